"""Interval and stochastic SAM: the sharpness-aware step on some steps only.

``every_k`` and ``with_probability`` wrap any method of the family (``sam``,
``asam``, ``gsam``, ``csam``, ``looksam``, ``stable_sam(...)``, ...): on the
chosen steps they run its update, on the others they return the plain
gradient. The choice is a ``jax.lax.cond``, so on a skipped step the
re-evaluation does not run on the device at all; or, with
``update(..., ascent_step=sam_optax.takes_ascent_step(opt_state))``, it is
made when the step is traced (a compiled step per phase, no conditional).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _checks, _numerics, _parallel, _phase
from sam_optax._ascent import Mask
from sam_optax._checks import Radius
from sam_optax._loss import LossFn
from sam_optax._parallel import Perturbation, axis_of
from sam_optax._sam import sam_transformation


class IntervalState(NamedTuple):
  """State of :func:`every_k`.

  Attributes:
    count: steps taken.
    inner: the state of the wrapped method.
    ascent_next: whether the next step runs ``inner`` (``count mod k = 0``),
      for :func:`sam_optax.takes_ascent_step`.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  inner: Any
  ascent_next: jax.Array


class StochasticState(NamedTuple):
  """State of :func:`with_probability`.

  Attributes:
    count: steps taken.
    key: the raw ``uint32[2]`` PRNG key; step ``t`` draws with
      ``jax.random.fold_in(key, t)``.
    inner: the state of the wrapped method.
    ascent_next: whether the next step runs ``inner`` (its draw, made at the
      end of the previous step), for :func:`sam_optax.takes_ascent_step`.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  key: jax.Array
  inner: Any
  ascent_next: jax.Array


def _choose(method: str, predicate: jax.Array, inner, updates, inner_state, params,
            extra_args, axis_name: str | None):
  """``inner.update`` on the steps the phase takes, else the (averaged) plain gradient.

  The phase is ``predicate`` or the static ``ascent_step`` of ``extra_args``
  (checked against it, :func:`~sam_optax._ascent.chosen_phase`). A masked
  part of the parameters is refused at once, not on the first step that runs
  the inner update (eagerly a skipped step does not call it).
  """
  _checks.check_not_masked(method, updates, params, wrapper=True)
  take = _phase.chosen_phase(method, extra_args.pop(_phase.ASCENT_STEP, None), predicate)

  def ascent():
    surrogate, new_state = inner.update(updates, inner_state, params, **extra_args)
    return _numerics.cast_like(surrogate, updates), new_state

  def skip():
    return _parallel.mean_over_axis(updates, axis_name), _phase.advance_counts(inner_state)

  return _phase.cond(take, ascent, skip)


def every_k(
    inner: optax.GradientTransformation,
    k: int,
    *,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` every ``k`` steps (from step 0), the plain gradient otherwise.

  .. math::

    \text{update}_t = \begin{cases} g̃_t \ (\text{inner's surrogate}) & t \bmod k = 0 \\
                                    g_t & \text{otherwise.} \end{cases}

  Interval SAM ("SAM-k" in Liu et al., CVPR 2022, arXiv:2203.02714; the
  ``interval`` of MosaicML Composer's SAM) is ``every_k(sam(ρ), k)``, see
  :func:`interval_sam`. Cost: ``1 + 1/k`` gradient evaluations per step on
  average; the choice is a ``jax.lax.cond``, so a skipped step does not run
  the re-evaluation (XLA's ``cost_analysis`` counts a conditional as its
  most expensive branch, so the compiled flop count equals the inner
  method's; the average is ``plain + (inner − plain)/k``).

  .. note::
    On XLA:CPU the convolution gradients inside a ``lax.cond`` branch get a
    layout that misses the fast convolution routine (jax-ml/jax#12868), so
    for convolutional models on CPU the SAM steps of this method run several
    times slower than :func:`sam_optax.sam`'s (measured in
    ``benchmarks/RESULTS.md``); flops are as expected. The cause is XLA:CPU's
    layout assignment; accelerators were not measured here. On CPU choose
    the phase when tracing instead: compile the step twice, with
    ``update(..., ascent_step=True)`` and ``ascent_step=False``, and call the
    one that ``sam_optax.takes_ascent_step(opt_state)`` names (the step
    checks the value against its count). ``benchmarks/RESULTS.md`` has both
    forms.

  On a skipped step the inner state is kept, except that its step counters
  (NamedTuple fields named ``count``) advance, so ρ schedules follow the
  global step. With data parallelism pass the axis of the inner method's
  ``perturbation`` as ``axis_name``: the plain gradient of a skipped step is
  averaged over it like the inner surrogate, so every device applies the
  same update.

  Args:
    inner: a method of this family (or any transform that maps a gradient to
      a surrogate gradient).
    k: the interval, an int ≥ 1 (``k=1`` is ``inner`` itself).
    axis_name: the data-parallel axis the inner method averages over (the
      ``axis_name`` of its ``perturbation``), or None without one.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an
    :class:`IntervalState`; chain it before the base optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(
    ...     sam_optax.every_k(sam_optax.asam(0.5, loss_fn=loss_fn), k=5),
    ...     optax.sgd(0.05))
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=x)
    >>> updates, state = tx.update(grads, state, params, x=x)
  """
  method = "every_k"
  inner = _checks.check_inner(method, inner)
  _checks.check_axis_name(method, axis_name)
  _checks.check_int("k", k, 1, method, injectable=True)

  def init(params):
    return IntervalState(count=jnp.zeros([], jnp.int32), inner=inner.init(params),
                         ascent_next=jnp.asarray(True))

  def update(updates, state, params=None, **extra_args):
    new_updates, inner_state = _choose(method, state.count % k == 0, inner, updates,
                                       state.inner, params, extra_args, axis_name)
    count = optax.safe_increment(state.count)
    return new_updates, IntervalState(count=count, inner=inner_state,
                                      ascent_next=count % k == 0)

  return optax.GradientTransformationExtraArgs(init, update)


