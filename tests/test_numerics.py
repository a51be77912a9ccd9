"""Every method equals its NumPy formula over several steps, with real bases.

For each method × problem (linear regression, logistic regression, a tiny
tanh MLP), ``optax.chain(method, base)`` runs ``STEPS`` steps with SGD
with momentum and with AdamW as the base; the parameters after every step
must equal those of the independent float64 NumPy implementation in
``reference.py`` to float32 tolerance. Also: ``sam`` matches
``optax.contrib.sam`` step for step, and ρ given as a schedule follows the
step count (GSAM with ``rho_schedule_from_lr``, BSAM with a decaying ρ_min).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import sam_cases as cases
import sam_optax

STEPS = 5
SGD_LR, ADAM_LR = 0.1, 0.01
# float32 against float64 over five steps. The parameters are O(1); the
# update chain (norms, a second gradient, Adam's division) loses a few ulps.
RTOL, ATOL = 1e-5, 1e-6

BASES = {
    "momentum": (lambda lr: optax.sgd(lr, momentum=0.9),
                 lambda lr: ref.SGD(lr, momentum=0.9), SGD_LR),
    "adamw": (lambda lr: optax.adamw(lr, weight_decay=1e-4),
              lambda lr: ref.AdamW(lr, weight_decay=1e-4), ADAM_LR),
}

PAIRS = cases.case_problem_pairs()


def run_jax(tx, problem: cases.JaxProblem, steps: int = STEPS):
  """Params after each of ``steps`` steps of ``tx`` on ``problem``.

  Run eagerly: on these tiny problems op-by-op dispatch (with primitives
  compiled once per process) is several times cheaper than compiling each of
  the ~80 method × problem × base programs; jit is covered by the variant and
  property tests.
  """
  step = cases.make_step(tx, problem.loss_fn)
  params = problem.params
  state = tx.init(params)
  history = []
  for t in range(steps):
    params, state = step(params, state, problem.batch(t))
    history.append(params)
  return history


def assert_history_close(history, expected, rtol=RTOL, atol=ATOL):
  assert len(history) == len(expected)
  for t, (got, want) in enumerate(zip(history, expected)):
    got = cases.to_numpy(got)
    for g, w in zip(ref.leaves(got), ref.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=rtol, atol=atol,
                                 err_msg=f"after step {t + 1}")


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("pair", PAIRS, ids=[cases.pair_id(p) for p in PAIRS])
def test_matches_numpy_reference(pair, base):
  case, problem = pair
  make_base, make_ref_base, lr = BASES[base]
  tx = optax.chain(case.make(problem), make_base(lr))
  expected = ref.train(problem.numpy, case.reference, make_ref_base(lr), STEPS)
  assert_history_close(run_jax(tx, problem), expected)


@pytest.mark.parametrize("problem", cases.jax_problems(), ids=lambda p: p.name)
def test_every_method_differs_from_plain_gradient_descent(problem):
  """The references are discriminating: each method moves params differently
  from the base optimizer alone (and from each other), so the comparison
  above cannot pass with an identity transform."""
  base = ref.SGD(SGD_LR)
  plain = ref.train(problem.numpy, lambda g, w, p, b, t: g, base, STEPS)[-1]
  finals = {"plain": plain}
  for case in cases.CASES:
    if case.applies_to(problem):
      finals[case.name] = ref.train(problem.numpy, case.reference, base, STEPS)[-1]
  names = sorted(finals)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      distance = ref.norm(ref.add(finals[a], -1.0, finals[b]))
      assert distance > 1e-4, (a, b, distance)


def test_csam_problems_exercise_both_branches_of_the_calibrated_loss():
  """Some examples have p_y > ½ (modulated) and some p_y ≤ ½ (plain CE)."""
  for problem in cases.jax_problems()[1:]:
    np_problem = problem.numpy
    batch = np_problem.batches[0]
    logits = np_problem.logits(np_problem.params, batch["x"])
    p = np.exp(ref.log_softmax(logits))[np.arange(len(batch["y"])), batch["y"]]
    assert (p > 0.5).any() and (p <= 0.5).any(), (problem.name, p)


# --------------------------------------------------------------------------
# optax.contrib.sam.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("problem", cases.jax_problems(), ids=lambda p: p.name)
def test_sam_matches_optax_contrib_sam(problem, base):
  """``chain(sam(ρ), opt)`` ≡ ``contrib.sam(opt, chain(normalize(), sgd(ρ)))``.

  In opaque mode with ``sync_period=2`` contrib takes one adversarial step:
  ``sgd(ρ)`` of the normalized gradient gives ``−ρ g/‖g‖``, which contrib
  negates and applies, so ``ŵ = w + ρ g/‖g‖``; it then calls ``grad_fn(ŵ)``
  and applies the outer optimizer to that adversarial gradient at ``w``.
  That is SAM's step with δ = 0 (contrib's normalize has no δ; ours,
  1e-12, changes ‖g‖ ≈ 1 by far less than float32 resolution).
  """
  rho = 0.1
  make_base, _, lr = BASES[base]
  ours = optax.chain(sam_optax.sam(rho, loss_fn=problem.loss_fn), make_base(lr))
  theirs = optax.contrib.sam(
      make_base(lr),
      optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2, opaque_mode=True)

  def contrib_step(params, state, batch):
    grads = jax.grad(problem.loss_fn)(params, batch)
    grad_fn = jax.grad(lambda p, _: problem.loss_fn(p, batch))
    updates, state = theirs.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  params, state = problem.params, theirs.init(problem.params)
  expected = []
  for t in range(STEPS):
    params, state = contrib_step(params, state, problem.batch(t))
    expected.append(cases.to_numpy(params))
  assert_history_close(run_jax(ours, problem), expected)
  # Not trivially equal: plain momentum SGD ends elsewhere.
  plain = run_jax(optax.chain(sam_optax.sam(0.0, loss_fn=problem.loss_fn),
                              make_base(lr)), problem)
  assert ref.norm(ref.add(cases.to_numpy(plain[-1]), -1.0, expected[-1])) > 1e-4


# --------------------------------------------------------------------------
# Radii given as schedules follow the step count.
# --------------------------------------------------------------------------

SCHEDULE_STEPS = 6
LR_PEAK = 0.1


def lr_schedule(count):
  return optax.cosine_decay_schedule(LR_PEAK, decay_steps=SCHEDULE_STEPS)(count)


def numpy_lr(count: int) -> float:
  """optax.cosine_decay_schedule(0.1, 6) written out."""
  fraction = min(count, SCHEDULE_STEPS) / SCHEDULE_STEPS
  return LR_PEAK * 0.5 * (1.0 + math.cos(math.pi * fraction))


def numpy_rho(count: int, rho_max: float, rho_min: float) -> float:
  """GSAM's ρ_t = ρ_min + (ρ_max − ρ_min)(lr_t − lr_min)/(lr_max − lr_min), lr_min = 0."""
  return rho_min + (rho_max - rho_min) * numpy_lr(count) / LR_PEAK


