"""The one shared mechanism of the SAM family.

Every method of the library is "SAM with a difference": it takes the gradient
``g = ∇L(w)`` that the training step already computed, moves to one or more
nearby points ``w + ε``, re-evaluates the gradient there with ``jax.grad`` of
the user's loss, and combines the results into a surrogate gradient for the
base optimizer. This module holds the pieces they share, written once:

* radius handling: a float or an optax schedule of the step count, validated
  at construction (:func:`check_radius`, :func:`radius_at`);
* float32 tree arithmetic: the global norm and inner product accumulated in
  float32 whatever the parameter dtype (:func:`global_norm`, :func:`vdot`);
* the ascent point ``w + s·d`` computed in float32 and cast back to the
  parameter dtype (:func:`ascent_point`);
* re-evaluation of the loss with the extra arguments of ``update``, with clear
  errors for a missing loss, a non-scalar loss or an unknown keyword
  (:func:`make_gradient_fn`);
* the renormalization ``(‖g‖ / (‖g̃‖ + δ)) · g̃`` (:func:`rescale_to_norm`);
* the transformation skeleton (:func:`surrogate_transformation`) that turns a
  method's rule into an ``optax.GradientTransformationExtraArgs`` with a
  :class:`SAMState`, averaging the result across ``axis_name`` exactly once
  (m-sharpness: every device perturbs with its own gradient), or perturbing
  with the all-reduced gradient (``sync_perturbation``), or per group of
  examples (``batch_splits``, :func:`split_arguments`);
* what wrappers of a method share (:func:`check_inner`, :func:`wrapper_axis`,
  :func:`cond`, :func:`advance_counts`) and the scheduling aid
  :func:`sequenced`.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import optax

Radius: TypeAlias = float | optax.Schedule
"""A neighbourhood radius: a non-negative float or a schedule of the step."""

LossFn: TypeAlias = Callable[..., Any]
"""``loss_fn(params, **extra_args) -> scalar`` (or ``(scalar, aux)``)."""

GradientFn: TypeAlias = Callable[[optax.Params], optax.Updates]
"""``∇L`` at a point, with the extra arguments of this ``update`` bound."""

DEFAULT_EPS = 1e-12

# Extra arguments that optax itself passes along a chain and that are not
# meant for the user's loss function; they are never forwarded to it.
_NOT_FOR_THE_LOSS = frozenset({"loss_fn", "value", "grad", "value_fn"})


class SAMState(NamedTuple):
  """State of every single-step method of the family.

  Attributes:
    count: steps taken; the argument of every ρ schedule.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count


# --------------------------------------------------------------------------
# Argument validation.
# --------------------------------------------------------------------------


def check_radius(name: str, value: Radius, method: str) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite ρ ≥ 0 or a schedule.

  A schedule is checked at step 0 where it can be evaluated there.
  """
  if callable(value):
    try:
      first = value(0)
    except Exception:  # pylint: disable=broad-except
      return  # a schedule that needs tracing; it is used as it is
    _check_number(name, first, method, what="the schedule's value at step 0")
    return
  _check_number(name, value, method, what="")


def _check_number(name: str, value: Any, method: str, what: str) -> None:
  try:
    if isinstance(value, (str, bytes)):  # float("0.05") would accept a string
      raise TypeError
    number = float(value)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    raise TypeError(
        f"{method}: {name} must be a float or an optax schedule, got"
        f" {type(value).__name__} {value!r}."
    ) from None
  if not math.isfinite(number) or number < 0:
    of = f" ({what})" if what else ""
    raise ValueError(
        f"{method}: {name} must be finite and >= 0, got {name}={number!r}{of}."
    )


def check_positive(name: str, value: float, method: str) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite number > 0."""
  if not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
    raise ValueError(f"{method}: {name} must be finite and > 0, got {name}={value!r}.")


def check_non_negative(name: str, value: float, method: str) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite number >= 0."""
  if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
    raise ValueError(f"{method}: {name} must be finite and >= 0, got {name}={value!r}.")


def check_int(name: str, value: Any, minimum: int, method: str) -> None:
  """Raises ``ValueError`` unless ``value`` is an int ``>= minimum``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(
        f"{method}: {name} must be an int >= {minimum}, got {name}={value!r}.")


