"""The one shared mechanism of the SAM family.

Every method of the library is "SAM with a difference": it takes the gradient
``g = ∇L(w)`` that the training step already computed, moves to one or more
nearby points ``w + ε``, re-evaluates the gradient there with ``jax.grad`` of
the user's loss, and combines the results into a surrogate gradient for the
base optimizer. This module holds the pieces they share, written once:

* radius handling: a float or an optax schedule of the step count, validated
  at construction (:func:`check_radius`, :func:`radius_at`);
* float32 tree arithmetic: the global norm and inner product accumulated in
  float32 whatever the parameter dtype (:func:`global_norm`, :func:`vdot`),
  the guarded division ``x / (‖y‖ + δ)`` (:func:`divide_by_norm`) and the
  orthogonal component (:func:`orthogonal_part`);
* the ascent point ``w + s·d`` computed in float32 and cast back to the
  parameter dtype (:func:`ascent_point`);
* re-evaluation of the loss with the extra arguments of ``update``, with clear
  errors for a missing loss, a non-scalar loss or an unknown keyword
  (:func:`make_gradient_fn`);
* the skeleton (:func:`transformation`) that turns a method's :class:`Rule`
  into an ``optax.GradientTransformationExtraArgs``: the rule gets ``g``, its
  state and an :class:`Ascent` that applies the perturbation mask
  (:func:`resolve_mask`) and the data-parallel option of
  :mod:`sam_optax._parallel` (per device, synchronized, per group of
  examples: :func:`split_arguments`, :func:`mean_over_axis`);
* what wrappers of a method share (:func:`check_inner`, :func:`cond`,
  :func:`advance_counts`) and the scheduling aid :func:`sequenced`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _parallel

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


def _traced(value: Any) -> bool:
  """Whether ``value`` is a tracer: a hyperparameter of ``optax.inject_hyperparams``
  under ``jit``, checked where it is concrete (eagerly), not while tracing."""
  return isinstance(value, jax.core.Tracer)


def _real(value: Any) -> float | None:
  """``value`` as a float if it is a real number or a concrete 0-d array."""
  if isinstance(value, bool):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if getattr(value, "shape", None) == () and jnp.issubdtype(value.dtype, jnp.number):
    return float(value)
  return None


def _check_number(name: str, value: Any, method: str, what: str) -> None:
  if _traced(value):
    return
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
  if _traced(value):
    return
  number = _real(value)
  if number is None or not math.isfinite(number) or number <= 0:
    raise ValueError(f"{method}: {name} must be finite and > 0, got {name}={value!r}.")


def check_non_negative(name: str, value: float, method: str) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite number >= 0."""
  if _traced(value):
    return
  number = _real(value)
  if number is None or not math.isfinite(number) or number < 0:
    raise ValueError(f"{method}: {name} must be finite and >= 0, got {name}={value!r}.")


def static_args_hint(method: str, *names: str) -> str:
  """The advice for a fixed argument that ``optax.inject_hyperparams`` injected."""
  listed = ", ".join(repr(name) for name in (*names, "loss_fn"))
  return (
      " optax.inject_hyperparams passes every numeric argument not in static_args"
      " as a JAX array (traced under jit); this one is fixed at construction, so"
      f" list it in static_args, e.g. optax.inject_hyperparams(sam_optax.{method},"
      f" static_args=({listed})). The injectable hyperparameters of each method"
      " are listed in the README ('Changing hyperparameters during training').")


