"""Gradient accumulation and non-finite steps, against float64 NumPy.

One ``update`` call is one optimizer step and gets the whole batch; the
library loops over ``K`` micro-batches of it (rows ``i·B/K`` to
``(i+1)·B/K − 1``):

* ``Splits(K, sequential=True)``: an ascent per micro-batch, the surrogate
  the mean over micro-batches (m-sharpness, m = the micro-batch) -- the
  NumPy mean of per-micro-batch steps, and the numbers of the vectorized
  ``Splits(K)``;
* ``MicroBatches(K)``: one ascent from the accumulated gradient, every
  re-evaluation the mean over the micro-batches -- NumPy's full-batch step
  (for a mean loss and equal micro-batches, the mean of the micro-batch
  gradients is the full-batch gradient, which is what the NumPy side uses);

ρ schedules advance once per optimizer step; ``optax.MultiSteps`` around a
re-evaluating method and ``optax.apply_if_finite`` around one are refused
at trace time; ``chain(method, apply_if_finite(base))`` leaves the params
unchanged on a step with a NaN at the ascent point and keeps the method's
state, except its count.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import reference_cheap as cheap
import sam_optax
from sam_optax import _checks
from sam_cases import jax_problems, to_numpy

K, RHO, ALPHA, LR, MOMENTUM, STEPS = 4, 0.1, 0.3, 0.05, 0.9, 3
RHO_SCHEDULE = optax.linear_schedule(0.05, 0.3, STEPS)  # ρ(t), t the optimizer step
SIGMA, LMBDA = 0.8, 0.6
TOL = dict(rtol=2e-5, atol=1e-6)
PROBLEM = {p.name: p for p in jax_problems()}["logistic"]  # softmax regression, B = 8


def micro_batches(batch):
  """The ``K`` micro-batches of a NumPy batch, as the library splits it."""
  size = len(batch["y"]) // K
  return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(K)]


def run(tx, steps=STEPS, accumulate=True):
  """``steps`` jitted steps of ``chain(tx, momentum SGD)`` on whole batches."""
  chain = optax.chain(tx, optax.sgd(LR, momentum=MOMENTUM))
  first = (sam_optax.accumulated_grad(PROBLEM.loss_fn, K) if accumulate
           else lambda params, batch: jax.grad(PROBLEM.loss_fn)(params, batch))

  @jax.jit
  def step(params, state, batch):
    grads = first(params, batch=batch)
    updates, state = chain.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  params, state = PROBLEM.params, chain.init(PROBLEM.params)
  history = []
  for t in range(steps):
    params, state = step(params, state, PROBLEM.batch(t))
    history.append(to_numpy(params))
  return history, state[0]


def numpy_run(surrogate, steps=STEPS):
  return ref.train(PROBLEM.numpy, surrogate, ref.SGD(LR, MOMENTUM), steps)


def assert_close(got, want, **tol):
  for a, b in zip(got, want, strict=True):
    chex.assert_trees_all_close(a, b, **(tol or TOL))


# NumPy surrogates: (g, w, problem, batch, t) -> g̃.

def rho_at(rho, t):
  return float(rho(t)) if callable(rho) else rho


def sam_full(rho=RHO):
  return lambda g, w, p, batch, t: ref.sam(g, w, lambda x: p.grad(x, batch), rho_at(rho, t))


def sam_per_micro(rho=RHO):
  def surrogate(g, w, p, batch, t):
    del g
    steps = [ref.sam(p.grad(w, micro), w, lambda x, m=micro: p.grad(x, m), rho_at(rho, t))
             for micro in micro_batches(batch)]
    return ref.tree_map(lambda *xs: np.mean(xs, axis=0), *steps)
  return surrogate


def gsam_full(g, w, p, batch, t):
  return ref.gsam(g, w, lambda x: p.grad(x, batch), RHO, ALPHA)


class FriendlySAM:
  """FriendlySAM per micro-batch: ``d_i = g_i − σ m`` (``d_i = g_i`` at the
  first step), ``m ← λ m + (1 − λ) mean_i g_i``, ``g̃ = mean_i ∇L_i(w + ρ
  d_i/‖d_i‖)``."""

  def __init__(self):
    self.m = None

  def __call__(self, g, w, p, batch, t):
    parts = micro_batches(batch)
    grads = [p.grad(w, part) for part in parts]
    mean_g = ref.tree_map(lambda *xs: np.mean(xs, axis=0), *grads)
    outs = []
    for part, g_i in zip(parts, grads):
      d = g_i if self.m is None else ref.add(g_i, -SIGMA, self.m)
      outs.append(p.grad(ref.add(w, RHO / (ref.norm(d) + ref.DELTA), d), part))
    self.m = mean_g if self.m is None else ref.add(ref.scale(LMBDA, self.m), 1 - LMBDA, mean_g)
    return ref.tree_map(lambda *xs: np.mean(xs, axis=0), *outs)


SEQUENTIAL = sam_optax.Splits(K, sequential=True)
GLOBAL = sam_optax.MicroBatches(K)


# --------------------------------------------------------------------------
# (a) Per-micro-batch ascent, sequential.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sam", "fsam"])
def test_per_micro_batch_matches_numpy_and_vectorized_splits(name):
  """SAM with a ρ schedule (advancing once per optimizer step) and FriendlySAM."""
  make, reference = {
      "sam": (lambda p: sam_optax.sam(RHO_SCHEDULE, loss_fn=PROBLEM.loss_fn, perturbation=p),
              sam_per_micro(RHO_SCHEDULE)),
      "fsam": (lambda p: sam_optax.fsam(RHO, sigma=SIGMA, lmbda=LMBDA, loss_fn=PROBLEM.loss_fn,
                                        perturbation=p), FriendlySAM()),
  }[name]
  sequential, state = run(make(SEQUENTIAL))
  assert_close(sequential, numpy_run(reference))
  vectorized, vectorized_state = run(make(sam_optax.Splits(K)))
  assert_close(sequential, vectorized, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(state, vectorized_state, rtol=1e-6, atol=1e-7)
  assert int(state.count) == STEPS  # optimizer steps, not STEPS * K micro-steps


# --------------------------------------------------------------------------
# (b) One ascent for the whole batch (global-batch SAM), (c) ρ schedules.
# --------------------------------------------------------------------------


def test_global_sam_with_a_rho_schedule_is_full_batch_sam_counting_optimizer_steps():
  history, state = run(sam_optax.sam(RHO_SCHEDULE, loss_fn=PROBLEM.loss_fn, perturbation=GLOBAL))
  assert_close(history, numpy_run(sam_full(RHO_SCHEDULE)))
  assert int(state.count) == STEPS  # optimizer steps, not STEPS * K micro-steps
  # and not the per-micro-batch steps: the two semantics differ.
  per_micro = numpy_run(sam_per_micro(RHO_SCHEDULE))
  assert not np.allclose(per_micro[-1]["kernel"], history[-1]["kernel"], rtol=1e-4)


@pytest.mark.parametrize("name", ["gsam", "looksam"])
def test_global_matches_numpy_full_batch(name):
  make, reference = {
      "gsam": (lambda: sam_optax.gsam(RHO, alpha=ALPHA, loss_fn=PROBLEM.loss_fn,
                                      perturbation=GLOBAL), gsam_full),
      "looksam": (lambda: sam_optax.looksam(RHO, k=2, alpha=ALPHA, loss_fn=PROBLEM.loss_fn,
                                            perturbation=GLOBAL), cheap.LookSAM(RHO, 2, ALPHA)),
  }[name]
  history, _ = run(make())
  assert_close(history, numpy_run(reference))


def test_accumulated_grad_with_aux_stacks_the_aux():
  def loss_and_logits(params, batch):
    logits, labels = PROBLEM.logits_fn(params, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  @jax.jit
  def both(params, batch):
    accumulated = sam_optax.accumulated_grad(loss_and_logits, K, has_aux=True)(params, batch=batch)
    return accumulated, jax.grad(PROBLEM.loss_fn)(params, batch), PROBLEM.logits_fn(params, batch)[0]

  (grads, logits), whole, whole_logits = both(PROBLEM.params, PROBLEM.batch(0))
  chex.assert_trees_all_close(grads, whole, rtol=1e-5, atol=1e-7)
  assert logits.shape == (K, 8 // K, 3)
  # Per micro-batch and whole-batch dots may sum in another order: a few ulps
  # of the largest terms, which a logit near 0 does not have in its own scale.
  np.testing.assert_allclose(logits.reshape(8, 3), whole_logits, rtol=1e-6,
                             atol=1e-6 * float(np.max(np.abs(whole_logits))))


def test_with_a_data_parallel_axis():
  """Under pmap over 2 devices: ``MicroBatches(2, axis_name)`` is the step on the
  global batch; ``Splits(2, axis_name, sequential=True)`` the vectorized one's."""
  params, batch = PROBLEM.params, PROBLEM.batch(0)
  shards = jax.tree.map(lambda a: a.reshape((2, -1) + a.shape[1:]), batch)
  make = lambda p: sam_optax.fsam(RHO, sigma=SIGMA, lmbda=LMBDA, loss_fn=PROBLEM.loss_fn,
                                  perturbation=p)
  options = {"micro": sam_optax.MicroBatches(2, axis_name="data"),
             "sequential": sam_optax.Splits(2, axis_name="data", sequential=True),
             "vectorized": sam_optax.Splits(2, axis_name="data")}

  def local(params, shard):
    out = {}
    for key, option in options.items():
      tx = make(option)
      grads = (sam_optax.accumulated_grad(PROBLEM.loss_fn, 2)(params, batch=shard)
               if key == "micro" else jax.grad(PROBLEM.loss_fn)(params, shard))
      out[key] = tx.update(grads, tx.init(params), params, batch=shard)
    return out

  out = jax.tree.map(lambda x: x[0], jax.pmap(local, axis_name="data", in_axes=(None, 0))(
      params, shards))
  whole = make(None)
  want = whole.update(jax.grad(PROBLEM.loss_fn)(params, batch), whole.init(params), params,
                      batch=batch)
  chex.assert_trees_all_close(out["micro"], want, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(out["sequential"], out["vectorized"], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# (d) optax.MultiSteps around a re-evaluating method: refused.
# --------------------------------------------------------------------------


def _multi_steps_update(tx):
  multi = optax.MultiSteps(optax.chain(tx, optax.sgd(LR)), every_k_schedule=2)
  params, batch = PROBLEM.params, PROBLEM.batch(0)
  return jax.eval_shape(lambda: multi.update(  # trace only: the check runs at trace time
      jax.grad(PROBLEM.loss_fn)(params, batch), multi.init(params), params, batch=batch))


@pytest.mark.parametrize("make", [
    lambda f: sam_optax.sam(RHO, loss_fn=f),
    lambda f: sam_optax.gsam(RHO, loss_fn=f),
    lambda f: sam_optax.looksam(RHO, loss_fn=f),
    lambda f: sam_optax.every_k(sam_optax.asam(RHO, loss_fn=f), 2),
    lambda f: sam_optax.stable_sam(sam_optax.usam(RHO, loss_fn=f)),
], ids=["sam", "gsam", "looksam", "every_k(asam)", "stable_sam(usam)"])
def test_multisteps_around_a_method_is_refused_with_what_to_write(make):
  with pytest.raises(TypeError, match=r"runs inside optax\.MultiSteps.*last micro-batch"
                     r".*perturbation=sam_optax\.MicroBatches\(k\).*"
                     r"perturbation=sam_optax\.Splits\(k, sequential=True\)"):
    _multi_steps_update(make(PROBLEM.loss_fn))


def test_multisteps_of_the_base_after_sam_stays_allowed():
  """``chain(sam, MultiSteps(base))``: per-micro-batch SAM (its count counts micro-steps)."""
  tx = optax.chain(sam_optax.sam(RHO, loss_fn=PROBLEM.loss_fn),
                   optax.MultiSteps(optax.sgd(LR), 2).gradient_transformation())
  params, batch = PROBLEM.params, PROBLEM.batch(0)
  jax.eval_shape(lambda: tx.update(jax.grad(PROBLEM.loss_fn)(params, batch), tx.init(params),
                                   params, batch=batch))


def test_saf_inside_multisteps_is_refused():
  tx = optax.MultiSteps(optax.chain(sam_optax.saf(num_examples=8, num_classes=3, steps_per_epoch=1),
                                    optax.sgd(LR)), 2)
  params = PROBLEM.params
  with pytest.raises(TypeError, match=r"saf: update\(\) runs inside optax\.MultiSteps.*logit bank"):
    jax.eval_shape(lambda: tx.update(
        jax.grad(PROBLEM.loss_fn)(params, PROBLEM.batch(0)), tx.init(params), params,
        logits=jnp.zeros((8, 3)), example_index=jnp.arange(8)))


def test_msam_inside_multisteps_is_msam_on_the_accumulated_gradient():
  """MSAM re-evaluates nothing: MultiSteps computes its global-batch step."""
  make = lambda: sam_optax.msam(optax.sgd(LR, momentum=MOMENTUM), 0.1)
  multi = optax.MultiSteps(make(), every_k_schedule=K)
  plain = make()

  @jax.jit
  def micro_step(params, state, micro):
    updates, state = multi.update(jax.grad(PROBLEM.loss_fn)(params, micro), state, params)
    return optax.apply_updates(params, updates), state

  @jax.jit
  def step(params, state, batch):
    grads = sam_optax.accumulated_grad(PROBLEM.loss_fn, K)(params, batch=batch)
    updates, state = plain.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p1 = p2 = PROBLEM.params
  s1, s2 = multi.init(p1), plain.init(p2)
  for t in range(2):
    batch = PROBLEM.batch(t)
    for i in range(K):
      p1, s1 = micro_step(p1, s1, jax.tree.map(lambda x, i=i: x[i * 2:(i + 1) * 2], batch))
    p2, s2 = step(p2, s2, batch)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# (e) Methods that cannot take one of the options say why, at construction.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: sam_optax.looksam(RHO, perturbation=SEQUENTIAL),
     r"looksam: perturbation=Splits\(.*sequential=True\) is not supported: LookSAM stores g_v"),
    (lambda: sam_optax.esam(RHO, perturbation=GLOBAL),
     r"esam: perturbation=MicroBatches\(.*\) is not supported: ESAM's data selection"),
    (lambda: sam_optax.msam(optax.sgd(LR), perturbation=GLOBAL),
     r"msam: perturbation=MicroBatches\(.*\) is not supported: MSAM re-evaluates no gradient"),
    (lambda: sam_optax.MicroBatches(0), r"MicroBatches: n must be an int >= 1, got n=0"),
    (lambda: sam_optax.MicroBatches(2.0), r"MicroBatches: n must be an int >= 1, got n=2.0"),
    (lambda: sam_optax.MicroBatches(2, batch_argnames="batch"),
     r"MicroBatches: batch_argnames must be a non-empty sequence"),
    (lambda: sam_optax.MicroBatches(2, axis_name=""), r"MicroBatches: axis_name must be"),
    (lambda: sam_optax.Splits(2, sequential=1), r"Splits: sequential must be a bool, got sequential=1"),
    (lambda: sam_optax.accumulated_grad(PROBLEM.loss_fn, 0),
     r"accumulated_grad: n must be an int >= 1, got n=0"),
    (lambda: sam_optax.accumulated_grad(None, 2), r"accumulated_grad: loss_fn must be a function"),
])
def test_construction_errors(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_micro_batches_that_do_not_divide_the_batch_is_an_error_naming_the_shape():
  tx = sam_optax.sam(RHO, loss_fn=PROBLEM.loss_fn, perturbation=sam_optax.MicroBatches(3))
  params, batch = PROBLEM.params, PROBLEM.batch(0)
  with pytest.raises(ValueError, match=r"sam: MicroBatches\(n=3\): n must divide the leading"
                     r" \(batch\) dimension.*has shape \(8, 4\)"):
    jax.eval_shape(lambda: tx.update(jax.grad(PROBLEM.loss_fn)(params, batch), tx.init(params),
                                     params, batch=batch))
  with pytest.raises(ValueError, match=r"accumulated_grad: MicroBatches\(n=3\): n must divide"):
    jax.eval_shape(lambda: sam_optax.accumulated_grad(PROBLEM.loss_fn, 3)(params, batch=batch))


# --------------------------------------------------------------------------
# (f) Non-finite values at the ascent point.
# --------------------------------------------------------------------------


def poisoned_loss(params, batch, anchor, bad):
  """The problem's loss, plus (when ``bad``) a term finite at ``anchor`` = w
  and NaN (with a NaN gradient) farther than 0.01 from it: at the ascent point."""
  distance2 = sum(jnp.sum((p - a) ** 2) for p, a in
                  zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))
  safe = jnp.where(bad, 1e-4 - distance2, 1.0)
  return PROBLEM.loss_fn(params, batch) + jnp.where(bad, jnp.sqrt(safe), 0.0)