def check_in_range(name: str, value: float, low: float, high: float, method: str) -> None:
  """Raises ``ValueError`` unless ``low <= value <= high``."""
  if not isinstance(value, numbers.Real) or not low <= value <= high:
    raise ValueError(
        f"{method}: {name} must be in [{low}, {high}], got {name}={value!r}."
    )


def check_callable(name: str, value: Any, method: str, required: bool = False) -> None:
  """Raises ``TypeError`` unless ``value`` is callable (or None if optional)."""
  if value is None and not required:
    return
  if not callable(value):
    raise TypeError(
        f"{method}: {name} must be a function, got {type(value).__name__} {value!r}."
    )


def radius_at(radius: Radius, count: jax.Array) -> jax.Array:
  """The value of ``radius`` at step ``count``, as a float32 scalar."""
  value = radius(count) if callable(radius) else radius
  return jnp.asarray(value, dtype=jnp.float32)


# --------------------------------------------------------------------------
# Tree arithmetic, accumulated in float32.
# --------------------------------------------------------------------------


def _float32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def global_norm(tree: Any) -> jax.Array:
  """``‖tree‖``: the L2 norm over every leaf, accumulated in float32."""
  return optax.tree.norm(_float32(tree))


def vdot(tree_a: Any, tree_b: Any) -> jax.Array:
  """``⟨a, b⟩`` over every leaf, accumulated in float32."""
  return optax.tree.vdot(_float32(tree_a), _float32(tree_b))


def scaled_sum(tree_a: Any, scale: float | jax.Array, tree_b: Any,
               like: Any = None) -> Any:
  """``a + scale·b`` computed in float32, cast leafwise to the dtypes of ``like``.

  ``like`` defaults to ``tree_a``.
  """
  like = tree_a if like is None else like
  return jax.tree.map(
      lambda a, b, ref: (
          jnp.asarray(a, jnp.float32) + scale * jnp.asarray(b, jnp.float32)
      ).astype(ref.dtype),
      tree_a, tree_b, like,
  )


def ascent_point(params: optax.Params, direction: Any, scale: jax.Array) -> optax.Params:
  """``ŵ = w + scale · direction`` in float32, in the parameters' dtypes."""
  return scaled_sum(params, scale, direction)


def normalized(tree: Any, eps: float) -> Any:
  """``tree / (‖tree‖ + δ)`` in float32 (a zero tree stays zero)."""
  inv = 1.0 / (global_norm(tree) + eps)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) * inv, tree)


def sam_gradient(
    grads: optax.Updates,
    params: optax.Params,
    gradient_at: GradientFn,
    rho: jax.Array,
    *,
    normalize: bool,
    eps: float,
) -> optax.Updates:
  """SAM's surrogate ``∇L(w + ρ g / (‖g‖ + δ))`` (``∇L(w + ρ g)`` unnormalized)."""
  direction = normalized(grads, eps) if normalize else grads
  return gradient_at(ascent_point(params, direction, rho))


def rescale_to_norm(tree: Any, reference: Any, eps: float) -> Any:
  """StableSAM's renormalization ``(‖reference‖ / (‖tree‖ + δ)) · tree``."""
  scale = global_norm(reference) / (global_norm(tree) + eps)
  return jax.tree.map(
      lambda x: (jnp.asarray(x, jnp.float32) * scale).astype(x.dtype), tree
  )


def cast_like(tree: Any, like: Any) -> Any:
  """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, ref: jnp.asarray(x).astype(ref.dtype), tree, like)


# --------------------------------------------------------------------------
# Re-evaluating the user's loss.
# --------------------------------------------------------------------------


def _accepted_keywords(fn: Callable[..., Any]) -> frozenset[str] | None:
  """Keywords ``fn`` takes after its first argument; None if it takes any."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return None
  names = []
  for index, parameter in enumerate(signature.parameters.values()):
    if parameter.kind is inspect.Parameter.VAR_KEYWORD:
      return None
    if index == 0 or parameter.kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
      continue
    names.append(parameter.name)
  return frozenset(names)


def loss_arguments(
    method: str,
    fn_name: str,
    fn: Callable[..., Any],
    extra_args: Mapping[str, Any],
) -> dict[str, Any]:
  """The extra arguments of ``update`` that go to ``fn``, checked by name.

  Raises:
    TypeError: naming the keyword, if ``fn`` cannot take one of them.
  """
  arguments = {k: v for k, v in extra_args.items() if k not in _NOT_FOR_THE_LOSS}
  accepted = _accepted_keywords(fn)
  if accepted is not None:
    unknown = sorted(set(arguments) - accepted)
    if unknown:
      raise TypeError(
          f"{method}: update() got extra argument(s) {unknown} that"
          f" {fn_name}{_signature_text(fn)} does not accept. The extra"
          f" arguments of update are passed to {fn_name} by keyword; it"
          f" accepts {sorted(accepted)}."
      )
  return arguments