def check_int(name: str, value: Any, minimum: int, method: str, *,
              injectable: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is an int ``>= minimum``.

  A JAX array (what ``optax.inject_hyperparams`` passes) is accepted only if
  ``injectable`` (an integer scalar, checked where concrete); otherwise the
  ``TypeError`` says to list the argument in ``static_args``.
  """
  if isinstance(value, jax.Array):
    if not injectable:
      raise TypeError(
          f"{method}: {name} must be a Python int, got {value!r}."
          + static_args_hint(method, name))
    if _traced(value):
      return
    if value.shape == () and jnp.issubdtype(value.dtype, jnp.integer):
      value = int(value)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(
        f"{method}: {name} must be an int >= {minimum}, got {name}={value!r}.")


def check_seed(seed: Any, method: str) -> None:
  """Raises ``TypeError`` unless ``seed`` is a Python int (not injectable: it
  seeds the key of the state at ``init``)."""
  if isinstance(seed, jax.Array):
    raise TypeError(
        f"{method}: seed must be a Python int (it seeds the PRNG key of the"
        f" state at init), got {seed!r}." + static_args_hint(method, "seed"))
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise TypeError(f"{method}: seed must be an int, got {seed!r}.")


def check_in_range(name: str, value: float, low: float, high: float, method: str) -> None:
  """Raises ``ValueError`` unless ``low <= value <= high``."""
  if _traced(value):
    return
  number = _real(value)
  if number is None or not low <= number <= high:
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


def scaled_sum(tree_a: Any, scale: float | jax.Array, tree_b: Any, like: Any = None) -> Any:
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


def divide_by_norm(numerator: Any, tree: Any, eps: float, *, squared: bool = False) -> jax.Array:
  """The guarded division ``numerator / (‖tree‖ + δ)`` (``‖tree‖²`` if squared), float32.

  A zero ``tree`` gives ``numerator / δ``, never NaN.
  """
  norm = global_norm(tree)
  return numerator / ((norm * norm if squared else norm) + eps)


def normalized(tree: Any, eps: float) -> Any:
  """``tree / (‖tree‖ + δ)`` in float32 (a zero tree stays zero)."""
  inv = divide_by_norm(1.0, tree, eps)
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) * inv, tree)


def orthogonal_part(tree: Any, onto: Any, eps: float, like: Any = None) -> Any:
  """``tree − (⟨tree, onto⟩ / (‖onto‖² + δ)) · onto``: the component of ``tree``
  orthogonal to ``onto``, in the dtypes of ``like`` (default ``tree``)."""
  projection = divide_by_norm(vdot(tree, onto), onto, eps, squared=True)
  return scaled_sum(tree, -projection, onto, like=tree if like is None else like)


def rescale_to_norm(tree: Any, reference: Any, eps: float) -> Any:
  """StableSAM's renormalization ``(‖reference‖ / (‖tree‖ + δ)) · tree``."""
  scale = divide_by_norm(global_norm(reference), tree, eps)
  return jax.tree.map(
      lambda x: (jnp.asarray(x, jnp.float32) * scale).astype(x.dtype), tree
  )


def moving_average(average: Any, new: Any, decay: float | jax.Array,
                   started: jax.Array | None = None) -> Any:
  """``decay · average + (1 − decay) · new`` in float32, in the dtypes of ``average``.

  The EMA of FriendlySAM, VaSSO and MSAM (``decay`` may be traced). With
  ``started`` False the result is ``new``: an EMA that starts as its first
  value rather than at zero.
  """
  if started is not None:
    decay = jnp.where(started, decay, 0.0).astype(jnp.float32)
  return jax.tree.map(
      lambda a, x: (decay * jnp.asarray(a, jnp.float32)
                    + (1.0 - decay) * jnp.asarray(x, jnp.float32)).astype(a.dtype),
      average, new)


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


def _required_keywords(fn: Callable[..., Any]) -> frozenset[str]:
  """The parameters of ``fn`` after its first that have no default and can be
  given by keyword (empty if the signature cannot be read)."""
  try:
    parameters = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return frozenset()
  return frozenset(
      parameter.name for parameter in parameters[1:]
      if parameter.default is inspect.Parameter.empty
      and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             inspect.Parameter.KEYWORD_ONLY))


