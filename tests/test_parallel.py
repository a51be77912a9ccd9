"""Data parallelism and m-sharpness on 8 fake CPU devices.

Checks (``test_common.py`` checks, for every method, that ``Synced`` under
``pmap`` equals the single-device step on the whole batch and that
``PerDevice`` equals a loop over the shards):
* per-device SAM under ``pmap`` equals a plain NumPy computation;
* ``pmap``, ``shard_map`` and ``jit`` over a sharded batch with
  ``Splits(n_devices)`` give the same parameters after several steps;
* bad data-parallel input fails with a clear error before any step runs.
"""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sam_optax
import test_common as common
from devices import replicate, shard as shards

N_DEVICES = 8
PER_DEVICE = 4
N_FEATURES, N_CLASSES = 5, 3
AXIS = "data"
DEVICE_ASCENT = sam_optax.PerDevice(AXIS)


def loss_fn(params, batch):
  x, y = batch
  logits = x @ params["kernel"] + params["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def logits_fn(params, batch):
  x, y = batch
  return x @ params["kernel"] + params["bias"], y


# The constructors of test_common.py, on this module's loss.
_LOSSES = common.Tiny(loss_fn, logits_fn)
METHODS = {name: functools.partial(common.ROWS_BY_NAME[name].build, _LOSSES)
           for name in ("sam", "asam", "gsam", "bsam", "csam")}


@pytest.fixture(scope="module")
def problem():
  assert jax.device_count() >= N_DEVICES, "the root conftest sets 8 CPU devices"
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N_DEVICES * PER_DEVICE, N_FEATURES)).astype(np.float32)
  y = rng.integers(0, N_CLASSES, size=N_DEVICES * PER_DEVICE).astype(np.int32)
  params = {
      "kernel": jnp.asarray(rng.normal(size=(N_FEATURES, N_CLASSES)) * 0.5, jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(N_CLASSES,)) * 0.1, jnp.float32),
  }
  return params, (jnp.asarray(x), jnp.asarray(y))


def pmapped_surrogate(tx, params, batch):
  state = tx.init(params)

  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)  # the local, un-averaged gradient
    return tx.update(grads, state, params, batch=batch)[0]

  out = jax.pmap(step, axis_name=AXIS)(replicate(params), replicate(state), shards(batch))
  for leaf in jax.tree.leaves(out):  # every device holds the same average
    np.testing.assert_allclose(leaf, jnp.broadcast_to(leaf[0], leaf.shape), rtol=1e-6, atol=1e-7)
  return jax.tree.map(lambda a: a[0], out)


def single_device_surrogate(tx, params, batch):
  grads = jax.grad(loss_fn)(params, batch)
  return jax.jit(tx.update)(grads, tx.init(params), params, batch=batch)[0]


def numpy_softmax_ce_grad(kernel, bias, x, y):
  logits = x @ kernel + bias
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  p /= len(y)
  return x.T @ p, p.sum(0)


def test_per_device_sam_matches_numpy(problem):
  params, batch = problem
  got = pmapped_surrogate(METHODS["sam"](perturbation=DEVICE_ASCENT), params, batch)
  kernel, bias = (np.asarray(params[k], np.float64) for k in ("kernel", "bias"))
  x, y = np.asarray(batch[0], np.float64), np.asarray(batch[1])
  rho, total_k, total_b = 0.1, 0.0, 0.0
  for i in range(N_DEVICES):
    xs, ys = x[i * PER_DEVICE:(i + 1) * PER_DEVICE], y[i * PER_DEVICE:(i + 1) * PER_DEVICE]
    gk, gb = numpy_softmax_ce_grad(kernel, bias, xs, ys)
    norm = np.sqrt((gk ** 2).sum() + (gb ** 2).sum()) + 1e-12
    sk, sb = numpy_softmax_ce_grad(kernel + rho * gk / norm, bias + rho * gb / norm, xs, ys)
    total_k, total_b = total_k + sk / N_DEVICES, total_b + sb / N_DEVICES
  np.testing.assert_allclose(got["kernel"], total_k, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["bias"], total_b, rtol=1e-5, atol=1e-6)


