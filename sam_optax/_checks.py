"""Argument validation, written once for every method of the family.

Each check raises at construction (or at trace time, for what only the
``update`` call shows) with a message that names the method, the argument,
the value and what was expected:

* numbers: radii (a float or an optax schedule, :func:`check_radius`),
  positive / non-negative / bounded floats, integers, seeds; a
  hyperparameter that ``optax.inject_hyperparams`` passes as a traced array
  is checked where it is concrete (:func:`is_traced`, :func:`real_number`);
* callables and transformations (:func:`check_callable`,
  :func:`check_inner`, :func:`check_base`) and axis names;
* the inputs of ``update`` (:func:`check_update_inputs`), the parameters
  hidden by ``optax.masked`` (:func:`check_not_masked`) and the placements
  inside ``optax.MultiSteps`` / ``optax.apply_if_finite`` that would be
  silently wrong (:func:`check_not_wrapped`).
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, TypeAlias

import chex
import jax
import jax.numpy as jnp
import optax

Radius: TypeAlias = float | optax.Schedule
"""A neighbourhood radius: a non-negative float or a schedule of the step."""


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


def is_traced(value: Any) -> bool:
  """Whether ``value`` is a tracer: a hyperparameter of ``optax.inject_hyperparams``
  under ``jit``, checked where it is concrete (eagerly), not while tracing."""
  return isinstance(value, jax.core.Tracer)


def real_number(value: Any) -> float | None:
  """``value`` as a float if it is a real number or a concrete 0-d array."""
  if isinstance(value, bool):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if getattr(value, "shape", None) == () and jnp.issubdtype(value.dtype, jnp.number):
    return float(value)
  return None


def _check_number(name: str, value: Any, method: str, what: str) -> None:
  if is_traced(value):
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
  if is_traced(value):
    return
  number = real_number(value)
  if number is None or not math.isfinite(number) or number <= 0:
    raise ValueError(f"{method}: {name} must be finite and > 0, got {name}={value!r}.")


def check_non_negative(name: str, value: float, method: str) -> None:
  """Raises ``ValueError`` unless ``value`` is a finite number >= 0."""
  if is_traced(value):
    return
  number = real_number(value)
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
    if is_traced(value):
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
  if is_traced(value):
    return
  number = real_number(value)
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


def check_axis_not_checked_for_vma(method: str, axis_name: str | tuple[str, ...] | None,
                                   *trees: Any) -> None:
  """Refuses ``shard_map(..., check_vma=True)`` over ``axis_name``.

  With varying-axis checks on (``shard_map``'s default), JAX's autodiff sums
  the gradient of replicated params over the axis itself (the transpose of
  their implicit broadcast), so every per-device gradient that the library
  averages with ``pmean`` would already be a sum: the surrogate (or the
  Hessian of :mod:`sam_optax.sharpness`) would come out ``axis_size`` times
  too large, silently. Under ``check_vma=False`` and ``jax.pmap`` the
  gradient is the device's own. A leaf of ``trees`` (the params, the
  gradient, the batch) that varies over the axis shows the check is on.
  """
  if axis_name is None:
    return
  names = {axis_name} if isinstance(axis_name, str) else set(axis_name)
  for leaf in jax.tree.leaves(trees):
    if not isinstance(leaf, jax.core.Tracer):
      continue
    manual = getattr(jax.typeof(leaf), "manual_axis_type", None)
    if names & set(getattr(manual, "varying", ())):
      raise ValueError(
          f"{method}: axis_name={axis_name!r} is an axis of a jax.shard_map with"
          " check_vma=True, under which JAX already sums the gradient of"
          " replicated params over the axis, so the per-device gradients the"
          " method averages would be counted once per device (a surrogate"
          f" axis_size times too large). Call it inside jax.shard_map(...,"
          " check_vma=False), as experiments/ does, or inside jax.pmap.")


def check_axis_name(method: str, axis_name: Any) -> None:
  """Raises ``TypeError`` unless ``axis_name`` is a non-empty string or None."""
  if axis_name is not None and (not isinstance(axis_name, str) or not axis_name):
    raise TypeError(
        f"{method}: axis_name must be a non-empty string or None, got {axis_name!r}.")


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


# The qualified names (``co_qualname``) of the two optax updates that
# check_not_wrapped refuses. They are optax's private function names, read
# from its source for optax 0.2.4 to 0.2.8 (``MultiSteps.update`` in
# transforms/_accumulation.py, the ``update`` closure of ``apply_if_finite``
# in transforms/_conditionality.py); tests/test_accumulation.py fails, naming
# the one that changed, if an optax release renames them.
MULTI_STEPS_UPDATE = "MultiSteps.update"
APPLY_IF_FINITE_UPDATE = "apply_if_finite.<locals>.update"


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

  The walk matches optax's private function names
  (:data:`MULTI_STEPS_UPDATE`, :data:`APPLY_IF_FINITE_UPDATE`), checked on
  optax 0.2.4 to 0.2.8; a test fails if a release renames them.
  """
  frame: Any = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)
    module = frame.f_globals.get("__name__", "")
    if module.startswith("optax") and name == MULTI_STEPS_UPDATE:
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
    if apply_if_finite and module.startswith("optax") and name == APPLY_IF_FINITE_UPDATE:
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
