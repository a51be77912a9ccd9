"""LookSAM: NumPy agreement over several steps, properties, data parallelism, errors."""

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import devices
import reference as ref
import reference_cheap as cheap
import sam_optax
from cheap_cases import run_steps, zero_loss
from sam_cases import jax_problems, make_step, to_numpy

RHO, K, ALPHA, LR, MOMENTUM, STEPS = 0.1, 3, 0.7, 0.1, 0.9, 8
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 against float64, over several steps
PROBLEMS = {problem.name: problem for problem in jax_problems()}


def looksam_history(problem, rho=RHO, k=K, steps=STEPS, **kwargs):
  inner = sam_optax.looksam(rho, k=k, alpha=ALPHA, loss_fn=problem.loss_fn, **kwargs)
  return run_steps(inner, problem, steps, LR, MOMENTUM)


@pytest.mark.parametrize("name, rho", [
    ("linear", RHO), ("logistic", RHO), ("mlp", RHO),
    ("mlp", optax.linear_schedule(0.2, 0.02, STEPS)),
], ids=["linear", "logistic", "mlp", "mlp-rho_schedule"])
def test_looksam_matches_numpy(name, rho):
  problem = PROBLEMS[name]
  history, state = looksam_history(problem, rho=rho)
  reference = cheap.LookSAM(rho, K, ALPHA)
  expected = ref.train(problem.numpy, reference, ref.SGD(LR, MOMENTUM), STEPS)
  assert reference.sam_steps == [0, 3, 6]
  for got, want in zip(history, expected):
    chex.assert_trees_all_close(to_numpy(got), want, **TOL)
  assert int(state[0].count) == STEPS


def test_k_one_is_sam():
  problem = PROBLEMS["mlp"]
  history, _ = looksam_history(problem, k=1, steps=4)
  expected = ref.train(problem.numpy, lambda g, w, p, b, t: ref.sam(
      g, w, lambda v: p.grad(v, b), RHO), ref.SGD(LR, MOMENTUM), 4)
  for got, want in zip(history, expected):
    chex.assert_trees_all_close(to_numpy(got), want, **TOL)


# --------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------

LOGISTIC = PROBLEMS["logistic"]
_PLAIN = sam_optax.looksam(0.0, k=2, alpha=0.0, loss_fn=LOGISTIC.loss_fn)
_FLAT = sam_optax.looksam(0.1, k=2, alpha=0.7, loss_fn=zero_loss)


def _run_two(tx, loss_fn):
  @jax.jit
  def two(params, batch):
    grads = jax.grad(loss_fn)(params, batch)
    state = tx.init(params)
    first, state = tx.update(grads, state, params, batch=batch)
    second, _ = tx.update(grads, state, params, batch=batch)
    return grads, first, second
  return two


_TWO_PLAIN = _run_two(_PLAIN, LOGISTIC.loss_fn)
_TWO_FLAT = _run_two(_FLAT, zero_loss)
_kernel = hnp.arrays(np.float32, (4, 3), elements=st.floats(-3, 3, width=32))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(_kernel)
def test_rho_and_alpha_zero_give_the_plain_gradient(kernel):
  params = {**LOGISTIC.params, "kernel": jnp.asarray(kernel)}
  grads, sam_step, reuse_step = _TWO_PLAIN(params, LOGISTIC.batch(0))
  chex.assert_trees_all_close(sam_step, grads, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(reuse_step, grads)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(_kernel)
def test_zero_gradient_stays_finite_and_zero(kernel):
  params = {**LOGISTIC.params, "kernel": jnp.asarray(kernel)}
  grads, sam_step, reuse_step = _TWO_FLAT(params, LOGISTIC.batch(0))
  for out in (sam_step, reuse_step):
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_equal(out, grads)


# --------------------------------------------------------------------------
# Data parallelism and chex variants.
# --------------------------------------------------------------------------


def test_synced_on_two_devices_equals_single_device_on_global_batch():
  problem = PROBLEMS["logistic"]
  single, _ = looksam_history(problem, k=2, steps=4)
  tx = optax.chain(sam_optax.looksam(RHO, k=2, alpha=ALPHA, loss_fn=problem.loss_fn,
                                     perturbation=sam_optax.Synced(devices.AXIS)),
                   optax.sgd(LR, momentum=MOMENTUM))
  history, state = devices.train_on_devices(
      make_step(tx, problem.loss_fn), problem.params, tx.init(problem.params),
      [problem.batch(t) for t in range(4)], devices=2)
  for got, want in zip(history, single, strict=True):
    chex.assert_trees_all_close(devices.unreplicate(got), want, rtol=1e-5, atol=1e-6)
  # g_v is the same on every device: the state stays replicated.
  devices.assert_replicated(state)


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_looksam_step(self):
    pmap = self.variant.type == chex.ChexVariantType.WITH_PMAP
    problem = PROBLEMS["logistic"]
    tx = optax.chain(
        sam_optax.looksam(RHO, k=2, alpha=ALPHA, loss_fn=problem.loss_fn,
                          perturbation=sam_optax.PerDevice("i") if pmap else None),
        optax.sgd(LR, momentum=MOMENTUM))
    step = self.variant(make_step(tx, problem.loss_fn),
                        **({"n_devices": 2} if pmap else {}))
    params, state = problem.params, tx.init(problem.params)
    expected = ref.train(problem.numpy, cheap.LookSAM(RHO, 2, ALPHA),
                         ref.SGD(LR, MOMENTUM), 3)
    for t in range(3):
      params, state = step(params, state, problem.batch(t))
    chex.assert_trees_all_close(to_numpy(params), expected[-1], **TOL)


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k must be an int >= 1, got k=0"),
    (dict(k=2.5), "k must be an int >= 1"),
    (dict(alpha=-0.1), "alpha must be finite and >= 0"),
    (dict(rho=-1.0), "rho must be finite and >= 0"),
    (dict(eps=0.0), "eps must be finite and > 0"),
])
def test_constructor_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.looksam(**kwargs)


def test_update_errors():
  problem = PROBLEMS["linear"]
  tx = sam_optax.looksam(RHO)
  state = tx.init(problem.params)
  grads = jax.grad(problem.loss_fn)(problem.params, problem.batch(0))
  with pytest.raises(ValueError, match="no loss_fn"):
    tx.update(grads, state, problem.params, batch=problem.batch(0))
  with pytest.raises(ValueError, match="needs params"):
    tx.update(grads, state, loss_fn=problem.loss_fn, batch=problem.batch(0))