def _signature_text(fn: Callable[..., Any]) -> str:
  try:
    return str(inspect.signature(fn))
  except (TypeError, ValueError):
    return "(...)"


def resolve_loss_fn(
    method: str, loss_fn: LossFn | None, extra_args: Mapping[str, Any]
) -> LossFn:
  """The loss of this step: the constructor's, else the ``loss_fn`` keyword."""
  given = extra_args.get("loss_fn")
  if loss_fn is not None and given is not None and given is not loss_fn:
    raise ValueError(
        f"{method}: loss_fn was given both to the constructor and to update();"
        " give it in one place only."
    )
  loss_fn = loss_fn if loss_fn is not None else given
  if loss_fn is None:
    raise ValueError(
        f"{method}: no loss_fn. Pass loss_fn=... to the constructor, e.g."
        f" sam_optax.{method}(..., loss_fn=loss_fn), or to update(...,"
        " loss_fn=loss_fn); the method re-evaluates its gradient at the"
        " perturbed weights."
    )
  check_callable("loss_fn", loss_fn, method, required=True)
  return loss_fn


def scalar_loss(method: str, loss_fn: LossFn, has_aux: bool) -> Callable[..., jax.Array]:
  """``loss_fn`` reduced to its scalar value, with its shape checked."""

  def value(params, **kwargs):
    out = loss_fn(params, **kwargs)
    if has_aux:
      if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(
            f"{method}: has_aux=True, so loss_fn must return (loss, aux), got"
            f" {type(out).__name__}."
        )
      out = out[0]
    elif isinstance(out, (tuple, list)):
      raise ValueError(
          f"{method}: loss_fn returned a {type(out).__name__} of"
          f" {len(out)}; if it returns (loss, aux), pass has_aux=True."
      )
    out = jnp.asarray(out)
    if out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
      raise ValueError(
          f"{method}: loss_fn must return a scalar float loss, got an array of"
          f" shape {out.shape} and dtype {out.dtype} (reduce it, e.g. with"
          " .mean())."
      )
    return out

  return value


def make_gradient_fn(
    method: str,
    loss_fn: LossFn | None,
    has_aux: bool,
    extra_args: Mapping[str, Any],
) -> GradientFn:
  """``w ↦ ∇L(w)`` for this step: the loss resolved and checked, args bound."""
  loss_fn = resolve_loss_fn(method, loss_fn, extra_args)
  arguments = loss_arguments(method, "loss_fn", loss_fn, extra_args)
  value = scalar_loss(method, loss_fn, has_aux)
  return lambda point: jax.grad(value)(point, **arguments)


def check_update_inputs(method: str, updates: Any, params: Any) -> None:
  """``params`` is given and has the structure and shapes of ``updates``."""
  if params is None:
    raise ValueError(
        f"{method}: update() needs params (the current weights) to compute the"
        " ascent point: call tx.update(grads, opt_state, params, ...)."
    )
  try:
    chex.assert_trees_all_equal_shapes(updates, params)
  except (AssertionError, ValueError) as error:
    raise ValueError(
        f"{method}: the gradient (updates) and params must be pytrees of the"
        f" same structure and shapes: {error}"
    ) from None


# --------------------------------------------------------------------------
# The transformation skeleton.
# --------------------------------------------------------------------------


SurrogateRule: TypeAlias = Callable[..., optax.Updates]
"""A method's rule: the surrogate gradient from ``g``, ``w`` and ``∇L``.

``rule(grads, params, gradient_at, **radii)``: ``radii`` holds each radius of
the method evaluated at this step, as keyword-only arguments named as in the
constructor (``rho``; BSAM's ``rho_max``, ``rho_min``).
"""


