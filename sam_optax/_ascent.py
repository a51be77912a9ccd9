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
  examples: :func:`split_arguments`, :func:`mean_over_axis`), gradient
  accumulation over micro-batches (:func:`mean_over_groups`), the state kept
  on a step whose surrogate is not finite (:func:`keep_state_if_not_finite`)
  and the trace-time refusal of the placements that would be silently wrong
  (:func:`check_not_wrapped`);
* what wrappers of a method share (:func:`check_inner`, :func:`cond`,
  :func:`advance_counts`) and the scheduling aid :func:`sequenced`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import sys
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
_NOT_FOR_THE_LOSS = frozenset({"loss_fn", "value", "grad", "value_fn", "ascent_step"})

# The extra argument of ``update`` that chooses the phase of a method with a
# cheap phase (``every_k``, ``with_probability``, ``looksam``) at trace time.
ASCENT_STEP = "ascent_step"


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
  return linear_combination(1.0, tree_a, scale, tree_b, like=tree_a if like is None else like)


def linear_combination(scale_a: float | jax.Array, tree_a: Any, scale_b: float | jax.Array,
                       tree_b: Any, like: Any) -> Any:
  """``scale_a·a + scale_b·b`` computed in float32, cast leafwise to the dtypes of ``like``."""
  return jax.tree.map(
      lambda a, b, ref: (scale_a * jnp.asarray(a, jnp.float32)
                         + scale_b * jnp.asarray(b, jnp.float32)).astype(ref.dtype),
      tree_a, tree_b, like)


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

  def perturbed_params(self, direction: Any, scale: jax.Array) -> optax.Params:
    """``ŵ = w + scale · m ⊙ direction``, in the parameters' dtypes."""
    return ascent_point(self.params, self.restrict(direction), scale)

  def gradient_at(self, direction: Any, scale: jax.Array) -> optax.Updates:
    """``∇L(w + scale · m ⊙ direction)``, the gradient at the perturbed point."""
    if self.gradient_fn is None:
      raise ValueError("this method re-evaluates no gradient (Ascent built without gradient_fn).")
    return self.gradient_fn(self.perturbed_params(direction, scale))


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
    phased: bool = False,
    unsupported: Mapping[str, str] | None = None,
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
    method itself). With ``sequential=True`` the groups run one after the
    other (:func:`mean_over_groups`): the surrogate and the floating leaves
    of the new state are the means over the groups, so the rule's new state
    must be an affine function of the values it averages with
    ``Ascent.mean`` (true of every rule here but LookSAM's, which says so in
    ``unsupported``);
  * :class:`~sam_optax.MicroBatches`: the rule runs once on ``g`` (averaged
    over the option's axis, if any); its ``gradient_fn`` is the mean over the
    micro-batches of the per-micro-batch gradients (:func:`mean_over_groups`).

  Whatever the option, the step's new state is kept only if the surrogate
  is finite (:func:`keep_state_if_not_finite`), and ``update`` refuses, at
  trace time, to run inside ``optax.MultiSteps`` or ``optax.apply_if_finite``
  (:func:`check_not_wrapped`).

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
    phased: whether the method has a cheap phase (LookSAM): the rule then
      also gets ``ascent_step``, the extra argument of ``update`` (None, or
      the phase as a Python bool, see :func:`chosen_phase`). Other methods
      reject ``ascent_step=False``.
    unsupported: ``{option: reason}`` for the data-parallel options the
      method cannot take, keyed as :func:`sam_optax._parallel.kind_of`
      spells them (``"MicroBatches"``, ``"Splits(sequential=True)"``, ...);
      such an option is refused at construction with the reason.

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
  kind = _parallel.kind_of(perturbation)
  if unsupported and kind in unsupported:
    raise ValueError(f"{method}: perturbation={perturbation!r} is not supported: {unsupported[kind]}")
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
    check_not_wrapped(method)
    check_update_inputs(method, updates, params)
    check_not_masked(method, updates, params)
    values = {name: radius_at(value, state.count) for name, value in radii.items()}
    if phased:
      values[ASCENT_STEP] = extra_args.pop(ASCENT_STEP, None)
    else:
      reject_phase(method, extra_args)
    resolved_mask = resolve_mask(method, mask, params)

    def run(grads, gradient_fn, mean):
      ascent = Ascent(params, gradient_fn, resolved_mask, eps, mean)
      surrogate, new_state = rule(grads, state, ascent, **values)
      return cast_like(surrogate, updates), new_state

    def split(option: _parallel.Splits | _parallel.MicroBatches, names: Sequence[str]):
      return split_arguments(method, extra_args, names, option.n, type(option).__name__)

    if isinstance(perturbation, _parallel.Synced):
      local_gradient_fn = gradient_factory(params, extra_args)
      surrogate, new_state = run(
          mean_over_axis(updates, axis_name),
          lambda point: mean_over_axis(local_gradient_fn(point), axis_name),
          mean=lambda tree: tree)
    elif isinstance(perturbation, _parallel.MicroBatches):
      micro_batches = split(perturbation, perturbation.batch_argnames)

      def accumulated_gradient_fn(point):
        return mean_over_axis(mean_over_groups(
            lambda micro: gradient_factory(params, {**extra_args, **micro})(point),
            micro_batches, perturbation.n), axis_name)

      surrogate, new_state = run(mean_over_axis(updates, axis_name), accumulated_gradient_fn,
                                 mean=lambda tree: tree)
    elif isinstance(perturbation, _parallel.Splits):
      sequential = perturbation.sequential
      axes = axis_name if sequential else (
          _GROUPS if axis_name is None else (_GROUPS, axis_name))

      def one_group(group_args):
        args = {**extra_args, **group_args}
        group_grads = ascent_gradient_factory(params, args)(params)
        return run(group_grads, gradient_factory(params, args),
                   mean=lambda tree: mean_over_axis(tree, axes))

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
      surrogate = mean_over_axis(surrogate, axis_name)
    else:
      surrogate, new_state = run(
          updates, gradient_factory(params, extra_args),
          mean=lambda tree: mean_over_axis(tree, axis_name))
      surrogate = mean_over_axis(surrogate, axis_name)
    new_state = keep_state_if_not_finite(surrogate, state, new_state)
    return surrogate, new_state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def keep_state_if_not_finite(surrogate: Any, state: Any, new_state: Any) -> Any:
  """``new_state`` if every leaf of ``surrogate`` is finite, else ``state``.

  The method's accumulators (LookSAM's ``g_v``, FriendlySAM's and VaSSO's
  EMAs, ...) never take in a step whose surrogate gradient holds a NaN or an
  inf (e.g. a NaN of the loss at the ascent point): that step's state is
  the previous one. Its ``count`` is advanced by the caller either way, as
  on a skipped step of :func:`sam_optax.every_k` (:func:`advance_counts`),
  so ρ schedules keep following the step number; the phase of the next step
  (``ascent_next``) is step bookkeeping too and always advances. A state of
  counts only is returned as it is.
  """
  def is_bookkeeping(path):
    return (bool(path) and isinstance(path[-1], jax.tree_util.GetAttrKey)
            and path[-1].name in ("count", "ascent_next"))

  kept = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(new_state)
          if not is_bookkeeping(path)]
  if not kept:
    return new_state
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(surrogate)]))
  return jax.tree_util.tree_map_with_path(
      lambda path, new, old: new if is_bookkeeping(path) else jnp.where(finite, new, old),
      new_state, state)


