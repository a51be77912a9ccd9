"""SAF and MESA: the trajectory loss, the memory bank, the EMA teacher.

* the trajectory KL and its gradient against NumPy (hypothesis);
* the bank returns the logits stored Ẽ epochs earlier for the same examples,
  with per-epoch shuffling and a last partial batch (smaller or padded);
* whole SAF / MESA training runs against NumPy; λ = 0 and the epochs before
  E_start equal plain training exactly; MESA's EMA against a NumPy EMA;
* data parallelism: pmap (all-gathered writes) and jit with a sharded bank;
* bad input fails with a clear error; chex variants.
"""

import functools

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import reference as ref
import reference_cheap as cheap
import sam_optax
from sam_cases import to_jax, to_numpy
from sam_optax.losses import TrajectoryTarget, trajectory_kl, trajectory_loss

N, B, C = 10, 4, 3          # examples, batch, classes: 3 steps per epoch (4, 4, 2)
STEPS_PER_EPOCH = 3
LR, MOMENTUM, TAU = 0.3, 0.9, 2.0
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 against float64, over several steps
DATA = cheap.Dataset(num_examples=N, num_classes=C)


def apply(params, x):
  return x @ params["kernel"] + params["bias"]


def masked_cross_entropy(logits, y, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def base_optimizer():
  return optax.sgd(LR, momentum=MOMENTUM)


def batch_arrays(index, mask, pad):
  """The jnp batch of ``index``; without ``pad`` the padding rows are dropped."""
  if not pad:
    index = index[mask > 0]
    mask = mask[mask > 0]
  return (jnp.asarray(DATA.x[index], jnp.float32), jnp.asarray(DATA.y[index], jnp.int32),
          jnp.asarray(index, jnp.int32), jnp.asarray(mask, jnp.float32))


# --------------------------------------------------------------------------
# Training steps (compiled once per module).
# --------------------------------------------------------------------------


def saf_step(tx, params, opt_state, x, y, index, mask):
  target = sam_optax.saf_target(opt_state, index, mask)

  def loss_fn(params):
    logits = apply(params, x)
    loss = masked_cross_entropy(logits, y, mask) + trajectory_loss(logits, target)
    return loss, logits

  (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params, logits=logits,
                                 example_index=index, example_mask=mask)
  return optax.apply_updates(params, updates), opt_state


def mesa_step(tx, params, opt_state, x, y, index, mask):
  del index
  target = sam_optax.mesa_target(opt_state, params, lambda ema: apply(ema, x),
                                 example_mask=mask)

  def loss_fn(params):
    logits = apply(params, x)
    return masked_cross_entropy(logits, y, mask) + trajectory_loss(logits, target)

  grads = jax.grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def plain_step(tx, params, opt_state, x, y, index, mask):
  del index
  grads = jax.grad(lambda p: masked_cross_entropy(apply(p, x), y, mask))(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def run(step, tx, epochs, pad=True):
  """Runs ``step`` over ``epochs``; returns the params after each step and the state."""
  params = to_jax(DATA.params)
  opt_state = tx.init(params)
  history = []
  for batches in epochs:
    for index, mask in batches:
      params, opt_state = step(params, opt_state, *batch_arrays(index, mask, pad))
      history.append(params)
  return history, opt_state


SAF_KW = dict(num_examples=N, num_classes=C, steps_per_epoch=STEPS_PER_EPOCH, lam=0.5,
              tau=TAU, start_epoch=2, past_epochs=2)
SAF_TX = optax.chain(sam_optax.saf(**SAF_KW), base_optimizer())
SAF_STEP = jax.jit(functools.partial(saf_step, SAF_TX))
MESA_KW = dict(steps_per_epoch=STEPS_PER_EPOCH, lam=0.5, tau=TAU, decay=0.8, start_epoch=1)
MESA_TX = optax.chain(sam_optax.mesa(**MESA_KW), base_optimizer())
MESA_STEP = jax.jit(functools.partial(mesa_step, MESA_TX))
PLAIN_TX = base_optimizer()
PLAIN_STEP = jax.jit(functools.partial(plain_step, PLAIN_TX))
EPOCHS = 6
ORDERS = cheap.epoch_orders(N, B, EPOCHS, seed=0, pad=True)


def _numpy_saf_hooks(epochs, steps_per_epoch, lam, start_epoch, past_epochs):
  """``target_fn`` and ``after_step`` of a NumPy SAF run over ``epochs``."""
  bank = cheap.Bank(N, C, past_epochs)
  step_epoch = {}

  def target_fn(t, epoch, params, index):
    step_epoch[t] = epoch
    return bank.read(epoch, index), cheap.trajectory_weight(epoch, lam, start_epoch)

  def after_step(t, params, logits):
    index, mask = epochs[step_epoch[t]][t % steps_per_epoch]
    bank.write(step_epoch[t], index[mask > 0], logits[mask > 0])

  return target_fn, after_step


def numpy_saf(epochs, lam=0.5, start_epoch=2, past_epochs=2):
  return cheap.train_with_trajectory_loss(
      DATA, ref.SGD(LR, MOMENTUM), epochs,
      *_numpy_saf_hooks(epochs, STEPS_PER_EPOCH, lam, start_epoch, past_epochs), tau=TAU)


@pytest.fixture(scope="module")
def plain_history():
  return run(PLAIN_STEP, PLAIN_TX, ORDERS)[0]


# --------------------------------------------------------------------------
# The trajectory KL.
# --------------------------------------------------------------------------

_logits = hnp.arrays(np.float32, (3, 4), elements=st.floats(-8, 8, width=32))


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(_logits, _logits, st.sampled_from([0.5, 1.0, 5.0]),
                  hnp.arrays(np.float32, (3,), elements=st.sampled_from([0.0, 1.0])))
def test_trajectory_kl_and_gradient_match_numpy(logits, target, tau, mask):
  value, grad = jax.value_and_grad(trajectory_kl)(
      jnp.asarray(logits), jnp.asarray(target), tau, jnp.asarray(mask))
  logits64, target64 = logits.astype(np.float64), target.astype(np.float64)
  np.testing.assert_allclose(value, cheap.trajectory_kl(logits64, target64, tau, mask),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad, cheap.trajectory_kl_grad(logits64, target64, tau, mask),
                             rtol=1e-4, atol=1e-6)
  assert float(value) >= -1e-5


def test_trajectory_kl_numpy_gradient_is_the_derivative():
  rng = np.random.default_rng(0)
  z, t = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
  numeric = ref.finite_difference_grad(lambda v: cheap.trajectory_kl(v, t, 2.0), z)
  np.testing.assert_allclose(cheap.trajectory_kl_grad(z, t, 2.0), numeric, atol=1e-7)


def test_trajectory_target_is_a_constant_and_weight_scales():
  z, t = jnp.array([[1.0, -1.0, 0.5]]), jnp.array([[0.0, 2.0, 0.0]])
  grad_t = jax.grad(lambda t: trajectory_kl(z, t, 5.0))(t)
  chex.assert_trees_all_equal(grad_t, jnp.zeros_like(t))
  target = TrajectoryTarget(t, jnp.ones(1), jnp.float32(0.3), jnp.float32(5.0))
  np.testing.assert_allclose(trajectory_loss(z, target), 0.3 * trajectory_kl(z, t, 5.0),
                             rtol=1e-6)
  off = target._replace(weight=jnp.float32(0.0))
  chex.assert_trees_all_equal(jax.grad(trajectory_loss)(z, off), jnp.zeros_like(z))


def test_trajectory_loss_bad_input():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"shape \[batch, num_classes\]"):
    trajectory_kl(z, jnp.zeros((2, 4)), 1.0)
  with pytest.raises(ValueError, match="mask must have shape"):
    trajectory_kl(z, z, 1.0, jnp.ones(3))
  with pytest.raises(TypeError, match="TrajectoryTarget"):
    trajectory_loss(z, (z, 1.0))


# --------------------------------------------------------------------------
# SAF: the bank.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "smaller_last_batch"])
def test_bank_returns_logits_of_the_same_examples_past_epochs_ago(pad):
  past, epochs = 2, 5
  tx = sam_optax.saf(N, C, STEPS_PER_EPOCH, start_epoch=past, past_epochs=past)
  orders = cheap.epoch_orders(N, B, epochs, seed=1, pad=pad)
  table = np.random.default_rng(2).normal(size=(epochs, N, C)).astype(np.float32)

  @jax.jit
  def step(state, index, mask):
    target = sam_optax.saf_target(state, index, mask)
    logits = jnp.asarray(table)[state.count // STEPS_PER_EPOCH][index]
    _, state = tx.update({}, state, {}, logits=logits, example_index=index,
                         example_mask=mask)
    return target, state

  state = tx.init({})
  assert state.bank.shape == (past + 1, N, C)
  for epoch, batches in enumerate(orders):
    for index, mask in batches:
      if not pad:
        index, mask = index[mask > 0], mask[mask > 0]
      target, state = step(state, jnp.asarray(index), jnp.asarray(mask))
      real = mask > 0
      np.testing.assert_array_equal(target.mask, real.astype(np.float32))
      if epoch >= past:
        np.testing.assert_array_equal(np.asarray(target.logits)[real],
                                      table[epoch - past][index[real]])
  assert int(state.invalid_count) == 0
  # Each slot holds the epoch it was last written in, for every example.
  for epoch in range(epochs - past - 1, epochs):
    np.testing.assert_array_equal(state.bank[epoch % (past + 1)], table[epoch])


def test_weight_follows_the_epoch_window():
  tx = sam_optax.saf(N, C, 2, lam=0.3, start_epoch=3, end_epoch=6, past_epochs=3)
  state = tx.init({})
  schedule = state.schedule
  for count in range(16):
    expected = cheap.trajectory_weight(count // 2, 0.3, 3, 6)
    np.testing.assert_allclose(schedule.weight(jnp.int32(count)), expected, rtol=1e-7)


# --------------------------------------------------------------------------
# SAF and MESA training against NumPy; equality with plain training.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "smaller_last_batch"])
def test_saf_training_matches_numpy(pad, plain_history):
  history, state = run(SAF_STEP, SAF_TX, ORDERS, pad=pad)
  expected = numpy_saf(ORDERS)
  for got, want in zip(history, expected):
    chex.assert_trees_all_close(to_numpy(got), want, **TOL)
  assert int(state[0].invalid_count) == 0
  # The trajectory loss (on from epoch 3) changed the result.
  gap = ref.norm(ref.add(to_numpy(history[-1]), -1.0, to_numpy(plain_history[-1])))
  assert gap > 1e-3


def test_saf_equals_base_optimizer_before_start_and_with_lam_zero(plain_history):
  history, _ = run(SAF_STEP, SAF_TX, ORDERS)
  first_active = (SAF_KW["start_epoch"] + 1) * STEPS_PER_EPOCH
  for got, want in zip(history[:first_active], plain_history[:first_active]):
    chex.assert_trees_all_equal(got, want)
  tx = optax.chain(sam_optax.saf(**{**SAF_KW, "lam": 0.0}), base_optimizer())
  history, _ = run(jax.jit(functools.partial(saf_step, tx)), tx, ORDERS)
  chex.assert_trees_all_equal(history, plain_history)


def test_saf_after_end_epoch_equals_base_optimizer_step():
  tx = optax.chain(sam_optax.saf(**{**SAF_KW, "end_epoch": 4}), base_optimizer())
  step = jax.jit(functools.partial(saf_step, tx))
  params = to_jax(DATA.params)
  state = tx.init(params)
  for t, (index, mask) in enumerate(b for e in ORDERS for b in e):
    arrays = batch_arrays(index, mask, True)
    if t >= 4 * STEPS_PER_EPOCH:  # epochs >= E_end: the base step, exactly
      plain, _ = PLAIN_STEP(params, state[1], *arrays)
      params, state = step(params, state, *arrays)
      chex.assert_trees_all_equal(params, plain)
    else:
      params, state = step(params, state, *arrays)


def numpy_mesa(epochs, decay=0.8, lam=0.5, start_epoch=1):
  ema = {}

  def target_fn(t, epoch, params, index):
    ema["w"] = params if t == 0 else ref.add(ref.scale(decay, ema["w"]), 1 - decay, params)
    weight = cheap.trajectory_weight(epoch, lam, start_epoch)
    return DATA.logits(ema["w"], DATA.x[index]), weight

  history = cheap.train_with_trajectory_loss(
      DATA, ref.SGD(LR, MOMENTUM), epochs, target_fn, tau=TAU)
  return history, ema["w"]


def test_mesa_training_and_ema_match_numpy(plain_history):
  history, state = run(MESA_STEP, MESA_TX, ORDERS)
  expected, _ = numpy_mesa(ORDERS)
  for got, want in zip(history, expected):
    chex.assert_trees_all_close(to_numpy(got), want, **TOL)
  # The EMA the paper evaluates: of w_0 ... w_T, the final weights included.
  weights = [ref.as_float64(DATA.params)] + expected
  chex.assert_trees_all_close(
      to_numpy(sam_optax.mesa_params(state, history[-1])),
      cheap.ema_of(weights, 0.8)[-1], **TOL)
  first_active = (MESA_KW["start_epoch"] + 1) * STEPS_PER_EPOCH
  for got, want in zip(history[:first_active], plain_history[:first_active]):
    chex.assert_trees_all_equal(got, want)
  gap = ref.norm(ref.add(to_numpy(history[-1]), -1.0, to_numpy(plain_history[-1])))
  assert gap > 1e-3
  tx = optax.chain(sam_optax.mesa(**{**MESA_KW, "lam": 0.0}), base_optimizer())
  history, _ = run(jax.jit(functools.partial(mesa_step, tx)), tx, ORDERS)
  chex.assert_trees_all_equal(history, plain_history)


def test_mesa_ema_of_weights_with_default_decay_and_placement():
  """The stored EMA after t updates is the NumPy EMA of w_0 … w_t; mesa last in the chain too."""
  rng = np.random.default_rng(3)
  weights = [{"w": rng.normal(size=(2, 3)).astype(np.float32)} for _ in range(6)]
  for tx in (optax.chain(sam_optax.mesa(3, decay=0.9998), optax.sgd(0.1)),
             optax.chain(optax.sgd(0.1), sam_optax.mesa(3, decay=0.9998))):
    state = tx.init(to_jax(weights[0]))
    expected = cheap.ema_of([ref.as_float64(w) for w in weights], 0.9998)
    for t, w in enumerate(weights):
      # float32 EMA against float64: a few ulps of the weights (|w| ~ 1), not
      # of an average that happens to be near 0.
      chex.assert_trees_all_close(to_numpy(sam_optax.mesa_params(state, to_jax(w))),
                                  expected[t], rtol=1e-6, atol=1e-6)
      _, state = tx.update(to_jax(w), state, to_jax(w))


def test_mesa_teacher_forward_runs_only_while_active():
  runs = []

  def counted_apply(params, x):
    jax.debug.callback(lambda: runs.append(1))
    return apply(params, x)

  tx = optax.chain(sam_optax.mesa(1, start_epoch=2, end_epoch=5), optax.sgd(0.1))

  @jax.jit
  def step(params, state, x):
    target = sam_optax.mesa_target(state, params, lambda ema: counted_apply(ema, x))
    grads = jax.grad(lambda p: trajectory_loss(apply(p, x), target))(params)
    return tx.update(grads, state, params)[1]

  params = to_jax(DATA.params)
  state = tx.init(params)
  for _ in range(7):
    state = step(params, state, jnp.asarray(DATA.x))
  jax.effects_barrier()
  assert len(runs) == 2  # epochs 3 and 4


def test_mesa_averages_model_state():
  stats = {"mean": jnp.zeros(3), "count": jnp.int32(0)}
  tx = optax.chain(sam_optax.mesa(1, decay=0.5, model_state=stats), optax.sgd(0.1))
  params = jnp.ones(2)
  state = tx.init(params)
  seen = []
  new_stats = stats
  for t in range(3):
    target = sam_optax.mesa_target(
        state, params, lambda w, s: jnp.outer(s["mean"], w), model_state=new_stats)
    seen.append(target.logits)
    _, state = tx.update(jnp.zeros(2), state, params, model_state=new_stats)
    new_stats = {"mean": jnp.full(3, float(t + 1)), "count": jnp.int32(t + 1)}
  ema = sam_optax.mesa_model_state(state, new_stats)
  # means seen: 0, 1, 2, 3 → EMA(0.5): 0, 0.5, 1.25, 2.125; counts are not averaged.
  np.testing.assert_allclose(ema["mean"], np.full(3, 2.125))
  assert int(ema["count"]) == 3
  with pytest.raises(ValueError, match="pass the current model state"):
    tx.update(jnp.zeros(2), state, params)
  with pytest.raises(ValueError, match="built without one"):
    sam_optax.mesa_target(MESA_TX.init(params), params, lambda w: w[None],
                          model_state=stats)


# --------------------------------------------------------------------------
# Data parallelism.
# --------------------------------------------------------------------------

N_DEVICES = 8


def test_saf_under_pmap_keeps_one_global_bank():
  """8 devices, 2 examples each: the all-gathered bank equals the single-device bank."""
  num, per_device = 32, 2
  steps_per_epoch = num // (N_DEVICES * per_device)
  tx = sam_optax.saf(num, C, steps_per_epoch, start_epoch=1, past_epochs=1, axis_name="d")
  single = sam_optax.saf(num, C, steps_per_epoch, start_epoch=1, past_epochs=1)
  rng = np.random.default_rng(4)

  def step(transform, state, index, logits):
    target = sam_optax.saf_target(state, index)
    return target, transform.update({}, state, {}, logits=logits, example_index=index)[1]

  pmapped = jax.pmap(functools.partial(step, tx), axis_name="d")
  jitted = jax.jit(functools.partial(step, single))
  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (N_DEVICES,) + x.shape), tx.init({}))
  state_1 = single.init({})
  for _ in range(3 * steps_per_epoch):
    index = rng.permutation(num)[:N_DEVICES * per_device].astype(np.int32)
    logits = rng.normal(size=(len(index), C)).astype(np.float32)
    target, state = pmapped(state, index.reshape(N_DEVICES, per_device),
                            logits.reshape(N_DEVICES, per_device, C))
    target_1, state_1 = jitted(state_1, index, logits)
    np.testing.assert_array_equal(np.asarray(target.logits).reshape(-1, C), target_1.logits)
  for device in range(N_DEVICES):
    np.testing.assert_array_equal(state.bank[device], state_1.bank)


def test_saf_under_jit_with_a_sharded_bank():
  mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), ("d",))
  num, batch = 32, 16
  tx = sam_optax.saf(num, C, 2, start_epoch=1, past_epochs=1)
  rng = np.random.default_rng(5)

  def step(state, index, logits):
    target = sam_optax.saf_target(state, index)
    return target, tx.update({}, state, {}, logits=logits, example_index=index)[1]

  state = tx.init({})
  bank_sharding = NamedSharding(mesh, P(None, "d", None))
  sharded = state._replace(bank=jax.device_put(state.bank, bank_sharding))
  step_jit = jax.jit(step)
  for _ in range(5):
    index = rng.permutation(num)[:batch].astype(np.int32)
    logits = rng.normal(size=(batch, C)).astype(np.float32)
    data = NamedSharding(mesh, P("d"))
    target_s, sharded = step_jit(sharded, jax.device_put(index, data),
                                 jax.device_put(logits, data))
    target, state = step_jit(state, index, logits)
    np.testing.assert_array_equal(target_s.logits, target.logits)
  np.testing.assert_array_equal(sharded.bank, state.bank)
  assert sharded.bank.sharding.is_equivalent_to(bank_sharding, 3)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


