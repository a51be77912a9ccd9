"""BSAM: bilateral sharpness-aware minimization."""

from __future__ import annotations

import optax

from sam_optax import _ascent, _numerics
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation


def bsam(
    rho_max: Radius = 0.05,
    rho_min: Radius = 0.05,
    *,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Bilateral SAM (Deng et al., 2024, arXiv:2409.13173; code ajiaaa/BSAM).

  With ``g_0 = ∇L(w)`` the incoming gradient and ``n = g_0 / (‖g_0‖ + δ)``:

  .. math::

    g_{max} = ∇L(w + ρ_{max} n), \quad g_{min} = ∇L(w − ρ_{min,t} n), \quad
    \text{update direction } g_{max} + \Big(g_0 − \frac{‖g_{max}‖}{‖g_{min}‖ + δ} g_{min}\Big).

  Max-sharpness (SAM's ascent) and min-sharpness (a descent step of the same
  kind) are combined into one flatness indicator. Three gradient evaluations
  per step (≈ 3× SGD). In the paper ``ρ_min,t = 0.05 · lr_t / lr_max`` decays
  with the learning rate: pass ``rho_min=sam_optax.rho_schedule_from_lr(lr,
  rho_max=0.05, rho_min=0.0, lr_max=lr_max)``.

  This is *bilateral* SAM. It is not Bayesian SAM (bSAM, Möllenhoff & Khan,
  ICLR 2023), which other libraries also call "BSAM".

  The step is applied at ``w``. The authors' PyTorch code never restores
  ``w`` after the min pass (an aliasing bug), so its published runs step from
  ``w − ρ_min,t · n`` instead; this implementation follows the formula.

  Args:
    rho_max: ρ_max ≥ 0, the radius of the ascent (max-sharpness) step.
    rho_min: ρ_min ≥ 0, the radius of the descent (min-sharpness) step, a
      float or a schedule.
    loss_fn, has_aux, perturbation, mask, eps:
      see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain it before the base
    optimizer.

  References:
    Deng et al., `Bilateral Sharpness-Aware Minimization for Flatter Minima
    <https://arxiv.org/abs/2409.13173>`_, 2024.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(sam_optax.bsam(0.05, 0.05, loss_fn=loss_fn),
    ...                  optax.sgd(0.05, momentum=0.9))
    >>> params = jnp.ones(4)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=jnp.arange(4.0))
    >>> updates, state = tx.update(grads, state, params, x=jnp.arange(4.0))
  """
  def rule(grads, state, ascent, *, rho_max, rho_min):
    direction = ascent.normalized(grads)
    max_grads = ascent.gradient_at(direction, rho_max)
    # The min pass starts once g_max is computed: run together, the two passes
    # would hold both passes' activations at once (see benchmarks/RESULTS.md).
    min_grads = ascent.gradient_at(_numerics.sequenced(direction, max_grads), -rho_min)
    ratio = _numerics.divide_by_norm(_numerics.global_norm(max_grads), min_grads, ascent.eps)
    flatness = _numerics.scaled_sum(grads, -ratio, min_grads, like=max_grads)
    return _numerics.scaled_sum(max_grads, 1.0, flatness), state

  return _ascent.transformation(
      "bsam", rule, radii={"rho_max": rho_max, "rho_min": rho_min},
      loss_fn=loss_fn, has_aux=has_aux, perturbation=perturbation, mask=mask,
      eps=eps)
