"""Interval and stochastic SAM (every_k, with_probability) and the compiled cost.

* NumPy agreement over several steps (SAM on the chosen steps, the plain
  gradient otherwise), also for other inner methods and a ρ schedule that
  must follow the global step;
* the stochastic draws are the documented ``fold_in(key, t)`` uniforms;
* k = 1 and p = 1 are the inner method, p = 0 plain training;
* XLA's cost analysis of the compiled steps of LookSAM and interval SAM;
* chex variants, data parallelism, errors.
"""

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import reference_cheap as cheap
import sam_optax
from cheap_cases import run_steps, zero_loss
from sam_cases import CASES_BY_NAME, jax_problems, make_step, to_numpy

RHO, LR, MOMENTUM, STEPS = 0.1, 0.1, 0.9, 7
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 against float64, over several steps
PROBLEMS = {problem.name: problem for problem in jax_problems()}


def history_of(inner, problem, steps=STEPS):
  return run_steps(inner, problem, steps, LR, MOMENTUM)


def assert_matches(history, problem, surrogate, steps=STEPS):
  expected = ref.train(problem.numpy, surrogate, ref.SGD(LR, MOMENTUM), steps)
  for got, want in zip(history, expected):
    chex.assert_trees_all_close(to_numpy(got), want, **TOL)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_interval_sam_matches_numpy(name):
  problem = PROBLEMS[name]
  history, state = history_of(sam_optax.interval_sam(RHO, k=3, loss_fn=problem.loss_fn), problem)
  assert_matches(history, problem, cheap.sam_on(lambda t: t % 3 == 0, RHO))
  assert int(state[0].count) == STEPS and int(state[0].inner.count) == STEPS


def test_rho_schedule_follows_the_global_step():
  problem = PROBLEMS["logistic"]
  rho = optax.linear_schedule(0.3, 0.0, STEPS)
  history, _ = history_of(sam_optax.interval_sam(rho, k=2, loss_fn=problem.loss_fn), problem)
  assert_matches(history, problem, cheap.sam_on(lambda t: t % 2 == 0, rho))


@pytest.mark.parametrize("name", ["gsam", "stable_asam"])
def test_every_k_wraps_other_methods(name):
  case, problem = CASES_BY_NAME[name], PROBLEMS["mlp"]
  history, _ = history_of(sam_optax.every_k(case.make(problem), 2), problem, steps=4)

  def surrogate(g, w, p, batch, t):
    return case.reference(g, w, p, batch, t) if t % 2 == 0 else g

  assert_matches(history, problem, surrogate, steps=4)


def chosen_steps(seed, p, steps):
  """The documented draws: ``uniform(fold_in(key(seed), t)) < p_t``."""
  key = jax.random.key(seed)
  value = lambda t: p(t) if callable(p) else p
  return [bool(jax.random.uniform(jax.random.fold_in(key, t)) < value(t))
          for t in range(steps)]


@pytest.mark.parametrize("p", [0.5, optax.linear_schedule(0.0, 1.0, STEPS)],
                         ids=["constant", "schedule"])
def test_stochastic_sam_matches_numpy(p):
  problem = PROBLEMS["logistic"]
  chosen = chosen_steps(3, p, STEPS)
  assert any(chosen) and not all(chosen)
  history, _ = history_of(
      sam_optax.stochastic_sam(RHO, p, seed=3, loss_fn=problem.loss_fn), problem)
  assert_matches(history, problem, cheap.sam_on(lambda t: chosen[t], RHO))


def test_limits_are_the_inner_method_or_plain_training():
  problem = PROBLEMS["mlp"]
  for wrapped, chosen in (
      (sam_optax.interval_sam(RHO, k=1, loss_fn=problem.loss_fn), lambda t: True),
      (sam_optax.stochastic_sam(RHO, p=1.0, loss_fn=problem.loss_fn), lambda t: True),
      (sam_optax.stochastic_sam(RHO, p=0.0, loss_fn=problem.loss_fn), lambda t: False)):
    history, _ = history_of(wrapped, problem, steps=3)
    assert_matches(history, problem, cheap.sam_on(chosen, RHO), steps=3)


def test_skipped_steps_keep_the_inner_accumulators():
  problem = PROBLEMS["logistic"]
  inner = sam_optax.looksam(RHO, k=1, loss_fn=problem.loss_fn)
  _, state = history_of(sam_optax.every_k(inner, 4), problem, steps=3)
  looksam_state = state[0].inner
  # Step 0 ran LookSAM (its g_v is set); steps 1 and 2 advanced only the counts.
  assert int(looksam_state.count) == 3
  _, after_one = history_of(sam_optax.every_k(inner, 4), problem, steps=1)
  chex.assert_trees_all_equal(looksam_state.orthogonal, after_one[0].inner.orthogonal)