def protected_run(tx, bad_steps, steps=4, base=None):
  chain = optax.chain(tx, optax.apply_if_finite(base or optax.sgd(LR, momentum=MOMENTUM), 5))

  @jax.jit
  def step(params, state, batch, bad):
    args = dict(batch=batch, anchor=params, bad=bad)
    grads = jax.grad(poisoned_loss)(params, **args)
    updates, state = chain.update(grads, state, params, **args)
    return optax.apply_updates(params, updates), state

  params, state = PROBLEM.params, chain.init(PROBLEM.params)
  history, states = [], []
  for t in range(steps):
    params, state = step(params, state, PROBLEM.batch(t), jnp.asarray(t in bad_steps))
    history.append(params)
    states.append(state)
  return history, states


def test_nan_at_the_ascent_point_is_caught_after_the_method():
  """``chain(fsam, apply_if_finite(base))``: params unchanged, the EMA kept, count on."""
  make = lambda: sam_optax.fsam(RHO, sigma=SIGMA, lmbda=LMBDA, loss_fn=poisoned_loss)
  history, states = protected_run(make(), bad_steps={1})
  chex.assert_trees_all_equal(history[1], history[0])      # the step was skipped
  assert int(states[1][1].notfinite_count) == 1
  assert int(states[1][1].total_notfinite) == 1
  fsam_state = states[1][0]
  assert int(fsam_state.count) == 2                        # the count advances
  chex.assert_trees_all_equal(fsam_state.momentum, states[0][0].momentum)  # the EMA is kept
  assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), history[-1]))
  # The base's state is kept whole too (optax.apply_if_finite's rule).
  chex.assert_trees_all_equal(states[1][1].inner_state, states[0][1].inner_state)


