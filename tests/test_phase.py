"""The phase chosen at trace time (``update(..., ascent_step=...)``).

LookSAM, interval and stochastic SAM re-evaluate on some steps only. By
default a ``jax.lax.cond`` chooses; the caller may instead read the phase from
the state (``sam_optax.takes_ascent_step``) and call one of two compiled steps.

* the static form agrees with NumPy over several steps (SAM on the chosen
  steps) and equals the ``lax.cond`` form;
* a compiled static step holds no conditional, and the cheap one no
  re-evaluation (its flops are the plain step's);
* a wrong phase is an error (eagerly and from a jitted step), a non-bool an
  error, a method without a cheap phase rejects ``ascent_step=False``;
* ``takes_ascent_step`` finds the outermost phase in a chain, under ``pmap``,
  and returns None without one.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import reference_cheap as cheap
import sam_optax
from sam_cases import jax_problems, to_numpy

RHO, LR, MOMENTUM, STEPS = 0.1, 0.1, 0.9, 7
TOL = dict(rtol=1e-4, atol=1e-5)
PROBLEM = {problem.name: problem for problem in jax_problems()}["mlp"]


def make_step(tx):
  @functools.partial(jax.jit, static_argnames="ascent_step")
  def step(params, state, batch, ascent_step=None):
    grads = jax.grad(PROBLEM.loss_fn)(params, batch=batch)
    updates, state = tx.update(grads, state, params, batch=batch, ascent_step=ascent_step)
    return optax.apply_updates(params, updates), state

  return step


def train(inner, static, steps=STEPS):
  tx = optax.chain(inner, optax.sgd(LR, momentum=MOMENTUM))
  step = make_step(tx)
  params, state = PROBLEM.params, tx.init(PROBLEM.params)
  history, phases = [], []
  for t in range(steps):
    phase = sam_optax.takes_ascent_step(state)
    phases.append(phase)
    params, state = step(params, state, PROBLEM.batch(t),
                         ascent_step=phase if static else None)
    history.append(params)
  return history, phases


METHODS = {
    "interval_sam": lambda: sam_optax.interval_sam(RHO, k=3, loss_fn=PROBLEM.loss_fn),
    "stochastic_sam": lambda: sam_optax.stochastic_sam(RHO, p=0.5, seed=1,
                                                       loss_fn=PROBLEM.loss_fn),
    "looksam": lambda: sam_optax.looksam(RHO, k=3, alpha=0.7, loss_fn=PROBLEM.loss_fn),
    "every_k(gsam)": lambda: sam_optax.every_k(
        sam_optax.gsam(RHO, alpha=0.2, loss_fn=PROBLEM.loss_fn), 2),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_static_phase_equals_the_conditional(name):
  static, phases = train(METHODS[name](), static=True)
  dynamic, _ = train(METHODS[name](), static=False)
  chex.assert_trees_all_close(static, dynamic, rtol=1e-6, atol=1e-7)
  assert True in phases and False in phases
  if name in ("interval_sam", "looksam"):
    assert phases == [t % 3 == 0 for t in range(STEPS)]


def test_static_interval_sam_matches_numpy():
  history, phases = train(METHODS["interval_sam"](), static=True)
  expected = ref.train(PROBLEM.numpy, cheap.sam_on(lambda t: t % 3 == 0, RHO),
                       ref.SGD(LR, MOMENTUM), STEPS)
  for got, want in zip(history, expected):
    chex.assert_trees_all_close(to_numpy(got), want, **TOL)


def test_stochastic_phases_are_the_documented_draws():
  _, phases = train(METHODS["stochastic_sam"](), static=True, steps=12)
  key = jax.random.key(1)
  draws = [bool(jax.random.uniform(jax.random.fold_in(key, t)) < 0.5) for t in range(12)]
  assert phases == draws


@pytest.mark.parametrize("name", ["interval_sam", "looksam"])
def test_static_steps_hold_no_conditional(name):
  tx = optax.chain(METHODS[name](), optax.sgd(LR))
  params, batch = PROBLEM.params, PROBLEM.batch(0)
  state = tx.init(params)
  step = make_step(tx)

  def compiled(**kwargs):
    return step.lower(params, state, batch, **kwargs).compile()

  def flops(c):
    cost = c.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  def has_conditional(c):  # the HLO instruction, not a name in the metadata
    return re.search(r" conditional\(", c.as_text()) is not None

  full, cheap_step = compiled(ascent_step=True), compiled(ascent_step=False)
  assert has_conditional(compiled())
  assert not has_conditional(full) and not has_conditional(cheap_step)
  plain = jax.jit(lambda p, b: jax.grad(PROBLEM.loss_fn)(p, batch=b)).lower(
      params, batch).compile()
  # The cheap step is one gradient evaluation (plus vector arithmetic), the
  # full one two.
  assert flops(cheap_step) < 1.5 * flops(plain) < flops(full)


def test_wrong_phase_is_an_error():
  tx = optax.chain(METHODS["interval_sam"](), optax.sgd(LR))
  params, batch = PROBLEM.params, PROBLEM.batch(0)
  state = tx.init(params)
  grads = jax.grad(PROBLEM.loss_fn)(params, batch=batch)
  # Eagerly (the state is concrete): at once.
  with pytest.raises(ValueError, match=r"interval_sam|every_k.*ascent_step=False"):
    tx.update(grads, state, params, batch=batch, ascent_step=False)
  # Jitted: from the step.
  step = make_step(tx)
  with pytest.raises(Exception, match="traced with ascent_step=False"):
    jax.block_until_ready(step(params, state, batch, ascent_step=False))
  with pytest.raises(TypeError, match="ascent_step must be a Python bool"):
    tx.update(grads, state, params, batch=batch, ascent_step=jnp.asarray(True))


def test_methods_without_a_cheap_phase():
  loss_fn = PROBLEM.loss_fn
  params, batch = PROBLEM.params, PROBLEM.batch(0)
  grads = jax.grad(loss_fn)(params, batch=batch)
  tx = optax.chain(sam_optax.sam(RHO, loss_fn=loss_fn), optax.sgd(LR))
  state = tx.init(params)
  assert sam_optax.takes_ascent_step(state) is None
  with pytest.raises(ValueError, match="sam: got ascent_step=False.*every step"):
    tx.update(grads, state, params, batch=batch, ascent_step=False)
  # True is what SAM does anyway; the loss never sees the argument.
  with_flag, _ = tx.update(grads, state, params, batch=batch, ascent_step=True)
  without, _ = tx.update(grads, state, params, batch=batch)
  chex.assert_trees_all_equal(with_flag, without)


def test_outermost_phase_is_read_and_consumed():
  # every_k(looksam(k=2), 3): the outer phase (steps 0, 3, 6) is static; the
  # inner LookSAM keeps its own lax.cond on its own count.
  def inner():
    return sam_optax.looksam(RHO, k=2, loss_fn=PROBLEM.loss_fn)

  static, phases = train(sam_optax.every_k(inner(), 3), static=True)
  dynamic, _ = train(sam_optax.every_k(inner(), 3), static=False)
  assert phases == [t % 3 == 0 for t in range(STEPS)]
  chex.assert_trees_all_close(static, dynamic, rtol=1e-6, atol=1e-7)


def test_takes_ascent_step_under_pmap():
  tx = optax.chain(sam_optax.interval_sam(RHO, k=2, loss_fn=PROBLEM.loss_fn), optax.sgd(LR))
  state = tx.init(PROBLEM.params)
  replicated = jax.tree.map(lambda x: jnp.stack([x] * 2), state)
  assert sam_optax.takes_ascent_step(replicated) is True
  differs = (replicated[0]._replace(ascent_next=jnp.asarray([True, False])),) + replicated[1:]
  with pytest.raises(ValueError, match="differs across the devices"):
    sam_optax.takes_ascent_step(differs)
  assert np.asarray(state[0].ascent_next).dtype == np.bool_
