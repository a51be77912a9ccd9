"""CSAM: calibrated sharpness-aware minimization."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks, _loss, _numerics, losses
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._parallel import Perturbation


def csam(
    rho: Radius = 0.05,
    *,
    gamma: float = 1.0,
    logits_fn: Callable[..., Any],
    normalize: bool = True,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Calibrated SAM (arXiv:2505.23866, ICLR 2026).

  The ascent is SAM's, along the incoming gradient ``g`` of the mean
  cross-entropy; the descent gradient is that of the calibrated loss
  (:func:`sam_optax.losses.calibrated_cross_entropy`) at the perturbed weights:

  .. math::

    ŵ = w + ρ g / (‖g‖ + δ), \qquad
    g̃ = ∇_w \operatorname{mean} ℓ̃(f_{ŵ}(x), y), \quad
    ℓ̃ = −\log p̃_y \ (p̃_y ≤ ½), \ \ −(1 + p̃_y)^{−γ} \log p̃_y \ (p̃_y > ½).

  ``gamma=0`` recovers SAM on the cross-entropy. Cost equals SAM's.

  Args:
    rho: ρ ≥ 0 (0.05 CIFAR-10 / ImageNet ResNet, 0.2 CIFAR-100 / ViT), or a
      schedule.
    gamma: γ ∈ [0, 2] (the theory's range; 0.5, 1 or 2 in the paper).
    logits_fn: ``logits_fn(params, **extra_args) -> (logits, labels)`` with
      logits ``[..., num_classes]`` and integer labels ``[...]``; with
      ``has_aux=True`` it returns ``((logits, labels), aux)``. The incoming
      gradient must be that of the mean cross-entropy of these logits.
    normalize: SAM's normalized ascent (True) or USAM's ``w + ρ g``.
    has_aux, perturbation, mask, eps:
      see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain it before the base
    optimizer.

  References:
    `Towards Understanding the Calibration Benefits of Sharpness-Aware
    Minimization <https://arxiv.org/abs/2505.23866>`_, ICLR 2026.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def logits_fn(params, x, y):
    ...   return x @ params, y
    >>> def loss_fn(params, x, y):
    ...   logits, labels = logits_fn(params, x, y)
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    >>> x, y = jnp.eye(3), jnp.array([0, 1, 2])
    >>> params = jnp.zeros((3, 3))
    >>> tx = optax.chain(sam_optax.csam(0.05, gamma=1.0, logits_fn=logits_fn),
    ...                  optax.sgd(0.5))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=x, y=y)
    >>> updates, state = tx.update(grads, state, params, x=x, y=y)
    >>> updates.shape
    (3, 3)
  """
  _checks.check_callable("logits_fn", logits_fn, "csam", required=True)
  _checks.check_in_range("gamma", gamma, 0.0, 2.0, "csam")

  def logits_and_labels(params, **kwargs):
    out = logits_fn(params, **kwargs)
    pair = out[0] if has_aux else out
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(
          "csam: logits_fn must return (logits, labels)"
          + (" as the first element of (…, aux) since has_aux=True" if has_aux else "")
          + f", got {type(pair).__name__}."
      )
    losses.check_logits_and_labels("csam: logits_fn", *pair)
    return pair

  def calibrated_loss(params, **kwargs):
    logits, labels = logits_and_labels(params, **kwargs)
    return losses.calibrated_cross_entropy(logits, labels, gamma)

  def cross_entropy(params, **kwargs):
    logits, labels = logits_and_labels(params, **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits, jnp.float32), labels).mean()

  def gradient_of(loss):
    def factory(params, extra_args: Mapping[str, Any]):
      del params
      arguments = _loss.loss_arguments("csam", "logits_fn", logits_fn, extra_args)
      return lambda point: jax.grad(loss)(point, **arguments)
    return factory

  def rule(grads, state, ascent, *, rho):
    direction = ascent.normalized(grads) if normalize else grads
    return ascent.gradient_at(direction, rho), state

  return _ascent.transformation(
      "csam", rule, radii={"rho": rho}, loss_fn=None, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps,
      gradient_factory=gradient_of(calibrated_loss),
      ascent_gradient_factory=gradient_of(cross_entropy),
  )
