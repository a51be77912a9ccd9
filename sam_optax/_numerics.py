"""Tree arithmetic of the family, accumulated in float32.

(In float64 where the parameters are float64: every value is computed in
float32 or in its own dtype if that is wider, :func:`at_least_float32`.)

Whatever the parameters' dtype (bfloat16 included), norms, inner products
and the combinations of gradients are computed in float32 and cast back
leafwise: the global norm and inner product (:func:`global_norm`,
:func:`vdot`), the guarded division ``x / (‖y‖ + δ)``
(:func:`divide_by_norm`, :func:`normalized`), the orthogonal component
(:func:`orthogonal_part`), the ascent point ``w + s·d``
(:func:`ascent_point`), moving averages, the value of a radius at a step
(:func:`radius_at`) and the scheduling aid :func:`sequenced`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _checks

DEFAULT_EPS = 1e-12


def radius_at(radius: _checks.Radius, count: jax.Array) -> jax.Array:
  """The value of ``radius`` at step ``count``, as a float32 scalar (float64 under x64)."""
  value = radius(count) if callable(radius) else radius
  return at_least_float32(value)


def at_least_float32(x: Any) -> jax.Array:
  """``x`` in float32, or in its own dtype if that is wider (float64 stays float64)."""
  return jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))


def _float32(tree: Any) -> Any:
  return jax.tree.map(at_least_float32, tree)


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
      lambda a, b, ref: (scale_a * at_least_float32(a)
                         + scale_b * at_least_float32(b)).astype(ref.dtype),
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
  return jax.tree.map(lambda x: at_least_float32(x) * inv, tree)


def orthogonal_part(tree: Any, onto: Any, eps: float, like: Any = None) -> Any:
  """``tree − (⟨tree, onto⟩ / (‖onto‖² + δ)) · onto``: the component of ``tree``
  orthogonal to ``onto``, in the dtypes of ``like`` (default ``tree``)."""
  projection = divide_by_norm(vdot(tree, onto), onto, eps, squared=True)
  return scaled_sum(tree, -projection, onto, like=tree if like is None else like)


def rescale_to_norm(tree: Any, reference: Any, eps: float) -> Any:
  """StableSAM's renormalization ``(‖reference‖ / (‖tree‖ + δ)) · tree``."""
  scale = divide_by_norm(global_norm(reference), tree, eps)
  return jax.tree.map(
      lambda x: (at_least_float32(x) * scale).astype(x.dtype), tree
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
      lambda a, x: (decay * at_least_float32(a)
                    + (1.0 - decay) * at_least_float32(x)).astype(a.dtype),
      average, new)


def cast_like(tree: Any, like: Any) -> Any:
  """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
  return jax.tree.map(lambda x, ref: jnp.asarray(x).astype(ref.dtype), tree, like)


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