_WRAPPED = [sam_optax.interval_sam(0.1, k=2, loss_fn=zero_loss),
            sam_optax.stochastic_sam(0.1, p=0.5, loss_fn=zero_loss)]


@jax.jit
def _updates_on_a_flat_loss(params, batch):
  grads = jax.grad(zero_loss)(params, batch)
  out = []
  for tx in _WRAPPED:
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, params, batch=batch)
      out.append(updates)
  return out


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(hnp.arrays(np.float32, (4, 3), elements=st.floats(-3, 3, width=32)))
def test_zero_gradient_stays_finite(kernel):
  problem = PROBLEMS["logistic"]
  params = {**problem.params, "kernel": jnp.asarray(kernel)}
  for updates in _updates_on_a_flat_loss(params, problem.batch(0)):
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))


# --------------------------------------------------------------------------
# The compiled cost: XLA counts a conditional as its costliest branch.
# --------------------------------------------------------------------------


def test_compiled_flops_of_looksam_and_interval_sam():
  width, batch = 128, 64
  keys = jax.random.split(jax.random.key(0), 4)
  params = {f"layer{i}": jax.random.normal(keys[i], (width, width)) / width ** 0.5
            for i in range(3)}
  data = {"x": jax.random.normal(keys[3], (batch, width)), "y": jnp.zeros(batch, jnp.int32)}

  def loss_fn(params, batch):
    h = batch["x"]
    for i in range(3):
      h = jnp.tanh(h @ params[f"layer{i}"])
    return optax.softmax_cross_entropy_with_integer_labels(h, batch["y"]).mean()

  def flops(inner):
    tx = optax.chain(inner, optax.sgd(0.1))
    compiled = jax.jit(make_step(tx, loss_fn)).lower(params, tx.init(params), data).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"], compiled.as_text()

  plain, _ = flops(optax.identity())
  sam, _ = flops(sam_optax.sam(0.05, loss_fn=loss_fn))
  assert 1.8 < sam / plain < 2.2  # a second forward and backward
  for inner in (sam_optax.looksam(0.05, k=5, loss_fn=loss_fn),
                sam_optax.interval_sam(0.05, k=5, loss_fn=loss_fn)):
    cost, text = flops(inner)
    # The SAM branch is counted, the cheap branch is not added to it ...
    assert 0.98 < cost / sam < 1.05
    # ... and the re-evaluation sits inside a conditional, so it only runs
    # on the chosen steps (the benchmark times it).
    assert "conditional" in text


# --------------------------------------------------------------------------
# Data parallelism, chex variants, errors.
# --------------------------------------------------------------------------


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_interval_and_stochastic_steps(self):
    pmap = self.variant.type == chex.ChexVariantType.WITH_PMAP
    axis = sam_optax.PerDevice("i") if pmap else None
    problem = PROBLEMS["logistic"]
    chosen = chosen_steps(1, 0.5, 3)
    for inner, surrogate in (
        (sam_optax.interval_sam(RHO, k=2, loss_fn=problem.loss_fn, perturbation=axis),
         cheap.sam_on(lambda t: t % 2 == 0, RHO)),
        (sam_optax.stochastic_sam(RHO, p=0.5, seed=1, loss_fn=problem.loss_fn,
                                  perturbation=axis),
         cheap.sam_on(lambda t: chosen[t], RHO))):
      tx = optax.chain(inner, optax.sgd(LR, momentum=MOMENTUM))
      step = self.variant(make_step(tx, problem.loss_fn),
                          **({"n_devices": 2} if pmap else {}))
      params, state = problem.params, tx.init(problem.params)
      for t in range(3):
        params, state = step(params, state, problem.batch(t))
      expected = ref.train(problem.numpy, surrogate, ref.SGD(LR, MOMENTUM), 3)
      chex.assert_trees_all_close(to_numpy(params), expected[-1], **TOL)


@pytest.mark.parametrize("make, match", [
    (lambda: sam_optax.every_k(sam_optax.sam(), 0), "k must be an int >= 1, got k=0"),
    (lambda: sam_optax.interval_sam(0.05, k=True), "k must be an int >= 1"),
    (lambda: sam_optax.every_k(lambda g: g, 2), "inner must be an optax GradientTransformation"),
    (lambda: sam_optax.with_probability(sam_optax.sam(), 1.5), r"p must be in \[0.0, 1.0\]"),
    (lambda: sam_optax.stochastic_sam(0.05, p=-0.1), r"p must be in \[0.0, 1.0\]"),
    (lambda: sam_optax.stochastic_sam(0.05, p=0.5, seed=0.5), "seed must be an int"),
])
def test_errors(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()