STEPS = 3


def training_step(tx):
  """One plain training step with ``tx``; the caller maps it over devices."""

  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  return step


def run_steps(step, params, state, batch):
  for _ in range(STEPS):
    params, state = step(params, state, batch)
  return params


def base_and(method):
  return optax.chain(method, optax.sgd(0.1, momentum=0.9))


def train_pmap(name, params, batch):
  tx = base_and(METHODS[name](perturbation=DEVICE_ASCENT))
  step = jax.pmap(training_step(tx), axis_name=AXIS)
  params = run_steps(step, replicate(params), replicate(tx.init(params)), shards(batch))
  return jax.tree.map(lambda a: a[0], params)


def train_shard_map(name, params, batch):
  mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), (AXIS,))
  tx = base_and(METHODS[name](perturbation=DEVICE_ASCENT))
  step = jax.jit(jax.shard_map(training_step(tx), mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                               out_specs=(P(), P()), check_vma=False))
  return run_steps(step, params, tx.init(params), batch)


def train_sharded_jit(name, params, batch):
  """jit over a batch sharded across the mesh; Splits(devices)."""
  mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), (AXIS,))
  batch = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  tx = base_and(METHODS[name](perturbation=sam_optax.Splits(N_DEVICES)))
  trained = run_steps(jax.jit(training_step(tx)), params, tx.init(params), batch)
  assert batch[0].sharding.spec == P(AXIS)
  return trained


@pytest.mark.parametrize("name", ["sam", "asam", "gsam", "bsam", "csam"])
def test_pmap_shard_map_and_sharded_jit_agree_after_several_steps(problem, name):
  params, batch = problem
  by_pmap = train_pmap(name, params, batch)
  by_shard_map = train_shard_map(name, params, batch)
  by_jit = train_sharded_jit(name, params, batch)
  for other in (by_shard_map, by_jit):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 by_pmap, other)
  assert not np.allclose(by_pmap["kernel"], params["kernel"])  # it trained


def test_one_split_equals_plain_step(problem):
  params, batch = problem
  plain = single_device_surrogate(METHODS["gsam"](), params, batch)
  split = single_device_surrogate(METHODS["gsam"](perturbation=sam_optax.Splits(1)), params, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), plain, split)


def test_batch_not_divisible_by_splits(problem):
  params, batch = problem
  tx = METHODS["sam"](perturbation=sam_optax.Splits(5))
  with pytest.raises(ValueError, match=r"Splits\(n=5\): n must divide the leading \(batch\) dimension"):
    tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params, batch=batch)


def test_splits_needs_the_named_batch_argument(problem):
  params, batch = problem
  tx = sam_optax.sam(0.1, loss_fn=lambda p, data: loss_fn(p, data),
                     perturbation=sam_optax.Splits(2))
  with pytest.raises(ValueError, match=r"got no \['batch'\].*Set batch_argnames"):
    tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params, data=batch)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_bad_number_of_splits(bad):
  with pytest.raises(ValueError, match=f"Splits: n must be an int >= 1, got n={bad!r}"):
    sam_optax.Splits(bad)


@pytest.mark.parametrize("bad", ["batch", (), [1]])
def test_bad_batch_argnames(bad):
  with pytest.raises(TypeError, match="Splits: batch_argnames must be a non-empty sequence"):
    sam_optax.Splits(2, batch_argnames=bad)


@pytest.mark.parametrize("option", [sam_optax.Synced, sam_optax.PerDevice])
def test_synced_and_per_device_need_an_axis(option):
  with pytest.raises(TypeError, match=f"{option.__name__}: axis_name must be a non-empty string"):
    option(None)