def with_probability(
    inner: optax.GradientTransformation,
    p: float | optax.Schedule,
    *,
    seed: int = 0,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` with probability ``p`` per step, the plain gradient otherwise.

  .. math::

    \text{update}_t = \begin{cases} g̃_t \ (\text{inner's surrogate}) & u_t < p_t \\
                                    g_t & \text{otherwise,} \end{cases}
    \qquad u_t \sim U[0, 1).

  Stochastic SAM (SS-SAM / RST, Zhao et al., arXiv:2203.09962) is
  ``with_probability(sam(ρ), p)``, see :func:`stochastic_sam`; ``p`` may be a
  schedule of the step (the paper's scheduling functions). Cost: ``1 + p``
  gradient evaluations per step on average (``jax.lax.cond``; see
  :func:`every_k` for what ``cost_analysis`` reports). ``u_t`` is drawn from
  ``jax.random.fold_in(key, t)`` with the key in the state, so the draws
  are reproducible, identical on every device under ``pmap`` (the same
  branch everywhere) and restored with a checkpoint. A skipped step keeps
  the inner state except its step counters, as in :func:`every_k`.

  Args:
    inner: a method of this family.
    p: the probability in [0, 1] of the inner step, or an optax schedule.
    seed: the seed of the draws.
    axis_name: the data-parallel axis the inner method averages over (the
      ``axis_name`` of its ``perturbation``), or None without one.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`StochasticState`; chain it before the base optimizer.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> p = optax.linear_schedule(0.2, 0.8, transition_steps=1000)
    >>> tx = optax.chain(
    ...     sam_optax.with_probability(sam_optax.sam(0.05, loss_fn=loss_fn), p),
    ...     optax.sgd(0.05))
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x=x)
    >>> updates, state = tx.update(grads, state, params, x=x)
  """
  method = "with_probability"
  inner = _checks.check_inner(method, inner)
  _checks.check_axis_name(method, axis_name)
  if callable(p):
    _checks.check_radius("p", p, method)
  else:
    _checks.check_in_range("p", p, 0.0, 1.0, method)
  _checks.check_seed(seed, method)

  def draw(key, count):
    draw_key = jax.random.fold_in(jax.random.wrap_key_data(key), count)
    return jax.random.uniform(draw_key) < _numerics.radius_at(p, count)

  def init(params):
    key = jax.random.key_data(jax.random.key(seed))
    count = jnp.zeros([], jnp.int32)
    return StochasticState(count=count, key=key, inner=inner.init(params),
                           ascent_next=draw(key, count))

  def update(updates, state, params=None, **extra_args):
    new_updates, inner_state = _choose(method, draw(state.key, state.count), inner, updates,
                                       state.inner, params, extra_args, axis_name)
    count = optax.safe_increment(state.count)
    return new_updates, StochasticState(count=count, key=state.key, inner=inner_state,
                                        ascent_next=draw(state.key, count))

  return optax.GradientTransformationExtraArgs(init, update)


def interval_sam(
    rho: Radius = 0.05,
    k: int = 5,
    *,
    loss_fn: LossFn | None = None,
    normalize: bool = True,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  """Interval SAM: :func:`sam_optax.sam` every ``k`` steps, SGD's gradient otherwise.

  ``every_k(sam(rho, ...), k)``; see :func:`every_k`.
  Takes the keywords of :func:`sam_optax.sam`. Cost ``1 + 1/k``.

  Example:
    >>> import optax, sam_optax
    >>> tx = optax.chain(sam_optax.interval_sam(0.05, k=5), optax.sgd(0.1))
  """
  inner = sam_transformation("interval_sam", rho, loss_fn=loss_fn, normalize=normalize,
                             has_aux=has_aux, perturbation=perturbation, mask=mask, eps=eps)
  return every_k(inner, k, axis_name=axis_of(perturbation))


def stochastic_sam(
    rho: Radius = 0.05,
    p: float | optax.Schedule = 0.5,
    *,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    normalize: bool = True,
    has_aux: bool = False,
    perturbation: Perturbation | None = None,
    mask: Mask | None = None,
    eps: float = _numerics.DEFAULT_EPS,
) -> optax.GradientTransformationExtraArgs:
  """Stochastic SAM: :func:`sam_optax.sam` with probability ``p``, SGD's gradient otherwise.

  ``with_probability(sam(rho, ...), p, seed=seed)``;
  see :func:`with_probability`. Takes the keywords of :func:`sam_optax.sam`.
  Cost ``1 + p``.

  Example:
    >>> import optax, sam_optax
    >>> tx = optax.chain(sam_optax.stochastic_sam(0.05, p=0.5), optax.sgd(0.1))
  """
  _checks.check_seed(seed, "stochastic_sam")  # named as the user called it
  inner = sam_transformation("stochastic_sam", rho, loss_fn=loss_fn, normalize=normalize,
                             has_aux=has_aux, perturbation=perturbation, mask=mask, eps=eps)
  return with_probability(inner, p, seed=seed, axis_name=axis_of(perturbation))

