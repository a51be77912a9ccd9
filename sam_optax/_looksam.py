"""LookSAM: a SAM step every k steps, its orthogonal component reused in between."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks, _numerics, _phase
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation


class LookSAMState(NamedTuple):
  """State of :func:`looksam`.

  Attributes:
    count: steps taken; the argument of the ρ schedule.
    orthogonal: ``g_v``, the component of the last SAM gradient orthogonal to
      the clean gradient of that step (zeros before step 0).
    ascent_next: whether the next step is a SAM step (``count mod k = 0``),
      for :func:`sam_optax.takes_ascent_step` (inside a wrapper that skips
      steps, such as ``every_k``, it is not advanced on the skipped steps;
      ``takes_ascent_step`` reads the outermost method's).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  orthogonal: optax.Updates
  ascent_next: jax.Array


def looksam(
    rho: Radius = 0.05,
    k: int = 5,
    alpha: float = 0.7,
    *,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM (Liu et al., CVPR 2022, arXiv:2203.02714).

  With ``g = ∇L(w)`` the incoming gradient, on every k-th step (``t mod k
  = 0``, from step 0) a full SAM step, which also stores the part of the SAM
  gradient orthogonal to ``g``:

  .. math::

    g̃ = ∇L(w + ρ g / (‖g‖ + δ)), \qquad
    g_v = g̃ − \frac{⟨g̃, g⟩}{‖g‖^2 + δ} g, \qquad \text{update direction } g̃;

  on the other steps no re-evaluation, the stored ``g_v`` is reused:

  .. math::

    \text{update direction } g + α \frac{‖g‖}{‖g_v‖ + δ} g_v.

  The choice is a ``jax.lax.cond``: the re-evaluation runs on the device
  only on the SAM steps. Or the caller chooses the phase when tracing: pass
  ``ascent_step=sam_optax.takes_ascent_step(opt_state)`` (a Python bool) to
  ``update`` and keep one compiled step per phase (see
  :func:`sam_optax.takes_ascent_step`); the step checks it against its count. Cost ≈ ``1 + 1/k`` gradient evaluations per step
  (XLA's ``cost_analysis`` counts the conditional as its costlier branch,
  so it reports SAM's flops). ``k=1`` is SAM. Norms are global (over the
  whole parameter pytree), as in the paper's formula; there is no official
  code and some ports decompose per tensor.

  Under a data-parallel option (``perturbation=``) the SAM gradient is that
  of :func:`sam_optax.sam` with the same option (per device, synchronized,
  per group of examples) averaged over the groups, and ``g`` in the formulas
  is the gradient averaged over them too, so ``g_v`` is the same on every
  device and the state stays replicated. A ``mask`` restricts the ascent;
  the decomposition sees every leaf.

  .. note::
    Inside a ``lax.cond`` the SAM step is slow for convolutions on XLA:CPU;
    see the note of :func:`sam_optax.every_k`. On CPU choose the phase
    statically (``ascent_step``).

  Args:
    rho: ρ ≥ 0, a float or an optax schedule (of the global step).
    k: the interval of the SAM steps, an int ≥ 1 (5 or 10 in the paper).
    alpha: α ≥ 0, the weight of the reused component (0.7).
    loss_fn, has_aux, perturbation, mask, eps: see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`LookSAMState`; chain it before the base optimizer.

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(sam_optax.looksam(0.05, k=5, alpha=0.7, loss_fn=loss_fn),
    ...                  optax.sgd(0.05, momentum=0.9))
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda params, state: tx.update(
    ...     jax.grad(loss_fn)(params, x=x), state, params, x=x))
    >>> for _ in range(6):  # steps 0 and 5 re-evaluate the gradient
    ...   updates, state = step(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> int(state[0].count)
    6
  """
  method = "looksam"
  _checks.check_int("k", k, 1, method, injectable=True)
  _checks.check_non_negative("alpha", alpha, method)

  def init(params: optax.Params) -> LookSAMState:
    return LookSAMState(count=jnp.zeros([], jnp.int32),
                        orthogonal=jax.tree.map(jnp.zeros_like, params),
                        ascent_next=jnp.asarray(True))

  def rule(grads, state, ascent, *, rho, ascent_step):
    # ``grads`` and ``sam_grads`` are per group (device, split); the surrogate
    # returned is too, and the skeleton averages it. What enters the state is
    # built from the averages ``g`` and ``g̃``, the same in every group.
    mean_grads = ascent.mean(grads)

    def sam_step():
      sam_grads = _numerics.cast_like(
          ascent.gradient_at(ascent.normalized(grads), rho), grads)
      orthogonal = _numerics.orthogonal_part(
          ascent.mean(sam_grads), mean_grads, ascent.eps, like=state.orthogonal)
      return sam_grads, orthogonal

    def reuse_step():
      scale = alpha * _numerics.divide_by_norm(
          _numerics.global_norm(mean_grads), state.orthogonal, ascent.eps)
      return _numerics.scaled_sum(grads, scale, state.orthogonal), state.orthogonal

    take = _phase.chosen_phase(method, ascent_step, state.count % k == 0)
    surrogate, orthogonal = _phase.cond(take, sam_step, reuse_step)
    next_count = optax.safe_increment(state.count)
    return surrogate, state._replace(orthogonal=orthogonal,
                                     ascent_next=next_count % k == 0)

  return _ascent.transformation(
      method, rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps, init=init, phased=True,
      unsupported={"Splits(sequential=True)": (
          "LookSAM stores g_v = the part of mean(g̃_i) orthogonal to mean(g_i), a"
          " non-linear function of the averages over all the groups, which a"
          " one-group-at-a-time loop has only after the last group (and its reuse"
          " steps scale by ‖mean(g_i)‖). Use sam_optax.Splits(n) (vectorized) or"
          " sam_optax.MicroBatches(n) (gradient accumulation with one ascent for the"
          " whole batch: global-batch LookSAM).")})
