"""Gradient accumulation: the first gradient of a step, over micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _checks, _loss, _parallel
from sam_optax._loss import LossFn


def accumulated_grad(
    loss_fn: LossFn,
    n: int,
    *,
    batch_argnames: Sequence[str] = ("batch",),
    has_aux: bool = False,
) -> Callable[..., Any]:
  r"""``jax.grad(loss_fn)`` of a whole batch, accumulated over ``n`` micro-batches.

  The returned function takes ``(params, **extra_args)``, splits the extra
  arguments named in ``batch_argnames`` along axis 0 into ``n``
  micro-batches ``B_1, …, B_n`` (micro-batch ``i``: rows ``i·B/n`` to
  ``(i+1)·B/n − 1``, as :class:`sam_optax.MicroBatches` splits them) and
  returns

  .. math::

    g = \frac1n \sum_{i=1}^n ∇L_{B_i}(w),

  computed one micro-batch after the other (``jax.lax.scan``), so only one
  micro-batch's activations are alive at a time; the sum is kept in float32
  (at least). For a loss that is a mean over examples and micro-batches of
  equal size, ``g`` is the gradient of the whole batch. It is the first
  gradient of a step of a method built with
  ``perturbation=sam_optax.MicroBatches(n, batch_argnames)``.

  Args:
    loss_fn: ``loss_fn(params, **extra_args) -> scalar`` (or ``(scalar,
      aux)`` with ``has_aux``), the loss of one micro-batch.
    n: the number of micro-batches, an int ≥ 1 that divides the leading
      (batch) dimension of every leaf of the named arguments.
    batch_argnames: the extra arguments to split; the others (model state,
      a PRNG key) are passed whole to every micro-batch.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; the result is then
      ``(g, aux)`` with every leaf of ``aux`` stacked along a new leading axis
      of size ``n`` (micro-batch ``i``'s at index ``i``).

  Returns:
    ``grad_fn(params, **extra_args) -> g`` (``(g, aux)`` with ``has_aux``),
    ``g`` in the dtypes of ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, sam_optax
    >>> def loss_fn(w, batch):
    ...   x, y = batch
    ...   return jnp.mean((x @ w - y) ** 2)
    >>> x, y = jnp.arange(24.0).reshape(8, 3) / 10, jnp.ones(8)
    >>> w = jnp.array([0.1, -0.2, 0.3])
    >>> g = sam_optax.accumulated_grad(loss_fn, 4)(w, batch=(x, y))
    >>> bool(jnp.allclose(g, jax.grad(loss_fn)(w, (x, y)), rtol=1e-5))
    True
  """
  method = "accumulated_grad"
  _checks.check_callable("loss_fn", loss_fn, method, required=True)
  _checks.check_int("n", n, 1, method)
  names = _parallel.MicroBatches(n, batch_argnames).batch_argnames  # checked there
  if not isinstance(has_aux, bool):
    raise TypeError(f"{method}: has_aux must be a bool, got has_aux={has_aux!r}.")

  def grad_fn(params: optax.Params, **extra_args: Any) -> Any:
    arguments = _loss.loss_arguments(method, "loss_fn", loss_fn, extra_args)
    micro_batches = _parallel.split_arguments(method, arguments, names, n, "MicroBatches")
    if not has_aux:
      value = _loss.scalar_loss(method, loss_fn, has_aux=False)
      return _parallel.mean_over_groups(
          lambda micro: jax.grad(value)(params, **{**arguments, **micro}), micro_batches, n)

    def loss_and_aux(point, args):
      out = loss_fn(point, **args)
      if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"{method}: has_aux=True, so loss_fn must return (loss, aux),"
                         f" got {type(out).__name__}.")
      return _loss.scalar_loss(method, lambda *_, **__: out[0], has_aux=False)(point), out[1]

    def body(total, micro):
      grads, aux = jax.grad(loss_and_aux, has_aux=True)(params, {**arguments, **micro})
      return jax.tree.map(lambda t, g: t + g.astype(t.dtype), total, grads), aux

    zeros = jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)),
        params)
    total, aux = jax.lax.scan(body, zeros, micro_batches)
    return jax.tree.map(lambda t, p: (t / n).astype(jnp.result_type(p)), total, params), aux

  return grad_fn
