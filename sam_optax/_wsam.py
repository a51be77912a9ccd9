"""WSAM: weighted SAM, sharpness as a weighted regularization term."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import optax

from sam_optax import _ascent, _checks, _numerics, _parallel
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation


class WSAMDecoupledState(NamedTuple):
  """State of :func:`wsam_decoupled`.

  Attributes:
    sharpness: the state of the sharpness term (its ``count`` is the step,
      the argument of the ρ and learning-rate schedules).
    base: the base optimizer's state.
  """

  sharpness: _ascent.SAMState
  base: optax.OptState


def _alpha(method: str, gamma: float) -> float:
  """``α = γ / (1 − γ)``, with ``γ ∈ [0, 1)`` checked."""
  if _checks.is_traced(gamma):  # pylint: disable=protected-access
    return gamma / (1.0 - gamma)  # under optax.inject_hyperparams and jit
  number = _checks.real_number(gamma)  # pylint: disable=protected-access
  if number is None or not 0.0 <= number < 1.0:
    raise ValueError(
        f"{method}: gamma must be in [0, 1) (the sharpness weight is"
        f" gamma / (1 - gamma)), got gamma={gamma!r}.")
  return number / (1.0 - number)


def _transformation(method, rho, gamma, keep_gradient, *, loss_fn, has_aux,
                    perturbation, mask, eps):
  """``keep·g + α (g̃ − g)`` with ``g̃`` SAM's gradient: ``keep = 1`` is the
  coupled WSAM surrogate, ``keep = 0`` the decoupled sharpness term."""
  alpha = _alpha(method, gamma)
  keep = 1.0 if keep_gradient else 0.0

  def rule(grads, state, ascent, *, rho):
    sam_grads = ascent.gradient_at(ascent.normalized(grads), rho)
    surrogate = jax.tree.map(
        lambda g, s: keep * _numerics.at_least_float32(g)
        + alpha * (_numerics.at_least_float32(s) - _numerics.at_least_float32(g)),
        grads, sam_grads)
    return surrogate, state

  return _ascent.transformation(
      method, rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps)


def wsam(
    rho: Radius = 0.05,
    *,
    gamma: float = 0.9,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted SAM, coupled form (Yue et al., KDD 2023, arXiv:2305.15817).

  WSAM minimizes ``L(w) + α (L(w + ε) − L(w))``: the loss plus the
  sharpness weighted by ``α = γ / (1 − γ)``. With ``g = ∇L(w)`` and SAM's
  ``g̃ = ∇L(w + ρ g / (‖g‖ + δ))``, the transform returns

  .. math::

    g + α (g̃ − g) = α g̃ + (1 − α) g.

  ``gamma=0`` is the base optimizer on ``g``; ``gamma=0.5`` (α = 1) is SAM.

  This is the official code's ``decouple=False`` branch (``dlrover``,
  ``atorch/atorch/optimizers/wsam.py``, ``WeightedSAM.second_step``:
  ``p.grad.mul_(α).add_(grad, alpha=1 − α)``). The authors recommend the
  *decoupled* form (``decouple=True``, their default and the paper's
  experiments): the base optimizer steps on ``g`` alone and the sharpness
  term is applied outside its momentum or Adam statistics; that needs the
  base optimizer and its learning rate, see :func:`wsam_decoupled`. The two
  agree under plain SGD only. The official code also clips ``g`` and ``g̃``
  to a global norm (``max_norm``, default 1.0; ``None`` in its README's
  example); here no clipping is applied.

  A ``mask`` restricts ``ε`` and its norm; the combination sees every leaf.

  Args:
    rho: ρ ≥ 0, a float or an optax schedule.
    gamma: γ ∈ [0, 1), the sharpness weight's parameter (0.88 is the
      official code's default, 0.9 its README's).
    loss_fn, has_aux, perturbation, mask, eps: see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain it before the base
    optimizer.

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness
    as a Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023;
    code https://github.com/intelligent-machine-learning/dlrover
    (``atorch/atorch/optimizers/wsam.py``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(sam_optax.wsam(0.05, gamma=0.9, loss_fn=loss_fn),
    ...                  optax.sgd(0.05))
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=x)
    >>> updates, state = tx.update(grads, state, params, x=x)
  """
  return _transformation("wsam", rho, gamma, True, loss_fn=loss_fn, has_aux=has_aux,
                         perturbation=perturbation, mask=mask, eps=eps)


