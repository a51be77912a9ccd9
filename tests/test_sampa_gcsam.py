"""SAMPa and GCSAM against float64 NumPy over several steps.

SAMPa's first reference is a line-by-line port of the official
``LIONS-EPFL/SAMPa`` ``train.py`` (its two processes, their own variables,
PyTorch's SGD with momentum and coupled weight decay), the second the
formula of the docstring with any base (AdamW here). The parallel form on a
2 × 4 mesh of fake CPU devices is checked against the sequential one.
GCSAM's reference is written from the authors' ``cifar10_gcsam_resnet50.py``
in PyTorch's layout and transposed to Flax's.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import reference as ref
import sam_optax
from sam_cases import jax_problems, to_jax, to_numpy

RHO, LAM, LR, MOMENTUM, WD, STEPS = 0.1, 0.2, 0.05, 0.9, 0.01, 5
TOL = dict(rtol=2e-5, atol=2e-6)  # float32 against float64, over several steps
PROBLEMS = {problem.name: problem for problem in jax_problems()}


# --------------------------------------------------------------------------
# NumPy references.
# --------------------------------------------------------------------------


def official_sampa(problem, steps, lr=LR, momentum=MOMENTUM, wd=WD, rho=RHO, og=LAM,
                   same_batch=False):
  """``train.py`` of LIONS-EPFL/SAMPa in float64, both ranks in one loop.

  Rank 0 holds ``pert_grads`` and recovers ``y`` from the all-reduced
  ``agg_grads`` (lines 52-64); rank 1 holds its own ``y_grads`` and reads
  SGD's momentum buffer (lines 67-87); both step ``optim.SGD`` (lr,
  momentum, weight_decay) on ``agg_grads`` (lines 89-100); ``data1`` is the
  previous batch (lines 48-49, 102).
  """
  w = ref.as_float64(problem.params)
  zeros = ref.tree_map(np.zeros_like, w)
  pert_grads, agg_grads, y_grads_rank1 = zeros, zeros, zeros
  buf = None  # optimizer.state[p]["momentum_buffer"]
  data1, history = None, []
  for t in range(steps):
    data = problem.batches[t % len(problem.batches)]
    if data1 is None or same_batch:
      data1 = data
    # rank 0: the perturbed point, on the previous batch
    y_grads = ref.scale(1.0 / (og + 1e-15), ref.add(agg_grads, -1.0, pert_grads))
    scale = rho / (ref.norm(y_grads) + 1e-12)
    g0 = problem.grad(ref.add(w, scale, y_grads), data1)
    pert_grads = ref.scale(1 - og, g0)
    # rank 1: the auxiliary point, on the current batch
    if buf is not None:
      direction = ref.tree_map(lambda y, p, b: y + wd * p + momentum * b, y_grads_rank1, w, buf)
    else:
      direction = y_grads_rank1
    g1 = problem.grad(ref.add(w, -lr, direction), data)
    y_grads_rank1 = g1
    agg_grads = ref.add(pert_grads, og, g1)  # the all-reduce (sum) of both ranks
    # optimizer.step(): PyTorch SGD, weight decay then momentum (dampening 0)
    d = ref.add(agg_grads, wd, w)
    buf = d if buf is None else ref.add(d, momentum, buf)
    w = ref.add(w, -lr, buf)
    data1 = data
    history.append(w)
  return history


def sampa_formula(problem, base, steps, rho=RHO, lam=LAM, mask=None):
  """The docstring's formula with a NumPy base (``reference.SGD``/``AdamW``):
  ``ỹ`` the base's step from ``y`` without committing its state."""
  w = ref.as_float64(problem.params)
  state, y = base.init(w), ref.tree_map(np.zeros_like, w)
  history = []
  for t in range(steps):
    batch = problem.batches[t % len(problem.batches)]
    previous = problem.batches[max(t - 1, 0) % len(problem.batches)]
    direction = ref.restrict(y, mask)
    perturbed = ref.add(w, rho / (ref.norm(direction) + ref.DELTA), direction)
    auxiliary = w if t == 0 else base.step(w, y, state)[0]
    g0, g1 = problem.grad(perturbed, previous), problem.grad(auxiliary, batch)
    w, state = base.step(w, ref.add(ref.scale(1 - lam, g0), lam, g1), state)
    y = g1
    history.append(w)
  return history