def test_unbound_axis_name_is_a_clear_error(problem):
  params, batch = problem
  tx = METHODS["bsam"](perturbation=sam_optax.PerDevice("devices"))
  grads = jax.grad(loss_fn)(params, batch)
  with pytest.raises(ValueError, match=r"axis_name='devices' is not bound"):
    jax.jit(tx.update)(grads, tx.init(params), params, batch=batch)


@pytest.mark.parametrize("wrap, second_step_is_plain", [
    (lambda inner: sam_optax.every_k(inner, 2, axis_name=AXIS), True),
    (lambda inner: sam_optax.with_probability(inner, 0.5, seed=3, axis_name=AXIS), False),
    (lambda inner: sam_optax.stable_sam(inner, axis_name=AXIS), False),
])
def test_wrappers_take_the_inner_axis_and_keep_devices_in_step(problem, wrap, second_step_is_plain):
  """A wrapper given the inner method's axis: on steps that skip the inner
  method the plain gradient is averaged too, so every device applies the
  same update."""
  params, batch = problem
  tx = wrap(METHODS["sam"](perturbation=DEVICE_ASCENT))

  def two_steps(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    first, state = tx.update(grads, state, params, batch=batch)
    second, state = tx.update(grads, state, params, batch=batch)
    return first, second

  outs = jax.pmap(two_steps, axis_name=AXIS)(
      replicate(params), replicate(tx.init(params)), shards(batch))
  whole_batch_grad = jax.grad(loss_fn)(params, batch)
  for leaf in jax.tree.leaves(outs):
    np.testing.assert_allclose(leaf, jnp.broadcast_to(leaf[0], leaf.shape), rtol=1e-6, atol=1e-7)
  if second_step_is_plain:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-7),
                 outs[1], whole_batch_grad)



@pytest.mark.parametrize("name", ["gsam", "looksam"])
def test_splits_with_an_axis_under_pmap_equals_a_loop_over_the_shards(problem, name):
  """``Splits(2, axis_name=...)``: two groups per device, averaged over the
  groups of every device (LookSAM's state from those averages stays
  replicated)."""
  params, batch = problem
  row = common.ROWS_BY_NAME[name]
  tx = row.build(_LOSSES, perturbation=sam_optax.Splits(2, axis_name=AXIS))

  def local(params, shard):
    grads = jax.grad(loss_fn)(params, shard)
    return tx.update(grads, tx.init(params), params, batch=shard)

  surrogates, states = jax.pmap(local, axis_name=AXIS, in_axes=(None, 0))(params, shards(batch))
  for leaf in jax.tree.leaves((surrogates, states)):
    np.testing.assert_allclose(leaf, jnp.broadcast_to(leaf[0], leaf.shape), rtol=1e-6, atol=1e-7)
  single = row.build(_LOSSES, perturbation=sam_optax.Splits(2))
  per_shard = [single_device_surrogate(single, params, jax.tree.map(lambda a, i=i: a[i], shards(batch)))
               for i in range(N_DEVICES)]
  want = jax.tree.map(lambda *a: np.mean(a, axis=0), *per_shard)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=2e-5, atol=1e-6), surrogates, want)


@pytest.mark.parametrize("option", [sam_optax.PerDevice(AXIS), sam_optax.Synced(AXIS),
                                    sam_optax.Splits(2, axis_name=AXIS)], ids=repr)
def test_shard_map_with_check_vma_is_refused(problem, option):
  """Under ``check_vma=True`` JAX sums the gradient of replicated params over
  the axis, so the averaged surrogate would be 8× too large (measured before
  this check: 2.03 against 0.25): a clear error instead."""
  params, batch = problem
  mesh = Mesh(np.array(jax.devices()[:N_DEVICES]), (AXIS,))
  tx = base_and(METHODS["sam"](perturbation=option))
  step = jax.shard_map(training_step(tx), mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                       out_specs=(P(), P()), check_vma=True)
  with pytest.raises(ValueError, match=r"^sam: axis_name='data' is an axis of a jax\.shard_map"
                     r" with check_vma=True.*check_vma=False"):
    jax.eval_shape(step, params, tx.init(params), batch)