# The qualified names of the two optax updates that check_not_wrapped refuses.
_MULTI_STEPS = "MultiSteps.update"
_APPLY_IF_FINITE = "apply_if_finite.<locals>.update"


def check_not_wrapped(method: str, *, apply_if_finite: bool = True,
                      multi_steps: str | None = None) -> None:
  """Raises ``TypeError`` if ``method``'s update runs inside ``optax.MultiSteps``
  (or, with ``apply_if_finite``, inside ``optax.apply_if_finite``).

  It walks the Python call stack outward looking for the code of those two
  optax updates, so it costs nothing once the step is traced (it runs at
  trace time, or on each eager call). Both placements are silently wrong
  for a method that re-evaluates the gradient:

  * ``optax.MultiSteps(optax.chain(method, base), k)`` calls the inner
    update on every micro-step, with the running average of the gradients
    and the extra arguments of the current micro-batch, and keeps the state
    only when it emits: ``k`` re-evaluations per step, and the step applies
    the gradient of the last micro-batch at the averaged ascent point,
    neither global-batch nor per-micro-batch SAM.
  * ``optax.apply_if_finite(optax.chain(method, base))`` checks the gradient
    it is given, finite at ``w``, before the method re-evaluates it at the
    ascent point: a NaN there reaches the parameters (``notfinite_count``
    stays 0).

  ``multi_steps``: the method's own reason and remedy for the MultiSteps
  message (default: the SAM family's).
  """
  frame: Any = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)
    module = frame.f_globals.get("__name__", "")
    if module.startswith("optax") and name == _MULTI_STEPS:
      if multi_steps is not None:
        raise TypeError(f"{method}: update() runs inside optax.MultiSteps, {multi_steps}")
      raise TypeError(
          f"{method}: update() runs inside optax.MultiSteps, which calls it on every"
          " micro-step with the running average of the gradients and the extra"
          " arguments of the current micro-batch only, keeping its state only when it"
          " emits: the step would apply the gradient of the last micro-batch at the"
          " averaged ascent point (k re-evaluations per step), neither global-batch"
          " nor per-micro-batch SAM. Drop MultiSteps and call update once per"
          " optimizer step with the whole batch and either"
          f" sam_optax.{method}(..., perturbation=sam_optax.MicroBatches(k)) (one ascent"
          " from the accumulated gradient, e.g. sam_optax.accumulated_grad(loss_fn, k):"
          f" global-batch SAM) or sam_optax.{method}(...,"
          " perturbation=sam_optax.Splits(k, sequential=True)) (an ascent per"
          " micro-batch, averaged); both loop over the micro-batches with jax.lax.scan."
          " See the README, 'Gradient accumulation'.")
    if apply_if_finite and module.startswith("optax") and name == _APPLY_IF_FINITE:
      hint = (" wsam_decoupled adds its sharpness term after its own base optimizer,"
              " so no apply_if_finite placement protects it: use sam_optax.wsam(...)"
              " chained before optax.apply_if_finite(base) instead."
              if method == "wsam_decoupled" else "")
      raise TypeError(
          f"{method}: update() runs inside optax.apply_if_finite, which checks the"
          " gradient it is given (at w) before the method re-evaluates the loss at the"
          " perturbed weights: a NaN or inf at the ascent point would reach the"
          " parameters unnoticed. Put the check after the method instead:"
          f" optax.chain(sam_optax.{method}(...), optax.apply_if_finite(base_optimizer,"
          " max_consecutive_errors)); it also catches a non-finite gradient at w, which"
          " makes the surrogate non-finite." + hint)
    frame = frame.f_back


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


