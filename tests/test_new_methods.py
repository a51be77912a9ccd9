"""FriendlySAM, VaSSO, WSAM and MSAM against float64 NumPy over several steps.

Each method's reference below is written from the formula of its docstring
(and the official code it names), independently of JAX; it is run by
``reference.train`` with momentum SGD and with AdamW as the base, and the
parameters after every step are compared.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import devices
import reference as ref
import sam_optax
from sam_cases import jax_problems, make_step, to_numpy

RHO, LR, ADAM_LR, MOMENTUM, WD, STEPS = 0.1, 0.05, 0.01, 0.9, 0.01, 6
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 against float64, over several steps
PROBLEMS = {problem.name: problem for problem in jax_problems()}
# The perturbation masks of the tests: one leaf out (a prefix for the MLP).
MASKS = {"linear": {"kernel": True, "bias": False},
         "logistic": {"kernel": False, "bias": True},
         "mlp": {"hidden": True, "out": False}}


def bases():
  """(optax base, NumPy base) pairs: momentum SGD and AdamW."""
  return {"sgd": (optax.sgd(LR, momentum=MOMENTUM), ref.SGD(LR, MOMENTUM)),
          "adamw": (optax.adamw(ADAM_LR, weight_decay=WD),
                    ref.AdamW(ADAM_LR, weight_decay=WD))}


def run(tx, problem, steps=STEPS):
  """``steps`` steps of ``tx`` (a whole optimizer); the params after each.

  Eager, as in ``test_numerics.py``: on these tiny problems op-by-op dispatch
  is cheaper than compiling every case; jit is covered by ``test_common``.
  """
  step = make_step(tx, problem.loss_fn)
  params, state = problem.params, tx.init(problem.params)
  history = []
  for t in range(steps):
    params, state = step(params, state, problem.batch(t))
    history.append(params)
  return history, state


def assert_histories_close(history, expected, tol=None):
  for got, want in zip(history, expected, strict=True):
    chex.assert_trees_all_close(to_numpy(got), want, **(tol or TOL))


def normalized_ascent(w, d, rho, mask):
  """``w + ρ m⊙d / (‖m⊙d‖ + δ)``."""
  d = ref.restrict(d, mask)
  return ref.add(w, rho / (ref.norm(d) + ref.DELTA), d)


def assert_is_sam(make, problem, steps=3):
  """``chain(make(loss_fn), momentum SGD)`` takes SAM's steps."""
  sgd = lambda: optax.sgd(LR, momentum=MOMENTUM)
  sam, _ = run(optax.chain(sam_optax.sam(RHO, loss_fn=problem.loss_fn), sgd()), problem, steps)
  got, _ = run(optax.chain(make(problem.loss_fn), sgd()), problem, steps)
  chex.assert_trees_all_close(got, sam, rtol=1e-5, atol=1e-6)


def check_chained(make, reference, name, base, masked):
  """``chain(make(loss_fn, mask), base)`` against ``reference.train`` with the
  NumPy surrogate ``reference(mask)``, on problem ``name``; its final state."""
  problem = PROBLEMS[name]
  mask = MASKS[name] if masked else None
  jax_base, numpy_base = bases()[base]
  history, state = run(optax.chain(make(problem.loss_fn, mask), jax_base), problem)
  assert_histories_close(history, ref.train(problem.numpy, reference(mask), numpy_base, STEPS))
  return state


CASES = [(problem, base, mask) for problem in PROBLEMS for base in ("sgd", "adamw")
         for mask in (False, True)]
IDS = [f"{p}-{b}{'-mask' if m else ''}" for p, b, m in CASES]


# --------------------------------------------------------------------------
# FriendlySAM.
# --------------------------------------------------------------------------

SIGMA, LMBDA = 0.8, 0.6


class FriendlySAM:
  """``d = g − σ m_prev`` (``d = g`` and ``m = g`` at the first step),
  ``m ← λ m + (1 − λ) g``, ``g̃ = ∇L(w + ρ d/‖d‖)``."""

  def __init__(self, rho, sigma, lmbda, mask=None):
    self.rho, self.sigma, self.lmbda, self.mask = rho, sigma, lmbda, mask
    self.m = None

  def __call__(self, g, w, problem, batch, t):
    if self.m is None:
      d, self.m = g, g
    else:
      d = ref.add(g, -self.sigma, self.m)
      self.m = ref.add(ref.scale(self.lmbda, self.m), 1.0 - self.lmbda, g)
    return problem.grad(normalized_ascent(w, d, self.rho, self.mask), batch)


