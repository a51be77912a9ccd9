"""FriendlySAM: SAM's ascent with the batch-clean gradient's EMA subtracted."""

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


class FSAMState(NamedTuple):
  """State of :func:`fsam`.

  Attributes:
    count: steps taken; the argument of the ρ schedule.
    momentum: ``m``, the EMA of the raw gradients (zeros before the first step).
    started: whether ``m`` holds a gradient (False before the first step, which
      sets ``m`` to that step's gradient).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  momentum: optax.Updates
  started: jax.Array


def fsam(
    rho: Radius = 0.05,
    *,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""FriendlySAM (Li et al., CVPR 2024, arXiv:2403.12350).

  With ``g_t = ∇L(w_t)`` the incoming gradient and ``m`` an EMA of the raw
  gradients, the ascent follows only the *batch-specific* part of the
  gradient, its full-data component (estimated by ``m``) removed:

  .. math::

    d_t = g_t − σ m_{t−1}, \qquad m_t = λ m_{t−1} + (1 − λ) g_t, \qquad
    g̃_t = ∇L(w_t + ρ d_t / (‖d_t‖ + δ)),

  with ``m`` set to the first gradient at the first step, which is plain
  SAM (``d_0 = g_0``). The EMA takes the raw ``g_t``, not ``d_t``; the norm
  is global, taken after the subtraction. The transform returns ``g̃``.

  This follows the official code, ``nblt/F-SAM``, ``utils.py``,
  ``FriendlySAM.first_step``: ``momentum`` is stored as a clone of the first
  gradient with ``p.grad`` left untouched (so step 0 ascends along ``g_0``,
  not along ``g_0 − σ g_0``); at later steps ``p.grad -= σ·momentum`` uses
  the previous ``momentum``, which is then updated with the cloned raw
  gradient; ``scale = ρ / (‖p.grad‖ + 1e-12)`` over every parameter. Ports
  that feed the corrected gradient ``d`` into the EMA, or start ``m`` at
  zero (so ``d_0 = g_0`` but ``m_0 = (1 − λ) g_0``), are different
  algorithms.

  Under a data-parallel option the ascent ``d`` uses each device's (or
  group's) own ``g``, and ``m`` is updated with the gradient averaged over
  them, so it stays the same everywhere. A ``mask`` restricts ``ε`` and its
  norm; ``m`` sees every leaf. ``sigma=0`` is SAM.

  Args:
    rho: ρ ≥ 0, a float or an optax schedule.
    sigma: σ ≥ 0, the weight of the subtracted EMA (1 in the paper).
    lmbda: λ ∈ [0, 1], the EMA's decay (0.6 and 0.95 in the official runs'
      logs, with σ = 1).
    loss_fn, has_aux, perturbation, mask, eps: see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`FSAMState`;
    chain it before the base optimizer.

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024; code
    https://github.com/nblt/F-SAM.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(sam_optax.fsam(0.05, sigma=1.0, lmbda=0.9, loss_fn=loss_fn),
    ...                  optax.sgd(0.05, momentum=0.9))
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda params, state: tx.update(
    ...     jax.grad(loss_fn)(params, x=x), state, params, x=x))
    >>> for _ in range(3):
    ...   updates, state = step(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(state[0].started)
    True
  """
  method = "fsam"
  _checks.check_non_negative("sigma", sigma, method)
  _checks.check_in_range("lmbda", lmbda, 0.0, 1.0, method)

  def init(params: optax.Params) -> FSAMState:
    return FSAMState(count=jnp.zeros([], jnp.int32),
                     momentum=jax.tree.map(jnp.zeros_like, params),
                     started=jnp.zeros([], jnp.bool_))

  def rule(grads, state, ascent, *, rho):
    # At the first step σ acts as 0 and m starts as g: d = g and m = g.
    s = jnp.where(state.started, sigma, 0.0).astype(jnp.float32)
    direction = _numerics.scaled_sum(grads, -s, state.momentum, like=grads)
    momentum = _numerics.moving_average(state.momentum, ascent.mean(grads), lmbda,
                                      started=state.started)
    surrogate = ascent.gradient_at(ascent.normalized(direction), rho)
    return surrogate, state._replace(momentum=momentum,
                                     started=jnp.ones([], jnp.bool_))

  return _ascent.transformation(
      method, rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps, init=init)
