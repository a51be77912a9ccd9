"""StableSAM: renormalize any surrogate gradient to the exact gradient's norm."""

from __future__ import annotations

import optax

from sam_optax import _checks, _numerics, _parallel


def stable_sam(
    inner: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""StableSAM (Tan et al., JMLR, arXiv:2401.07250): a renormalizing wrapper.

  With ``g`` the incoming (exact) gradient and ``g̃`` the surrogate gradient
  that ``inner`` returns:

  .. math::

    ĝ = \frac{‖g‖}{‖g̃‖ + δ} \, g̃.

  No clipping of the scale. It wraps any method of the family (``sam``,
  ``usam``, ``asam``, ``gsam``, ``csam``, ``bsam``, ...): the state is the
  inner state and the extra arguments pass through. The paper's analysis
  uses the unnormalized ascent (``sam_optax.usam``, e.g. ρ = 0.05 with
  lr 0.05); the normalized one works too.

  With data parallelism the inner surrogate is averaged across the axis of
  the inner method's ``perturbation``, so pass that axis as ``axis_name``
  here: ``‖g‖`` is then taken of the incoming gradient averaged across it,
  the gradient of the whole batch, the same on every device.

  Args:
    inner: a transform of this family (or any ``GradientTransformation``
      that maps a gradient to a surrogate gradient).
    axis_name: the data-parallel axis the inner method averages over (the
      ``axis_name`` of its ``perturbation``), or None without one.
    eps: δ, added to ``‖g̃‖``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain it before the base
    optimizer.

  References:
    Tan et al., `Stabilizing Sharpness-Aware Minimization Through A Simple
    Renormalization Strategy <https://arxiv.org/abs/2401.07250>`_, JMLR.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(
    ...     sam_optax.stable_sam(sam_optax.usam(0.05, loss_fn=loss_fn)),
    ...     optax.sgd(0.05))
    >>> params = jnp.ones(4)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=jnp.arange(4.0))
    >>> updates, state = tx.update(grads, state, params, x=jnp.arange(4.0))
    >>> bool(jnp.allclose(optax.tree.norm(updates), 0.05 * optax.tree.norm(grads)))
    True
  """
  inner = _checks.check_inner("stable_sam", inner)
  _checks.check_positive("eps", eps, "stable_sam")
  _checks.check_axis_name("stable_sam", axis_name)

  def update(updates, state, params=None, **extra_args):
    _checks.check_not_masked("stable_sam", updates, params, wrapper=True)
    surrogate, state = inner.update(updates, state, params, **extra_args)
    exact = _parallel.mean_over_axis(updates, axis_name)
    return _numerics.rescale_to_norm(surrogate, exact, eps), state

  return optax.GradientTransformationExtraArgs(inner.init, update)