@pytest.mark.parametrize("name, base, masked", CASES, ids=IDS)
def test_fsam_matches_numpy(name, base, masked):
  state = check_chained(
      lambda loss_fn, mask: sam_optax.fsam(RHO, sigma=SIGMA, lmbda=LMBDA, loss_fn=loss_fn,
                                           mask=mask),
      lambda mask: FriendlySAM(RHO, SIGMA, LMBDA, mask), name, base, masked)
  assert int(state[0].count) == STEPS


def test_fsam_first_step_is_sam_and_sigma_zero_is_sam():
  problem = PROBLEMS["mlp"]
  assert_is_sam(lambda loss_fn: sam_optax.fsam(RHO, loss_fn=loss_fn), problem, steps=1)
  assert_is_sam(lambda loss_fn: sam_optax.fsam(RHO, sigma=0.0, loss_fn=loss_fn), problem)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sigma=-0.5), ValueError, r"fsam: sigma must be finite and >= 0, got sigma=-0.5"),
    (dict(lmbda=1.5), ValueError, r"fsam: lmbda must be in \[0.0, 1.0\], got lmbda=1.5"),
    (dict(lmbda=-0.1), ValueError, r"fsam: lmbda must be in \[0.0, 1.0\]"),
    (dict(rho=-1.0), ValueError, r"fsam: rho must be finite and >= 0, got rho=-1.0"),
])
def test_fsam_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    sam_optax.fsam(**kwargs)


# --------------------------------------------------------------------------
# VaSSO.
# --------------------------------------------------------------------------

THETA = 0.4


class VaSSO:
  """``d ← (1 − θ) d + θ g`` (``d = g`` at the first step), then
  ``g̃ = ∇L(w + ρ d/‖d‖)``."""

  def __init__(self, rho, theta, mask=None):
    self.rho, self.theta, self.mask = rho, theta, mask
    self.d = None

  def __call__(self, g, w, problem, batch, t):
    self.d = g if self.d is None else ref.add(ref.scale(1.0 - self.theta, self.d), self.theta, g)
    return problem.grad(normalized_ascent(w, self.d, self.rho, self.mask), batch)


@pytest.mark.parametrize("name, base, masked", CASES, ids=IDS)
def test_vasso_matches_numpy(name, base, masked):
  state = check_chained(
      lambda loss_fn, mask: sam_optax.vasso(RHO, theta=THETA, loss_fn=loss_fn, mask=mask),
      lambda mask: VaSSO(RHO, THETA, mask), name, base, masked)
  assert int(state[0].count) == STEPS


def test_vasso_theta_one_is_sam():
  assert_is_sam(lambda loss_fn: sam_optax.vasso(RHO, theta=1.0, loss_fn=loss_fn),
                PROBLEMS["mlp"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(theta=1.5), r"vasso: theta must be in \[0.0, 1.0\], got theta=1.5"),
    (dict(theta=-0.1), r"vasso: theta must be in \[0.0, 1.0\], got theta=-0.1"),
    (dict(rho=-1.0), r"vasso: rho must be finite and >= 0, got rho=-1.0"),
])
def test_vasso_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.vasso(**kwargs)


# --------------------------------------------------------------------------
# WSAM: coupled and decoupled.
# --------------------------------------------------------------------------

GAMMA = 0.7
WSAM_ALPHA = GAMMA / (1.0 - GAMMA)


def coupled_wsam(mask=None):
  """``g + α (g̃ − g)`` with SAM's ``g̃``."""
  def surrogate(g, w, problem, batch, t):
    sam = problem.grad(normalized_ascent(w, g, RHO, mask), batch)
    return ref.add(g, WSAM_ALPHA, ref.add(sam, -1.0, g))
  return surrogate


def train_decoupled(problem, base, lr, steps, mask=None):
  """The decoupled form: ``w ← base(w, g) − η_t α (g̃ − g)``."""
  params = ref.as_float64(problem.params)
  state = base.init(params)
  history = []
  for t in range(steps):
    batch = problem.batches[t % len(problem.batches)]
    g = problem.grad(params, batch)
    sam = problem.grad(normalized_ascent(params, g, RHO, mask), batch)
    stepped, state = base.step(params, g, state)
    params = ref.add(stepped, -ref._value(lr, t) * WSAM_ALPHA, ref.add(sam, -1.0, g))
    history.append(params)
  return history


