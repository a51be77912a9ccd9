"""SAM: sharpness-aware minimization, normalized (SAM) and unnormalized (USAM)."""

from __future__ import annotations

import optax

from sam_optax import _ascent, _numerics
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation


def sam(
    rho: Radius = 0.05,
    *,
    loss_fn: LossFn | None = None,
    normalize: bool = True,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Minimization (Foret et al., ICLR 2021, arXiv:2010.01412).

  With ``g = ∇L(w)`` the incoming gradient:

  .. math::

    ŵ = w + ρ · g / (‖g‖ + δ)  \quad (\text{USAM, normalize=False: } ŵ = w + ρ · g),
    \qquad g̃ = ∇L(ŵ).

  The transform returns ``g̃``; the base optimizer chained after it applies
  ``g̃`` at the original ``w``. Norms are accumulated in float32. Cost: one
  extra forward and backward pass per step (≈ 2× SGD).

  Data parallelism (``perturbation=``): with
  ``sam_optax.PerDevice(axis_name)`` (inside ``jax.pmap`` or ``shard_map``)
  each device perturbs with its *own* gradient, so pass the local,
  un-averaged gradient (m-sharpness with m = the per-device batch, as in the
  paper); ``g̃`` is averaged across the axis once.
  ``sam_optax.Synced(axis_name)`` perturbs with the averaged gradient (the
  single-device step on the global batch); ``sam_optax.Splits(n)`` perturbs
  per group of ``B / n`` examples. See :class:`sam_optax.PerDevice`, :class:`sam_optax.Synced` and :class:`sam_optax.Splits`.

  Gradient accumulation (one ``update`` per optimizer step, with the whole
  batch): ``perturbation=sam_optax.MicroBatches(k)`` takes the ascent from
  the accumulated gradient (:func:`sam_optax.accumulated_grad`) and averages
  the re-evaluated gradient over the ``k`` micro-batches, one after the
  other: SAM on the whole batch. ``sam_optax.Splits(k, sequential=True)``
  perturbs per micro-batch. Do not wrap the method in ``optax.MultiSteps``
  (refused at trace time), and check for NaN after it:
  ``optax.chain(sam(...), optax.apply_if_finite(base, n))``.

  Masks (``mask=``): only the masked leaves are perturbed, and ``‖g‖`` is
  taken over them: ``ε = ρ · m ⊙ g / (‖m ⊙ g‖ + δ)``; the gradient is still
  re-evaluated for, and returned on, every leaf. Perturbing only the
  normalization layers is SAM-ON (Mueller et al., NeurIPS 2023); a mask per
  layer gives layer-wise SAM. Every method of the family takes ``mask``.

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
    perturbation: where the perturbation is computed under data
      parallelism or gradient accumulation: None (from the gradient given),
      ``sam_optax.PerDevice``, ``sam_optax.Synced``, ``sam_optax.Splits`` or
      ``sam_optax.MicroBatches``.
    mask: the leaves to perturb: a pytree of bools like the params (or a
      prefix of it), or a function of the params that returns one, as
      ``optax.masked`` takes; None perturbs every leaf.
    eps: δ, added to norms in divisions.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain it before the base
    optimizer.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
    Andriushchenko & Flammarion, `Towards Understanding Sharpness-Aware
    Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022 (USAM).
    Mueller et al., `Normalization Layers Are All That Sharpness-Aware
    Minimization Needs <https://arxiv.org/abs/2306.04226>`_, NeurIPS 2023
    (SAM-ON, ``mask=``).

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

    SAM-ON: perturb only the normalization layers of a Flax model (every
    leaf is still updated with the gradient at the perturbed point):

    >>> import flax.linen as nn
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.relu(nn.LayerNorm()(nn.Dense(8)(x)))
    ...     return nn.Dense(1)(x)[:, 0]
    >>> model = MLP()
    >>> x, y = jnp.ones((4, 3)), jnp.zeros(4)
    >>> variables = model.init(jax.random.key(0), x)
    >>> def mse(variables, x, y):
    ...   return jnp.mean((model.apply(variables, x) - y) ** 2)
    >>> def is_norm(variables):  # True on the leaves of LayerNorm modules
    ...   return jax.tree_util.tree_map_with_path(
    ...       lambda path, _: any('Norm' in str(k) for k in path), variables)
    >>> tx = optax.chain(sam_optax.sam(0.05, loss_fn=mse, mask=is_norm),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(variables)
    >>> grads = jax.grad(mse)(variables, x, y)
    >>> updates, state = tx.update(grads, state, variables, x=x, y=y)
    >>> sorted(updates['params'])
    ['Dense_0', 'Dense_1', 'LayerNorm_0']
  """
  return sam_transformation("sam", rho, loss_fn=loss_fn, normalize=normalize, has_aux=has_aux,
                            perturbation=perturbation, mask=mask, eps=eps)


def sam_transformation(
    method: str,
    rho: Radius,
    *,
    loss_fn: LossFn | None,
    normalize: bool,
    has_aux: bool,
    perturbation: Perturbation | None,
    mask: Mask | None,
    eps: float,
) -> optax.GradientTransformationExtraArgs:
  """:func:`sam` under the name ``method``, which its errors report.

  For the constructors that are SAM under another name (``usam``,
  ``interval_sam``, ``stochastic_sam``): a bad argument is reported under
  the name the user called.
  """

  def rule(grads, state, ascent, *, rho):
    direction = ascent.normalized(grads) if normalize else grads
    return ascent.gradient_at(direction, rho), state

  return _ascent.transformation(
      method, rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps)


def usam(
    rho: Radius = 0.05,
    *,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  """Unnormalized SAM, ``ŵ = w + ρ · g``: :func:`sam` with ``normalize=False``.

  Takes the keywords of :func:`sam` except ``normalize`` (spelled out, so that
  ``optax.inject_hyperparams`` sees them).

  Example:
    >>> import optax, sam_optax
    >>> tx = optax.chain(sam_optax.usam(0.05), optax.sgd(0.05))
  """
  return sam_transformation("usam", rho, loss_fn=loss_fn, normalize=False, has_aux=has_aux,
                            perturbation=perturbation, mask=mask, eps=eps)
