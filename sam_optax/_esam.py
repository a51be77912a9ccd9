"""ESAM: efficient SAM by stochastic weight perturbation and data selection."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _checks, _loss, _numerics, _parallel
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation


class ESAMState(NamedTuple):
  """State of :func:`esam`.

  Attributes:
    count: steps taken.
    key: the raw ``uint32[2]`` PRNG key. Step ``t`` keeps leaf ``j`` (in
      ``jax.tree.leaves`` order) iff ``jax.random.bernoulli(
      jax.random.split(jax.random.fold_in(key, t), n_leaves)[j], beta)``.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  key: jax.Array


def keep_mask(key: jax.Array, tree: Any, beta: float) -> Any:
  """SWP's mask: a bool per leaf of ``tree``, each True with probability β.

  Leaf ``j`` (in ``jax.tree.leaves`` order) is kept iff
  ``jax.random.bernoulli(jax.random.split(key, n_leaves)[j], beta)``, where
  ``key`` is the typed key of the step.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  kept = [jax.random.bernoulli(keys[j], beta) for j in range(len(leaves))]
  return jax.tree.unflatten(treedef, kept)


def esam(
    rho: Radius = 0.05,
    *,
    beta: float = 0.5,
    gamma: float = 0.5,
    loss_fn: LossFn | None = None,
    has_aux: bool = False,
    batch_argnames: Sequence[str] = ("batch",),
    seed: int = 0,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  r"""Efficient SAM (Du et al., ICLR 2022, arXiv:2110.03141).

  Two changes to SAM. Stochastic weight perturbation (SWP): each parameter
  tensor ``j`` is kept with probability β, drawn per step (``m_j ∈ {0, 1}``),
  and only kept tensors are perturbed:

  .. math::

    ε = \frac{ρ}{β} \frac{m ⊙ g}{‖m ⊙ g‖ + δ}.

  Sharpness-sensitive data selection (SDS): with ``ℓ_i`` the loss of
  example ``i``, each example is scored by ``ℓ_i(w + ε) − ℓ_i(w)`` and the
  surrogate gradient is taken on the ``n = ⌈γ B⌉`` examples of highest score
  only (``jax.lax.top_k``; a fixed count, so shapes are static under jit):

  .. math::

    g̃ = ∇_w \frac{1}{n} \sum_{i ∈ \mathrm{top}_n} ℓ_i(w + ε).

  ``beta=1, gamma=1`` is SAM on the mean loss.

  Contract: ``loss_fn(params, **extra_args)`` returns the *per-example*
  losses, shape ``[B]`` (with ``has_aux``: ``([B], aux)``), and the incoming
  gradient is that of their mean. The extra arguments named in
  ``batch_argnames`` are pytrees whose leaves have the batch axis first;
  they are gathered to the selected examples for the second gradient (the
  other extra arguments are passed unchanged). ``ℓ_i(w)`` needs a forward
  pass at ``w``: the training step has already computed it, so pass it as
  ``update(..., per_example_losses=...)``; otherwise ``update`` runs one
  more forward pass::

    def mean_loss(params, batch):
      per_example = loss_fn(params, batch=batch)
      return per_example.mean(), per_example
    (loss, per_example), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch,
                                   per_example_losses=per_example)

  Cost per step beyond the training step's forward and backward: one
  forward at ``w + ε`` over the batch and one forward and backward over
  ``⌈γB⌉`` examples (≈ 1 + 1/3 + γ passes; the paper reports 1.4× SGD). The
  saving of SWP in PyTorch (no weight gradient for unperturbed tensors in
  the first backward) does not apply here: the training step computes the
  whole gradient, so SWP changes the perturbation only.

  Data parallelism (``perturbation=``): with ``sam_optax.PerDevice`` each
  device perturbs with its own gradient (the tensor mask is the same on
  every device: the key is replicated) and selects among its own examples;
  the surrogate gradient is averaged across the axis. With
  ``sam_optax.Synced`` the perturbation is the averaged gradient's, the
  selection still per device (among its own examples), and the selected
  gradients are averaged. With ``sam_optax.Splits(n)`` each group of
  ``B / n`` examples perturbs with its own gradient and selects
  ``⌈γ B / n⌉`` of its examples (``per_example_losses`` is split with the
  batch). A ``mask`` (``m``) restricts SWP further:
  ``ε = (ρ/β) (m ⊙ m_{SWP} ⊙ g) / (‖m ⊙ m_{SWP} ⊙ g‖ + δ)``.

  Args:
    rho: ρ ≥ 0 (0.05 ResNet-18, 0.1 WRN), a float or an optax schedule.
    beta: β ∈ (0, 1], the probability that a tensor is perturbed (0.5–0.6).
    gamma: γ ∈ (0, 1], the fraction of the batch in the second gradient (0.5).
    loss_fn: ``loss_fn(params, **extra_args) -> [B]`` per-example losses. If
      None, ``update`` takes it as the keyword ``loss_fn``.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    batch_argnames: the extra arguments that hold the batch (axis 0), gathered
      to the selected examples.
    seed: the seed of the tensor masks.
    perturbation, mask, eps: see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an :class:`ESAMState`;
    chain it before the base optimizer.

  References:
    Du et al., `Efficient Sharpness-aware Minimization for Improved Training
    of Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> def loss_fn(params, batch):  # per-example squared errors, [B]
    ...   x, y = batch
    ...   return (x @ params['w'] + params['b'] - y) ** 2
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> batch = (x, x @ jnp.array([1.0, -2.0, 0.5]))
    >>> params = {'w': jnp.zeros(3), 'b': jnp.zeros(())}
    >>> tx = optax.chain(sam_optax.esam(0.05, beta=0.5, gamma=0.5, loss_fn=loss_fn),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> mean_loss = lambda p, batch: (lambda l: (l.mean(), l))(loss_fn(p, batch))
    >>> (loss, per_example), grads = jax.value_and_grad(mean_loss, has_aux=True)(
    ...     params, batch)
    >>> updates, state = tx.update(grads, state, params, batch=batch,
    ...                            per_example_losses=per_example)
    >>> params = optax.apply_updates(params, updates)
    >>> bool(loss_fn(params, batch).mean() < loss)
    True
  """
  method = "esam"
  if isinstance(gamma, jax.Array):  # ⌈γB⌉ is a shape: fixed at construction
    raise TypeError(
        f"{method}: gamma must be a Python float (it sets how many examples the"
        f" second gradient uses, a shape), got {gamma!r}."
        + _checks.static_args_hint(method, "gamma", "seed"))
  for name, value in (("beta", beta), ("gamma", gamma)):
    if _checks.is_traced(value):  # pylint: disable=protected-access
      continue  # beta under optax.inject_hyperparams and jit
    number = _checks.real_number(value)  # pylint: disable=protected-access
    if number is None or not 0 < number <= 1:
      raise ValueError(f"{method}: {name} must be in (0, 1], got {name}={value!r}.")
  if isinstance(batch_argnames, str) or not batch_argnames:
    raise TypeError(
        f"{method}: batch_argnames must be a non-empty sequence of names of"
        f" update()'s extra arguments, got {batch_argnames!r}.")
  _checks.check_seed(seed, method)

  def init(params: optax.Params) -> ESAMState:
    del params
    return ESAMState(count=jnp.zeros([], jnp.int32),
                     key=jax.random.key_data(jax.random.key(seed)))

  def losses_and_arguments(extra_args):
    """The per-example loss, its bound arguments and ``per_example_losses``."""
    arguments = dict(extra_args)
    given = arguments.pop("per_example_losses", None)
    fn = _loss.resolve_loss_fn(method, loss_fn, arguments)
    arguments = _loss.loss_arguments(method, "loss_fn", fn, arguments)
    return _per_example(fn, has_aux), arguments, given

  def mean_loss_gradient(params, extra_args):
    del params
    losses_at, arguments, _ = losses_and_arguments(extra_args)
    return jax.grad(lambda p: jnp.mean(losses_at(p, **arguments)))

  def selected_gradient(params, extra_args):
    """SDS: ``ŵ ↦ ∇`` of the mean loss of the sharpest ``⌈γB⌉`` examples."""
    losses_at, arguments, before = losses_and_arguments(extra_args)

    def gradient_at(point):
      after = losses_at(point, **arguments)
      batch = after.shape[0]
      count = min(batch, math.ceil(round(gamma * batch, 9)))
      selected_arguments = arguments
      if count < batch:
        if before is None:
          at_params = losses_at(params, **arguments)
        else:
          at_params = jnp.asarray(before)
          if at_params.shape != after.shape:
            raise ValueError(
                f"{method}: per_example_losses must have the shape [B] ="
                f" {after.shape} of loss_fn's output, got {at_params.shape}.")
        sharpness = jax.lax.stop_gradient(after - at_params.astype(after.dtype))
        _, selected = jax.lax.top_k(sharpness, count)
        selected_arguments = _select(method, arguments, batch_argnames, selected, batch)
      return jax.grad(lambda p: jnp.mean(losses_at(p, **selected_arguments)))(point)

    return gradient_at

  def rule(grads, state, ascent, *, rho):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
    kept = keep_mask(step_key, grads, beta)
    swp = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, kept)
    return ascent.gradient_at(ascent.normalized(swp), rho / beta), state

  return _ascent.transformation(
      method, rule, radii={"rho": rho}, loss_fn=loss_fn, has_aux=has_aux,
      perturbation=perturbation, mask=mask, eps=eps, init=init,
      gradient_factory=selected_gradient,
      ascent_gradient_factory=mean_loss_gradient,
      split_argnames=("per_example_losses",),
      unsupported={"MicroBatches": (
          "ESAM's data selection (SDS) keeps the ⌈γB⌉ examples of the whole batch"
          " whose loss rose most at the ascent point, which needs every example's loss"
          " at once, not a sum over micro-batches. Use"
          " sam_optax.Splits(n, sequential=True) (gradient accumulation with an ascent"
          " and a selection per micro-batch) or no accumulation.")})


def _per_example(loss_fn: LossFn, has_aux: bool) -> Callable[..., jax.Array]:
  """``loss_fn`` reduced to its ``[B]`` per-example losses, checked."""

  def losses(params, **kwargs):
    out = loss_fn(params, **kwargs)
    if has_aux:
      if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(
            "esam: has_aux=True, so loss_fn must return (per_example_losses,"
            f" aux), got {type(out).__name__}.")
      out = out[0]
    elif isinstance(out, (tuple, list)):
      raise ValueError(
          f"esam: loss_fn returned a {type(out).__name__}; if it returns"
          " (per_example_losses, aux), pass has_aux=True.")
    out = jnp.asarray(out)
    if out.ndim != 1 or not jnp.issubdtype(out.dtype, jnp.floating):
      raise ValueError(
          "esam: loss_fn must return the per-example losses, a float array of"
          f" shape [batch] (not their mean), got shape {out.shape} and dtype"
          f" {out.dtype}.")
    return out

  return losses


def _select(method: str, arguments: Mapping[str, Any], names: Sequence[str],
            selected: jax.Array, batch: int) -> dict[str, Any]:
  """The named batch arguments gathered to the ``selected`` examples."""
  def take(path, leaf):
    shape = jnp.shape(leaf)
    if not shape or shape[0] != batch:
      raise ValueError(
          f"{method}: every leaf of the batch arguments {list(names)} must have"
          f" the batch axis first, of size B = {batch} (the length of the"
          f" per-example losses), but {jax.tree_util.keystr(path) or 'one'} has"
          f" shape {shape}.")
    return jnp.take(leaf, selected, axis=0)

  return {**arguments, **_parallel.map_batch_arguments(
      method, arguments, names, "the data selection gathers the examples of", take)}