def centralized_torch_layout(g):
  """``centralized_gradient`` (GCSAM lines 96-104) on a Flax kernel: moved to
  PyTorch's layout (output axis first, ``[out, in, kh, kw]``), ``x −
  x.mean(dim=(1, ..., n-1))``, moved back."""
  if g.ndim <= 1:
    return g
  torch = np.moveaxis(g, -1, 0)
  if torch.ndim == 4:  # Flax [kh, kw, in, out] -> [out, kh, kw, in] -> [out, in, kh, kw]
    torch = np.transpose(torch, (0, 3, 1, 2))
  centred = torch - torch.mean(axis=tuple(range(1, torch.ndim)), keepdims=True)
  if centred.ndim == 4:
    centred = np.transpose(centred, (0, 2, 3, 1))
  return np.moveaxis(centred, 0, -1)


def gcsam_reference(problem, base, steps, rho=RHO, mask=None):
  """``GCSAM.first_step``: ``‖g‖`` before centralizing, ``e_w = C(g)·ρ/(‖g‖ +
  1e-12)``; ``second_step``: the base on the plain gradient at ``w + e_w``."""
  w = ref.as_float64(problem.params)
  state, history = base.init(w), []
  for t in range(steps):
    batch = problem.batches[t % len(problem.batches)]
    g = problem.grad(w, batch)
    scale = rho / (ref.norm(ref.restrict(g, mask)) + 1e-12)
    e_w = ref.restrict(ref.tree_map(centralized_torch_layout, g), mask)
    w, state = base.step(w, problem.grad(ref.add(w, scale, e_w), batch), state)
    history.append(w)
  return history


# --------------------------------------------------------------------------
# SAMPa.
# --------------------------------------------------------------------------


def pytorch_sgd():
  """``optim.SGD(lr, momentum, weight_decay)`` in optax."""
  return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))


def run_sampa(tx, problem, steps=STEPS, previous=True, jit=True):
  """``steps`` steps, ``previous_args`` the previous batch (the first: its own)."""

  def step(params, state, batch, previous_batch):
    args = {"previous_args": {"batch": previous_batch}} if previous else {}
    updates, state = tx.update(params, state, params, batch=batch, **args)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  params, state, history = problem.params, tx.init(problem.params), []
  for t in range(steps):
    params, state = step(params, state, problem.batch(t), problem.batch(max(t - 1, 0)))
    history.append(params)
  return history, state


def assert_histories_close(history, expected):
  for got, want in zip(history, expected, strict=True):
    chex.assert_trees_all_close(to_numpy(got), want, **TOL)


@pytest.mark.parametrize("name", ["logistic", "mlp"])
def test_sampa_is_the_official_train_py(name):
  problem = PROBLEMS[name]
  history, state = run_sampa(sam_optax.sampa(pytorch_sgd(), RHO, lam=LAM,
                                             loss_fn=problem.loss_fn), problem)
  assert_histories_close(history, official_sampa(problem.numpy, STEPS))
  assert int(state.count) == STEPS


def test_sampa_without_previous_args_takes_the_current_batch_twice():
  problem = PROBLEMS["logistic"]
  history, _ = run_sampa(sam_optax.sampa(pytorch_sgd(), RHO, loss_fn=problem.loss_fn),
                         problem, previous=False)
  assert_histories_close(history, official_sampa(problem.numpy, STEPS, same_batch=True))


def test_sampa_with_adamw_and_a_mask_is_the_formula():
  problem = PROBLEMS["mlp"]
  mask = {"hidden": True, "out": False}
  tx = sam_optax.sampa(optax.adamw(0.01, weight_decay=WD), RHO, lam=0.3,
                       loss_fn=problem.loss_fn, mask=mask)
  history, _ = run_sampa(tx, problem)
  want = sampa_formula(problem.numpy, ref.AdamW(0.01, weight_decay=WD), STEPS, lam=0.3,
                       mask=mask)
  assert_histories_close(history, want)


def _two_by_four():
  assert jax.device_count() >= 8, "the root conftest sets 8 CPU devices"
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("pair", "data"))


