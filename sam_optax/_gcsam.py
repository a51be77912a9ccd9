"""GCSAM: SAM's ascent along the centralized gradient."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks, _numerics
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation


def centralized(tree: Any, output_axis: int = -1) -> Any:
  """Gradient centralization, in float32 (or wider): each leaf with more than one axis
  minus its mean over every axis but ``output_axis``; other leaves as given.

  ``output_axis=-1`` is Flax's layout (``Dense`` kernel ``[in, out]``,
  ``Conv`` kernel ``[kh, kw, in, out]``): the mean over the fan-in of each
  output unit, PyTorch's ``x.mean(dim=(1, ..., n−1))`` on its ``[out, in]``
  and ``[out, in, kh, kw]`` weights.
  """

  def leaf(x):
    x = _numerics.at_least_float32(x)
    if x.ndim <= 1:
      return x
    axes = tuple(a for a in range(x.ndim) if a != output_axis % x.ndim)
    return x - jnp.mean(x, axis=axes, keepdims=True)

  return jax.tree.map(leaf, tree)


def gcsam(
    rho: Radius = 0.05,
    *,
    output_axis: int = -1,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-centralized SAM (GCSAM, Hassan, Vakanski, Zhang & Xian, 2025, arXiv:2501.11584).

  SAM's ascent along the *centralized* gradient: for every leaf with more
  than one axis (kernels), the mean over its fan-in is removed from each
  output unit's gradient (gradient centralization, Yong et al., ECCV 2020).
  With ``g = ∇L(w)``:

  .. math::

    C(g)_{…,o} = g_{…,o} − \operatorname{mean}_{\text{axes} ≠ o}\, g_{…,o},
    \qquad ŵ = w + ρ\, m ⊙ C(g) / (‖m ⊙ g‖ + δ), \qquad g̃ = ∇L(ŵ),

  (``C`` is the identity on biases and other leaves of one axis). The
  transform returns the *plain* ``g̃``: only the ascent is centralized.

  Pinned to the authors' code (``Mohamed-Hassan22/GCSAM``,
  ``cifar10_gcsam_resnet50.py``): ``centralized_gradient(x, use_gc=True,
  gc_conv_only=False)`` (lines 96–104) subtracts ``x.mean(dim=(1, …,
  n−1))`` from every tensor with ``ndim > 1``; ``GCSAM.first_step`` (lines
  123–136) takes the norm ``‖g‖`` *before* centralizing (line 124), then
  ``e_w = C(g) · ρ / (‖g‖ + 1e-12)`` (lines 131–132); ``second_step``
  leaves the perturbed gradient as it is (the centralization there is
  commented out, line 143) and the base optimizer steps on it. So ``‖ε‖ ≤
  ρ``; we keep the raw norm, as the code does.

  **Layout.** PyTorch weights are ``[out, in, kh, kw]`` and ``[out, in]``
  (output axis first, mean over the rest); Flax's kernels are ``[kh, kw,
  in, out]`` and ``[in, out]`` (output axis last), hence
  ``output_axis=-1``, the mean over every axis but the last. For a
  parameter whose output axis is not the last (``nn.Embed``'s
  ``[vocab, features]`` embedding, a ``DenseGeneral`` with several output
  axes), leave it out with ``mask``, or build a second transform.

  Args:
    rho: ρ ≥ 0, a float or an optax schedule (0.05 in the authors' code).
    output_axis: the axis of the output units in every kernel (−1: Flax).
    loss_fn, has_aux, perturbation, mask, eps: see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; chain it before the base
    optimizer.

  References:
    Hassan et al., `GCSAM: Gradient Centralized Sharpness Aware
    Minimization <https://arxiv.org/abs/2501.11584>`_, 2025; code
    https://github.com/Mohamed-Hassan22/GCSAM. Yong et al., `Gradient
    Centralization <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, x):
    ...   return jnp.mean(jnp.tanh(x @ params['kernel'] + params['bias']) ** 2)
    >>> params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> tx = optax.chain(sam_optax.gcsam(0.05, loss_fn=loss_fn), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x)
    >>> updates, state = tx.update(grads, state, params, x=x)
    >>> jax.tree.map(jnp.shape, updates)
    {'bias': (2,), 'kernel': (3, 2)}
  """
  method = "gcsam"
  if isinstance(output_axis, bool) or not isinstance(output_axis, int):
    raise TypeError(
        f"{method}: output_axis must be a Python int, got {output_axis!r}."
        + (_checks.static_args_hint(method, "output_axis")
           if isinstance(output_axis, jax.Array) else ""))

  def rule(grads, state, ascent, *, rho):
    scale = _numerics.divide_by_norm(rho, ascent.restrict(grads), ascent.eps)
    return ascent.gradient_at(centralized(grads, output_axis), scale), state

  return _ascent.transformation(
      method, rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps)
