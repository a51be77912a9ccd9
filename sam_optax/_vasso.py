"""VaSSO: variance-suppressed SAM, the ascent along an EMA of the gradients."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks, _numerics
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation


class VaSSOState(NamedTuple):
  """State of :func:`vasso`.

  Attributes:
    count: steps taken; the argument of the ρ schedule.
    direction: ``d``, the EMA of the gradients (zeros before the first step).
    started: whether ``d`` holds a gradient (False before the first step,
      which sets ``d`` to that step's gradient).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  direction: optax.Updates
  started: jax.Array


def vasso(
    rho: Radius = 0.05,
    *,
    theta: float = 0.9,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Variance-suppressed SAM (Li & Giannakis, NeurIPS 2023, arXiv:2309.15639).

  The ascent follows an EMA of the gradients instead of the single,
  noisy ``g_t = ∇L(w_t)``:

  .. math::

    d_t = (1 − θ) d_{t−1} + θ g_t, \qquad
    g̃_t = ∇L(w_t + ρ d_t / (‖d_t‖ + δ)),

  with ``d`` set to the first gradient at the first step (which is plain
  SAM). The EMA is updated *before* the perturbation, so ``d_t`` includes
  ``g_t``. The transform returns ``g̃``. ``theta=1`` is SAM.

  This follows the official code, ``BingcongLi/VaSSO``, ``solver/vasso.py``,
  ``VASSO.first_step``: ``state['ema']`` is a clone of the first gradient,
  later ``ema.mul_(1 − θ).add_(grad, alpha=θ)``, then
  ``e_w = ema · ρ / (‖ema‖ + 1e-7)`` with the norm over every parameter
  (here ``δ = eps``, 1e-12 by default); ``θ ∈ [0, 1]`` as asserted there.

  Under a data-parallel option each device (or group) ascends along
  ``(1 − θ) d + θ g_i`` with its own ``g_i``, and the state keeps the
  average of those, ``(1 − θ) d + θ ḡ``, the same everywhere. A ``mask``
  restricts ``ε`` and its norm; ``d`` sees every leaf.

  Args:
    rho: ρ ≥ 0, a float or an optax schedule.
    theta: θ ∈ [0, 1], the weight of the new gradient (0.9 in the official
      README's example).
    loss_fn, has_aux, perturbation, mask, eps: see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`VaSSOState`;
    chain it before the base optimizer.

  References:
    Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023; code
    https://github.com/BingcongLi/VaSSO.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(sam_optax.vasso(0.05, theta=0.4, loss_fn=loss_fn),
    ...                  optax.sgd(0.05, momentum=0.9))
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda params, state: tx.update(
    ...     jax.grad(loss_fn)(params, x=x), state, params, x=x))
    >>> for _ in range(3):
    ...   updates, state = step(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> int(state[0].count)
    3
  """
  method = "vasso"
  _checks.check_in_range("theta", theta, 0.0, 1.0, method)

  def init(params: optax.Params) -> VaSSOState:
    return VaSSOState(count=jnp.zeros([], jnp.int32),
                      direction=jax.tree.map(jnp.zeros_like, params),
                      started=jnp.zeros([], jnp.bool_))

  def rule(grads, state, ascent, *, rho):
    # d starts as the first gradient; this group's d, and the state's (the mean).
    ema = lambda g: _numerics.moving_average(state.direction, g, 1.0 - theta,
                                           started=state.started)
    surrogate = ascent.gradient_at(ascent.normalized(ema(grads)), rho)
    return surrogate, state._replace(direction=ema(ascent.mean(grads)),
                                     started=jnp.ones([], jnp.bool_))

  return _ascent.transformation(
      method, rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps, init=init)
