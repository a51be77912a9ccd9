"""ASAM: adaptive sharpness-aware minimization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks, _numerics
from sam_optax._ascent import Ascent, Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation


def not_a_bias(params: optax.Params) -> Any:
  """The authors' mask: True for every leaf except those named ``bias``.

  Kernels, embeddings and normalization scales are scaled by ``|w| + η``;
  biases get ``T = 1`` (still perturbed, still counted in the norm).

  Example:
    >>> import jax.numpy as jnp, sam_optax
    >>> sam_optax.not_a_bias({'dense': {'kernel': jnp.ones(2), 'bias': jnp.zeros(2)}})
    {'dense': {'bias': False, 'kernel': True}}
  """

  def is_scaled(path, _):
    last = path[-1] if path else None
    name = getattr(last, "key", getattr(last, "name", None))
    return not (isinstance(name, str) and "bias" in name.lower())

  return jax.tree_util.tree_map_with_path(is_scaled, params)


def adaptive_step(
    ascent: Ascent,
    grads: optax.Updates,
    rho: jax.Array | float,
    *,
    eta: float,
    adaptive_mask: Any | Callable[[optax.Params], Any] = not_a_bias,
) -> tuple[Any, jax.Array]:
  r"""ASAM's perturbation ``ε = step · direction``, the whole of its difference from SAM.

  .. math::

    T_w = |w| + η \ (T_w = 1 \text{ off the adaptive mask}), \qquad
    \text{direction} = T_w (m ⊙ T_w g), \qquad
    \text{step} = ρ / (‖m ⊙ T_w g‖ + δ),

  with ``m`` the perturbation mask of ``ascent``, in float32. :func:`asam`
  re-evaluates the gradient at ``ascent.perturbed_params(direction, step)``;
  :func:`sam_optax.sharpness.m_sharpness` (``method="asam"``) the loss there.

  Args:
    ascent: the neighbourhood of ``w`` (its params, mask and δ).
    grads: ``g``, the gradient at ``w``.
    rho: the radius ρ.
    eta: η ≥ 0.
    adaptive_mask: see :func:`asam`.

  Returns:
    ``(direction, step)``: a float32 pytree like the params and a scalar.
  """
  adaptive = adaptive_mask(ascent.params) if callable(adaptive_mask) else adaptive_mask
  scale = jax.tree.map(
      lambda w, scaled: (jnp.abs(_numerics.at_least_float32(w)) + eta)
      if scaled else jnp.ones([], jnp.float32),
      ascent.params, adaptive,
  )
  scaled_grads = ascent.restrict(jax.tree.map(
      lambda t, g: t * _numerics.at_least_float32(g), scale, grads))
  direction = jax.tree.map(lambda t, tg: t * tg, scale, scaled_grads)
  return direction, _numerics.divide_by_norm(rho, scaled_grads, ascent.eps)


def asam(
    rho: Radius = 0.5,
    *,
    eta: float = 0.01,
    loss_fn: LossFn | None = None,
    adaptive_mask: Any | Callable[[optax.Params], Any] = not_a_bias,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM (Kwon et al., ICML 2021, arXiv:2102.11600).

  .. math::

    T_w = |w| + η, \qquad ε = ρ · T_w^2 g / (‖T_w g‖ + δ), \qquad g̃ = ∇L(w + ε).

  With ``mask`` (``m``): ``ε = ρ · T_w (m ⊙ T_w g) / (‖m ⊙ T_w g‖ + δ)``.

  The scale operator makes the neighbourhood scale-invariant. Following the
  authors' code, ``T_w = 1`` on biases (``adaptive_mask=not_a_bias``); pass
  ``adaptive_mask=lambda p: jax.tree.map(lambda _: True, p)`` and ``eta=0``
  for the ports that scale every leaf.

  Args:
    rho: the radius ρ ≥ 0 (0.5 on CIFAR-10, 1.0 on CIFAR-100 / ImageNet), or
      an optax schedule.
    eta: η ≥ 0, added to ``|w|`` so that zero weights are perturbed too.
    loss_fn: see :func:`sam_optax.sam`.
    adaptive_mask: a pytree of bools like the params (True: ``T = |w| + η``,
      False: ``T = 1``) or a function of the params that returns one.
    has_aux, perturbation, mask, eps:
      see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain it before the base
    optimizer.

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum((p['kernel'] * x + p['bias']) ** 2)
    >>> params = {'kernel': jnp.ones(3), 'bias': jnp.zeros(3)}
    >>> tx = optax.chain(sam_optax.asam(0.5, loss_fn=loss_fn), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=jnp.arange(3.0))
    >>> updates, state = tx.update(grads, state, params, x=jnp.arange(3.0))
    >>> updates['kernel'].shape
    (3,)
  """
  _checks.check_non_negative("eta", eta, "asam")
  if isinstance(adaptive_mask, (bool, jax.Array)):
    # optax.inject_hyperparams takes a function argument it is not told is
    # static for a schedule and passes its value at the step (a bool).
    raise TypeError(
        "asam: adaptive_mask must be a pytree of bools like the params or a"
        f" function of the params, got {adaptive_mask!r}. Under"
        " optax.inject_hyperparams list the function arguments in static_args:"
        " optax.inject_hyperparams(sam_optax.asam, static_args=('loss_fn',"
        " 'adaptive_mask')).")

  def rule(grads, state, ascent, *, rho):
    direction, step = adaptive_step(ascent, grads, rho, eta=eta, adaptive_mask=adaptive_mask)
    return ascent.gradient_at(direction, step), state

  return _ascent.transformation(
      "asam", rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps)