def test_out_of_range_example_index_is_detected():
  tx = sam_optax.saf(N, C, 1, start_epoch=3, past_epochs=3)
  logits = jnp.ones((2, C))
  with pytest.raises(ValueError, match=r"1 example index\(es\) out of range \[0, 10\): 10"):
    tx.update({}, tx.init({}), {}, logits=logits, example_index=jnp.array([3, 10]))
  # Under jit the bad row is counted, not stored; padding is not counted.
  update = jax.jit(lambda s, i, m: tx.update(
      {}, s, {}, logits=logits, example_index=i, example_mask=m)[1])
  state = update(tx.init({}), jnp.array([10, -1]), jnp.array([1, 0]))
  assert int(state.invalid_count) == 1
  chex.assert_trees_all_equal(state.bank, jnp.zeros_like(state.bank))
  target = sam_optax.saf_target(state, jnp.array([4, 12]))
  np.testing.assert_array_equal(target.mask, [1.0, 0.0])
  with pytest.raises(ValueError, match=r"1 example index\(es\) out of range \[0, 10\) were"):
    sam_optax.saf_check(state)
  sam_optax.saf_check(update(tx.init({}), jnp.array([9, -1]), jnp.array([1, 0])))
  # check_indices=True raises at the first bad step, under jit too.
  loud = sam_optax.saf(N, C, 1, start_epoch=3, past_epochs=3, check_indices=True)
  update = jax.jit(lambda s, i: loud.update({}, s, {}, logits=logits, example_index=i)[1])
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"out of range \[0, 10\): -1"):
    jax.block_until_ready(update(loud.init({}), jnp.array([-1, 2])))