def test_looksam_keeps_its_stored_component_on_a_non_finite_sam_step():
  tx = sam_optax.looksam(RHO, k=2, alpha=ALPHA, loss_fn=poisoned_loss)
  history, states = protected_run(tx, bad_steps={2})        # step 2 is a SAM step (2 % k = 0)
  chex.assert_trees_all_equal(history[2], history[1])
  assert int(states[2][0].count) == 3
  chex.assert_trees_all_equal(states[2][0].orthogonal, states[1][0].orthogonal)
  # The reuse step that follows uses the kept g_v: finite.
  assert jax.tree.all(jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), history[3]))
  assert not np.allclose(history[3]["kernel"], history[2]["kernel"])


def test_apply_if_finite_around_the_method_is_refused():
  tx = optax.apply_if_finite(optax.chain(sam_optax.sam(RHO, loss_fn=poisoned_loss),
                                         optax.sgd(LR)), 5)
  params, batch = PROBLEM.params, PROBLEM.batch(0)
  args = dict(batch=batch, anchor=params, bad=jnp.asarray(True))
  with pytest.raises(TypeError, match=r"sam: update\(\) runs inside optax\.apply_if_finite.*"
                     r"optax\.chain\(sam_optax\.sam\(\.\.\.\), optax\.apply_if_finite\("):
    jax.eval_shape(lambda: tx.update(jax.grad(poisoned_loss)(params, **args), tx.init(params),
                                     params, **args))