def loss_arguments(
    method: str,
    fn_name: str,
    fn: Callable[..., Any],
    extra_args: Mapping[str, Any],
) -> dict[str, Any]:
  """The extra arguments of ``update`` that go to ``fn``, checked by name.

  Raises:
    TypeError: naming the keyword, if ``fn`` cannot take one of them, or
      naming the missing ones, if ``fn`` requires one that ``update`` did
      not get.
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
  missing = sorted(_required_keywords(fn) - set(arguments))
  if missing:
    raise TypeError(
        f"{method}: {fn_name}{_signature_text(fn)} requires {missing}, but"
        f" update() got {sorted(arguments) or 'no extra arguments'}: pass them"
        " to update(..., name=value), they reach"
        f" {fn_name} by keyword; flax's TrainState.apply_gradients(grads=...)"
        " calls tx.update without them — call tx.update yourself (see README"
        " 'Flax').")
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


def check_not_masked(method: str, updates: Any, params: Any, *, wrapper: bool = False) -> None:
  """Raises ``ValueError`` if ``updates`` or ``params`` hold ``optax.MaskedNode``.

  ``optax.masked`` and ``optax.multi_transform`` give the transforms inside
  them a part of the parameters (``MaskedNode`` in place of the others); the
  loss re-evaluated at the perturbed point needs all of them. ``wrapper``:
  ``method`` wraps a method of the family (which is where ``mask=`` goes).
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  paths = sorted({jax.tree_util.keystr(path)
                  for tree in (updates, params)
                  for path, leaf in jax.tree_util.tree_flatten_with_path(
                      tree, is_leaf=is_masked)[0]
                  if is_masked(leaf)})
  if not paths:
    return
  shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
  example = (f"sam_optax.{method}(sam_optax.sam(..., mask=is_sam), ...)" if wrapper
             else f"sam_optax.{method}(..., mask=is_sam)")
  raise ValueError(
      f"{method}: update() got only a part of the parameters (optax.MaskedNode"
      f" at {shown}): it is inside optax.masked or optax.multi_transform,"
      " which hide the other parameters from it, but the loss re-evaluated at"
      " the perturbed point needs all of them. Put it outside and select the"
      " leaves to perturb with the mask= option of"
      f" {'the method it wraps' if wrapper else 'the method'} instead, e.g."
      f" optax.chain({example}, optax.multi_transform(base_optimizers, labels))"
      " with is_sam = lambda params: jax.tree.map(lambda label: label == 'sam',"
      " labels(params)). Only the selected leaves are perturbed; every leaf"
      " gets the gradient at the perturbed point.")


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


Mask: TypeAlias = Any | Callable[[optax.Params], Any]
"""A pytree of bools like the params (or a prefix of it), or a function of
the params that returns one, as ``optax.masked`` takes."""


def resolve_mask(method: str, mask: Mask | None, params: optax.Params) -> Any:
  """``mask`` as a pytree of bools with the structure of ``params`` (None: all).

  Raises:
    ValueError: if the structure does not match, or no leaf is selected.
    TypeError: if a leaf is not a bool.
  """
  if mask is None:
    return None
  tree = mask(params) if callable(mask) else mask
  try:
    full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), tree, params)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"{method}: mask must be a pytree of bools with the structure of"
        f" params (or a prefix of it), as optax.masked takes: {error}") from None
  leaves = jax.tree.leaves(full)
  for leaf in leaves:
    if not (isinstance(leaf, (bool, np.bool_)) or getattr(leaf, "dtype", None) == np.bool_):
      raise TypeError(
          f"{method}: mask leaves must be bools (True: perturb this leaf), got"
          f" {type(leaf).__name__} {leaf!r}.")
  if leaves and all(leaf is False for leaf in leaves):
    raise ValueError(
        f"{method}: mask selects no parameter, so nothing would be perturbed"
        " (the step would be plain SGD's); select at least one leaf.")
  return full


def _restrict_leaf(leaf: jax.Array, keep: Any) -> jax.Array:
  if isinstance(keep, bool):
    return leaf if keep else jnp.zeros_like(leaf)
  return jnp.where(keep, leaf, jnp.zeros_like(leaf))


