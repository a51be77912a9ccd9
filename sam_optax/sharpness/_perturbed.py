"""Sharpness measured by perturbing the weights: m-sharpness and adaptive sharpness."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax import _ascent, _checks, _loss, _numerics, _parallel
from sam_optax._asam import adaptive_step, not_a_bias
from sam_optax._ascent import Mask
from sam_optax.sharpness import _common
from sam_optax.sharpness._common import Batches

_METHODS = ("sam", "asam")


def _checked_inputs(function: str, loss_fn: Callable[..., Any], params: Any, batches: Batches,
                    *, has_aux: bool, mask: Mask | None, axis_name: str | None
                    ) -> tuple[Callable[..., jax.Array], list[dict[str, Any]]]:
  """The scalar loss and the checked batches of a perturbed-loss measure.

  Checks ``axis_name``, the params, the batches (required, each against
  ``loss_fn``'s signature) and a fixed ``mask``'s structure.
  """
  _checks.check_axis_name(function, axis_name)
  _common.check_params(function, params)
  value = _loss.scalar_loss(function, loss_fn, has_aux)
  batch_list = _common.batch_list(function, loss_fn, batches, required=True)
  if mask is not None and not callable(mask):
    _ascent.resolve_mask(function, mask, mask)
  return value, batch_list


def _check_choice(function: str, name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"{function}: {name} must be one of {list(choices)}, got {name}={value!r}.")


def _groups_of(function: str, batch: Mapping[str, Any], m: int,
               names: Sequence[str] | None) -> tuple[dict[str, Any], int]:
  """The leaves of ``batch[name]`` for ``name`` in ``names`` (None: every key)
  reshaped ``[B, ...] → [B/m, m, ...]``, and ``B/m``."""
  names = list(batch) if names is None else list(names)
  missing = [name for name in names if name not in batch]
  if missing:
    raise ValueError(
        f"{function}: batch_argnames={names} names {missing}, which a batch does"
        f" not have (it has {sorted(batch)}).")
  sizes = set()

  def split(name, path, leaf):
    shape = jnp.shape(leaf)
    if not shape or shape[0] % m:
      raise ValueError(
          f"{function}: m={m} must divide the leading (example) dimension of every"
          f" per-example leaf, but batch[{name!r}]{jax.tree_util.keystr(path)} has"
          f" shape {shape}. Pass batches whose size is a multiple of m, or name the"
          " per-example arguments in batch_argnames.")
    sizes.add(shape[0])
    return jnp.reshape(leaf, (shape[0] // m, m) + shape[1:])

  groups = {name: jax.tree_util.tree_map_with_path(
      lambda path, leaf, name=name: split(name, path, leaf), batch[name]) for name in names}
  if len(sizes) != 1:
    raise ValueError(
        f"{function}: the per-example arguments {names} of a batch must hold"
        " arrays that agree on the number of examples, got leading dimensions"
        f" {sorted(sizes)}.")
  return groups, sizes.pop() // m


def m_sharpness(
    loss_fn: Callable[..., Any],
    params: Any,
    batches: Batches,
    *,
    rho: float,
    m: int,
    method: str = "sam",
    eta: float = 0.01,
    mask: Mask | None = None,
    adaptive_mask: Any | Callable[[Any], Any] = not_a_bias,
    batch_argnames: Sequence[str] | None = None,
    axis_name: str | None = None,
    has_aux: bool = False,
    eps: float = _numerics.DEFAULT_EPS,
) -> jax.Array:
  r"""SAM's m-sharpness: the loss increase of the one-step ascent, per group of ``m`` examples.

  Every batch is cut into consecutive groups ``B`` of ``m`` examples (rows
  ``i·m`` to ``(i+1)·m − 1`` of each per-example leaf). For each group, the
  ascent ``ε̂_B`` of the optimizer is taken from the group's gradient
  ``g_B = ∇L_B(w)``, and

  .. math::

    S^ρ_m(w) = \frac{1}{|\{B\}|} \sum_{B} \big[L_B(w + ε̂_B) − L_B(w)\big],
    \qquad ε̂_B = \begin{cases}
      ρ\, m ⊙ g_B / (‖m ⊙ g_B‖ + δ) & \text{method="sam"}\\
      ρ\, T_w (m ⊙ T_w g_B) / (‖m ⊙ T_w g_B‖ + δ) & \text{method="asam"}
    \end{cases}

  (``m ⊙`` the perturbation ``mask``; ``T_w = |w| + η``, 1 on biases). The
  mean runs over every group of every batch. ``ε̂_B`` is computed by the code
  of :func:`sam_optax.sam` and :func:`sam_optax.asam` themselves (the
  ``Ascent`` of the optimizers, ASAM's ``adaptive_step``: float32 norms, the
  perturbed point in the parameters' dtypes), so the number read here is the
  one the optimizer minimizes at batch size ``m``. Each term is a lower bound
  on ``max_{‖ε‖≤ρ} L_B(w+ε) − L_B(w)`` (Foret et al.'s definition), exact to
  first order; for small ρ it is ``≈ ρ‖g_B‖`` and measures the gradient norm
  more than the curvature.

  The groups of a batch run one after the other (``jax.lax.scan``), so memory
  is that of one group's forward and backward pass; batches of one shape are
  scanned over too. With ``axis_name`` (inside ``jax.pmap`` or ``shard_map(check_vma=False)``,
  each device holding a shard of every batch) each device cuts its shard
  into groups and the mean is taken over the devices (``jax.lax.pmean``):
  with shards of a multiple of ``m`` examples, the number of the whole batch.

  Args:
    loss_fn: ``loss_fn(params, **batch) -> scalar``, the mean loss over the
      examples it gets (or ``(loss, aux)`` with ``has_aux``).
    params: a pytree of float arrays, the point ``w``.
    batches: one mapping of keyword arguments of ``loss_fn``, or a non-empty
      iterable of them.
    rho: the radius ρ ≥ 0.
    m: the group size; it must divide the leading dimension of every
      per-example leaf.
    method: ``"sam"`` (normalized ascent) or ``"asam"`` (ASAM's adaptive
      ascent).
    eta: η ≥ 0 of ASAM (``method="asam"`` only).
    mask: the leaves to perturb (see :func:`sam_optax.sam`); None: all.
    adaptive_mask: ASAM's leaves scaled by ``|w| + η`` (see
      :func:`sam_optax.asam`).
    batch_argnames: the keys of each batch that hold one row per example
      (split into groups); None: every key. The others are passed whole.
    axis_name: the mesh axis to average over, inside ``jax.pmap`` or
      ``jax.shard_map(..., check_vma=False)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    eps: δ, added to the norms in divisions.

  Returns:
    ``S^ρ_m(w)``, a scalar (float32, or float64 for float64 losses).

  References:
    Foret, Kleiner, Mobahi and Neyshabur, `Sharpness-Aware Minimization for
    Efficiently Improving Generalization <https://arxiv.org/abs/2010.01412>`_,
    ICLR 2021 (§4.1, m-sharpness). Andriushchenko and Flammarion, `Towards
    Understanding Sharpness-Aware Minimization
    <https://arxiv.org/abs/2206.06232>`_, ICML 2022. Kwon et al., `ASAM
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

  Example:
    >>> import jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w, x: jnp.sum((x @ w) ** 2)
    >>> w = jnp.array([1.0, 0.0, 0.0, 0.0])      # flat on the second group
    >>> value = sharpness.m_sharpness(loss_fn, w, {'x': jnp.eye(4)}, rho=0.1, m=2)
    >>> round(float(value), 4)                   # (1.1² − 1 + 0) / 2
    0.105
  """
  function = "m_sharpness"
  _checks.check_non_negative("rho", rho, function)
  _checks.check_int("m", m, 1, function)
  _check_choice(function, "method", method, _METHODS)
  _checks.check_non_negative("eta", eta, function)
  _checks.check_positive("eps", eps, function)
  value, batch_list = _checked_inputs(function, loss_fn, params, batches, has_aux=has_aux,
                                      mask=mask, axis_name=axis_name)

  def run(params, batch_list, rho):
    _checks.check_axis_not_checked_for_vma(function, axis_name, params, batch_list)
    ascent = _ascent.Ascent(params, None, _ascent.resolve_mask(function, mask, params),
                            eps, mean=lambda tree: tree)

    def of_group(arguments):
      loss, grads = jax.value_and_grad(value)(params, **arguments)
      if method == "sam":
        perturbed = ascent.perturbed_params(ascent.normalized(grads), rho)
      else:
        direction, step = adaptive_step(ascent, grads, rho, eta=eta,
                                        adaptive_mask=adaptive_mask)
        perturbed = ascent.perturbed_params(direction, step)
      return value(perturbed, **arguments) - loss

    def of_batch(index, batch):
      del index
      groups, num_groups = _groups_of(function, batch, m, batch_argnames)
      return _parallel.mean_over_groups(lambda group: of_group({**batch, **group}), groups,
                                      num_groups)

    weights = [_groups_of(function, batch, m, batch_argnames)[1] for batch in batch_list]
    sharpness = _common.mean_over_batches(of_batch, batch_list, weights=weights)
    return _parallel.mean_over_axis(sharpness, axis_name)

  return _common.jit_call(run, params, batch_list, rho)


_KINDS = ("worst", "average")
_NORMS = ("linf", "l2")
_DEFAULT_NORM = {"worst": "linf", "average": "l2"}  # the authors' driver and paper
_DEFAULT_STEPS = 20  # eval_sharpness.py --n_iters: ascent steps, or noise samples
_MOMENTUM = 0.75  # sharpness.weight_ascent_step_momentum
_STEP_SIZE_DECAY = 0.5  # eval_APGD_sharpness: step_size_scaler
_MIN_UPDATE_RATIO = 0.75  # eval_APGD_sharpness: min_update_ratio
_BISECTION_STEPS = 64  # the l2 projection onto the ellipsoid


def apgd_checkpoints(num_steps: int) -> list[int]:
  """The steps after which APGD may halve its step size (Croce and Hein, 2020).

  ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``,
  checkpoints ``⌈p_j · N⌉`` for ``j ≥ 1`` up to ``N``: the schedule of
  ``eval_APGD_sharpness`` (``version='default'``), computed the same way (in
  floating point: ``p_4 · 20 = 14.000000000000002`` gives 15).

  Example:
    >>> from sam_optax import sharpness
    >>> sharpness.apgd_checkpoints(20)
    [5, 9, 12, 15, 16, 18, 19, 20]
  """
  p = [0.0, 0.22]
  w = [0, math.ceil(num_steps * 0.22)]
  while w[-1] < num_steps and w[-1] != w[-2]:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    w.append(math.ceil(p[-1] * num_steps))
  return w[1:]


def _shifted(params: Any, delta: Any) -> Any:
  """``w + δ`` in (at least) float32, in the parameters' dtypes."""
  return jax.tree.map(
      lambda w, d: (jnp.asarray(w, d.dtype) + d).astype(jnp.result_type(w)), params, delta)


def _weighted_norm(delta: Any, scale: Any) -> jax.Array:
  """``‖δ / c‖₂`` over the leaves, with ``0/0 = 0`` where ``c = 0``."""
  return jnp.sqrt(sum(
      jnp.sum(jnp.where(c > 0, d / jnp.where(c > 0, c, 1), 0) ** 2)
      for d, c in zip(jax.tree.leaves(delta), jax.tree.leaves(scale))))


def _project(delta: Any, scale: Any, rho: jax.Array, norm: str) -> Any:
  """The Euclidean projection of ``δ`` onto ``{‖δ / c‖_p ≤ ρ}``.

  ``linf``: clipping to ``[−ρc, ρc]``. ``l2``: the ellipsoid; the projection is
  ``δ_i c_i² / (c_i² + 2λ)`` with ``λ ≥ 0`` found by bisection so that the
  weighted norm is ρ (the authors find the same λ by a bisection to 1e-5).
  """
  if norm == "linf":
    return jax.tree.map(lambda d, c: jnp.clip(d, -rho * c, rho * c), delta, scale)

  def shrunk(lmbd):
    return jax.tree.map(lambda d, c: d * c * c / (c * c + 2.0 * lmbd), delta, scale)

  scaled = jnp.sqrt(sum(jnp.sum((d * c) ** 2)
                        for d, c in zip(jax.tree.leaves(delta), jax.tree.leaves(scale))))
  high = scaled / (2.0 * jnp.maximum(rho, jnp.finfo(scaled.dtype).tiny))  # norm ≤ ρ there

  def bisect(_, bracket):
    low, high = bracket
    middle = 0.5 * (low + high)
    outside = _weighted_norm(shrunk(middle), scale) > rho
    return jnp.where(outside, middle, low), jnp.where(outside, high, middle)

  _, lmbd = jax.lax.fori_loop(0, _BISECTION_STEPS, bisect, (jnp.zeros_like(high), high))
  inside = _weighted_norm(delta, scale) <= rho
  return jax.tree.map(lambda d, p: jnp.where(inside, d, jnp.where(rho > 0, p, 0)),
                      delta, shrunk(lmbd))


def _worst_case(loss_at, grad_at, scale, rho, step_size, norm, num_steps, dtype):
  """``max_k L(w + δ_k) − L(w)`` over the iterates of the authors' APGD."""
  zeros = jax.tree.map(jnp.zeros_like, scale)
  initial_loss = loss_at(zeros)
  checkpoints = jnp.asarray(apgd_checkpoints(num_steps), jnp.int32)
  step_size = jnp.asarray(step_size, dtype)

  def step(i, state):
    (delta, previous, worst_delta, worst_loss, size, from_worst, updates,
     checkpoint_size, checkpoint_loss, checkpoint) = state
    # After a step-size reduction the authors reload the best weights, so the
    # next gradient is taken there, while the iterate δ goes on from where it was.
    grads = grad_at(jax.tree.map(lambda d, b: jnp.where(from_worst, b, d), delta, worst_delta))
    if norm == "linf":
      moved = jax.tree.map(lambda d, g, c: d + size * jnp.sign(g) * c, delta, grads, scale)
    else:
      inverse = 1.0 / (jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))) + 1e-12)
      moved = jax.tree.map(lambda d, g, c: d + size * inverse * g * c, delta, grads, scale)
    projected = _project(moved, scale, rho, norm)
    new_delta = jax.tree.map(lambda z, p: _MOMENTUM * z + (1 - _MOMENTUM) * p,
                             projected, previous)
    loss = loss_at(new_delta)
    improved = loss > worst_loss
    worst_loss = jnp.where(improved, loss, worst_loss)
    worst_delta = jax.tree.map(lambda n, b: jnp.where(improved, n, b), new_delta, worst_delta)
    updates = updates + improved.astype(jnp.int32)
    at_checkpoint = jnp.any(i == checkpoints)
    too_few = updates < _MIN_UPDATE_RATIO * (i - checkpoint)
    stalled = (checkpoint_size == size) & (checkpoint_loss == worst_loss)
    reduce = at_checkpoint & (too_few | stalled)
    checkpoint_size = jnp.where(at_checkpoint, size, checkpoint_size)
    checkpoint_loss = jnp.where(at_checkpoint, worst_loss, checkpoint_loss)
    checkpoint = jnp.where(at_checkpoint, i, checkpoint)
    updates = jnp.where(at_checkpoint, 0, updates)
    size = jnp.where(reduce, _STEP_SIZE_DECAY * size, size)
    return (new_delta, delta, worst_delta, worst_loss, size, reduce, updates,
            checkpoint_size, checkpoint_loss, checkpoint)

  state = (zeros, zeros, zeros, initial_loss, step_size, jnp.asarray(False),
           jnp.zeros([], jnp.int32), step_size, initial_loss, jnp.zeros([], jnp.int32))
  worst_loss = jax.lax.fori_loop(0, num_steps, step, state)[3]
  return worst_loss - initial_loss


def _average_case(loss_at, scale, rho, norm, num_samples, key, dtype):
  """``E_ξ L(w + ρ c ⊙ ξ) − L(w)``, ``ξ ~ N(0, I)`` (l2) or ``U[−1, 1]`` (linf)."""
  leaves, treedef = jax.tree.flatten(scale)

  def of_sample(sample_key):
    keys = jax.random.split(sample_key, len(leaves))
    if norm == "l2":
      noise = [jax.random.normal(k, c.shape, dtype) for k, c in zip(keys, leaves)]
    else:
      noise = [jax.random.uniform(k, c.shape, dtype, -1.0, 1.0) for k, c in zip(keys, leaves)]
    return loss_at(jax.tree.unflatten(treedef, [rho * c * x for c, x in zip(leaves, noise)]))

  zeros = jax.tree.map(jnp.zeros_like, scale)
  mean = _parallel.mean_over_groups(of_sample, jax.random.split(key, num_samples), num_samples)
  return mean - loss_at(zeros)


def adaptive_sharpness(
    loss_fn: Callable[..., Any],
    params: Any,
    batches: Batches,
    *,
    rho: float,
    kind: str = "worst",
    norm: str | None = None,
    key: jax.Array | None = None,
    num_steps: int | None = None,
    step_size: float | None = None,
    num_samples: int | None = None,
    eta: float = 0.0,
    mask: Mask | None = None,
    axis_name: str | None = None,
    has_aux: bool = False,
) -> jax.Array:
  r"""Worst-case or average-case adaptive sharpness (Andriushchenko et al., ICML 2023).

  With the elementwise scale ``c = |w| + η`` (``η = 0``: the authors' ``|w|``)
  and, for each batch ``B``, ``L_B(w) = loss_fn(w, **batch)``:

  .. math::

    S^{ρ}_{\max}(w) = \frac{1}{|\{B\}|}\sum_B \Big[\max_{‖δ ⊘ c‖_p ≤ ρ} L_B(w + δ) − L_B(w)\Big],
    \qquad
    S^{ρ}_{\mathrm{avg}}(w) = \frac{1}{|\{B\}|}\sum_B \Big[\mathbb{E}_{ξ} L_B(w + ρ\, c ⊙ ξ) − L_B(w)\Big],

  with ``p = ∞`` (``norm="linf"``, the default of ``kind="worst"``) or ``p = 2``
  (``"l2"``), and ``ξ ~ N(0, I)`` (``norm="l2"``, the default of
  ``kind="average"``: ``δ ~ N(0, ρ² diag(c²))``) or ``ξ ~ U[−1, 1]^n``
  (``"linf"``). Scaling by ``|w|`` makes the measure invariant to the
  rescalings of a ReLU network that leave its function unchanged.

  ``kind="worst"`` maximizes by the authors' projected gradient ascent
  (``eval_APGD_sharpness`` with ``weight_ascent_step_momentum``), on each
  batch independently, from ``δ_0 = 0``, ``num_steps`` (20) steps of

  .. math::

    z_{k+1} = P\big(δ_k + η_k\, s(∇L_B(w + δ_k)) ⊙ c\big), \qquad
    δ_{k+1} = 0.75\, z_{k+1} + 0.25\, δ_{k−1},

  ``s(g) = sign(g)`` (linf) or ``g / (‖g‖₂ + 10⁻¹²)`` (l2), ``P`` the
  projection onto the ball (clipping to ``±ρc``, or the ellipsoid
  ``‖δ ⊘ c‖₂ ≤ ρ`` by bisection on its Lagrange multiplier), the step size
  ``η_0 = 2ρ`` (``step_size``) halved at APGD's checkpoints
  (:func:`apgd_checkpoints`: after steps 5, 9, 12, 15, 16, 18 and 19 of 20,
  counting from 0) when
  fewer than 75% of the steps since the last checkpoint raised the loss or
  neither the step size nor the best loss changed since; the gradient after
  a halving is taken at the best point so far. The value is the largest loss
  of the iterates (each step costs one gradient and one loss evaluation).
  ``kind="average"`` draws ``num_samples`` (20) perturbations per batch.

  Where we follow the authors' code (tml-epfl/sharpness-vs-generalization,
  ``sharpness.py`` and ``eval_sharpness.py``): the scale ``|w|`` with no η
  by default; every leaf of ``params`` perturbed, the normalization layers'
  scales and biases included, with the model in evaluation mode
  (BatchNorm's running statistics are not parameters: bind them in
  ``loss_fn``); the same batch for the ascent and the measurement; one
  maximization per batch, averaged over batches; 20 steps or samples; APGD's
  momentum (0.75, with ``δ_{k−1}``, as their code does), step size,
  checkpoints, and its habit of taking the gradient at the best point while
  continuing from the current iterate after a halving; no random start and
  one restart (their driver's defaults); ``‖g‖`` unscaled in the l2 step.
  Where we differ, and why: the l2 projection is solved to convergence (64
  bisection steps; theirs stops within 1e-5 of ρ); a zero weight is never
  perturbed, with no division by zero (theirs divides by ``|w|`` in the l2
  projection); ``mask`` and ``eta`` (not in their code) let a user leave the
  normalization layers out or perturb zero weights; their classification
  error and logit normalization are the model's business, not measured here;
  the noise is drawn from JAX's generator, so the average-case number
  matches theirs in distribution, not sample by sample.

  Args:
    loss_fn: ``loss_fn(params, **batch) -> scalar`` (or ``(loss, aux)`` with
      ``has_aux``), in evaluation mode.
    params: a pytree of float arrays, the point ``w``.
    batches: one mapping of keyword arguments of ``loss_fn``, or a non-empty
      iterable of them; the sharpness is computed on each and averaged.
    rho: the radius ρ ≥ 0, relative to ``|w|``.
    kind: ``"worst"`` or ``"average"``.
    norm: ``"linf"`` or ``"l2"``; None: ``"linf"`` for ``"worst"`` (their
      driver's default, ``m_apgd_linf``) and ``"l2"`` for ``"average"``
      (Gaussian noise, their paper's average-case sharpness).
    key: a ``jax.random`` key, required by ``kind="average"`` (and unused
      by ``"worst"``: an error there).
    num_steps: the ascent steps of ``kind="worst"`` (default 20).
    step_size: the first step size of ``kind="worst"`` (default ``2ρ``).
    num_samples: the noise samples per batch of ``kind="average"`` (default
      20).
    eta: η ≥ 0 added to ``|w|``.
    mask: the leaves to perturb (see :func:`sam_optax.sam`); None: all.
    axis_name: inside ``jax.pmap`` or ``jax.shard_map(..., check_vma=False)``,
      with every batch split over the devices: the mesh axis the losses and
      gradients are averaged over (equal shards give the numbers of the
      whole batch).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    The sharpness, a scalar (``≥ 0`` for ``"worst"``).

  References:
    Andriushchenko, Croce, Müller, Hein and Flammarion, `A Modern Look at the
    Relationship between Sharpness and Generalization
    <https://arxiv.org/abs/2302.07011>`_, ICML 2023; code:
    https://github.com/tml-epfl/sharpness-vs-generalization. Croce and Hein,
    `Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks <https://arxiv.org/abs/2003.01690>`_, ICML
    2020 (APGD).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w, x: jnp.mean((x @ w) ** 2)
    >>> w, batch = jnp.array([1.0, -2.0]), {'x': jnp.eye(2)}
    >>> # the worst case of ‖δ ⊘ |w|‖∞ ≤ 0.1 is δ = 0.1 w: (1.1² − 1)·2.5
    >>> round(float(sharpness.adaptive_sharpness(loss_fn, w, batch, rho=0.1)), 4)
    0.525
    >>> average = sharpness.adaptive_sharpness(
    ...     loss_fn, w, batch, rho=0.1, kind="average", key=jax.random.key(0))
    >>> bool(0.0 < average < 0.525)
    True
  """
  function = "adaptive_sharpness"
  _checks.check_non_negative("rho", rho, function)
  _check_choice(function, "kind", kind, _KINDS)
  norm = _DEFAULT_NORM[kind] if norm is None else norm
  _check_choice(function, "norm", norm, _NORMS)
  if kind == "average":
    if key is None:
      raise ValueError(
          f"{function}: kind='average' draws random perturbations and needs a key,"
          " e.g. key=jax.random.key(0); got key=None.")
    for name, option in (("num_steps", num_steps), ("step_size", step_size)):
      if option is not None:
        raise ValueError(
            f"{function}: {name} is an option of kind='worst' (the ascent); with"
            f" kind='average' use num_samples, got {name}={option!r}.")
    num_samples = _DEFAULT_STEPS if num_samples is None else num_samples
    _checks.check_int("num_samples", num_samples, 1, function)
  else:
    for name, given in (("key", key), ("num_samples", num_samples)):
      if given is not None:
        raise ValueError(
            f"{function}: {name} is an option of kind='average'; kind='worst'"
            f" ascends from δ = 0 (the authors' default), got {name}={given!r}.")
    num_steps = _DEFAULT_STEPS if num_steps is None else num_steps
    _checks.check_int("num_steps", num_steps, 1, function)
    if step_size is not None:
      _checks.check_positive("step_size", step_size, function)
  _checks.check_non_negative("eta", eta, function)
  value, batch_list = _checked_inputs(function, loss_fn, params, batches, has_aux=has_aux,
                                      mask=mask, axis_name=axis_name)
  dtype = _common.work_dtype(params)

  def run(params, batch_list, rho, step_size, key):
    _checks.check_axis_not_checked_for_vma(function, axis_name, params, batch_list)
    resolved = _ascent.resolve_mask(function, mask, params)
    selected = resolved if resolved is not None else jax.tree.map(lambda _: True, params)
    scale = jax.tree.map(
        lambda w, keep: jnp.where(keep, jnp.abs(jnp.asarray(w, dtype)) + eta, 0.0).astype(dtype),
        params, selected)
    rho = jnp.asarray(rho, dtype)

    def of_batch(index, batch):
      def loss_at(delta):
        loss = value(_shifted(params, delta), **batch)
        return _parallel.mean_over_axis(jnp.asarray(loss, dtype), axis_name)

      def grad_at(delta):
        grads = jax.grad(value)(_shifted(params, delta), **batch)
        return _parallel.mean_over_axis(_numerics.cast_like(grads, scale), axis_name)

      if kind == "worst":
        size = 2.0 * rho if step_size is None else step_size
        return _worst_case(loss_at, grad_at, scale, rho, size, norm, num_steps, dtype)
      return _average_case(loss_at, scale, rho, norm, num_samples,
                           jax.random.fold_in(key, index), dtype)

    return _common.mean_over_batches(of_batch, batch_list)

  return _common.jit_call(run, params, batch_list, rho, step_size, key)
