"""Losses used by the methods of the family."""

from __future__ import annotations

from typing import NamedTuple

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


class TrajectoryTarget(NamedTuple):
  """What the trajectory loss of SAF and MESA compares the current logits to.

  Built by :func:`sam_optax.saf_target` or :func:`sam_optax.mesa_target` for
  one batch and passed to :func:`trajectory_loss` inside the user's loss
  function. It is a pytree of arrays, so it can be an argument of a jitted
  or ``jax.value_and_grad``-ed loss.

  Attributes:
    logits: ``[batch, num_classes]`` float32 target logits ``z_past`` (SAF:
      the logits of the same examples ``Ẽ`` epochs ago; MESA: the logits of
      the EMA weights). They carry no gradient.
    mask: ``[batch]`` float32, 1 for the examples that count and 0 for
      padding or an example index out of range.
    weight: scalar float32, λ while the trajectory loss is on
      (``E_start < e < E_end``) and 0 otherwise.
    tau: scalar float32, the temperature τ.
  """

  logits: jax.Array
  mask: jax.Array
  weight: jax.Array
  tau: jax.Array


def trajectory_kl(
    logits: jax.Array,
    target_logits: jax.Array,
    tau: float | jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
  r"""``τ² · mean_batch KL(softmax(z_target/τ) ‖ softmax(z/τ))``, in float32.

  .. math::

    τ^2 \frac{1}{\sum_i m_i} \sum_i m_i \sum_c p_{ic} (\log p_{ic} − \log q_{ic}),
    \quad p_i = \operatorname{softmax}(z^{target}_i / τ),
    \quad q_i = \operatorname{softmax}(z_i / τ).

  The target is a constant (``jax.lax.stop_gradient``); the gradient with
  respect to the logits is ``τ m_i (q_i − p_i) / Σ m``. With every ``m_i = 0``
  the result is 0.

  Args:
    logits: ``[batch, num_classes]`` current logits ``z``.
    target_logits: ``[batch, num_classes]`` target logits.
    tau: the temperature τ > 0.
    mask: optional ``[batch]`` weights (1 = counts, 0 = padding); default all 1.

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.losses import trajectory_kl
    >>> z = jnp.array([[1.0, 0.0, -1.0]])
    >>> float(trajectory_kl(z, z, tau=5.0))
    0.0
  """
  logits_shape, target_shape = jnp.shape(logits), jnp.shape(target_logits)
  if len(logits_shape) != 2 or logits_shape != target_shape:
    raise ValueError(
        "trajectory_kl: logits and target logits must both have shape [batch,"
        f" num_classes], got logits {logits_shape} and target {target_shape}.")
  if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
    raise ValueError(
        f"trajectory_kl: logits must be floating point, got {jnp.result_type(logits)}.")
  if mask is None:
    mask = jnp.ones(logits_shape[:1], jnp.float32)
  elif jnp.shape(mask) != logits_shape[:1]:
    raise ValueError(
        f"trajectory_kl: mask must have shape [batch] = {logits_shape[:1]}, got"
        f" {jnp.shape(mask)}.")
  tau = jnp.asarray(tau, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  log_p = jax.nn.log_softmax(
      jax.lax.stop_gradient(jnp.asarray(target_logits, jnp.float32)) / tau, axis=-1)
  log_q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / tau, axis=-1)
  # p·(log p − log q) with log p finite: an underflowed p gives 0, not NaN.
  per_example = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  total = jnp.sum(mask * per_example)
  return tau**2 * total / jnp.maximum(jnp.sum(mask), 1.0)


def trajectory_loss(logits: jax.Array, target: TrajectoryTarget) -> jax.Array:
  r"""SAF / MESA's trajectory loss ``λ · τ² · mean_batch KL(softmax(z_past/τ) ‖ softmax(z/τ))``.

  Add it to the task loss inside the loss function that the training step
  differentiates, so that it shares the step's single forward and backward
  pass::

    target = sam_optax.saf_target(opt_state, batch['index'])
    def loss_fn(params):
      logits = apply(params, batch['x'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
      return ce + sam_optax.losses.trajectory_loss(logits, target), logits

  ``target.weight`` is λ inside the active epochs and 0 outside them (then
  the gradient is exactly the task loss's). See :func:`trajectory_kl` for
  the formula and :func:`sam_optax.saf` / :func:`sam_optax.mesa` for the
  training step.

  Args:
    logits: ``[batch, num_classes]`` the logits of the training forward pass.
    target: the :class:`TrajectoryTarget` of this batch.

  Returns:
    A float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax.losses import TrajectoryTarget, trajectory_loss
    >>> target = TrajectoryTarget(logits=jnp.zeros((1, 2)), mask=jnp.ones(1),
    ...                           weight=jnp.float32(0.3), tau=jnp.float32(5.0))
    >>> round(float(trajectory_loss(jnp.array([[5.0, -5.0]]), target)), 3)
    3.253
  """
  if not isinstance(target, TrajectoryTarget):
    raise TypeError(
        "trajectory_loss: target must be a sam_optax.losses.TrajectoryTarget"
        " (from sam_optax.saf_target or sam_optax.mesa_target), got"
        f" {type(target).__name__}.")
  return target.weight * trajectory_kl(logits, target.logits, target.tau, target.mask)
