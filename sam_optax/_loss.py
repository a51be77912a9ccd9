"""Re-evaluating the user's loss inside ``update``.

The extra arguments of ``update`` reach ``loss_fn`` by keyword, checked
against its signature (:func:`loss_arguments`); the loss comes from the
constructor or from the ``loss_fn`` keyword (:func:`resolve_loss_fn`); its
value must be a scalar float (:func:`scalar_loss`); :func:`make_gradient_fn`
puts the three together into ``w ↦ ∇L(w)`` for one step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import optax

from sam_optax import _checks

LossFn: TypeAlias = Callable[..., Any]
"""``loss_fn(params, **extra_args) -> scalar`` (or ``(scalar, aux)``)."""


GradientFn: TypeAlias = Callable[[optax.Params], optax.Updates]
"""``∇L`` at a point, with the extra arguments of this ``update`` bound."""


# Extra arguments that optax itself passes along a chain and that are not
# meant for the user's loss function; they are never forwarded to it.
_NOT_FOR_THE_LOSS = frozenset({"loss_fn", "value", "grad", "value_fn", "ascent_step"})


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
    *,
    source: str | None = None,
) -> dict[str, Any]:
  """The extra arguments of ``update`` that go to ``fn``, checked by name.

  ``source``: where the arguments come from when it is not ``update`` (the
  batches of :mod:`sam_optax.sharpness`, ``"batches[0]"``); then every key
  goes to ``fn``, and the messages name that source.

  Raises:
    TypeError: naming the keyword, if ``fn`` cannot take one of them, or
      naming the missing ones, if ``fn`` requires one that ``update`` did
      not get.
  """
  if source is None:
    arguments = {k: v for k, v in extra_args.items() if k not in _NOT_FOR_THE_LOSS}
  else:
    arguments = dict(extra_args)
  accepted = _accepted_keywords(fn)
  if accepted is not None:
    unknown = sorted(set(arguments) - accepted)
    if unknown and source is not None:
      raise TypeError(
          f"{method}: {source} has key(s) {unknown} that"
          f" {fn_name}{_signature_text(fn)} does not accept. The keys of each"
          f" batch are passed to {fn_name} by keyword; it accepts {sorted(accepted)}.")
    if unknown:
      raise TypeError(
          f"{method}: update() got extra argument(s) {unknown} that"
          f" {fn_name}{_signature_text(fn)} does not accept. The extra"
          f" arguments of update are passed to {fn_name} by keyword; it"
          f" accepts {sorted(accepted)}."
      )
  missing = sorted(_required_keywords(fn) - set(arguments))
  if missing and source is not None:
    raise TypeError(
        f"{method}: {fn_name}{_signature_text(fn)} requires {missing}, but"
        f" {source} has {sorted(arguments) or 'no keys'}: pass batches as"
        " mappings of the keyword arguments of the loss, e.g. {'x': x, 'y': y}.")
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
  _checks.check_callable("loss_fn", loss_fn, method, required=True)
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
