"""Where the perturbation is computed: the one data-parallel option.

Every method that re-evaluates the gradient takes ``perturbation=``, one of

* ``None`` (the default): one perturbation from the gradient the step is
  given; no communication. Under a sharded ``jax.jit`` the gradient is the
  global batch's.
* :class:`PerDevice` ``(axis_name)``: inside ``jax.pmap`` / ``shard_map``,
  every device perturbs with its own, local gradient (m-sharpness with m the
  per-device batch, as in Foret et al.); the surrogate is averaged over
  ``axis_name`` once.
* :class:`Synced` ``(axis_name)``: one perturbation from the gradient
  averaged over ``axis_name``, every re-evaluated gradient averaged too: the
  step of the single-device method on the global batch.
* :class:`Splits` ``(n, batch_argnames=("batch",), axis_name=None,
  sequential=False)``: a perturbation per group of ``B / n`` examples inside
  the batch (m-sharpness within a device, or under a sharded ``jax.jit`` with
  ``n`` = the device count); with ``axis_name`` the surrogate is also
  averaged over that axis. ``sequential=True`` runs the groups one after the
  other (``jax.lax.scan``) instead of vectorized, so only one group's
  activations are alive at a time: gradient accumulation with a perturbation
  per micro-batch.
* :class:`MicroBatches` ``(n, batch_argnames=("batch",), axis_name=None)``:
  gradient accumulation with one perturbation for the whole batch: the ascent
  from the gradient given (the accumulated one), every re-evaluated gradient
  the mean over ``n`` micro-batches computed one after the other.
* :class:`TwoGroups` ``(mesh, pair_axis="pair", data_axis="data")``: SAMPa
  only; its two independent gradients on two groups of devices at once.

Each is a frozen dataclass that checks its fields when built, so a
contradictory combination (a synchronized perturbation per group, a
synchronized perturbation without an axis, one perturbation per micro-batch
*and* one for the whole batch) cannot be written.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax import _checks
from jax.sharding import Mesh


def _check_n(kind: str, n: object) -> None:
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
    raise ValueError(f"{kind}: n must be an int >= 1, got n={n!r}.")


def _check_batch_argnames(kind: str, names: object) -> tuple[str, ...]:
  if (isinstance(names, str) or not isinstance(names, Sequence) or not names
      or not all(isinstance(name, str) for name in names)):
    raise TypeError(
        f"{kind}: batch_argnames must be a non-empty sequence of names of"
        f" update()'s extra arguments, got {names!r}.")
  return tuple(names)


def _check_axis_name(kind: str, axis_name: object, optional: bool = False) -> None:
  if optional and axis_name is None:
    return
  if not isinstance(axis_name, str) or not axis_name:
    expected = "a non-empty string or None" if optional else "a non-empty string"
    raise TypeError(
        f"{kind}: axis_name must be {expected} (the axis of jax.pmap or"
        f" shard_map), got {axis_name!r}.")


@dataclasses.dataclass(frozen=True)
class _OnAxis:
  """An option that averages over a named data-parallel axis."""

  axis_name: str

  def __post_init__(self):
    _check_axis_name(type(self).__name__, self.axis_name)


class PerDevice(_OnAxis):
  """Each device perturbs with its own gradient; the surrogate is averaged once.

  Pass the local, un-averaged gradient to ``update`` inside ``jax.pmap`` or
  ``shard_map`` over ``axis_name``.

  Attributes:
    axis_name: the data-parallel axis.

  Example:
    >>> import sam_optax
    >>> tx = sam_optax.sam(0.05, perturbation=sam_optax.PerDevice("data"))
  """


class Synced(_OnAxis):
  """One perturbation from the gradient averaged over ``axis_name``.

  Every re-evaluated gradient is averaged too (one all-reduce per gradient
  evaluation), so the step equals the single-device step on the global
  batch.

  Attributes:
    axis_name: the data-parallel axis.

  Example:
    >>> import sam_optax
    >>> tx = sam_optax.gsam(0.05, perturbation=sam_optax.Synced("data"))
  """


@dataclasses.dataclass(frozen=True)
class Splits:
  r"""A perturbation per group of ``B / n`` examples of the batch.

  The extra arguments of ``update`` named in ``batch_argnames`` are split
  along axis 0 into ``n`` groups (group ``i``: rows ``i·B/n`` to
  ``(i+1)·B/n − 1``); each group's gradient ``g_i = ∇L_i(w)`` is recomputed
  (one extra pass) and the method's rule runs per group with ``g_i`` and
  ``∇L_i``; the surrogate is the mean over groups (and over ``axis_name`` if
  given):

  .. math::

    g̃ = \frac1n \sum_{i=1}^n ∇L_i\big(w + ε_i\big), \qquad
    ε_i = ρ\,g_i / (‖g_i‖ + δ) \ \text{(SAM)}.

  Under ``jax.jit`` with a batch sharded over ``n`` devices, ``Splits(n)``
  gives the per-device perturbation of ``pmap``.

  ``sequential=False`` vectorizes over the groups (``jax.vmap``: every
  group's activations at once). ``sequential=True`` computes the same
  numbers one group after the other (``jax.lax.scan``), so only one group's
  activations are alive at a time: this is gradient accumulation with a
  perturbation per micro-batch (m-sharpness with m = the micro-batch), in
  one ``update`` call per optimizer step, so ρ schedules and every step
  counter count optimizer steps. A method whose state is a non-linear
  function of the averages over the groups (LookSAM) rejects it.

  Attributes:
    n: the number of groups (micro-batches), an int ≥ 1.
    batch_argnames: the extra arguments of ``update`` to split (model state
      such as BatchNorm statistics is not split).
    axis_name: the data-parallel axis to average over as well, or None.
    sequential: loop over the groups instead of vectorizing.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> loss_fn = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    >>> x, y = jnp.arange(24.0).reshape(8, 3) / 10, jnp.ones(8)
    >>> w = jnp.array([0.1, -0.2, 0.3])
    >>> g = jax.grad(loss_fn)(w, (x, y))
    >>> vectorized, sequential = (
    ...     sam_optax.sam(0.05, loss_fn=loss_fn, perturbation=sam_optax.Splits(4, sequential=s))
    ...     for s in (False, True))
    >>> a, _ = vectorized.update(g, vectorized.init(w), w, batch=(x, y))
    >>> b, _ = sequential.update(g, sequential.init(w), w, batch=(x, y))
    >>> bool(jnp.allclose(a, b, rtol=1e-5))
    True
  """

  n: int
  batch_argnames: Sequence[str] = ("batch",)
  axis_name: str | None = None
  sequential: bool = False

  def __post_init__(self):
    _check_n("Splits", self.n)
    object.__setattr__(self, "batch_argnames",
                       _check_batch_argnames("Splits", self.batch_argnames))
    _check_axis_name("Splits", self.axis_name, optional=True)
    if not isinstance(self.sequential, bool):
      raise TypeError(f"Splits: sequential must be a bool, got sequential={self.sequential!r}.")


@dataclasses.dataclass(frozen=True)
class MicroBatches:
  r"""Gradient accumulation with one perturbation for the whole batch.

  ``update`` gets the gradient ``g`` of the whole batch of one optimizer
  step (accumulated over its micro-batches, e.g. by
  :func:`sam_optax.accumulated_grad`) and the whole batch as extra
  arguments. The arguments named in ``batch_argnames`` are split along axis
  0 into ``n`` micro-batches ``B_1, …, B_n``; the ascent is the method's,
  from ``g``, and every gradient the method re-evaluates is the mean over the
  micro-batches, computed one after the other (``jax.lax.scan``, so only one
  micro-batch's activations are alive at a time):

  .. math::

    ŵ = w + ρ\,g / (‖g‖ + δ) \ \text{(SAM)}, \qquad
    g̃ = \frac1n \sum_{i=1}^n ∇L_{B_i}(ŵ).

  For a loss that is a mean over examples and micro-batches of equal size,
  ``g̃`` is the full-batch gradient at ``ŵ``: the step is the method's step
  on the whole batch (global-batch SAM), with the memory of one
  micro-batch. One ``update`` call is one optimizer step, so ρ schedules and
  every step counter count optimizer steps. With ``axis_name`` (inside
  ``jax.pmap`` / ``shard_map``) ``g`` and every re-evaluated gradient are
  also averaged over that axis, as with :class:`Synced`.

  Every method that re-evaluates the gradient takes it, except ESAM (its
  data selection ranks the examples of the whole batch at once) and MSAM
  (it re-evaluates nothing: give it the accumulated gradient).

  Attributes:
    n: the number of micro-batches, an int ≥ 1; it must divide the leading
      (batch) dimension of every leaf of the ``batch_argnames`` arguments.
    batch_argnames: the extra arguments of ``update`` to split (model state
      such as BatchNorm statistics is not split).
    axis_name: the data-parallel axis to average over as well, or None.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    >>> x, y = jnp.arange(24.0).reshape(8, 3) / 10, jnp.ones(8)
    >>> w = jnp.array([0.1, -0.2, 0.3])
    >>> tx = sam_optax.sam(0.05, loss_fn=loss_fn, perturbation=sam_optax.MicroBatches(4))
    >>> g = sam_optax.accumulated_grad(loss_fn, 4)(w, batch=(x, y))
    >>> accumulated, _ = tx.update(g, tx.init(w), w, batch=(x, y))
    >>> full = sam_optax.sam(0.05, loss_fn=loss_fn)
    >>> whole, _ = full.update(jax.grad(loss_fn)(w, (x, y)), full.init(w), w, batch=(x, y))
    >>> bool(jnp.allclose(accumulated, whole, rtol=1e-5))
    True
  """

  n: int
  batch_argnames: Sequence[str] = ("batch",)
  axis_name: str | None = None

  def __post_init__(self):
    _check_n("MicroBatches", self.n)
    object.__setattr__(self, "batch_argnames",
                       _check_batch_argnames("MicroBatches", self.batch_argnames))
    _check_axis_name("MicroBatches", self.axis_name, optional=True)


@dataclasses.dataclass(frozen=True)
class TwoGroups:
  r"""SAMPa's parallel form: its two gradients on two groups of devices.

  :func:`sam_optax.sampa` computes the two gradients of a step, at the
  perturbed point ``w̃`` (on the previous batch) and at the auxiliary point
  ``ỹ`` (on the current batch): a pair, a stacked axis of size 2. With
  this option ``shard_map`` maps that axis over the ``pair_axis`` of
  ``mesh`` (size 2), one slot per group of devices: group 0
  computes ``∇L(w̃)`` on the previous batch, group 1 ``∇L(ỹ)`` on the
  current one (both batches enter sharded over ``data_axis``, the same in
  the two groups; each group selects its point and batch, so nothing is
  resharded), at the same time; one all-reduce over the whole mesh then
  gives every device both gradients (the combination and the next step's
  perturbation need them). Call ``update`` inside ``jax.jit`` (not inside ``shard_map``),
  with the batch sharded over ``data_axis``.

  Only SAMPa takes it: the other methods' two gradients depend on each
  other.

  Attributes:
    mesh: a ``jax.sharding.Mesh`` with a ``pair_axis`` of size 2.
    pair_axis: the mesh axis of the two groups.
    data_axis: the mesh axis the batch is sharded over within a group, or
      None (each group holds the whole batch).
    batch_argnames: the extra arguments of ``update`` sharded over
      ``data_axis`` along their axis 0 (others are replicated in a group).

  Example:
    >>> import jax, numpy as np, sam_optax
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(2, 1), ("pair", "data"))
    >>> option = sam_optax.TwoGroups(mesh)
    >>> option.pair_axis, option.data_axis
    ('pair', 'data')
  """

  mesh: Mesh
  pair_axis: str = "pair"
  data_axis: str | None = "data"
  batch_argnames: Sequence[str] = ("batch",)

  def __post_init__(self):
    shape = getattr(self.mesh, "shape", None)
    if not hasattr(self.mesh, "axis_names") or shape is None:
      raise TypeError(f"TwoGroups: mesh must be a jax.sharding.Mesh, got"
                      f" {type(self.mesh).__name__} {self.mesh!r}.")
    _check_axis_name("TwoGroups", self.pair_axis)
    _check_axis_name("TwoGroups", self.data_axis, optional=True)
    object.__setattr__(self, "batch_argnames",
                       _check_batch_argnames("TwoGroups", self.batch_argnames))
    for name in (self.pair_axis, self.data_axis):
      if name is not None and name not in shape:
        raise ValueError(f"TwoGroups: the mesh has axes {tuple(shape)}, not {name!r}.")
    if shape[self.pair_axis] != 2:
      raise ValueError(
          f"TwoGroups: the mesh axis pair_axis={self.pair_axis!r} must have size 2"
          f" (one group per gradient), got {shape[self.pair_axis]}.")

  @property
  def axis_name(self) -> None:
    """None: the placement is inside the step (no axis of the caller's)."""
    return None


Perturbation = PerDevice | Synced | Splits | MicroBatches | TwoGroups
"""Where the perturbation is computed (see the module docstring)."""


def check_perturbation(method: str, perturbation: object) -> None:
  """Raises ``TypeError`` unless ``perturbation`` is None or one of the three."""
  if perturbation is None or isinstance(perturbation, (PerDevice, Synced, Splits, MicroBatches)):
    return
  if isinstance(perturbation, TwoGroups):
    raise TypeError(
        f"{method}: perturbation=sam_optax.TwoGroups(...) is SAMPa's parallel form"
        " (sam_optax.sampa): it places two independent gradients on two device"
        f" groups, and {method}'s gradients depend on each other. Use None,"
        " PerDevice, Synced, Splits or MicroBatches.")
  raise TypeError(
      f"{method}: perturbation must be None, sam_optax.PerDevice(axis_name),"
      " sam_optax.Synced(axis_name), sam_optax.Splits(n, ...) or"
      " sam_optax.MicroBatches(n, ...), got"
      f" {type(perturbation).__name__} {perturbation!r}.")


def kind_of(perturbation: Perturbation | None) -> str:
  """The option's name as a method's table of unsupported options spells it."""
  if isinstance(perturbation, Splits) and perturbation.sequential:
    return "Splits(sequential=True)"
  return type(perturbation).__name__ if perturbation is not None else "None"


def axis_of(perturbation: Perturbation | None) -> str | None:
  """The axis the surrogate is averaged over (None if there is none)."""
  return None if perturbation is None else perturbation.axis_name


# --------------------------------------------------------------------------
# Splitting the batch and averaging over groups and devices.
# --------------------------------------------------------------------------


def map_batch_arguments(
    method: str,
    extra_args: Mapping[str, Any],
    names: Sequence[str],
    purpose: str,
    leaf_fn: Callable[[Any, jax.Array], jax.Array],
) -> dict[str, Any]:
  """``leaf_fn(path, leaf)`` on every leaf of the extra arguments in ``names``.

  Raises:
    ValueError: if ``update`` got no argument of one of the names; the
      message says ``purpose`` (what the method does with them).
  """
  missing = [name for name in names if name not in extra_args]
  if missing:
    raise ValueError(
        f"{method}: {purpose} the extra arguments {list(names)}, but update()"
        f" got no {missing}; it got {sorted(extra_args)}. Set batch_argnames to"
        " the names of the batch arguments.")
  return {name: jax.tree_util.tree_map_with_path(leaf_fn, extra_args[name])
          for name in names}


def split_arguments(
    method: str,
    extra_args: Mapping[str, Any],
    names: Sequence[str],
    splits: int,
    kind: str = "Splits",
) -> dict[str, Any]:
  """The named extra arguments, each leaf reshaped ``[B, ...] → [splits, B/splits, ...]``.

  Group ``i`` holds rows ``i·B/splits`` to ``(i+1)·B/splits − 1``. ``kind``
  names the option in error messages.
  """

  def split(path, leaf):
    shape = jnp.shape(leaf)
    if not shape or shape[0] % splits:
      raise ValueError(
          f"{method}: {kind}(n={splits}): n must divide the leading (batch)"
          f" dimension of every leaf of {list(names)}, but"
          f" {jax.tree_util.keystr(path) or 'the argument'} has shape {shape}.")
    return jnp.reshape(leaf, (splits, shape[0] // splits) + shape[1:])

  return map_batch_arguments(
      method, extra_args, names,
      f"{kind}(n={splits}) splits along axis 0", split)


def _floating(leaf: Any) -> bool:
  return bool(jnp.issubdtype(leaf.dtype, jnp.floating))


def mean_over_groups(fn: Callable[[Any], Any], groups: Any, n: int) -> Any:
  """``(1/n) Σ_i fn(group_i)``, one group after the other (``jax.lax.scan``).

  ``groups``: a pytree whose leaves have a leading axis of size ``n`` (from
  :func:`split_arguments`). Only one group's intermediate values (a
  micro-batch's activations) are alive at a time. Floating leaves of the
  result are summed in (at least) float32 and returned in ``fn``'s dtypes;
  other leaves (counters, flags, keys) are the last group's.
  """
  shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], groups))

  def accumulator(shape):
    dtype = jnp.promote_types(shape.dtype, jnp.float32) if _floating(shape) else shape.dtype
    return jnp.zeros(shape.shape, dtype)

  def body(total, group):
    out = fn(group)
    return jax.tree.map(
        lambda t, o, shape: t + jnp.asarray(o, t.dtype) if _floating(shape) else jnp.asarray(o),
        total, out, shapes), None

  total, _ = jax.lax.scan(body, jax.tree.map(accumulator, shapes), groups)
  return jax.tree.map(
      lambda t, shape: (t / n).astype(shape.dtype) if _floating(shape) else t, total, shapes)


def mean_over_axis(tree: Any, axis_name: str | tuple[str, ...] | None) -> Any:
  """``lax.pmean`` over ``axis_name`` (identity for None), with a clear error."""
  if axis_name is None:
    return tree
  try:
    return jax.lax.pmean(tree, axis_name)
  except NameError as error:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound: call the update inside"
        f" jax.pmap(..., axis_name={axis_name!r}) or shard_map over a mesh axis"
        f" of that name, or build the transform without that axis"
        f" (perturbation=None, axis_name=None). ({error})"
    ) from None