def wsam_decoupled(
    base_optimizer: optax.GradientTransformation,
    learning_rate: float | optax.Schedule,
    rho: Radius = 0.05,
    *,
    gamma: float = 0.9,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted SAM, decoupled form: the whole optimizer around a base.

  The form the authors recommend (Yue et al., KDD 2023): the base optimizer
  steps on the clean gradient ``g`` alone, and the sharpness term, scaled
  by the learning rate ``η_t``, is added outside its statistics:

  .. math::

    u_t = \text{base}(g_t) − η_t · α (g̃_t − g_t), \qquad α = γ / (1 − γ),

  with ``g̃ = ∇L(w + ρ g / (‖g‖ + δ))`` and ``u_t`` the update of
  ``optax.apply_updates``. This is the official code's ``decouple=True``
  branch (``dlrover``, ``atorch/atorch/optimizers/wsam.py``,
  ``WeightedSAM.second_step``: ``p.grad`` is reset to ``g`` before
  ``base_optimizer.step()``, then ``p.add_(g̃ − g, alpha=−lr·α)`` with the
  param group's current ``lr``). Momentum and Adam's moments see ``g``
  only, so it differs from :func:`wsam` (the coupled form) for every base
  but plain SGD.

  Because the term must bypass the base optimizer, this is not a transform
  to chain before one: it *is* the optimizer. Pass the base and the same
  learning rate (or schedule) that the base was built with::

    lr = optax.cosine_decay_schedule(0.1, steps)
    tx = sam_optax.wsam_decoupled(optax.sgd(lr, momentum=0.9), lr, rho=0.05,
                                  gamma=0.9, loss_fn=loss_fn)
    updates, state = tx.update(grads, state, params, batch=batch)
    params = optax.apply_updates(params, updates)

  A schedule is evaluated at the step count, as optax's own schedules are
  (step 0 first). Weight decay belongs in the base (``optax.adamw``, or
  ``optax.add_decayed_weights`` inside it), as in the official code.

  Under a data-parallel option pass the local gradient, as to :func:`wsam`:
  the base steps on the gradient averaged over the option's axis.

  Args:
    base_optimizer: the base optimizer (an optax ``GradientTransformation``
      whose updates include ``−η_t``, such as ``optax.sgd`` or
      ``optax.adamw``).
    learning_rate: ``η_t`` of the base, a float or an optax schedule.
    rho, gamma, loss_fn, has_aux, perturbation, mask, eps: see :func:`wsam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`WSAMDecoupledState`: the whole optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> lr = 0.05
    >>> tx = sam_optax.wsam_decoupled(optax.sgd(lr, momentum=0.9), lr, 0.05,
    ...                               gamma=0.9, loss_fn=loss_fn)
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=x)
    >>> updates, state = tx.update(grads, state, params, x=x)
    >>> params = optax.apply_updates(params, updates)
    >>> int(state.sharpness.count)
    1
  """
  method = "wsam_decoupled"
  base = _checks.check_base(method, base_optimizer)
  _check_learning_rate(method, learning_rate)
  sharpness = _transformation(method, rho, gamma, False, loss_fn=loss_fn, has_aux=has_aux,
                              perturbation=perturbation, mask=mask, eps=eps)
  axis_name = _parallel.axis_of(perturbation)

  def init(params: optax.Params) -> WSAMDecoupledState:
    return WSAMDecoupledState(sharpness.init(params), base.init(params))

  def update(updates, state, params=None, **extra_args):
    step_size = _numerics.radius_at(learning_rate, state.sharpness.count)
    term, sharpness_state = sharpness.update(updates, state.sharpness, params, **extra_args)
    base_updates, base_state = base.update(
        _parallel.mean_over_axis(updates, axis_name), state.base, params, **extra_args)
    new_updates = _numerics.scaled_sum(base_updates, -step_size, term)
    return new_updates, WSAMDecoupledState(sharpness_state, base_state)

  return optax.GradientTransformationExtraArgs(init, update)


def _check_learning_rate(method: str, value: Any) -> None:
  if callable(value) or _checks.is_traced(value):  # pylint: disable=protected-access
    return
  number = _checks.real_number(value)  # pylint: disable=protected-access
  if number is None or not math.isfinite(number):
    raise ValueError(
        f"{method}: learning_rate must be a finite float or an optax schedule"
        f" (the base optimizer's), got learning_rate={value!r}.")