@dataclasses.dataclass(frozen=True)
class Ascent:
  """A rule's handle on the neighbourhood of ``w``, built by the skeleton.

  It applies the perturbation mask and the data-parallel option, so a rule
  only says which directions it perturbs along and what it does with the
  gradients it gets back.

  Attributes:
    params: ``w``, the current weights.
    gradient_fn: ``∇L`` at a point (every leaf), the extra arguments bound
      (None for a method that re-evaluates nothing, such as ``msam``).
    mask: a bool pytree like ``params`` (None: every leaf is perturbed).
    eps: δ, added to norms in divisions.
    mean: the average over the groups that perturb separately (the devices
      of :class:`~sam_optax.PerDevice`, the groups of
      :class:`~sam_optax.Splits`; the identity otherwise). A rule with state
      builds its state from averaged values, so that it stays the same on
      every device and group.
  """

  params: optax.Params
  gradient_fn: GradientFn | None
  mask: Any
  eps: float
  mean: Callable[[Any], Any]

  def restrict(self, tree: Any) -> Any:
    """``m ⊙ tree``: zero on the leaves the mask leaves out."""
    if self.mask is None:
      return tree
    return jax.tree.map(_restrict_leaf, tree, self.mask)

  def normalized(self, tree: Any) -> Any:
    """``m ⊙ tree / (‖m ⊙ tree‖ + δ)`` in float32: the norm over the masked leaves."""
    return normalized(self.restrict(tree), self.eps)

  def gradient_at(self, direction: Any, scale: jax.Array) -> optax.Updates:
    """``∇L(w + scale · m ⊙ direction)``, the gradient at the perturbed point."""
    if self.gradient_fn is None:
      raise ValueError("this method re-evaluates no gradient (Ascent built without gradient_fn).")
    return self.gradient_fn(ascent_point(self.params, self.restrict(direction), scale))


Rule: TypeAlias = Callable[..., tuple[optax.Updates, Any]]
"""A method's rule: the surrogate gradient (and new state) of one step.

``rule(grads, state, ascent, **radii) -> (surrogate, state)``: ``grads`` is ``g``, the gradient the rule perturbs with (per device or per
group under a data-parallel option); ``state`` the method's state (its
``count`` is advanced by the skeleton); ``radii`` each radius of the
method at this step, under its name in the constructor.
"""


GradientFactory: TypeAlias = Callable[[optax.Params, Mapping[str, Any]], GradientFn]
"""``factory(params, extra_args) -> (w ↦ ∇L(w))`` for one step (or group)."""

_GROUPS = "sam_optax_groups"  # the vmap axis of Splits, for Ascent.mean