def test_two_groups_on_a_2x4_mesh_equals_the_sequential_form():
  """The two gradients on two groups of 4 fake CPU devices, the batch of 8
  sharded 2 per device within a group: the sequential numbers (and the
  official code's), and the state replicated."""
  problem = PROBLEMS["mlp"]
  mesh = _two_by_four()
  parallel = sam_optax.sampa(pytorch_sgd(), RHO, loss_fn=problem.loss_fn,
                             perturbation=sam_optax.TwoGroups(mesh))
  replicated, by_data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  @jax.jit
  def step(params, state, batch, previous_batch):
    updates, state = parallel.update(params, state, params, batch=batch,
                                     previous_args={"batch": previous_batch})
    return optax.apply_updates(params, updates), state

  params = jax.device_put(problem.params, replicated)
  state = jax.device_put(parallel.init(problem.params), replicated)
  history = []
  for t in range(STEPS):
    batch, previous = (jax.device_put(problem.batch(s), by_data) for s in (t, max(t - 1, 0)))
    params, state = step(params, state, batch, previous)
    history.append(params)
  sequential, _ = run_sampa(sam_optax.sampa(pytorch_sgd(), RHO, loss_fn=problem.loss_fn),
                            problem)
  for got, want in zip(history, sequential, strict=True):
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert_histories_close(history, official_sampa(problem.numpy, STEPS))
  hlo = step.lower(params, state, batch, previous).compile().as_text()
  assert hlo.count("all-reduce-start") + hlo.count(" all-reduce(") >= 1


def test_two_groups_passes_keys_and_other_arguments():
  """A PRNG key and a replicated argument next to the batch (one step)."""
  problem = PROBLEMS["logistic"]
  mesh = _two_by_four()

  def loss_fn(params, batch, rng, scale):
    del rng  # the trainer's dropout key; unused by this model
    return scale * problem.loss_fn(params, batch=batch)

  def one_step(perturbation):
    tx = sam_optax.sampa(pytorch_sgd(), RHO, loss_fn=loss_fn, perturbation=perturbation)
    params = problem.params
    state = tx.init(params)
    for t in range(2):
      updates, state = jax.jit(tx.update)(
          params, state, params, batch=problem.batch(t), rng=jax.random.key(t),
          scale=jnp.float32(2.0), previous_args={"batch": problem.batch(max(t - 1, 0)),
                                                 "rng": jax.random.key(7)})
      params = optax.apply_updates(params, updates)
    return params

  chex.assert_trees_all_close(one_step(sam_optax.TwoGroups(mesh)), one_step(None),
                              rtol=1e-5, atol=1e-6)


def test_synced_under_pmap_equals_the_step_on_the_global_batch():
  problem = PROBLEMS["logistic"]
  tx = sam_optax.sampa(pytorch_sgd(), RHO, loss_fn=problem.loss_fn,
                       perturbation=sam_optax.Synced("data"))
  shards = lambda tree: jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), tree)

  def local(params, state, batch, previous):
    return tx.update(params, state, params, batch=batch, previous_args={"batch": previous})

  step = jax.pmap(local, axis_name="data", in_axes=(None, None, 0, 0), devices=jax.devices()[:4])
  params, state = problem.params, tx.init(problem.params)
  history = []
  for t in range(3):
    updates, states = step(params, state, shards(problem.batch(t)),
                           shards(problem.batch(max(t - 1, 0))))
    params = optax.apply_updates(params, jax.tree.map(lambda u: u[0], updates))
    state = jax.tree.map(lambda s: s[0], states)
    history.append(params)
  assert_histories_close(history, official_sampa(problem.numpy, 3))


def test_sampa_errors():
  loss = PROBLEMS["logistic"].loss_fn
  base = optax.sgd(0.1)
  for lam in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=rf"sampa: lam must be in \[0.0, 1.0\], got lam={lam}"):
      sam_optax.sampa(base, lam=lam, loss_fn=loss)
  with pytest.raises(ValueError, match=r"sampa: rho must be finite and >= 0, got rho=-0.1"):
    sam_optax.sampa(base, -0.1, loss_fn=loss)
  with pytest.raises(TypeError, match=r"sampa: base_optimizer must be an optax"):
    sam_optax.sampa(0.1, loss_fn=loss)
  for option in (sam_optax.PerDevice("data"), sam_optax.Splits(2), sam_optax.MicroBatches(2)):
    with pytest.raises(ValueError, match=r"sampa: perturbation=.* is not supported: SAMPa's"):
      sam_optax.sampa(base, loss_fn=loss, perturbation=option)
  mesh = _two_by_four()
  with pytest.raises(TypeError, match=r"sam: perturbation=sam_optax.TwoGroups\(...\) is SAMPa's"):
    sam_optax.sam(0.1, loss_fn=loss, perturbation=sam_optax.TwoGroups(mesh))
  with pytest.raises(ValueError, match=r"TwoGroups: the mesh axis pair_axis='data' must have size 2"):
    sam_optax.TwoGroups(mesh, pair_axis="data", data_axis="pair")
  with pytest.raises(ValueError, match=r"TwoGroups: the mesh has axes \('pair', 'data'\), not 'x'"):
    sam_optax.TwoGroups(mesh, data_axis="x")
  problem = PROBLEMS["logistic"]
  tx = sam_optax.sampa(base, loss_fn=loss)
  params, batch = problem.params, problem.batch(0)
  half = jax.tree.map(lambda x: x[:4], batch)
  with pytest.raises(ValueError, match=r"sampa: previous_args\['batch'\]\['x'\] has shape \(4, 4\)"):
    tx.update(params, tx.init(params), params, batch=batch, previous_args={"batch": half})
  with pytest.raises(ValueError, match=r"sampa: previous_args has \['labels'\]"):
    tx.update(params, tx.init(params), params, batch=batch, previous_args={"labels": 1})


