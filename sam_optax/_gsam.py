"""GSAM: surrogate-gap guided sharpness-aware minimization."""

from __future__ import annotations

import optax

from sam_optax import _ascent, _checks, _numerics
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation


def gsam(
    rho: Radius = 0.05,
    *,
    alpha: float = 0.1,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate-gap SAM (Zhuang et al., ICLR 2022, arXiv:2203.08065).

  .. math::

    g_p = ∇L(w + ρ_t g / (‖g‖ + δ)), \quad
    g_⊥ = g − \frac{⟨g, g_p⟩}{‖g_p‖^2 + δ} g_p, \quad
    \text{update direction } g_p − α g_⊥.

  ``g_⊥`` is the part of the clean gradient orthogonal to the SAM gradient;
  descending along ``−g_⊥`` (the ``−α g_⊥`` term) lowers the surrogate gap
  without touching the SAM loss to first order. In the paper ``ρ_t`` follows
  the learning-rate schedule: pass
  ``rho=sam_optax.rho_schedule_from_lr(lr_schedule, rho_max=..., rho_min=...,
  lr_max=..., lr_min=...)``. With ``sam_optax.PerDevice`` the ascent and
  the decomposition run per device and only the result is averaged. A
  ``mask`` restricts the ascent only; the decomposition sees every leaf.
  ``alpha=0`` (and a constant ρ) recovers SAM.

  Args:
    rho: the radius ρ_t ≥ 0, a float or an optax schedule.
    alpha: α, the weight of the ascent along the orthogonal component
      (0.6 for ViT-B/32 on ImageNet in the paper).
    loss_fn, has_aux, perturbation, mask, eps:
      see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain it before the base
    optimizer.

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> lr = optax.cosine_decay_schedule(0.1, 100)
    >>> rho = sam_optax.rho_schedule_from_lr(
    ...     lr, rho_max=0.1, rho_min=0.01, lr_max=0.1, lr_min=0.0)
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(sam_optax.gsam(rho, alpha=0.3, loss_fn=loss_fn),
    ...                  optax.sgd(lr))
    >>> params = jnp.ones(4)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=jnp.arange(4.0))
    >>> updates, state = tx.update(grads, state, params, x=jnp.arange(4.0))
  """
  _checks.check_non_negative("alpha", alpha, "gsam")

  def rule(grads, state, ascent, *, rho):
    sam_grads = ascent.gradient_at(ascent.normalized(grads), rho)
    # g_p − α g_⊥ = (1 + α c) g_p − α g with c = ⟨g, g_p⟩ / (‖g_p‖² + δ): one
    # elementwise pass over the leaves, no g_⊥ tree materialized.
    projection = _numerics.divide_by_norm(_numerics.vdot(grads, sam_grads), sam_grads,
                                        ascent.eps, squared=True)
    return _numerics.linear_combination(1.0 + alpha * projection, sam_grads,
                                      -alpha, grads, like=sam_grads), state

  return _ascent.transformation(
      "gsam", rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps)