# --------------------------------------------------------------------------
# The phase of a method that re-evaluates on some steps only.
# --------------------------------------------------------------------------


def _phase_mismatch(method: str, ascent_step: bool) -> str:
  taken = "the ascent (full) step" if ascent_step else "the cheap step"
  return (
      f"{method}: the step was traced with ascent_step={ascent_step} ({taken}),"
      f" but the method's state says this step is {'not ' if ascent_step else ''}an"
      " ascent step. Pass ascent_step=sam_optax.takes_ascent_step(opt_state),"
      " read from the state before the step.")


def chosen_phase(method: str, ascent_step: Any, predicate: jax.Array) -> Any:
  """The phase of this step: ``predicate``, or the static ``ascent_step`` checked.

  ``ascent_step=None`` (the default): ``predicate`` (traced under ``jit``),
  for :func:`cond` to branch on at run time. ``ascent_step`` a Python bool:
  the phase chosen at trace time (a compiled step per phase, no
  ``lax.cond``); it must agree with ``predicate``, checked eagerly when
  ``predicate`` is concrete and by a host callback when it is traced (a
  mismatch raises an error from the step, never a silently different
  schedule).

  Raises:
    TypeError: if ``ascent_step`` is neither None nor a bool.
    ValueError: if a concrete ``predicate`` disagrees with ``ascent_step``.
  """
  if ascent_step is None:
    return predicate
  if not isinstance(ascent_step, (bool, np.bool_)):
    raise TypeError(
        f"{method}: ascent_step must be a Python bool (the phase, chosen when the"
        f" step is traced) or None (the phase chosen by jax.lax.cond), got"
        f" {type(ascent_step).__name__} {ascent_step!r}.")
  ascent_step = bool(ascent_step)
  if isinstance(predicate, jax.core.Tracer):

    def check(value):
      if bool(value) != ascent_step:
        raise ValueError(_phase_mismatch(method, ascent_step))

    jax.debug.callback(check, predicate)
  elif bool(predicate) != ascent_step:
    raise ValueError(_phase_mismatch(method, ascent_step))
  return ascent_step


