"""Losses used by the methods of the family."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def calibrated_cross_entropy(
    logits: jax.Array, labels: jax.Array, gamma: float = 1.0
) -> jax.Array:
  r"""CSAM's calibrated cross-entropy, averaged over the batch.

  With ``p_y = softmax(logits)[y]`` the probability of the true class:

  .. math::

    ℓ̃ = −\log p_y \ \text{ if } p_y ≤ ½, \qquad
    ℓ̃ = −(1 + p_y)^{−γ} \log p_y \ \text{ otherwise.}

  The modulating factor is differentiated (no stop-gradient): it is an
  ordinary loss. ``gamma=0`` gives the cross-entropy.

  Args:
    logits: ``[..., num_classes]`` unnormalized log-probabilities.
    labels: integer class labels of shape ``logits.shape[:-1]``.
    gamma: γ ∈ [0, 2] (0.5, 1 or 2 in the paper).

  Returns:
    The mean of ℓ̃ over every example, a float32 scalar.

  References:
    `Towards Understanding the Calibration Benefits of Sharpness-Aware
    Minimization <https://arxiv.org/abs/2505.23866>`_, ICLR 2026.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.losses import calibrated_cross_entropy
    >>> logits = jnp.array([[2.0, 0.0], [0.0, 0.0]])
    >>> float(calibrated_cross_entropy(logits, jnp.array([0, 1]), gamma=0.0))
    ... # doctest: +ELLIPSIS
    0.41...
  """
  check_logits_and_labels("calibrated_cross_entropy", logits, labels)
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  log_p = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  p = jnp.exp(log_p)
  modulation = jnp.where(p <= 0.5, 1.0, (1.0 + p) ** (-gamma))
  return jnp.mean(-modulation * log_p)


def check_logits_and_labels(where: str, logits: jax.Array, labels: jax.Array) -> None:
  """Raises ``ValueError`` unless logits are ``[..., C]`` and labels ``[...]`` ints."""
  logits_shape = jnp.shape(logits)
  labels_shape = jnp.shape(labels)
  if len(logits_shape) < 1 or logits_shape[:-1] != labels_shape:
    raise ValueError(
        f"{where}: logits must have shape [..., num_classes] and labels the"
        f" leading shape [...], got logits {logits_shape} and labels"
        f" {labels_shape}."
    )
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(
        f"{where}: labels must be integer class indices, got dtype"
        f" {jnp.result_type(labels)} (for one-hot targets take argmax)."
    )
  if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
    raise ValueError(
        f"{where}: logits must be floating point, got dtype {jnp.result_type(logits)}."
    )