@pytest.mark.parametrize("name, base, masked", CASES, ids=IDS)
def test_wsam_matches_numpy(name, base, masked):
  check_chained(
      lambda loss_fn, mask: sam_optax.wsam(RHO, gamma=GAMMA, loss_fn=loss_fn, mask=mask),
      coupled_wsam, name, base, masked)


@pytest.mark.parametrize("name, base, masked", CASES, ids=IDS)
def test_wsam_decoupled_matches_numpy(name, base, masked):
  problem = PROBLEMS[name]
  mask = MASKS[name] if masked else None
  lr = optax.linear_schedule(LR, LR / 4, STEPS) if base == "sgd" else ADAM_LR
  jax_base = (optax.sgd(lr, momentum=MOMENTUM) if base == "sgd"
              else optax.adamw(lr, weight_decay=WD))
  numpy_base = (ref.SGD(lr, MOMENTUM) if base == "sgd"
                else ref.AdamW(lr, weight_decay=WD))
  tx = sam_optax.wsam_decoupled(jax_base, lr, RHO, gamma=GAMMA, loss_fn=problem.loss_fn,
                                mask=mask)
  history, state = run(tx, problem)
  assert_histories_close(history, train_decoupled(problem.numpy, numpy_base, lr, STEPS, mask))
  assert int(state.sharpness.count) == STEPS


def test_decoupled_equals_coupled_under_plain_sgd_only():
  problem = PROBLEMS["mlp"]
  make = lambda: sam_optax.wsam(RHO, gamma=GAMMA, loss_fn=problem.loss_fn)
  coupled, _ = run(optax.chain(make(), optax.sgd(LR)), problem, 3)
  decoupled, _ = run(sam_optax.wsam_decoupled(optax.sgd(LR), LR, RHO, gamma=GAMMA,
                                              loss_fn=problem.loss_fn), problem, 3)
  chex.assert_trees_all_close(decoupled, coupled, rtol=1e-5, atol=1e-6)
  with_momentum, _ = run(optax.chain(make(), optax.sgd(LR, momentum=MOMENTUM)), problem, 3)
  decoupled_momentum, _ = run(sam_optax.wsam_decoupled(
      optax.sgd(LR, momentum=MOMENTUM), LR, RHO, gamma=GAMMA, loss_fn=problem.loss_fn),
      problem, 3)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(with_momentum[-1]), jax.tree.leaves(decoupled_momentum[-1]))) > 1e-4


def test_wsam_gamma_half_is_sam():
  assert_is_sam(lambda loss_fn: sam_optax.wsam(RHO, gamma=0.5, loss_fn=loss_fn),
                PROBLEMS["logistic"])


@pytest.mark.parametrize("make, kwargs, error, match", [
    ("wsam", dict(gamma=1.0), ValueError, r"wsam: gamma must be in \[0, 1\) .*, got gamma=1.0"),
    ("wsam", dict(gamma=-0.1), ValueError, r"wsam: gamma must be in \[0, 1\)"),
    ("wsam", dict(rho=-1.0), ValueError, r"wsam: rho must be finite and >= 0, got rho=-1.0"),
    ("decoupled", dict(gamma=1.5), ValueError, r"wsam_decoupled: gamma must be in \[0, 1\)"),
    ("decoupled", dict(learning_rate=float("nan")), ValueError,
     r"wsam_decoupled: learning_rate must be a finite float or an optax schedule"),
    ("decoupled", dict(base_optimizer=optax.sgd), TypeError,
     r"wsam_decoupled: base_optimizer must be an optax GradientTransformation"),
])
def test_wsam_errors(make, kwargs, error, match):
  with pytest.raises(error, match=match):
    if make == "wsam":
      sam_optax.wsam(**kwargs)
    else:
      sam_optax.wsam_decoupled(**{"base_optimizer": optax.sgd(LR), "learning_rate": LR,
                                  **kwargs})


# --------------------------------------------------------------------------
# MSAM.
# --------------------------------------------------------------------------

