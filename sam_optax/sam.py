"""SAM: sharpness-aware minimization, normalized (SAM) and unnormalized (USAM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optax

from sam_optax import _ascent
from sam_optax._ascent import LossFn, Radius


def sam(
    rho: Radius = 0.05,
    *,
    loss_fn: LossFn | None = None,
    normalize: bool = True,
    has_aux: bool = False,
    axis_name: str | None = None,
    batch_splits: int | None = None,
    batch_argnames: Sequence[str] = ("batch",),
    sync_perturbation: bool = False,
    eps: float = _ascent.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization (Foret et al., ICLR 2021, arXiv:2010.01412).

  With ``g = ∇L(w)`` the incoming gradient:

  .. math::

    ŵ = w + ρ · g / (‖g‖ + δ)  \quad (\text{USAM, normalize=False: } ŵ = w + ρ · g),
    \qquad g̃ = ∇L(ŵ).

  The transform returns ``g̃``; the base optimizer chained after it applies
  ``g̃`` at the original ``w``. Norms are accumulated in float32. Cost: one
  extra forward and backward pass per step (≈ 2× SGD).

  With ``axis_name`` (inside ``jax.pmap`` or ``shard_map``), each device
  perturbs with its *own* gradient, so pass the local, un-averaged gradient
  (m-sharpness with m = the per-device batch, as in the paper); ``g̃`` is
  averaged across the axis once. Pass an already averaged gradient to
  perturb all devices with the same, synchronized, direction.

  Weight decay belongs in the base optimizer after this transform
  (``optax.chain(sam(...), optax.add_decayed_weights(wd), optax.sgd(lr))``,
  or AdamW), so the ascent uses the plain loss gradient as every reference
  code does.

  Args:
    rho: the radius ρ ≥ 0 of the neighbourhood, or an optax schedule of the
      step count.
    loss_fn: ``loss_fn(params, **extra_args) -> scalar``; the extra arguments
      of ``update`` are passed to it by keyword. If None, ``update`` takes it
      as the keyword ``loss_fn``.
    normalize: True for SAM's normalized ascent, False for USAM.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``. The ``aux`` of the
      re-evaluation is dropped: model state such as BatchNorm statistics is
      taken from the user's own first pass (see the README).
    axis_name: the data-parallel axis (of ``jax.pmap`` or ``shard_map``) to
      average the surrogate gradient over, once.
    batch_splits: m-sharpness inside a device: split the batch into this many
      groups of ``m = B / batch_splits`` examples and perturb each group with
      its own gradient (recomputed, vectorized: one extra pass); the
      surrogate is the mean over groups. Under ``jax.jit`` with a batch
      sharded over ``n`` devices, ``batch_splits=n`` gives the per-device
      perturbation of ``pmap``.
    batch_argnames: the extra arguments of ``update`` that ``batch_splits``
      splits along axis 0 (model state such as BatchNorm statistics is not
      split).
    sync_perturbation: perturb with the gradient averaged over ``axis_name``
      instead of the local one, and average every re-evaluated gradient: the
      step of the single-device method on the global batch (one all-reduce
      per gradient evaluation).
    eps: δ, added to norms in divisions.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain it before the base
    optimizer.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
    Andriushchenko & Flammarion, `Towards Understanding Sharpness-Aware
    Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022 (USAM).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):
    ...   x, y = batch
    ...   return jnp.mean((x @ params['w'] - y) ** 2)
    >>> params = {'w': jnp.array([1.0, -1.0])}
    >>> batch = (jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([0.5, 1.0]))
    >>> tx = optax.chain(sam_optax.sam(0.05, loss_fn=loss_fn),
    ...                  optax.sgd(0.01, momentum=0.9))
    >>> opt_state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, batch=batch)
    >>> updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params, batch) < loss_fn({'w': jnp.array([1.0, -1.0])}, batch))
    True
  """
  _ascent.check_positive("eps", eps, "sam")

  def rule(grads, params, gradient_at, *, rho):
    return _ascent.sam_gradient(grads, params, gradient_at, rho,
                                normalize=normalize, eps=eps)

  return _ascent.surrogate_transformation(
      "sam", rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      axis_name=axis_name, batch_splits=batch_splits,
  batch_argnames=batch_argnames, sync_perturbation=sync_perturbation,
  )


def usam(rho: Radius = 0.05, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """Unnormalized SAM, ``ŵ = w + ρ · g``: :func:`sam` with ``normalize=False``.

  Takes the keywords of :func:`sam` except ``normalize``.

  Example:
    >>> import optax, sam_optax
    >>> tx = optax.chain(sam_optax.usam(0.05), optax.sgd(0.05))
  """
  if "normalize" in kwargs:
    raise TypeError("usam: normalize is always False; use sam(normalize=...) instead.")
  return sam(rho, normalize=False, **kwargs)