def test_optax_still_names_the_updates_that_check_not_wrapped_looks_for():
  """The refusals above find optax's updates by their private qualified names.

  If an optax release renames them, the refusals would silently stop (the
  placements would run, wrongly): this fails first, naming what changed.
  """
  multi_steps = optax.MultiSteps(optax.sgd(LR), every_k_schedule=2).update
  apply_if_finite = optax.apply_if_finite(optax.sgd(LR), 5).update
  for update, expected in ((multi_steps, _checks.MULTI_STEPS_UPDATE),
                           (apply_if_finite, _checks.APPLY_IF_FINITE_UPDATE)):
    code = update.__code__
    assert code.co_qualname == expected, (
        f"optax {optax.__version__} renamed {expected!r} to {code.co_qualname!r}:"
        " update MULTI_STEPS_UPDATE / APPLY_IF_FINITE_UPDATE in sam_optax/_checks.py")
    assert update.__module__.startswith("optax"), update.__module__


def test_without_protection_the_nan_reaches_the_params():
  """Why the placement matters: the gradient at w is finite, the step is not."""
  tx = optax.chain(sam_optax.sam(RHO, loss_fn=poisoned_loss), optax.sgd(LR))
  params, batch = PROBLEM.params, PROBLEM.batch(0)
  args = dict(batch=batch, anchor=params, bad=jnp.asarray(True))
  grads = jax.grad(poisoned_loss)(params, **args)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  updates, _ = tx.update(grads, tx.init(params), params, **args)
  assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