MSAM_RHO = 0.3


def train_msam(problem, base, rho, mu, steps, mask=None):
  """The official algorithm with SGD's buffer ``v ← μ v + g`` (a sum, not an
  EMA) as the direction: ``g = ∇L(w + ε)``, ``w ← base(w, g)``,
  ``ε = −ρ m⊙v/‖m⊙v‖``. Returns the perturbed and the evaluation weights."""
  w = ref.as_float64(problem.params)
  state = base.init(w)
  v = ref.tree_map(np.zeros_like, w)
  epsilon = ref.tree_map(np.zeros_like, w)
  perturbed, evaluation = [], []
  for t in range(steps):
    batch = problem.batches[t % len(problem.batches)]
    g = problem.grad(ref.add(w, 1.0, epsilon), batch)
    w, state = base.step(w, g, state)
    v = ref.add(g, mu, v)
    d = ref.restrict(v, mask)
    epsilon = ref.scale(-rho / (ref.norm(d) + ref.DELTA), d)
    perturbed.append(ref.add(w, 1.0, epsilon))
    evaluation.append(w)
  return perturbed, evaluation


@pytest.mark.parametrize("name, base, masked", CASES, ids=IDS)
def test_msam_matches_numpy(name, base, masked):
  problem = PROBLEMS[name]
  mask = MASKS[name] if masked else None
  jax_base, numpy_base = bases()[base]
  tx = sam_optax.msam(jax_base, MSAM_RHO, momentum=MOMENTUM, mask=mask)
  history, state = run(tx, problem)
  perturbed, evaluation = train_msam(problem.numpy, numpy_base, MSAM_RHO, MOMENTUM, STEPS, mask)
  assert_histories_close(history, perturbed)
  chex.assert_trees_all_close(to_numpy(sam_optax.msam_eval_params(state, history[-1])),
                              evaluation[-1], **TOL)
  assert int(state.count) == STEPS


def test_msam_costs_one_gradient_and_rho_zero_is_the_base():
  problem = PROBLEMS["mlp"]
  base = lambda: optax.sgd(LR, momentum=MOMENTUM)
  plain, _ = run(base(), problem, 3)
  zero, state = run(sam_optax.msam(base(), 0.0), problem, 3)
  chex.assert_trees_all_close(zero, plain, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(sam_optax.msam_eval_params(state, zero[-1]), zero[-1])


def test_msam_synced_on_two_devices_equals_the_global_batch():
  problem = PROBLEMS["logistic"]
  single, _ = run(sam_optax.msam(optax.sgd(LR, momentum=MOMENTUM), MSAM_RHO), problem, 3)
  tx = sam_optax.msam(optax.sgd(LR, momentum=MOMENTUM), MSAM_RHO,
                      perturbation=sam_optax.Synced(devices.AXIS))
  history, state = devices.train_on_devices(
      make_step(tx, problem.loss_fn), problem.params, tx.init(problem.params),
      [problem.batch(t) for t in range(3)], devices=2)
  for got, want in zip(history, single, strict=True):
    chex.assert_trees_all_close(devices.unreplicate(got), want, rtol=1e-5, atol=1e-6)
  devices.assert_replicated(state)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(momentum=1.0), ValueError, r"msam: momentum must be in \[0, 1\), got momentum=1.0"),
    (dict(rho=-1.0), ValueError, r"msam: rho must be finite and >= 0, got rho=-1.0"),
    (dict(eps=0.0), ValueError, r"msam: eps must be finite and > 0, got eps=0.0"),
    (dict(perturbation=sam_optax.PerDevice("d")), TypeError,
     r"msam: perturbation=PerDevice\(axis_name='d'\) is not supported: MSAM re-evaluates no"),
    (dict(perturbation=sam_optax.Splits(2)), TypeError, r"msam: perturbation=Splits"),
    (dict(base_optimizer=optax.sgd), TypeError, r"msam: base_optimizer must be an optax"),
])
def test_msam_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    sam_optax.msam(**{"base_optimizer": optax.sgd(LR), **kwargs})


def test_msam_eval_params_needs_the_msam_state():
  with pytest.raises(TypeError, match="msam_eval_params: state must be the MSAMState"):
    sam_optax.msam_eval_params(optax.sgd(LR).init(jnp.ones(2)), jnp.ones(2))