def reject_phase(method: str, extra_args: Mapping[str, Any]) -> None:
  """For a method without a cheap phase: ``ascent_step=False`` is an error."""
  if extra_args.get(ASCENT_STEP, True) is not True:
    raise ValueError(
        f"{method}: got ascent_step={extra_args[ASCENT_STEP]!r}, but {method} takes"
        " its ascent step on every step (ascent_step chooses the phase of"
        " every_k, with_probability, interval_sam, stochastic_sam and looksam;"
        " wrap this method in one of them).")


def takes_ascent_step(opt_state: Any) -> bool | None:
  """Whether the next ``update`` with ``opt_state`` takes the ascent step.

  For the methods with a cheap phase (:func:`sam_optax.every_k`,
  :func:`sam_optax.with_probability`, :func:`sam_optax.interval_sam`,
  :func:`sam_optax.stochastic_sam`, :func:`sam_optax.looksam`) the state
  holds the phase of its next step (``ascent_next``). Reading it on the host
  lets a training loop choose between two compiled steps, one traced with
  ``ascent_step=True`` and one with ``ascent_step=False``, so neither holds a
  ``jax.lax.cond`` (on XLA:CPU convolution gradients inside a conditional
  branch run several times slower). The outermost such method is read (a
  state nested inside it is not); ``update`` checks the value it is given
  against its state. The read waits for the previous step to finish, which
  costs about a millisecond per step on CPU: for steps shorter than that
  (small MLPs) keep ``lax.cond`` (``benchmarks/RESULTS.md`` has both forms).

  Args:
    opt_state: the state of the whole optimizer (a chain, a state under
      ``pmap`` with a leading device axis, a sharded state).

  Returns:
    The phase as a Python bool, or None if no method of ``opt_state`` has a
    cheap phase (then call ``update`` without ``ascent_step``).

  Example:
    >>> import functools, jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(sam_optax.interval_sam(0.05, k=3, loss_fn=loss_fn),
    ...                  optax.sgd(0.1))
    >>> @functools.partial(jax.jit, static_argnames="ascent_step")
    ... def step(params, state, x, ascent_step):
    ...   updates, state = tx.update(jax.grad(loss_fn)(params, x), state, params,
    ...                              x=x, ascent_step=ascent_step)
    ...   return optax.apply_updates(params, updates), state
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> phases = []
    >>> for _ in range(4):
    ...   phases.append(sam_optax.takes_ascent_step(state))
    ...   params, state = step(params, state, x, ascent_step=phases[-1])
    >>> phases
    [True, False, False, True]
  """
  phases = [(len(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
            if path and isinstance(path[-1], jax.tree_util.GetAttrKey)
            and path[-1].name == "ascent_next"]
  if not phases:
    return None
  _, outermost = min(phases, key=lambda phase: phase[0])
  values = np.asarray(jax.device_get(outermost)).ravel()
  if values.size and not (values == values[0]).all():
    raise ValueError(
        "takes_ascent_step: the phase differs across the devices"
        f" ({values.tolist()}); the state of a method with a cheap phase must"
        " be the same on every device.")
  return bool(values[0])


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


def _check_transformation(method: str, name: str, value: Any, example: str
                          ) -> optax.GradientTransformationExtraArgs:
  if not hasattr(value, "init") or not hasattr(value, "update"):
    raise TypeError(
        f"{method}: {name} must be an optax GradientTransformation such as"
        f" {example}, got {type(value).__name__}.")
  return optax.with_extra_args_support(value)


def check_inner(method: str, inner: Any) -> optax.GradientTransformationExtraArgs:
  """``inner`` (a method of this family) with extra-args support, or a clear TypeError."""
  return _check_transformation(method, "inner", inner, "sam_optax.sam(...) (of this family)")


def check_base(method: str, base: Any) -> optax.GradientTransformationExtraArgs:
  """``base`` (a base optimizer) with extra-args support, or a clear TypeError."""
  return _check_transformation(method, "base_optimizer", base,
                               "optax.sgd(...) or optax.adamw(...)")


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