def transformation(
    method: str,
    rule: Rule,
    *,
    radii: Mapping[str, Radius],
    loss_fn: LossFn | None,
    has_aux: bool,
    perturbation: _parallel.Perturbation | None,
    mask: Mask | None,
    eps: float,
    init: Callable[[optax.Params], Any] | None = None,
    gradient_factory: GradientFactory | None = None,
    ascent_gradient_factory: GradientFactory | None = None,
    split_argnames: Sequence[str] = (),
) -> optax.GradientTransformationExtraArgs:
  """Builds a method of the family from its ``rule``: the one skeleton.

  ``update(g, state, params, **extra_args)`` checks its inputs, binds the
  extra arguments to the loss (``gradient_factory``; default: ``jax.grad``
  of ``loss_fn``), evaluates the radii at ``state.count``, resolves the
  mask, runs ``rule`` as the data-parallel option says, casts the result to
  the dtypes of ``g`` and advances ``state.count``:

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
    method itself).

  Args:
    method: the constructor's name, for error messages.
    rule: the method's difference from SAM (see :class:`Rule`).
    radii: the radii by name (floats or schedules), checked here.
    loss_fn, has_aux: the user's loss (see :func:`sam_optax.sam`).
    perturbation: the data-parallel option, checked here.
    mask: the perturbation mask (see :func:`resolve_mask`).
    eps: δ, checked here.
    init: ``init(params) -> state``, a NamedTuple with a ``count`` field
      (default: :class:`SAMState`).
    gradient_factory: ``factory(params, extra_args) -> GradientFn``, for a
      method whose descent gradient is not ``∇ loss_fn``.
    ascent_gradient_factory: the factory of the groups' ``g_i`` under
      :class:`~sam_optax.Splits`.
    split_argnames: extra arguments of the method's own that hold one row
      per example and are split with the batch.

  Returns:
    The method's ``optax.GradientTransformationExtraArgs``.

  Example:
    A method is its rule; SAM's is two lines:

    >>> import jax.numpy as jnp
    >>> from sam_optax import _ascent
    >>> def rule(grads, state, ascent, *, rho):
    ...   return ascent.gradient_at(ascent.normalized(grads), rho), state
    >>> loss_fn = lambda w: jnp.sum(jnp.cos(w))
    >>> tx = _ascent.transformation(
    ...     "my_sam", rule, radii={"rho": 0.05}, loss_fn=loss_fn, has_aux=False,
    ...     perturbation=None, mask=None, eps=_ascent.DEFAULT_EPS)
    >>> w = jnp.ones(3)
    >>> surrogate, state = tx.update(-jnp.sin(w), tx.init(w), w)
    >>> int(state.count)
    1
  """
  for name, value in radii.items():
    check_radius(name, value, method)
  check_callable("loss_fn", loss_fn, method)
  check_positive("eps", eps, method)
  _parallel.check_perturbation(method, perturbation)
  if mask is not None and not callable(mask):
    resolve_mask(method, mask, mask)  # structure and leaf types, at once
  axis_name = _parallel.axis_of(perturbation)

  if gradient_factory is None:
    gradient_factory = lambda params, args: make_gradient_fn(method, loss_fn, has_aux, args)
  if ascent_gradient_factory is None:
    ascent_gradient_factory = gradient_factory
  if init is None:
    init = lambda params: SAMState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, **extra_args):
    check_update_inputs(method, updates, params)
    check_not_masked(method, updates, params)
    values = {name: radius_at(value, state.count) for name, value in radii.items()}
    resolved_mask = resolve_mask(method, mask, params)

    def run(grads, gradient_fn, mean):
      ascent = Ascent(params, gradient_fn, resolved_mask, eps, mean)
      surrogate, new_state = rule(grads, state, ascent, **values)
      return cast_like(surrogate, updates), new_state

    if isinstance(perturbation, _parallel.Synced):
      local_gradient_fn = gradient_factory(params, extra_args)
      surrogate, new_state = run(
          mean_over_axis(updates, axis_name),
          lambda point: mean_over_axis(local_gradient_fn(point), axis_name),
          mean=lambda tree: tree)
    elif isinstance(perturbation, _parallel.Splits):
      axes = _GROUPS if axis_name is None else (_GROUPS, axis_name)

      def one_group(group_args):
        args = {**extra_args, **group_args}
        group_grads = ascent_gradient_factory(params, args)(params)
        return run(group_grads, gradient_factory(params, args),
                   mean=lambda tree: mean_over_axis(tree, axes))

      names = tuple(perturbation.batch_argnames) + tuple(
          name for name in split_argnames if name in extra_args)
      groups = split_arguments(method, extra_args, names, perturbation.n)
      surrogate, new_state = jax.vmap(one_group, axis_name=_GROUPS)(groups)
      surrogate = mean_over_axis(
          jax.tree.map(lambda x: jnp.mean(x, axis=0), surrogate), axis_name)
      # The same in every group by the rule's contract (built from means).
      new_state = jax.tree.map(lambda x: x[0], new_state)
    else:
      surrogate, new_state = run(
          updates, gradient_factory(params, extra_args),
          mean=lambda tree: mean_over_axis(tree, axis_name))
      surrogate = mean_over_axis(surrogate, axis_name)
    return surrogate, new_state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


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


def check_base(method: str, base: Any) -> optax.GradientTransformationExtraArgs:
  """``base`` (a base optimizer) with extra-args support, or a clear TypeError."""
  if not hasattr(base, "init") or not hasattr(base, "update"):
    raise TypeError(
        f"{method}: base_optimizer must be an optax GradientTransformation such"
        f" as optax.sgd(...) or optax.adamw(...), got {type(base).__name__}.")
  return optax.with_extra_args_support(base)


def check_axis_name(method: str, axis_name: Any) -> None:
  """Raises ``TypeError`` unless ``axis_name`` is a non-empty string or None."""
  if axis_name is not None and (not isinstance(axis_name, str) or not axis_name):
    raise TypeError(
        f"{method}: axis_name must be a non-empty string or None, got {axis_name!r}.")


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
          f"{method}: Splits(n={splits}): n must divide the leading (batch)"
          f" dimension of every leaf of {list(names)}, but"
          f" {jax.tree_util.keystr(path) or 'the argument'} has shape {shape}.")
    return jnp.reshape(leaf, (splits, shape[0] // splits) + shape[1:])

  return map_batch_arguments(
      method, extra_args, names,
      f"Splits(n={splits}) splits along axis 0", split)


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
