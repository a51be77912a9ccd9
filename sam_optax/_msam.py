"""MSAM: momentum-SAM, the ascent along the momentum at no extra gradient."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks, _numerics, _parallel
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._parallel import Perturbation


class MSAMState(NamedTuple):
  """State of :func:`msam`.

  Attributes:
    count: steps taken; the argument of the ρ schedule.
    momentum: ``m``, the EMA of the gradients (zeros before the first step).
    perturbation: ``ε``, the offset of the params the user holds from the
      evaluation weights (zeros before the first step).
    base: the base optimizer's state.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  momentum: optax.Updates
  perturbation: optax.Updates
  base: optax.OptState


def _sub(a, b):
  """``a − b`` in float32, in the dtypes of ``a``."""
  return jax.tree.map(
      lambda x, y: (_numerics.at_least_float32(x) - _numerics.at_least_float32(y)).astype(x.dtype),
      a, b)


def msam(
    base_optimizer: optax.GradientTransformation,
    rho: Radius = 0.3,
    *,
    momentum: float = 0.9,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM (Becker, Altrock & Risse, 2024, arXiv:2401.12033).

  SAM's ascent costs a second gradient. MSAM perturbs instead along the
  *negative momentum*, which needs no gradient, and takes the one gradient
  of the step at the perturbed point. With ``w_t`` the evaluation weights
  and ``m`` an EMA of the gradients:

  .. math::

    w̃_t = w_t + ε_t, \qquad g_t = ∇L(w̃_t), \qquad
    m_{t+1} = μ m_t + (1 − μ) g_t, \\
    w_{t+1} = w_t + \text{base}(g_t), \qquad
    ε_{t+1} = −ρ · m_{t+1} / (‖m_{t+1}‖ + δ),

  starting from ``m_0 = 0`` and ``ε_0 = 0`` (step 0 is the base's step).

  **What the training step must do.** The params the user holds (and
  differentiates at) are the *perturbed* weights ``w̃``; this transform is
  the whole optimizer, built around the base, and moves them from ``w̃_t``
  to ``w̃_{t+1}`` (it removes ``ε_t``, applies the base's update, adds
  ``ε_{t+1}``)::

    tx = sam_optax.msam(optax.sgd(lr, momentum=0.9), rho=0.3)
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params, batch)   # at the perturbed params
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ...
    eval_params = sam_optax.msam_eval_params(state, params)  # w, for evaluation

  Evaluate, checkpoint for inference or re-estimate BatchNorm statistics at
  :func:`msam_eval_params`, as with ``optax.contrib.schedule_free``. Do not
  chain another transform after it that changes the updates (that would
  break ``w̃ = w + ε``); put gradient clipping or weight decay in the base.

  Official code: ``MarlonBecker/MSAM``, ``optimizer/msam.py``, ``MSAM.step``
  (SGD) and ``optimizer/adamW_msam.py``, ``adamW_msam`` (AdamW). There the
  ascent uses the base's own buffer (SGD's ``v ← μ v + g`` or Adam's
  ``exp_avg``): ``param.add_(buf, ρ/‖buf‖)`` returns to ``w``, the base
  steps, ``param.sub_(buf_new, ρ/(‖buf_new‖ + 1e-12))`` perturbs again;
  ``main.py`` moves back to ``w`` (``move_back_from_momentumAscent``) for
  evaluation. A transform cannot read an optax base's state, so MSAM keeps
  its own EMA with ``momentum = μ`` (or Adam's ``b1``): normalized, it is
  the same direction as both buffers (SGD's sum ``Σ μ^k g`` and Adam's EMA
  differ by a scalar). Differences, all of order ``ρ·wd`` or ``lr²·wd``:
  the official SGD variant adds weight decay to the gradient before its
  buffer (so the direction includes ``wd·w̃``) where here the EMA sees the
  loss gradient and the base its own decay at ``w``; the official AdamW
  variant decays after its step; the official SGD variant returns with the
  current ρ of a ρ schedule, here with the stored ``ε``.

  Data parallelism: the perturbation comes from the EMA, which must be the
  same on every device, and no gradient is re-evaluated, so only
  ``perturbation=None`` (the gradient given, e.g. under a sharded
  ``jax.jit``) and ``sam_optax.Synced(axis_name)`` (the local gradient is
  averaged over the axis first) are accepted. A ``mask`` restricts ``ε``
  and its norm; the EMA sees every leaf.

  Args:
    base_optimizer: the base optimizer (``optax.sgd(lr, momentum=0.9)`` or
      ``optax.adamw(...)`` in the paper).
    rho: ρ ≥ 0, a float or an optax schedule. The official constructors
      default to 0.3 (SGD) and 1 (AdamW), and its README's runs use ρ = 3,
      larger than SAM's: ‖ε‖ is measured against steps of the momentum.
    momentum: μ ∈ [0, 1), the EMA's decay; the base's momentum (or ``b1``)
      for the official algorithm.
    perturbation: None or ``sam_optax.Synced(axis_name)``.
    mask, eps: see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an :class:`MSAMState`:
    the whole optimizer.

  References:
    Becker, Altrock & Risse, `Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead <https://arxiv.org/abs/2401.12033>`_,
    2024; code https://github.com/MarlonBecker/MSAM.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = sam_optax.msam(optax.sgd(0.05, momentum=0.9), rho=0.3)
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss_fn)(params, x)  # at the perturbed weights
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> eval_params = sam_optax.msam_eval_params(state, params)
    >>> bool(jnp.allclose(jnp.linalg.norm(params - eval_params), 0.3))
    True
  """
  method = "msam"
  base = _checks.check_base(method, base_optimizer)
  _checks.check_radius("rho", rho, method)
  traced = _checks.is_traced(momentum)  # pylint: disable=protected-access
  number = None if traced else _checks.real_number(momentum)  # pylint: disable=protected-access
  if not traced and (number is None or not 0.0 <= number < 1.0):
    raise ValueError(f"{method}: momentum must be in [0, 1), got momentum={momentum!r}"
                     " (at 1 the EMA would never see a gradient).")
  _checks.check_positive("eps", eps, method)
  _parallel.check_perturbation(method, perturbation)
  if isinstance(perturbation, _parallel.MicroBatches):
    raise ValueError(
        f"{method}: perturbation={perturbation!r} is not supported: MSAM re-evaluates no"
        " gradient, so there is nothing to accumulate inside it. Give update() the"
        " gradient accumulated over the micro-batches (sam_optax.accumulated_grad(loss_fn,"
        " n) at the weights you hold), or wrap it: optax.MultiSteps(msam(...), k), which"
        " is right for MSAM.")
  if isinstance(perturbation, (_parallel.PerDevice, _parallel.Splits)):
    raise TypeError(
        f"{method}: perturbation={perturbation!r} is not supported: MSAM"
        " re-evaluates no gradient (its ascent follows the EMA of past gradients,"
        " which must be the same on every device and group), so there is no"
        " per-device or per-group ascent. Use None or sam_optax.Synced(axis_name).")
  if mask is not None and not callable(mask):
    _ascent.resolve_mask(method, mask, mask)
  axis_name = _parallel.axis_of(perturbation)

  def init(params: optax.Params) -> MSAMState:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return MSAMState(count=jnp.zeros([], jnp.int32), momentum=zeros, perturbation=zeros,
                     base=base.init(params))

  def update(updates, state, params=None, **extra_args):
    _checks.check_update_inputs(method, updates, params)
    grads = _parallel.mean_over_axis(updates, axis_name)
    weights = _sub(params, state.perturbation)  # w = w̃ − ε
    base_updates, base_state = base.update(grads, state.base, weights, **extra_args)
    ema = _numerics.moving_average(state.momentum, grads, jnp.float32(momentum))
    ascent = _ascent.Ascent(weights, None, _ascent.resolve_mask(method, mask, params), eps,
                            lambda tree: tree)
    scale = -_numerics.radius_at(rho, state.count)
    new_perturbation = jax.tree.map(lambda n, p: (scale * n).astype(p.dtype),
                                    ascent.normalized(ema), params)
    # w̃_{t+1} − w̃_t = base(g) + ε_{t+1} − ε_t
    new_updates = jax.tree.map(
        lambda u, new, old, like: (_numerics.at_least_float32(u) + _numerics.at_least_float32(new)
                                   - _numerics.at_least_float32(old)).astype(like.dtype),
        base_updates, new_perturbation, state.perturbation, updates)
    return new_updates, MSAMState(count=optax.safe_increment(state.count), momentum=ema,
                                  perturbation=new_perturbation, base=base_state)

  return optax.GradientTransformationExtraArgs(init, update)


def msam_eval_params(state: MSAMState, params: optax.Params) -> optax.Params:
  """The evaluation weights ``w = w̃ − ε`` of :func:`msam`.

  Args:
    state: the state of :func:`msam` (``tx.init``/``tx.update``'s).
    params: the params the training step holds, ``w̃``.

  Returns:
    ``w``, the weights to evaluate, checkpoint for inference, or compute
    BatchNorm statistics at.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = sam_optax.msam(optax.sgd(0.1, momentum=0.9))
    >>> params = jnp.ones(3)
    >>> state = tx.init(params)
    >>> bool(jnp.all(sam_optax.msam_eval_params(state, params) == params))
    True
  """
  if not isinstance(state, MSAMState):
    raise TypeError(
        "msam_eval_params: state must be the MSAMState of sam_optax.msam(...),"
        f" got {type(state).__name__}.")
  return _sub(params, state.perturbation)