@pytest.mark.parametrize("problem", cases.jax_problems()[1:], ids=lambda p: p.name)
def test_gsam_rho_follows_learning_rate_schedule(problem):
  rho_max, rho_min, alpha = 0.2, 0.02, 0.4
  rho = sam_optax.rho_schedule_from_lr(
      lr_schedule, rho_max=rho_max, rho_min=rho_min, lr_max=LR_PEAK, lr_min=0.0)
  tx = optax.chain(sam_optax.gsam(rho, alpha=alpha, loss_fn=problem.loss_fn),
                   optax.sgd(lr_schedule, momentum=0.9))

  def surrogate(g, w, p, b, t):
    return ref.gsam(g, w, lambda v: p.grad(v, b), numpy_rho(t, rho_max, rho_min), alpha)

  expected = ref.train(problem.numpy, surrogate, ref.SGD(numpy_lr), SCHEDULE_STEPS)
  assert_history_close(run_jax(tx, problem, SCHEDULE_STEPS), expected)

  # A constant ρ = ρ_max gives a different trajectory: the schedule is used.
  def constant(g, w, p, b, t):
    return ref.gsam(g, w, lambda v: p.grad(v, b), rho_max, alpha)

  other = ref.train(problem.numpy, constant, ref.SGD(numpy_lr), SCHEDULE_STEPS)[-1]
  assert ref.norm(ref.add(other, -1.0, expected[-1])) > 1e-5


