"""SAMPa: SAM parallelized, the perturbation from the previous step's auxiliary point."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks, _loss, _numerics, _parallel
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation

PREVIOUS_ARGS = "previous_args"
"""The extra argument of ``update`` with the loss arguments of ``∇L(w̃)``."""


class SAMPaState(NamedTuple):
  """State of :func:`sampa`.

  Attributes:
    count: steps taken; the argument of the ρ schedule.
    auxiliary_grads: ``y_t = ∇L(ỹ_t)``, the gradient at the previous step's
      auxiliary point (zeros before the first step): the direction of this
      step's perturbation and the gradient of the base's look-ahead.
    base: the base optimizer's state.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  auxiliary_grads: optax.Updates
  base: optax.OptState


def _select(first: jax.Array, a: Any, b: Any) -> Any:
  """``a`` if ``first`` else ``b``, branch-free (a PRNG key through its data)."""
  if jax.dtypes.issubdtype(jnp.result_type(a), jax.dtypes.prng_key):
    return jax.random.wrap_key_data(
        jnp.where(first, jax.random.key_data(a), jax.random.key_data(b)),
        impl=jax.random.key_impl(a))
  return jnp.where(first, a, b)


def _check_same_shapes(method: str, first: Mapping[str, Any], second: Mapping[str, Any]):
  """The previous and current loss arguments have the same structure, shapes, dtypes."""

  def check(path, a, b):
    a_shape, b_shape = jnp.shape(a), jnp.shape(b)
    a_type, b_type = jnp.result_type(a), jnp.result_type(b)
    if a_shape != b_shape or a_type != b_type:
      raise ValueError(
          f"{method}: {PREVIOUS_ARGS}{jax.tree_util.keystr(path)} has shape {a_shape} and"
          f" dtype {a_type}, but the current argument has {b_shape}, {b_type}: the two"
          " gradients of a step run side by side (TwoGroups: one vmap), so the previous"
          " and the current batch must have the same shapes (drop the last, smaller"
          " batch of an epoch).")

  try:
    jax.tree_util.tree_map_with_path(check, dict(first), dict(second))
  except ValueError as error:
    if method in str(error):
      raise
    raise ValueError(
        f"{method}: {PREVIOUS_ARGS} must hold the same structure as the current"
        f" loss arguments: {error}") from None