def test_saf_bad_input_errors():
  tx = sam_optax.saf(N, C, 1, start_epoch=3, past_epochs=3)
  state = tx.init({})
  index = jnp.array([0, 1])
  with pytest.raises(ValueError, match=r"logits must have shape \[batch, num_classes\] = \(2, 3\)"):
    tx.update({}, state, {}, logits=jnp.ones((2, 4)), example_index=index)
  with pytest.raises(ValueError, match=r"logits must have shape"):
    tx.update({}, state, {}, logits=jnp.ones((2,)), example_index=index)
  with pytest.raises(ValueError, match="needs the logits"):
    tx.update({}, state, {}, example_index=index)
  with pytest.raises(ValueError, match="1-D integer array"):
    tx.update({}, state, {}, logits=jnp.ones((2, C)), example_index=jnp.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="example_mask must have shape"):
    sam_optax.saf_target(state, index, jnp.ones(3))
  nested = optax.chain(optax.clip(1.0), optax.chain(optax.identity(), tx))
  chex.assert_trees_all_equal(sam_optax.saf_target(nested.init({}), index),
                              sam_optax.saf_target(state, index))
  with pytest.raises(ValueError, match="no SAFState in the optimizer state"):
    sam_optax.saf_target(optax.sgd(0.1).init(jnp.zeros(2)), index)
  two = optax.chain(sam_optax.saf(N, C, 1, start_epoch=3), sam_optax.saf(N, C, 1, start_epoch=3))
  with pytest.raises(ValueError, match="holds 2 SAFStates"):
    sam_optax.saf_target(two.init({}), index)
  with pytest.raises(ValueError, match="no MESAState"):
    sam_optax.mesa_params(state, {})
  unbound = sam_optax.saf(N, C, 1, start_epoch=3, past_epochs=3, axis_name="data")
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):
    jax.jit(lambda s: unbound.update({}, s, {}, logits=jnp.ones((2, C)),
                                     example_index=index))(unbound.init({}))