# --------------------------------------------------------------------------
# Running a method's rule under each option.
# --------------------------------------------------------------------------

_GROUPS = "sam_optax_groups"  # the vmap axis of Splits, for Ascent.mean

RunRule = Callable[[Any, Callable[[Any], Any], Callable[[Any], Any]], tuple[Any, Any]]
"""``run(grads, gradient_fn, mean) -> (surrogate, new_state)``: the method's
rule on ``grads`` with ``gradient_fn`` (``∇L`` at a point) and ``mean`` (the
average over the groups that perturb separately), built by the skeleton."""


def run_rule(
    method: str,
    perturbation: Perturbation | None,
    run: RunRule,
    updates: Any,
    params: Any,
    extra_args: Mapping[str, Any],
    *,
    gradient_factory: Callable[[Any, Mapping[str, Any]], Callable[[Any], Any]],
    ascent_gradient_factory: Callable[[Any, Mapping[str, Any]], Callable[[Any], Any]],
    split_argnames: Sequence[str] = (),
) -> tuple[Any, Any]:
  """The surrogate gradient and new state of one step under ``perturbation``.

  ``updates`` is the gradient ``g`` the step was given; ``gradient_factory(params,
  extra_args)`` gives ``∇L`` at a point with those extra arguments bound:

  * ``perturbation=None``: the rule runs once on ``g``;
  * :class:`~sam_optax.PerDevice`: the rule runs on the local ``g`` and the
    local loss; the surrogate is averaged over the axis once;
  * :class:`~sam_optax.Synced`: the rule sees ``g`` and every re-evaluated
    gradient averaged over the axis;
  * :class:`~sam_optax.Splits`: the rule runs per group of examples
    (``jax.vmap``) with the group's gradient ``g_i`` (from
    ``ascent_gradient_factory``, default ``gradient_factory``) and the
    group's loss; the surrogate is the mean over the groups. The extra
    arguments split are the option's ``batch_argnames`` and those of
    ``split_argnames`` that ``update`` got (per-example inputs of the
    method itself). With ``sequential=True`` the groups run one after the
    other (:func:`mean_over_groups`): the surrogate and the floating leaves
    of the new state are the means over the groups, so the rule's new state
    must be an affine function of the values it averages with
    ``Ascent.mean`` (true of every rule here but LookSAM's, which says so in
    ``unsupported``);
  * :class:`~sam_optax.MicroBatches`: the rule runs once on ``g`` (averaged
    over the option's axis, if any); its ``gradient_fn`` is the mean over the
    micro-batches of the per-micro-batch gradients (:func:`mean_over_groups`).

  Returns:
    ``(surrogate, new_state)``, the surrogate averaged over the option's axis.
  """
  axis_name = axis_of(perturbation)
  _checks.check_axis_not_checked_for_vma(method, axis_name, updates, params, dict(extra_args))

  def split(option: Splits | MicroBatches, names: Sequence[str]):
    return split_arguments(method, extra_args, names, option.n, type(option).__name__)

  if isinstance(perturbation, Synced):
    local_gradient_fn = gradient_factory(params, extra_args)
    return run(
        mean_over_axis(updates, axis_name),
        lambda point: mean_over_axis(local_gradient_fn(point), axis_name),
        lambda tree: tree)
  if isinstance(perturbation, MicroBatches):
    micro_batches = split(perturbation, perturbation.batch_argnames)

    def accumulated_gradient_fn(point):
      return mean_over_axis(mean_over_groups(
          lambda micro: gradient_factory(params, {**extra_args, **micro})(point),
          micro_batches, perturbation.n), axis_name)

    return run(mean_over_axis(updates, axis_name), accumulated_gradient_fn, lambda tree: tree)
  if isinstance(perturbation, Splits):
    sequential = perturbation.sequential
    axes = axis_name if sequential else (
        _GROUPS if axis_name is None else (_GROUPS, axis_name))

    def one_group(group_args):
      args = {**extra_args, **group_args}
      group_grads = ascent_gradient_factory(params, args)(params)
      return run(group_grads, gradient_factory(params, args),
                 lambda tree: mean_over_axis(tree, axes))

    groups = split(perturbation, tuple(perturbation.batch_argnames) + tuple(
        name for name in split_argnames if name in extra_args))
    if sequential:
      # The surrogate and the state's floating leaves: means over the groups.
      surrogate, new_state = mean_over_groups(one_group, groups, perturbation.n)
    else:
      surrogate, new_state = jax.vmap(one_group, axis_name=_GROUPS)(groups)
      surrogate = jax.tree.map(lambda x: jnp.mean(x, axis=0), surrogate)
      # The same in every group by the rule's contract (built from means).
      new_state = jax.tree.map(lambda x: x[0], new_state)
    return mean_over_axis(surrogate, axis_name), new_state
  surrogate, new_state = run(
      updates, gradient_factory(params, extra_args),
      lambda tree: mean_over_axis(tree, axis_name))
  return mean_over_axis(surrogate, axis_name), new_state