def _two_gradients(method: str, loss_fn, has_aux: bool, extra_args: Mapping[str, Any],
                   placement: _parallel.TwoGroups | None):
  """``(w̃, ỹ) ↦ (∇L(w̃; previous args), ∇L(ỹ; current args))``.

  Two gradient calls; with ``placement`` the pair is mapped by
  ``shard_map`` over the mesh's pair axis (each group selects its point and
  batch and takes one gradient), and one ``psum`` gives every device both.
  """
  current = {k: v for k, v in extra_args.items() if k != PREVIOUS_ARGS}
  loss_fn = _loss.resolve_loss_fn(method, loss_fn, current)
  arguments = _loss.loss_arguments(method, "loss_fn", loss_fn, current)
  previous = extra_args.get(PREVIOUS_ARGS)
  if previous is None:
    previous = {}
  if not isinstance(previous, Mapping):
    raise TypeError(
        f"{method}: {PREVIOUS_ARGS} must be a dict of loss_fn's arguments for the"
        f" gradient at the perturbed point (the previous step's batch, e.g."
        f" {{'batch': previous_batch}}), got {type(previous).__name__}.")
  unknown = sorted(set(previous) - set(arguments))
  if unknown:
    raise ValueError(
        f"{method}: {PREVIOUS_ARGS} has {unknown}, which are not among the loss"
        f" arguments given to update() ({sorted(arguments)}); it overrides some of"
        " them for the gradient at the perturbed point.")
  first_args, second_args = {**arguments, **previous}, arguments
  _check_same_shapes(method, first_args, second_args)
  value = _loss.scalar_loss(method, loss_fn, has_aux)
  gradient = lambda point, args: jax.grad(value)(point, **args)
  if placement is None:
    # Two plain gradient calls: under a sharded jit XLA's partitioner splits a
    # vmapped pair of batch-sharded convolutions into all-gathers and 5x the
    # flops per device (measured, benchmarks/sampa.py).
    def sequential(points):
      perturbed, auxiliary = points
      return gradient(perturbed, first_args), gradient(auxiliary, second_args)

    return sequential

  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  pair, data = placement.pair_axis, placement.data_axis
  groups = 1 if data is None else placement.mesh.shape[data]
  batch_names = set(placement.batch_argnames)
  missing = sorted(batch_names - set(arguments))
  if missing:
    raise ValueError(
        f"{method}: TwoGroups(batch_argnames={list(placement.batch_argnames)}) shards"
        f" these arguments over {data!r}, but update() got no {missing}; it got"
        f" {sorted(arguments)}.")
  # The batches enter as they are (sharded over the data axis, the same in both
  # groups): stacking them first would cost all-to-alls to reshard.
  args_specs = {name: jax.tree.map(
      lambda leaf, batch=name in batch_names: P(data) if batch and data else P(), leaf)
      for name, leaf in second_args.items()}

  def local(perturbed, auxiliary, previous_args, current_args):
    index = jax.lax.axis_index(pair)
    # Group 0: w̃ on the previous batch; group 1: ỹ on the current one. Both
    # enter replicated (the batches sharded over the data axis) and each group
    # selects its own: stacking them outside costs XLA all-to-alls to reshard.
    point, args = jax.tree.map(functools.partial(_select, index == 0),
                               (perturbed, previous_args), (auxiliary, current_args))
    if data is not None:
      # Varying over the data axis, so that the gradient is this shard's (not
      # summed over the group by shard_map's transpose): one psum below.
      point = jax.tree.map(lambda x: jax.lax.pcast(x, (data,), to="varying"), point)
    # This group's slot of the pair: its gradient on its shard, [1, ...].
    grads = jax.tree.map(lambda g: g[None], gradient(point, args))
    # Both gradients everywhere, in one all-reduce: this group's in its slot.
    padded = jax.tree.map(
        lambda g: jnp.where(jnp.arange(2).reshape((2,) + (1,) * (g.ndim - 1)) == index,
                            g, jnp.zeros_like(g)), grads)
    axes = (pair,) if data is None else (pair, data)
    return jax.tree.map(lambda g: jax.lax.psum(g, axes) / groups, padded)

  def placed(points):
    perturbed, auxiliary = points
    replicated = jax.tree.map(lambda _: P(), perturbed)
    pair_of_grads = jax.shard_map(
        local, mesh=placement.mesh,
        in_specs=(replicated, replicated, args_specs, args_specs),
        out_specs=replicated)(perturbed, auxiliary, first_args, second_args)
    return tuple(jax.tree.map(lambda g, i=i: g[i], pair_of_grads) for i in (0, 1))

  return placed