@pytest.mark.parametrize("kwargs, match", [
    (dict(past_epochs=3, start_epoch=2), r"start_epoch=2 must be >= 3 = past_epochs"),
    (dict(past_epochs=0), "past_epochs must be an int >= 1"),
    (dict(lam=-0.1), r"lam \(λ\) must be finite and >= 0"),
    (dict(tau=0.0), "tau must be finite and > 0"),
    (dict(tau=-5.0), "tau must be finite and > 0"),
    (dict(start_epoch=5, end_epoch=6), "end_epoch must be > start_epoch"),
    (dict(steps_per_epoch=0), "steps_per_epoch must be an int >= 1"),
    (dict(num_examples=0), "num_examples must be an int >= 1"),
    (dict(bank_dtype=jnp.int32), "bank_dtype must be a floating dtype"),
])
def test_saf_constructor_errors(kwargs, match):
  arguments = dict(num_examples=N, num_classes=C, steps_per_epoch=3)
  with pytest.raises((ValueError, TypeError), match=match):
    sam_optax.saf(**{**arguments, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay=1.5), r"decay must be in \[0.0, 1.0\]"),
    (dict(lam=float("nan")), "lam"),
    (dict(tau=0.0), "tau must be finite and > 0"),
    (dict(start_epoch=-1), "start_epoch must be an int >= 0"),
])
def test_mesa_constructor_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.mesa(3, **kwargs)


