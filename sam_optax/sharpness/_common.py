"""What every sharpness measure shares: arguments, batches, the loss, HVPs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax import _checks, _loss, _numerics, _parallel

Batches = Mapping[str, Any] | Iterable[Mapping[str, Any]] | None
"""None, one mapping of keyword arguments of ``loss_fn``, or an iterable of them."""

EXTRA = "pip install 'sam_optax[sharpness]'"


def import_matfree(function: str) -> Any:
  """The ``matfree`` package, or an ``ImportError`` that names the extra."""
  try:
    import matfree  # pylint: disable=import-outside-toplevel
    import matfree.decomp  # pylint: disable=import-outside-toplevel
    import matfree.eig  # pylint: disable=import-outside-toplevel
    import matfree.stochtrace  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        f"sam_optax.sharpness.{function} runs its Krylov methods with matfree,"
        f" which is not installed: {EXTRA} (or pip install 'matfree>=0.6')."
    ) from error
  return matfree


def check_params(function: str, params: Any) -> list[Any]:
  """The leaves of ``params``: at least one, every one a float array."""
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError(f"{function}: params has no arrays (got {params!r}).")
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{function}: every leaf of params must be a float array, but"
          f" params{jax.tree_util.keystr(path)} has dtype {dtype}; pass only the"
          " trainable parameters and bind the rest in loss_fn.")
  return leaves


def num_params(params: Any) -> int:
  return int(sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(params)))


def work_dtype(params: Any) -> Any:
  """The dtype of the Krylov vectors: at least float32 (float64 stays float64)."""
  return jnp.result_type(jnp.float32, *(jnp.result_type(x) for x in jax.tree.leaves(params)))


def batch_list(function: str, loss_fn: Callable[..., Any], batches: Batches, *,
               required: bool = False) -> list[dict[str, Any]]:
  """``batches`` as a non-empty list of mappings of keyword arguments of
  ``loss_fn``, each checked against its signature."""
  _checks.check_callable("loss_fn", loss_fn, function, required=True)
  if batches is None:
    if required:
      raise ValueError(
          f"{function}: batches is required: a mapping of the keyword arguments of"
          " loss_fn (batches={'x': x, 'y': y}) or a non-empty list of them.")
    listed: list[Any] = [{}]
  elif isinstance(batches, Mapping):
    listed = [batches]
  elif isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable) or hasattr(
      batches, "shape"):
    raise TypeError(
        f"{function}: batches must be None, a mapping of keyword arguments of"
        " loss_fn (e.g. {'x': x, 'y': y}) or an iterable of such mappings, got"
        f" {type(batches).__name__}.")
  else:
    listed = list(batches)
  if not listed:
    raise ValueError(
        f"{function}: batches is empty; pass at least one mapping of keyword"
        " arguments of loss_fn.")
  checked = []
  for index, batch in enumerate(listed):
    if not isinstance(batch, Mapping):
      raise TypeError(
          f"{function}: every element of batches must be a mapping of keyword"
          f" arguments of loss_fn, but batches[{index}] is a"
          f" {type(batch).__name__}.")
    source = "batches" if batches is None or isinstance(batches, Mapping) else f"batches[{index}]"
    checked.append(_loss.loss_arguments(function, "loss_fn", loss_fn, batch, source=source))
  return checked


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def split_static(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
  """The array leaves of ``tree`` and a function rebuilding it from them.

  Leaves that are not arrays (a Python flag such as ``train=False``) stay
  Python values, closed over, so that ``loss_fn`` can branch on them.
  """
  leaves, treedef = jax.tree.flatten(tree)
  where = [_is_array(leaf) for leaf in leaves]
  arrays = [leaf for leaf, is_array in zip(leaves, where) if is_array]

  def rebuild(new_arrays: list[Any]) -> Any:
    it = iter(new_arrays)
    return jax.tree.unflatten(
        treedef, [next(it) if is_array else leaf for leaf, is_array in zip(leaves, where)])

  return arrays, rebuild


def jit_call(fn: Callable[..., Any], *trees: Any) -> Any:
  """``fn(*trees)`` compiled once, the non-array leaves of ``trees`` static."""
  arrays, rebuild = split_static(trees)
  return jax.jit(lambda arrays: fn(*rebuild(arrays)))(arrays)


def _stackable(batches: list[Mapping[str, Any]]) -> bool:
  first: Any = jax.tree.structure(batches[0])
  shapes = None
  for batch in batches:
    leaves, treedef = jax.tree.flatten(batch)
    if treedef != first or not all(_is_array(leaf) or isinstance(leaf, jax.core.Tracer)
                                   for leaf in leaves):
      return False
    these = [(jnp.shape(leaf), jnp.result_type(leaf)) for leaf in leaves]
    if shapes is not None and these != shapes:
      return False
    shapes = these
  return True


def mean_over_batches(
    fn: Callable[[jax.Array, Mapping[str, Any]], Any],
    batches: list[Mapping[str, Any]],
    weights: list[int] | None = None,
) -> Any:
  """``Σ_b w_b fn(b, batch_b) / Σ_b w_b`` (equal weights by default).

  Batches of one structure and shapes are stacked and scanned over
  (:func:`sam_optax._parallel.mean_over_groups`: one batch's intermediate
  values alive at a time, the sum in at least float32); others are summed in
  a Python loop (one copy of ``fn`` each in the program).
  """
  if len(batches) == 1:
    return fn(jnp.zeros([], jnp.int32), batches[0])
  if _stackable(batches) and (weights is None or len(set(weights)) == 1):
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches)
    indices = jnp.arange(len(batches), dtype=jnp.int32)
    return _parallel.mean_over_groups(lambda group: fn(*group), (indices, stacked), len(batches))
  weights = [1] * len(batches) if weights is None else weights
  total = sum(weights)
  outs = [fn(jnp.asarray(i, jnp.int32), batch) for i, batch in enumerate(batches)]

  def weighted_mean(*values):
    dtype = jnp.promote_types(jnp.result_type(values[0]), jnp.float32)
    total_value = jnp.zeros(jnp.shape(values[0]), dtype)
    for weight, value in zip(weights, values):
      total_value = total_value + weight / total * jnp.asarray(value, dtype)
    return total_value.astype(jnp.result_type(values[0]))

  return jax.tree.map(weighted_mean, *outs)


def hessian_vector_product(
    value: Callable[..., jax.Array],
    params: Any,
    batches: list[Mapping[str, Any]],
    axis_name: str | None,
) -> Callable[[Any], Any]:
  """``v ↦ H v`` with ``H = ∇²(1/B Σ_b L_b)(w)``, forward-over-reverse.

  ``v`` is a pytree like ``params`` in :func:`work_dtype`; it is cast to each
  parameter's dtype for ``jax.jvp`` of ``jax.grad`` and the product is
  returned (and averaged over batches and over ``axis_name``) in the work
  dtype, so that bf16 parameters give float32 products.
  """
  dtype = work_dtype(params)

  def product(vector: Any) -> Any:
    tangent = _numerics.cast_like(vector, params)

    def of_batch(index, batch):
      del index
      _, out = jax.jvp(lambda p: jax.grad(value)(p, **batch), (params,), (tangent,))
      return jax.tree.map(lambda x: x.astype(dtype), out)

    return _parallel.mean_over_axis(mean_over_batches(of_batch, batches), axis_name)

  return product
