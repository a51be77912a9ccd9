"""The phase of a method that re-evaluates the gradient on some steps only.

``every_k``, ``with_probability`` (and their ``interval_sam`` /
``stochastic_sam`` forms) and ``looksam`` take their ascent step on some
steps and a cheap step on the others. The phase is chosen either at run
time by :func:`cond` (``jax.lax.cond`` under ``jit``) or at trace time from
the ``ascent_step`` extra argument (:func:`chosen_phase`), read on the host
from the state with :func:`takes_ascent_step`. Methods without a cheap
phase refuse ``ascent_step=False`` (:func:`reject_phase`); a skipped step
advances the wrapped method's counters (:func:`advance_counts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

# The extra argument of ``update`` that chooses the phase of a method with a
# cheap phase (``every_k``, ``with_probability``, ``looksam``) at trace time.
ASCENT_STEP = "ascent_step"


def cond(pred: jax.Array, true_fn, false_fn):
  """``jax.lax.cond``, or a plain ``if`` when ``pred`` is concrete (eager use).

  Eagerly, ``lax.cond`` would compile its freshly built branches on every
  call; under ``jit`` the conditional runs only the branch taken.
  """
  if isinstance(pred, jax.core.Tracer):
    return jax.lax.cond(pred, true_fn, false_fn)
  return true_fn() if bool(pred) else false_fn()


def _phase_mismatch(method: str, ascent_step: bool) -> str:
  taken = "the ascent (full) step" if ascent_step else "the cheap step"
  return (
      f"{method}: the step was traced with ascent_step={ascent_step} ({taken}),"
      f" but the method's state says this step is {'not ' if ascent_step else ''}an"
      " ascent step. Pass ascent_step=sam_optax.takes_ascent_step(opt_state),"
      " read from the state before the step.")


def chosen_phase(method: str, ascent_step: Any, predicate: jax.Array) -> Any:
  """The phase of this step: ``predicate``, or the static ``ascent_step`` checked.

  ``ascent_step=None`` (the default): ``predicate`` (traced under ``jit``),
  for :func:`cond` to branch on at run time. ``ascent_step`` a Python bool:
  the phase chosen at trace time (a compiled step per phase, no
  ``lax.cond``); it must agree with ``predicate``, checked eagerly when
  ``predicate`` is concrete and by a host callback when it is traced (a
  mismatch raises an error from the step, never a silently different
  schedule).

  Raises:
    TypeError: if ``ascent_step`` is neither None nor a bool.
    ValueError: if a concrete ``predicate`` disagrees with ``ascent_step``.
  """
  if ascent_step is None:
    return predicate
  if not isinstance(ascent_step, (bool, np.bool_)):
    raise TypeError(
        f"{method}: ascent_step must be a Python bool (the phase, chosen when the"
        f" step is traced) or None (the phase chosen by jax.lax.cond), got"
        f" {type(ascent_step).__name__} {ascent_step!r}.")
  ascent_step = bool(ascent_step)
  if isinstance(predicate, jax.core.Tracer):

    def check(value):
      if bool(value) != ascent_step:
        raise ValueError(_phase_mismatch(method, ascent_step))

    jax.debug.callback(check, predicate)
  elif bool(predicate) != ascent_step:
    raise ValueError(_phase_mismatch(method, ascent_step))
  return ascent_step


def reject_phase(method: str, extra_args: Mapping[str, Any]) -> None:
  """For a method without a cheap phase: ``ascent_step=False`` is an error."""
  if extra_args.get(ASCENT_STEP, True) is not True:
    raise ValueError(
        f"{method}: got ascent_step={extra_args[ASCENT_STEP]!r}, but {method} takes"
        " its ascent step on every step (ascent_step chooses the phase of"
        " every_k, with_probability, interval_sam, stochastic_sam and looksam;"
        " wrap this method in one of them).")


def takes_ascent_step(opt_state: Any) -> bool | None:
  """Whether the next ``update`` with ``opt_state`` takes the ascent step.

  For the methods with a cheap phase (:func:`sam_optax.every_k`,
  :func:`sam_optax.with_probability`, :func:`sam_optax.interval_sam`,
  :func:`sam_optax.stochastic_sam`, :func:`sam_optax.looksam`) the state
  holds the phase of its next step (``ascent_next``). Reading it on the host
  lets a training loop choose between two compiled steps, one traced with
  ``ascent_step=True`` and one with ``ascent_step=False``, so neither holds a
  ``jax.lax.cond`` (on XLA:CPU convolution gradients inside a conditional
  branch run several times slower). The outermost such method is read (a
  state nested inside it is not); ``update`` checks the value it is given
  against its state. The read waits for the previous step to finish, which
  costs about a millisecond per step on CPU: for steps shorter than that
  (small MLPs) keep ``lax.cond`` (``benchmarks/RESULTS.md`` has both forms).

  Args:
    opt_state: the state of the whole optimizer (a chain, a state under
      ``pmap`` with a leading device axis, a sharded state).

  Returns:
    The phase as a Python bool, or None if no method of ``opt_state`` has a
    cheap phase (then call ``update`` without ``ascent_step``).

  Example:
    >>> import functools, jax, jax.numpy as jnp, optax, sam_optax
    >>> loss_fn = lambda p, x: jnp.sum(jnp.cos(p * x))
    >>> tx = optax.chain(sam_optax.interval_sam(0.05, k=3, loss_fn=loss_fn),
    ...                  optax.sgd(0.1))
    >>> @functools.partial(jax.jit, static_argnames="ascent_step")
    ... def step(params, state, x, ascent_step):
    ...   updates, state = tx.update(jax.grad(loss_fn)(params, x), state, params,
    ...                              x=x, ascent_step=ascent_step)
    ...   return optax.apply_updates(params, updates), state
    >>> params, x = jnp.ones(4), jnp.arange(4.0)
    >>> state = tx.init(params)
    >>> phases = []
    >>> for _ in range(4):
    ...   phases.append(sam_optax.takes_ascent_step(state))
    ...   params, state = step(params, state, x, ascent_step=phases[-1])
    >>> phases
    [True, False, False, True]
  """
  phases = [(len(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
            if path and isinstance(path[-1], jax.tree_util.GetAttrKey)
            and path[-1].name == "ascent_next"]
  if not phases:
    return None
  _, outermost = min(phases, key=lambda phase: phase[0])
  values = np.asarray(jax.device_get(outermost)).ravel()
  if values.size and not (values == values[0]).all():
    raise ValueError(
        "takes_ascent_step: the phase differs across the devices"
        f" ({values.tolist()}); the state of a method with a cheap phase must"
        " be the same on every device.")
  return bool(values[0])


def advance_counts(state: Any) -> Any:
  """``state`` with every NamedTuple field named ``count`` incremented.

  What a skipped step does to the state of the wrapped method: its
  accumulators stay, its step counters (the argument of ρ schedules) keep
  following the global step.
  """

  def advance(path, leaf):
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "count":
      return optax.safe_increment(leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(advance, state)