def test_mesa_bad_input_errors():
  params = to_jax(DATA.params)
  state = MESA_TX.init(params)
  with pytest.raises(ValueError, match=r"shape \[batch, num_classes\]"):
    sam_optax.mesa_target(state, params, lambda w: w["bias"])
  with pytest.raises(ValueError, match="needs params"):
    MESA_TX.update(params, state)
  with pytest.raises(ValueError, match="structure"):
    sam_optax.mesa_params(state, {"kernel": params["kernel"]})


# --------------------------------------------------------------------------
# chex variants: jit, no jit, pmap.
# --------------------------------------------------------------------------


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_saf_and_mesa_steps(self):
    """Three epochs of one batch; the trajectory loss is on in the third."""
    pmap = self.variant.type == chex.ChexVariantType.WITH_PMAP
    axis = "i" if pmap else None
    saf_tx = optax.chain(
        sam_optax.saf(N, C, 1, lam=0.5, tau=TAU, start_epoch=1, past_epochs=1,
                      axis_name=axis),
        base_optimizer())
    mesa_tx = optax.chain(sam_optax.mesa(1, lam=0.5, tau=TAU, decay=0.8, start_epoch=1),
                          base_optimizer())
    orders = cheap.epoch_orders(N, N, 3, seed=6, pad=False)
    expected_saf = cheap.train_with_trajectory_loss(
        DATA, ref.SGD(LR, MOMENTUM), orders, *_numpy_saf_hooks(orders, 1, 0.5, 1, 1),
        tau=TAU)
    for name, transform, step_fn, expected in (
        ("saf", saf_tx, saf_step, expected_saf),
        ("mesa", mesa_tx, mesa_step, numpy_mesa(orders)[0])):
      step = self.variant(functools.partial(step_fn, transform),
                          **({"n_devices": 2} if pmap else {}))
      history, _ = run(step, transform, orders)
      with self.subTest(name):
        chex.assert_trees_all_close(to_numpy(history[-1]), expected[-1],
                                    **TOL)