def test_sampa_rejects_a_phase():
  problem = PROBLEMS["logistic"]
  tx = sam_optax.sampa(optax.sgd(0.1), loss_fn=problem.loss_fn)
  params = problem.params
  with pytest.raises(ValueError, match="sampa: got ascent_step=False"):
    tx.update(params, tx.init(params), params, batch=problem.batch(0), ascent_step=False)


# --------------------------------------------------------------------------
# GCSAM.
# --------------------------------------------------------------------------


def test_centralization_maps_pytorch_layout_to_flax():
  """Flax ``Conv`` ``[kh, kw, in, out]`` and ``Dense`` ``[in, out]`` kernels:
  the mean over every axis but the last, PyTorch's ``dim=(1, 2, 3)`` on
  ``[out, in, kh, kw]``; biases unchanged. Read through the public
  transform: with ``L(w) = ½‖w‖²`` at ``w = 0``, ``g̃ = ŵ = ε = ρ C(g) / (‖g‖ + δ)``
  for the gradient ``g`` given."""
  rng = np.random.default_rng(0)
  tree = {"conv": rng.normal(size=(3, 3, 2, 5)), "dense": rng.normal(size=(4, 6)),
          "bias": rng.normal(size=(6,))}
  tree = ref.as_float64(to_numpy(to_jax(tree)))  # float32-representable
  half_square = lambda w: 0.5 * sum(jnp.sum(x * x) for x in jax.tree.leaves(w))
  zeros = jax.tree.map(jnp.zeros_like, to_jax(tree))

  def epsilon(output_axis=-1):
    tx = sam_optax.gcsam(RHO, loss_fn=half_square, output_axis=output_axis)
    return to_numpy(tx.update(to_jax(tree), tx.init(zeros), zeros)[0])

  got = epsilon()
  want = ref.scale(RHO / (ref.norm(tree) + 1e-12), ref.tree_map(centralized_torch_layout, tree))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["conv"].mean(axis=(0, 1, 2)), 0.0, atol=1e-7)
  np.testing.assert_allclose(got["bias"], RHO * tree["bias"] / ref.norm(tree), rtol=1e-5)
  # The first axis as output (PyTorch's own layout) is a different centralization.
  assert np.max(np.abs(epsilon(output_axis=0)["dense"] - got["dense"])) > 1e-3


@pytest.mark.parametrize("name, masked", [("logistic", False), ("mlp", False), ("mlp", True)])
def test_gcsam_is_the_authors_first_and_second_step(name, masked):
  problem = PROBLEMS[name]
  mask = {"hidden": True, "out": False} if masked else None
  tx = optax.chain(sam_optax.gcsam(RHO, loss_fn=problem.loss_fn, mask=mask),
                   optax.sgd(LR, momentum=MOMENTUM))

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(problem.loss_fn)(params, batch=batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  params, state, history = problem.params, tx.init(problem.params), []
  for t in range(STEPS):
    params, state = step(params, state, problem.batch(t))
    history.append(params)
  assert_histories_close(history, gcsam_reference(problem.numpy, ref.SGD(LR, MOMENTUM), STEPS,
                                                  mask=mask))


def test_gcsam_errors():
  with pytest.raises(TypeError, match=r"gcsam: output_axis must be a Python int, got 1.5"):
    sam_optax.gcsam(output_axis=1.5)
  with pytest.raises(ValueError, match=r"gcsam: rho must be finite and >= 0, got rho=-1"):
    sam_optax.gcsam(-1)