def surrogate_transformation(
    method: str,
    rule: SurrogateRule,
    *,
    radii: Mapping[str, Radius],
    loss_fn: LossFn | None,
    has_aux: bool,
    axis_name: str | None,
    batch_splits: int | None = None,
    batch_argnames: Sequence[str] = ("batch",),
    sync_perturbation: bool = False,
    gradient_fn_factory: Callable[[Mapping[str, Any]], GradientFn] | None = None,
    ascent_gradient_fn_factory: Callable[[Mapping[str, Any]], GradientFn] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a method of the family from its ``rule``.

  ``update(g, state, params, **extra_args)`` checks its inputs, binds the
  extra arguments to the loss (``make_gradient_fn``, or
  ``gradient_fn_factory`` for a method whose descent loss is not ``loss_fn``),
  evaluates the radii at ``state.count``, applies ``rule``, casts the result
  to the dtypes of ``g`` and, with ``axis_name``, averages it across that axis
  exactly once. Where the perturbation is computed (m-sharpness):

  * default: with the incoming gradient, i.e. per device under ``pmap`` /
    ``shard_map`` when the local, un-averaged gradient is passed;
  * ``sync_perturbation=True``: with the gradient averaged over
    ``axis_name``, and every re-evaluated gradient averaged too, so the step
    equals the single-device step on the global batch;
  * ``batch_splits=n``: per group of ``B/n`` examples inside the batch. The
    extra arguments named in ``batch_argnames`` are split along axis 0 into
    ``n`` groups; each group's gradient ``g_i = ∇L_i(w)`` is recomputed (one
    extra pass, vectorized over the groups) and the rule runs per group with
    ``g_i`` and ``∇L_i``; the surrogate is the mean over groups. The ascent
    loss of group ``i`` is ``ascent_gradient_fn_factory`` (default: the same
    loss as the descent).
  """
  for name, value in radii.items():
    check_radius(name, value, method)
  check_callable("loss_fn", loss_fn, method)
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"{method}: axis_name must be a string or None, got {axis_name!r}.")
  if sync_perturbation and axis_name is None:
    raise ValueError(
        f"{method}: sync_perturbation=True averages the gradient over the data"
        " axis before the ascent, so it needs axis_name.")
  if batch_splits is not None:
    if isinstance(batch_splits, bool) or not isinstance(batch_splits, int) or batch_splits < 1:
      raise ValueError(
          f"{method}: batch_splits must be a positive int or None, got"
          f" batch_splits={batch_splits!r}.")
    if sync_perturbation:
      raise ValueError(
          f"{method}: batch_splits (a perturbation per group of examples) and"
          " sync_perturbation=True (one perturbation for all devices)"
          " contradict each other; choose one.")
    if isinstance(batch_argnames, str) or not batch_argnames:
      raise TypeError(
          f"{method}: batch_argnames must be a non-empty sequence of names of"
          f" update()'s extra arguments, got {batch_argnames!r}.")

  if gradient_fn_factory is None:
    gradient_fn_factory = lambda args: make_gradient_fn(method, loss_fn, has_aux, args)
  if ascent_gradient_fn_factory is None:
    ascent_gradient_fn_factory = gradient_fn_factory

  def init(params: optax.Params) -> SAMState:
    del params
    return SAMState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, **extra_args):
    check_update_inputs(method, updates, params)
    values = {name: radius_at(value, state.count) for name, value in radii.items()}
    if sync_perturbation:
      # Every gradient the rule sees is the global batch's, so the result
      # equals the single-device step on the whole batch (also for the
      # non-linear rules of GSAM and BSAM), and needs no final average.
      local_gradient_at = gradient_fn_factory(extra_args)
      surrogate = rule(
          mean_over_axis(updates, axis_name), params,
          lambda point: mean_over_axis(local_gradient_at(point), axis_name),
          **values)
      return cast_like(surrogate, updates), SAMState(count=optax.safe_increment(state.count))
    if batch_splits is None:
      surrogate = rule(updates, params, gradient_fn_factory(extra_args), **values)
    else:
      def one_group(group_args):
        args = {**extra_args, **group_args}
        group_grads = ascent_gradient_fn_factory(args)(params)
        return rule(group_grads, params, gradient_fn_factory(args), **values)

      groups = split_arguments(method, extra_args, batch_argnames, batch_splits)
      surrogate = jax.tree.map(
          lambda x: jnp.mean(x, axis=0), jax.vmap(one_group)(groups))
    surrogate = mean_over_axis(cast_like(surrogate, updates), axis_name)
    return surrogate, SAMState(count=optax.safe_increment(state.count))

  # Read by wrappers such as stable_sam.
  update.axis_name = axis_name  # type: ignore[attr-defined]
  return optax.GradientTransformationExtraArgs(init, update)


def data_axis(transformation: optax.GradientTransformation) -> str | None:
  """The ``axis_name`` a transform of this family averages over (None if none)."""
  return getattr(transformation.update, "axis_name", None)


def advance_counts(state: Any) -> Any:
  """``state`` with every NamedTuple field named ``count`` incremented.

  What a skipped step does to the state of the wrapped method: its
  accumulators stay, its step counters (the argument of ρ schedules) keep
  following the global step.
  """

  def advance(path, leaf):
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "count":
      return optax.safe_increment(leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(advance, state)


def cond(pred: jax.Array, true_fn, false_fn):
  """``jax.lax.cond``, or a plain ``if`` when ``pred`` is concrete (eager use).

  Eagerly, ``lax.cond`` would compile its freshly built branches on every
  call; under ``jit`` the conditional runs only the branch taken.
  """
  if isinstance(pred, jax.core.Tracer):
    return jax.lax.cond(pred, true_fn, false_fn)
  return true_fn() if bool(pred) else false_fn()


def sequenced(value: Any, after: Any) -> Any:
  """``value``, made to depend on ``after`` so that XLA computes it later.

  Adds ``0 · a`` (with ``a`` one finite-guarded element of ``after``) to each
  floating leaf of ``value``: the result is exactly ``value``, but work that
  uses it cannot be scheduled before ``after`` exists. BSAM uses it to run
  its two re-evaluations one after the other (together they would hold both
  passes' activations at once), SAF to write its bank after the gradient
  that read it (otherwise XLA copies the whole bank to keep the read safe).
  ``jax.lax.optimization_barrier`` was measured not to give either effect.
  """
  leaves = [leaf for leaf in jax.tree.leaves(after) if jnp.size(leaf)]
  if not leaves:
    return value
  first = jnp.ravel(leaves[0])[0].astype(jnp.float32)
  zero = jnp.where(jnp.isfinite(first), first, 0.0) * 0.0
  return jax.tree.map(lambda v: v + zero.astype(v.dtype), value)


def check_inner(method: str, inner: Any) -> optax.GradientTransformationExtraArgs:
  """``inner`` as a transform with extra-args support, or a clear TypeError."""
  if not hasattr(inner, "init") or not hasattr(inner, "update"):
    raise TypeError(
        f"{method}: inner must be an optax GradientTransformation of this"
        f" family such as sam_optax.sam(...), got {type(inner).__name__}.")
  return optax.with_extra_args_support(inner)


def wrapper_axis(
    method: str, inner: optax.GradientTransformation, axis_name: str | None
) -> str | None:
  """The axis of a wrapper around ``inner``: its own, else the inner one's.

  Raises:
    ValueError: if both are given and differ: the wrapper must average (or
      renormalize) over the axis the inner surrogate is averaged over, or the
      devices would drift apart.
  """
  inner_axis = data_axis(inner)
  if axis_name is None:
    return inner_axis
  if inner_axis is not None and inner_axis != axis_name:
    raise ValueError(
        f"{method}: axis_name={axis_name!r} differs from the inner method's"
        f" axis_name={inner_axis!r}; a wrapper must use the axis the inner"
        " surrogate is averaged over.")
  return axis_name


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
) -> dict[str, Any]:
  """The named extra arguments, each leaf reshaped ``[B, ...] → [splits, B/splits, ...]``."""

  def split(path, leaf):
    shape = jnp.shape(leaf)
    if not shape or shape[0] % splits:
      raise ValueError(
          f"{method}: batch_splits={splits} must divide the leading (batch)"
          f" dimension of every leaf of {list(names)}, but"
          f" {jax.tree_util.keystr(path) or 'the argument'} has shape {shape}.")
    return jnp.reshape(leaf, (splits, shape[0] // splits) + shape[1:])

  return map_batch_arguments(
      method, extra_args, names,
      f"batch_splits={splits} splits along axis 0", split)


def mean_over_axis(tree: Any, axis_name: str | None) -> Any:
  """``lax.pmean`` over ``axis_name`` (identity for None), with a clear error."""
  if axis_name is None:
    return tree
  try:
    return jax.lax.pmean(tree, axis_name)
  except NameError as error:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound: call the update inside"
        f" jax.pmap(..., axis_name={axis_name!r}) or shard_map over a mesh axis"
        f" of that name, or pass axis_name=None. ({error})"
    ) from None
