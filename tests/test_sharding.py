"""Large-scale sharding: a 2-D (data × model) mesh on 8 fake CPU devices.

The parameters of a small MLP are sharded over the ``model`` axis
(FSDP-style ``NamedSharding``), the batch over ``data``. For SAM and GSAM:

* global mode (``perturbation=None``) under ``jax.jit`` with sharded inputs
  and outputs: the steps equal the single-device steps on the whole batch,
  and the parameters stay sharded as they came in;
* per-device mode (m-sharpness, one perturbation per data shard) equals a
  loop over the data shards, both as ``Splits(n=data)`` under the same
  sharded ``jit`` and as ``shard_map`` over the mesh with
  ``PerDevice('data')``, the parameters entering the ``shard_map`` whole
  (``P()``: XLA gathers them from their ``model`` shards), since the loss
  is written for the full parameters.

What is not supported: a ``shard_map`` whose loss sees parameter *blocks*
(``P(None, 'model')`` inside the map): the method's norms and the loss would
then be per block, which needs a loss written for blocks with its own
collectives.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sam_optax

DATA, MODEL = 4, 2
PER_SHARD, FEATURES, HIDDEN, CLASSES = 3, 5, 4, 3
STEPS = 2
METHODS = {"sam": lambda **kw: sam_optax.sam(0.1, loss_fn=loss_fn, **kw),
           "gsam": lambda **kw: sam_optax.gsam(0.1, alpha=0.3, loss_fn=loss_fn, **kw)}
# FSDP-style: each weight split over 'model' along one dimension.
SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


def loss_fn(params, x, y):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.fixture(scope="module")
def problem():
  assert jax.device_count() >= DATA * MODEL, "the root conftest sets 8 CPU devices"
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(FEATURES, HIDDEN)) * 0.5, "b1": rng.normal(size=HIDDEN) * 0.1,
            "w2": rng.normal(size=(HIDDEN, CLASSES)) * 0.5, "b2": np.zeros(CLASSES)}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(DATA * PER_SHARD, FEATURES)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, size=DATA * PER_SHARD), jnp.int32)
  mesh = Mesh(np.array(jax.devices()[:DATA * MODEL]).reshape(DATA, MODEL), ("data", "model"))
  return params, x, y, mesh


def steps(tx, params, x, y):
  """``STEPS`` training steps from ``tx.init`` (traced once, inside one jit)."""
  state = tx.init(params)
  for _ in range(STEPS):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, x=x, y=y)
    params = optax.apply_updates(params, updates)
  return params


def loop_over_data_shards(tx, params, x, y):
  """The per-device step by hand: each data shard perturbs with its own
  gradient; the surrogates are averaged; SGD(0.1) applies the average."""
  for _ in range(STEPS):
    surrogates = []
    for i in range(DATA):
      xs, ys = (a[i * PER_SHARD:(i + 1) * PER_SHARD] for a in (x, y))
      grads = jax.grad(loss_fn)(params, xs, ys)
      surrogates.append(tx.update(grads, tx.init(params), params, x=xs, y=ys)[0])
    mean = jax.tree.map(lambda *s: sum(s) / DATA, *surrogates)
    params = jax.tree.map(lambda w, g: w - 0.1 * g, params, mean)
  return params


def _close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-6), a, b)


def test_global_and_per_device_modes_with_fsdp_params(problem):
  """SAM and GSAM together, each mode one compiled program for both."""
  params, x, y, mesh = problem
  global_tx = {name: optax.chain(method(), optax.sgd(0.1, momentum=0.9))
               for name, method in METHODS.items()}
  splits_tx = {name: optax.chain(method(perturbation=sam_optax.Splits(
      DATA, batch_argnames=("x", "y"))), optax.sgd(0.1)) for name, method in METHODS.items()}
  device_tx = {name: optax.chain(method(perturbation=sam_optax.PerDevice("data")),
                                 optax.sgd(0.1)) for name, method in METHODS.items()}

  def each(transforms, p, x, y):
    return {name: steps(tx, p, x, y) for name, tx in transforms.items()}

  # References on one device: the global step, and the loop over the data shards.
  want_global, want_per_device = jax.jit(lambda p, x, y: (
      each(global_tx, p, x, y),
      {name: loop_over_data_shards(method(), p, x, y) for name, method in METHODS.items()}))(
          params, x, y)

  # Under jit, params in and out sharded over 'model', the batch over 'data'.
  shardings = {k: NamedSharding(mesh, spec) for k, spec in SPECS.items()}
  sharded_params = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
  sharded_x, sharded_y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
  out_shardings = {name: shardings for name in METHODS}
  got_global, got_splits = jax.jit(
      lambda p, x, y: (each(global_tx, p, x, y), each(splits_tx, p, x, y)),
      out_shardings=(out_shardings, out_shardings))(sharded_params, sharded_x, sharded_y)
  _close(got_global, want_global)  # global mode: the single-device step
  _close(got_splits, want_per_device)  # Splits(n=data): the loop over the shards
  for tree in (got_global, got_splits):  # still FSDP-sharded
    for name in METHODS:
      for key, leaf in tree[name].items():
        assert leaf.sharding.is_equivalent_to(shardings[key], leaf.ndim), (name, key)

  # shard_map over 'data' with PerDevice: the params enter whole (P()).
  got_device = jax.jit(jax.shard_map(
      lambda p, x, y: each(device_tx, p, x, y), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=P(), check_vma=False))(
          sharded_params, sharded_x, sharded_y)
  _close(got_device, want_per_device)
  # It trained. (That per device differs from global, m-sharpness, is test_common's.)
  for name in METHODS:
    assert not np.allclose(want_global[name]["w1"], params["w1"])
    assert not np.allclose(want_per_device[name]["w1"], params["w1"])
