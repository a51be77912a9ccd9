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


def step_fn(tx):
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, x=x, y=y)
    return optax.apply_updates(params, updates), state
  return step


def train(step, params, state, x, y):
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return params


def sharded(problem):
  params, x, y, mesh = problem
  params = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params.items()}
  x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
  return params, x, y


def sharded_jit(tx, problem):
  """The step under jit, params in and out sharded over 'model', batch over 'data'."""
  mesh = problem[3]
  params, x, y = sharded(problem)
  param_shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  state = tx.init(params)
  step = jax.jit(step_fn(tx), out_shardings=(param_shardings, None))
  trained = train(step, params, state, x, y)
  for name, leaf in trained.items():  # still FSDP-sharded
    assert leaf.sharding.is_equivalent_to(param_shardings[name], leaf.ndim), name
  return trained


def loop_over_data_shards(method, problem):
  """The per-device step by hand: each data shard perturbs with its own
  gradient; the surrogates are averaged; SGD(0.1) applies the average."""
  params, x, y, _ = problem
  tx = method()

  @jax.jit
  def surrogate(params, xs, ys):  # one device, one shard
    grads = jax.grad(loss_fn)(params, xs, ys)
    return tx.update(grads, tx.init(params), params, x=xs, y=ys)[0]

  for _ in range(STEPS):
    surrogates = [surrogate(params, *(a[i * PER_SHARD:(i + 1) * PER_SHARD] for a in (x, y)))
                  for i in range(DATA)]
    mean = jax.tree.map(lambda *s: sum(s) / DATA, *surrogates)
    params = jax.tree.map(lambda w, g: w - 0.1 * g, params, mean)
  return params


def _close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-6), a, b)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_global_mode_with_fsdp_params_equals_the_single_device_step(problem, name):
  params, x, y, _ = problem
  tx = optax.chain(METHODS[name](), optax.sgd(0.1, momentum=0.9))
  got = sharded_jit(tx, problem)
  want = train(jax.jit(step_fn(tx)), params, tx.init(params), x, y)  # one device
  _close(got, want)
  assert not np.allclose(want["w1"], params["w1"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_per_device_mode_equals_a_loop_over_the_data_shards(problem, name):
  want = loop_over_data_shards(METHODS[name], problem)
  # Splits over the data-axis size, under the same FSDP-sharded jit.
  tx = optax.chain(METHODS[name](perturbation=sam_optax.Splits(
      DATA, batch_argnames=("x", "y"))), optax.sgd(0.1))
  _close(sharded_jit(tx, problem), want)
  # shard_map over 'data' with PerDevice: the params enter whole (P()).
  mesh = problem[3]
  tx = optax.chain(METHODS[name](perturbation=sam_optax.PerDevice("data")), optax.sgd(0.1))
  params, x, y = sharded(problem)
  step = jax.jit(jax.shard_map(step_fn(tx), mesh=mesh,
                               in_specs=(P(), P(), P("data"), P("data")),
                               out_specs=(P(), P()), check_vma=False))
  _close(train(step, params, tx.init(params), x, y), want)
  # (That this differs from the global step, m-sharpness, is test_common's.)