@pytest.mark.parametrize("problem", cases.jax_problems(), ids=lambda p: p.name)
def test_bsam_decaying_rho_min(problem):
  """BSAM's ρ_min,t = 0.05 · lr_t / lr_max, as rho_schedule_from_lr gives it."""
  rho_min = sam_optax.rho_schedule_from_lr(lr_schedule, rho_max=0.05, rho_min=0.0,
                                           lr_max=LR_PEAK)
  tx = optax.chain(sam_optax.bsam(0.1, rho_min, loss_fn=problem.loss_fn),
                   optax.sgd(lr_schedule, momentum=0.9))

  def surrogate(g, w, p, b, t):
    return ref.bsam(g, w, lambda v: p.grad(v, b), 0.1, 0.05 * numpy_lr(t) / LR_PEAK)

  expected = ref.train(problem.numpy, surrogate, ref.SGD(numpy_lr), SCHEDULE_STEPS)
  assert_history_close(run_jax(tx, problem, SCHEDULE_STEPS), expected)


def test_schedule_is_evaluated_at_the_step_count():
  """The radius of step t is ρ(t): a schedule that is 0 until step 2 gives
  plain gradients on steps 0-1 and SAM gradients from step 2 on."""
  problem = cases.jax_problems()[1]
  def rho(count):
    return jnp.where(count >= 2, 0.3, 0.0)

  tx = sam_optax.sam(rho, loss_fn=problem.loss_fn)
  params = problem.params
  state = tx.init(params)
  batch = problem.batch(0)
  grads = jax.grad(problem.loss_fn)(params, batch)
  w = cases.to_numpy(params)
  g = cases.to_numpy(grads)
  for t in range(4):
    out, state = tx.update(grads, state, params, batch=batch)
    want = ref.sam(g, w, lambda v: problem.numpy.grad(v, problem.numpy.batches[0]),
                   0.3 if t >= 2 else 0.0)
    for a, b in zip(ref.leaves(cases.to_numpy(out)), ref.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"step {t}")
  assert int(state.count) == 4


# --------------------------------------------------------------------------
# float64 parameters stay float64.
# --------------------------------------------------------------------------


def _to_float64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64 if np.issubdtype(
      np.asarray(x).dtype, np.floating) else jnp.int64), tree)


@pytest.mark.parametrize("pair", cases.case_problem_pairs(problems=cases.jax_problems()[:1]),
                         ids=lambda p: cases.pair_id(p))
def test_float64_params_are_computed_in_float64(pair):
  """With ``jax_enable_x64`` and float64 params, the ascent point, norms and
  combinations keep float64 (the float32 accumulation is a floor, not a
  cap): two steps agree with the float64 NumPy reference to 1e-11, where
  float32 rounding would leave ~1e-7."""
  case, problem = pair
  with jax.enable_x64(True):
    tx = optax.chain(case.make(problem), optax.sgd(SGD_LR, momentum=0.9))
    step = cases.make_step(tx, problem.loss_fn)
    params = _to_float64(problem.numpy.params)
    state = tx.init(params)
    history = []
    for t in range(2):
      params, state = step(params, state, _to_float64(problem.numpy.batches[t]))
      history.append(params)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params))
  expected = ref.train(problem.numpy, case.reference, ref.SGD(SGD_LR, momentum=0.9), 2)
  assert_history_close(history, expected, rtol=1e-11, atol=1e-12)