def test_mesa_ema_starts_as_a_copy_not_an_alias_of_the_params():
  """A jitted step that donates the optimizer state must not also donate the
  parameters' buffers through the EMA."""
  params = {"w": jnp.arange(4.0), "b": jnp.zeros((2,), jnp.float32)}
  tx = optax.chain(sam_optax.mesa(steps_per_epoch=1, start_epoch=0), optax.sgd(0.1))
  state = tx.init(params)
  ema = sam_optax.mesa_params(state, params)
  chex.assert_trees_all_equal(ema, params)
  mesa_state = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, sam_optax.MESAState))
                if isinstance(s, sam_optax.MESAState)][0]
  for kept, given in zip(jax.tree.leaves(mesa_state.ema_params), jax.tree.leaves(params)):
    assert kept.unsafe_buffer_pointer() != given.unsafe_buffer_pointer()

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(params, state):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  new_params, _ = step(params, state)
  assert float(new_params["w"][0]) == pytest.approx(-0.1)


def test_saf_step_updates_the_bank_in_place():
  """The bank is written after the gradient that read it, so a jitted step
  with the state donated needs no scratch copy of the bank."""
  num_examples, num_classes, features = 4096, 10, 8
  tx = optax.chain(sam_optax.saf(num_examples, num_classes, steps_per_epoch=1, start_epoch=3),
                   optax.sgd(0.1))
  params = {"w": jnp.zeros((features, num_classes))}

  def step(params, opt_state, x, index):
    target = sam_optax.saf_target(opt_state, index)

    def loss_fn(params):
      logits = x @ params["w"]
      return jnp.mean(logits ** 2) + trajectory_loss(logits, target), logits

    (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, logits=logits, example_index=index)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt_state, jnp.ones((32, features)), jnp.arange(32)).compile()
  bank_bytes = num_examples * num_classes * 4 * 4  # Ẽ + 1 = 4 slots of float32
  assert compiled.memory_analysis().temp_size_in_bytes < bank_bytes / 4