def sampa(
    base_optimizer: optax.GradientTransformation,
    rho: Radius = 0.1,
    *,
    lam: float = 0.2,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""SAMPa: SAM parallelized (Xie et al., NeurIPS 2024, arXiv:2410.10683).

  SAM's second gradient needs its first (the ascent direction). SAMPa takes
  the direction from the gradient ``y_t`` at an auxiliary point ``ỹ_t`` of
  the *previous* step, so the two gradients of a step are independent and
  can run at the same time on two devices. With ``w_t`` the weights and
  ``base`` the base optimizer:

  .. math::

    w̃_t = w_t + ρ_t\, m ⊙ y_t / (‖m ⊙ y_t‖ + δ), \qquad
    ỹ_{t+1} = w_t + \text{base}(y_t;\ \text{its state at } t,\ w_t), \\
    g_t = (1 − λ)\, ∇L_{B_{t−1}}(w̃_t) + λ\, ∇L_{B_t}(ỹ_{t+1}), \qquad
    y_{t+1} = ∇L_{B_t}(ỹ_{t+1}), \qquad
    w_{t+1} = w_t + \text{base}(g_t),

  with ``y_0 = 0`` and ``ỹ_1 = w_0`` at the first step (so ``w̃_0 = w_0``
  and both gradients are ``∇L_{B_0}(w_0)``), ``B_t`` the batch of step
  ``t`` and ``B_{−1} = B_0``. ``base(y; state, w)`` is the update the base
  would make from the gradient ``y`` *without* committing its state: the
  look-ahead of the next iterate. ``lam=0`` with ``rho`` fixed is SAM whose
  ascent direction is the previous step's look-ahead gradient.

  **Pinned to the official code** (``LIONS-EPFL/SAMPa``, ``train.py``; two
  processes, rank 0 the perturbed point, rank 1 the auxiliary point, the
  same batches on both):

  * the perturbation (lines 52–58): rank 0 recovers ``y = (agg − pert) /
    λ`` from the previous step's all-reduced ``agg = (1 − λ) g̃ + λ y`` and
    its own ``pert = (1 − λ) g̃``, scales it by ``ρ / (‖y‖ + 1e-12)`` and
    adds it to the weights; ``y = 0`` at the first step, so ``ε = 0``;
  * the auxiliary point (lines 67–81): rank 1 keeps its own previous
    gradient ``y`` and moves to ``w − lr·(y + wd·w + μ·buf)``, with
    ``buf`` SGD's momentum buffer before this step's update and ``lr`` the
    current one; before the first ``optimizer.step`` there is no buffer and
    it moves by ``lr·y = 0``. This is exactly the step PyTorch's SGD (weight
    decay added to the gradient, then ``buf ← μ buf + d``) would take from
    the gradient ``y``: ``base(y)`` above for ``base =
    optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=μ))``;
  * which batch (lines 48–49, 59, 82, 102): ``w̃`` on the *previous* batch
    ``data1`` (the batch whose auxiliary gradient gave the direction, as in
    SAM), ``ỹ`` on the current batch; at the first step ``data1 = data``.
    The README's formulas (the paper's, ``x̃_t = x_t + ρ ∇f(y_t)/‖∇f(y_t)‖``,
    ``y_{t+1} = x_t − η_t ∇f(y_t)``) name no batch and extrapolate with
    plain SGD; the code uses the base's momentum and weight decay, starts
    with ``ε = 0`` and pairs the batches as above. We follow the code (the
    paper's text itself could not be read here);
  * the combination (lines 63–64, 87–89, 96): ``agg = (1 − og)·g̃ + og·y``
    with ``og = λ = 0.2`` by default (line 154), the base steps on ``agg``
    (line 99) at the unperturbed weights (weight decay and momentum in the
    base, as in ``optim.SGD(..., weight_decay=5e-4, momentum=0.9)``, line
    30). ``ρ = 0.1`` is its default (line 153).

  Differences from the official code: ``y`` is sent, not recovered by
  dividing by ``λ`` (which breaks at ``λ = 0``); with ``momentum=0``
  PyTorch keeps no buffer and the code's look-ahead then drops the weight
  decay term, here the look-ahead is always the base's step; ``δ = eps``
  (1e-12 as there).

  **Why it owns the base optimizer.** The auxiliary point is the base's
  next iterate from ``y``: it needs the learning rate, the momentum buffer
  and the weight decay, i.e. the base's state, which a transform chained
  before the base cannot read. Taking the base (as :func:`sam_optax.msam`
  does) gives every base its own look-ahead — momentum SGD exactly as the
  official code, AdamW with its moments, any schedule at the right step —
  with no learning rate passed twice. The transform is therefore the whole
  optimizer; it replaces ``optax.chain(method, base)``::

    tx = sam_optax.sampa(optax.chain(optax.add_decayed_weights(5e-4),
                                     optax.sgd(lr, momentum=0.9)),
                         rho=0.1, lam=0.2, loss_fn=loss_fn)
    previous = batch_0
    for batch in batches:
      updates, state = tx.update(params, state, params, batch=batch,
                                 previous_args={"batch": previous})
      params = optax.apply_updates(params, updates)
      previous = batch

  **The gradient given to** ``update`` **is not used** (its shapes and
  dtypes are): SAMPa never needs ``∇L(w)``, so do not compute it; pass the
  params, as above. Both gradients are computed inside ``update`` with
  ``loss_fn``: ``∇L(ỹ)`` with the extra arguments of ``update``, ``∇L(w̃)``
  with those overridden by ``previous_args`` (a dict, e.g. ``{"batch":
  previous_batch}``, the previous step's; omitted, the current ones: both
  gradients then take the current batch, a variant of the code).

  **Parallel form.** With ``perturbation=sam_optax.TwoGroups(mesh)`` the
  pair ``[w̃, ỹ]`` with their batches is a stacked axis of size 2 that
  ``shard_map`` maps over the mesh's ``pair`` axis, one slot per group
  (each group selects its point and batch from replicated inputs, so
  nothing is resharded; a ``jax.vmap`` over a slot of size 1 was measured
  slower on XLA:CPU, so each group takes its plain gradient), the batch over its ``data`` axis:
  the two gradients run at the same time on two device groups, followed by
  one all-reduce that gives every device both (the numbers of the
  sequential form up to float rounding). ``sam_optax.Synced(axis_name)``
  (inside ``pmap`` / ``shard_map``) averages both gradients over the axis.
  ``PerDevice``, ``Splits`` and ``MicroBatches`` are refused: the
  direction is a stored gradient of the previous step, one per run, so
  there is no per-device or per-group ascent to take.

  A ``mask`` restricts ``ε`` and its norm; the look-ahead and the gradients
  see every leaf. ``has_aux``: the aux of both evaluations is dropped.

  Args:
    base_optimizer: the base optimizer, an optax ``GradientTransformation``
      (the official code's: ``optax.chain(optax.add_decayed_weights(wd),
      optax.sgd(lr, momentum=0.9))``).
    rho: ρ ≥ 0, a float or an optax schedule (0.1 in the official code).
    lam: λ ∈ [0, 1], the weight of the auxiliary gradient (0.2, the
      paper's and the code's default).
    loss_fn, has_aux, mask, eps: see :func:`sam_optax.sam`.
    perturbation: None, ``sam_optax.TwoGroups(mesh, ...)`` or
      ``sam_optax.Synced(axis_name)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`SAMPaState`:
    the whole optimizer.

  References:
    Xie, Pethick, Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
    <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024; code
    https://github.com/LIONS-EPFL/SAMPa.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = sam_optax.sampa(optax.sgd(0.05, momentum=0.9), 0.1, loss_fn=loss_fn)
    >>> params, batches = jnp.ones(4), [jnp.arange(4.0) + t for t in range(3)]
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda params, state, x, previous: tx.update(
    ...     params, state, params, x=x, previous_args={"x": previous}))
    >>> previous = batches[0]
    >>> for x in batches:
    ...   updates, state = step(params, state, x, previous)
    ...   params, previous = optax.apply_updates(params, updates), x
    >>> int(state.count)
    3
  """
  method = "sampa"
  base = _checks.check_base(method, base_optimizer)
  _checks.check_in_range("lam", lam, 0.0, 1.0, method)
  placement = perturbation if isinstance(perturbation, _parallel.TwoGroups) else None
  if placement is not None:
    perturbation = None
  _checks.check_callable("loss_fn", loss_fn, method)

  def init(params: optax.Params) -> SAMPaState:
    return SAMPaState(count=jnp.zeros([], jnp.int32),
                      auxiliary_grads=jax.tree.map(jnp.zeros_like, params),
                      base=base.init(params))

  def rule(grads, state, ascent, *, rho):
    del grads  # SAMPa never uses ∇L(w)
    params, y = ascent.params, state.auxiliary_grads
    perturbed = _numerics.ascent_point(params, ascent.normalized(y), rho)
    lookahead, _ = base.update(y, state.base, params)
    started = (state.count > 0).astype(jnp.float32)  # ỹ = w at the first step
    auxiliary = _numerics.ascent_point(params, lookahead, started)
    perturbed_grads, auxiliary_grads = ascent.gradient_fn((perturbed, auxiliary))
    surrogate = _numerics.linear_combination(1.0 - lam, perturbed_grads, lam, auxiliary_grads,
                                           like=params)
    return surrogate, state._replace(
        auxiliary_grads=_numerics.cast_like(auxiliary_grads, state.auxiliary_grads))

  unsupported = {kind: (
      "SAMPa's ascent direction is the stored gradient of the previous step's"
      " auxiliary point, one for the run, so there is no per-device or per-group"
      " ascent; use None (a sharded jax.jit), sam_optax.Synced(axis_name) or"
      " sam_optax.TwoGroups(mesh) (the two gradients on two device groups).")
      for kind in ("PerDevice", "Splits", "Splits(sequential=True)", "MicroBatches")}
  gradients = _ascent.transformation(
      method, rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps, init=init,
      gradient_factory=lambda params, args: _two_gradients(
          method, loss_fn, has_aux, args, placement),
      unsupported=unsupported)

  def update(updates, state, params=None, **extra_args):
    surrogate, state = gradients.update(updates, state, params, **extra_args)
    extra_args.pop(PREVIOUS_ARGS, None)
    base_updates, base_state = base.update(surrogate, state.base, params, **extra_args)
    return base_updates, state._replace(base=base_state)

  return optax.GradientTransformationExtraArgs(init, update)
