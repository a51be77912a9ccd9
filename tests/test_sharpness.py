"""sam_optax.sharpness against NumPy float64 references on a small MLP.

The Hessian is built exactly (``jax.hessian`` of the loss of the flattened
parameters, float64) and decomposed by ``np.linalg.eigh``; the m-sharpness and
the adaptive sharpness are re-computed by NumPy loops written from their
definitions (and, for the adaptive sharpness, from the authors' PyTorch code:
tml-epfl/sharpness-vs-generalization, ``sharpness.py``), with gradients by
hand-written backpropagation. Multi-device tests use the 8 fake CPU devices of
conftest.py with real per-device shards.
"""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax import sharpness

D_IN, HIDDEN, D_OUT, N = 6, 16, 4, 32  # 180 parameters, 32 examples


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


# --------------------------------------------------------------------------
# The model, its NumPy twin and the exact Hessian.
# --------------------------------------------------------------------------


def init(dtype=np.float64, seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "dense1": {"kernel": rng.normal(size=(D_IN, HIDDEN)) * 0.6, "bias": rng.normal(size=HIDDEN) * 0.1},
      "dense2": {"kernel": rng.normal(size=(HIDDEN, D_OUT)) * 0.6, "bias": rng.normal(size=D_OUT) * 0.1},
  }
  x = rng.normal(size=(N, D_IN))
  y = rng.normal(size=(N, D_OUT))
  return jax.tree.map(lambda a: np.asarray(a, dtype), params), {"x": x.astype(dtype), "y": y.astype(dtype)}


def loss_fn(params, x, y):
  hidden = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  out = hidden @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def np_loss(params, x, y):
  hidden = np.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  out = hidden @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  return 0.5 * np.mean(np.sum((out - y) ** 2, axis=-1))


def np_grad(params, x, y):
  """Backpropagation by hand."""
  pre = x @ params["dense1"]["kernel"] + params["dense1"]["bias"]
  hidden = np.tanh(pre)
  out = hidden @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  d_out = (out - y) / x.shape[0]
  d_pre = (d_out @ params["dense2"]["kernel"].T) * (1.0 - hidden ** 2)
  return {
      "dense1": {"kernel": x.T @ d_pre, "bias": d_pre.sum(0)},
      "dense2": {"kernel": hidden.T @ d_out, "bias": d_out.sum(0)},
  }


def np_tree(fn, *trees):
  return jax.tree.map(fn, *trees)


def np_norm(tree):
  return math.sqrt(sum(float(np.sum(np.asarray(leaf) ** 2)) for leaf in jax.tree.leaves(tree)))


def linear_problem(seed=0):
  rng = np.random.default_rng(seed)
  w = {"kernel": rng.normal(size=(5, 2)), "bias": rng.normal(size=2)}
  x = rng.normal(size=(64, 5))
  return w, {"x": x, "y": rng.normal(size=(64, 2))}


def linear_loss(w, x, y):
  return 0.5 * jnp.mean(jnp.sum((x @ w["kernel"] + w["bias"] - y) ** 2, axis=-1))


def np_linear_loss(w, x, y):
  return 0.5 * np.mean(np.sum((x @ w["kernel"] + w["bias"] - y) ** 2, axis=-1))


@pytest.fixture(scope="module")
def problem():
  with jax.enable_x64(True):
    params, batch = init()
    flat, unravel = ravel_pytree(params)
    hessian = np.asarray(jax.jit(jax.hessian(lambda f, b: loss_fn(unravel(f), **b)))(flat, batch))
  eigenvalues, eigenvectors = np.linalg.eigh(hessian)
  return {"params": params, "batch": batch, "hessian": hessian, "unravel": unravel,
          "eigenvalues": eigenvalues[::-1], "eigenvectors": eigenvectors[:, ::-1]}


def test_the_numpy_gradient_is_the_gradient(problem):
  params, batch = problem["params"], problem["batch"]
  want = jax.jit(jax.grad(loss_fn))(params, **batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
               np_grad(params, **batch), want)


# --------------------------------------------------------------------------
# Lanczos: top eigenvalues and eigenvectors.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def top3(problem):
  with jax.enable_x64(True):
    return sharpness.top_hessian_eigenvalues(
        loss_fn, problem["params"], problem["batch"], k=3, num_iters=40,
        key=jax.random.key(1), return_eigenvectors=True)


def test_top_eigenvalues_match_numpy(problem, top3):
  want = problem["eigenvalues"]
  assert top3.eigenvalues.shape == (3,) and top3.eigenvalues.dtype == jnp.float64
  np.testing.assert_allclose(top3.eigenvalues, want[:3], rtol=1e-6)
  assert want[2] - want[3] > 1e-3 * want[0]  # separated: the vectors are defined
  vectors = np.stack([ravel_pytree(jax.tree.map(lambda v: v[i], top3.eigenvectors))[0]
                      for i in range(3)])
  overlap = np.abs(vectors @ problem["eigenvectors"][:, :3])
  np.testing.assert_allclose(overlap, np.eye(3), atol=1e-6)
  chex_shapes = jax.tree.map(lambda v, p: v.shape == (3,) + np.shape(p), top3.eigenvectors,
                             problem["params"])
  assert all(jax.tree.leaves(chex_shapes))


def test_top_eigenvalue_k1_is_the_largest_and_without_vectors(problem):
  got = sharpness.top_hessian_eigenvalues(
      loss_fn, problem["params"], problem["batch"], num_iters=30, key=jax.random.key(3))
  assert got.eigenvectors is None and got.eigenvalues.shape == (1,)
  np.testing.assert_allclose(got.eigenvalues[0], problem["eigenvalues"][0], rtol=1e-6)


def test_lanczos_recovers_the_whole_spectrum_with_n_steps():
  # Krylov dimension = n: the Ritz values are the eigenvalues, negative ones included.
  spectrum = np.array([3.0, -2.0, 0.5, 1.5, -0.25])
  loss = lambda w: 0.5 * jnp.sum(spectrum * w["a"] ** 2) + 0.0 * w["b"]
  got = sharpness.top_hessian_eigenvalues(
      loss, {"a": np.ones(5), "b": np.zeros(())}, k=6, num_iters=6, key=jax.random.key(0))
  np.testing.assert_allclose(got.eigenvalues, [3.0, 1.5, 0.5, 0.0, -0.25, -2.0], atol=1e-10)


# --------------------------------------------------------------------------
# Hutchinson and stochastic Lanczos quadrature.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trace100(problem):
  with jax.enable_x64(True):
    return sharpness.hessian_trace(loss_fn, problem["params"], problem["batch"],
                                   key=jax.random.key(2), num_samples=100)


def test_trace_within_three_standard_errors(problem, trace100):
  got = trace100
  want = np.trace(problem["hessian"])
  assert got.num_samples == 100 and got.stderr > 0
  assert abs(float(got.trace) - want) < 3 * float(got.stderr), (got, want)
  # The standard error is that of Rademacher probes: sqrt(2 Σ_{i≠j} H_ij² / S).
  off = problem["hessian"] - np.diag(np.diag(problem["hessian"]))
  np.testing.assert_allclose(float(got.stderr), math.sqrt(2 * np.sum(off ** 2) / 100), rtol=0.35)


def test_trace_of_a_diagonal_hessian_is_exact():
  # Rademacher probes: v^T D v = tr(D) for every probe (a Gaussian probe would not be).
  got = sharpness.hessian_trace(lambda w: jnp.sum(jnp.cosh(w) * jnp.arange(1.0, 5.0)),
                                np.linspace(-1, 1, 4), key=jax.random.key(0), num_samples=8)
  np.testing.assert_allclose(got.trace, np.sum(np.cosh(np.linspace(-1, 1, 4)) * np.arange(1, 5)),
                             rtol=1e-12)
  assert float(got.stderr) < 1e-12


@pytest.fixture(scope="module")
def density(problem):
  with jax.enable_x64(True):
    return sharpness.hessian_spectral_density(
        loss_fn, problem["params"], problem["batch"], key=jax.random.key(4), num_iters=25,
        num_samples=40)


def test_slq_moments_within_their_sampling_error(problem, density):
  n = problem["hessian"].shape[0]
  assert density.nodes.shape == density.weights.shape == (40, 25)
  np.testing.assert_allclose(np.sum(density.weights, axis=1), 1.0, rtol=1e-10)
  hessian = problem["hessian"]
  for power, want in ((1, np.trace(hessian) / n), (2, np.trace(hessian @ hessian) / n)):
    per_probe = np.sum(np.asarray(density.weights) * np.asarray(density.nodes) ** power, axis=1)
    stderr = np.std(per_probe, ddof=1) / math.sqrt(len(per_probe))
    assert abs(per_probe.mean() - want) < 4 * stderr, (power, per_probe.mean(), want, stderr)


def test_slq_density_is_a_normalized_broadening_of_the_quadrature(density):
  grid, phi = np.asarray(density.grid), np.asarray(density.density)
  assert grid.shape == phi.shape == (1000,) and np.all(np.diff(grid) > 0) and np.all(phi >= 0)
  np.testing.assert_allclose(np.trapezoid(phi, grid), 1.0, rtol=1e-10)
  # Its mean and variance are those of the averaged quadrature (+ σ², the broadening).
  first = np.mean(np.sum(density.weights * density.nodes, axis=1))
  second = np.mean(np.sum(density.weights * density.nodes ** 2, axis=1))
  sigma = 5 * (grid[-1] - grid[0]) / 999
  np.testing.assert_allclose(np.trapezoid(grid * phi, grid), first, rtol=1e-3)
  np.testing.assert_allclose(np.trapezoid(grid ** 2 * phi, grid), second + sigma ** 2, rtol=1e-2)
  nodes = np.asarray(density.nodes)
  assert grid[0] < nodes.min() and grid[-1] > nodes.max()


def test_slq_quadrature_is_exact_per_probe_on_a_diagonal_hessian():
  # v̂ᵀ H^p v̂ = tr(H^p)/n for every Rademacher probe if H is diagonal, and
  # K-point Gauss quadrature is exact for p < 2K.
  diagonal = np.array([0.3, 1.0, 2.0, 2.5, 4.0, 7.0])
  loss = lambda w: 0.5 * jnp.sum(diagonal * w ** 2)
  got = sharpness.hessian_spectral_density(
      loss, np.ones(6), key=jax.random.key(0), num_iters=3, num_samples=2,
      grid=np.linspace(-1.0, 9.0, 501), sigma=0.2)
  for power in range(6):  # 0 .. 2K - 1
    np.testing.assert_allclose(np.sum(got.weights * got.nodes ** power, axis=1),
                               np.mean(diagonal ** power), rtol=1e-9)
  np.testing.assert_allclose(got.grid, np.linspace(-1.0, 9.0, 501))
  # with σ given: the broadening of each node is N(θ, σ²)
  want = np.mean([np.sum(w * np.exp(-0.5 * ((got.grid[:, None] - t) / 0.2) ** 2), axis=1)
                  for w, t in zip(np.asarray(got.weights), np.asarray(got.nodes))], axis=0)
  np.testing.assert_allclose(got.density, want / np.trapezoid(want, got.grid), rtol=1e-9)


# --------------------------------------------------------------------------
# Several batches.
# --------------------------------------------------------------------------


def test_equal_batches_average_to_the_concatenated_batch(problem, top3):
  batch = problem["batch"]
  halves = [{k: v[:16] for k, v in batch.items()}, {k: v[16:] for k, v in batch.items()}]
  # Same key: the same start vector, so Lanczos sees the same operator.
  got = sharpness.top_hessian_eigenvalues(
      loss_fn, problem["params"], iter(halves), k=3, num_iters=40, key=jax.random.key(1))
  np.testing.assert_allclose(got.eigenvalues, top3.eigenvalues, rtol=1e-10)


def test_unequal_batches_weigh_the_same():
  # Linear regression: the Hessian of batch b is I ⊗ [x_b, 1]ᵀ[x_b, 1] / N_b.
  w, batch = linear_problem()
  parts = [{k: v[:40] for k, v in batch.items()}, {k: v[40:] for k, v in batch.items()}]
  hessians = []
  for part in parts:
    features = np.hstack([part["x"], np.ones((len(part["x"]), 1))])
    hessians.append(features.T @ features / len(features))
  want = np.sort(np.linalg.eigvalsh(0.5 * (hessians[0] + hessians[1])))[::-1]  # each twice
  got = sharpness.top_hessian_eigenvalues(linear_loss, w, parts, k=4, num_iters=12,
                                          key=jax.random.key(0))
  np.testing.assert_allclose(got.eigenvalues, np.repeat(want[:2], 2), rtol=1e-8)


# --------------------------------------------------------------------------
# m-sharpness against a NumPy loop.
# --------------------------------------------------------------------------


def np_m_sharpness(params, batches, rho, m, method, eta=0.01, eps=1e-12):
  values = []
  for batch in batches:
    for start in range(0, len(batch["x"]), m):
      x, y = batch["x"][start:start + m], batch["y"][start:start + m]
      g = np_grad(params, x, y)
      if method == "sam":
        norm = np_norm(g)
        epsilon = np_tree(lambda gi: rho * gi / (norm + eps), g)
      else:  # ASAM: T = |w| + η on kernels, 1 on biases
        t = {layer: {"kernel": np.abs(params[layer]["kernel"]) + eta,
                     "bias": np.ones_like(params[layer]["bias"])} for layer in params}
        norm = np_norm(np_tree(lambda ti, gi: ti * gi, t, g))
        epsilon = np_tree(lambda ti, gi: rho * ti * ti * gi / (norm + eps), t, g)
      perturbed = np_tree(lambda w, e: w + e, params, epsilon)
      values.append(np_loss(perturbed, x, y) - np_loss(params, x, y))
  return float(np.mean(values))


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_m_sharpness_matches_numpy(problem, method):
  params, batch = problem["params"], problem["batch"]
  got = sharpness.m_sharpness(loss_fn, params, batch, rho=0.3, m=8, method=method)
  want = np_m_sharpness(params, [batch], 0.3, 8, method)
  # The ascent point is the optimizers': float32 arithmetic (|w + ε̂| rounded).
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
  assert want > 0.01


def test_m_sharpness_of_several_batches_is_the_mean_over_all_groups(problem):
  params, batch = problem["params"], problem["batch"]
  parts = [{k: v[:24] for k, v in batch.items()}, {k: v[24:] for k, v in batch.items()}]
  got = sharpness.m_sharpness(loss_fn, params, parts, rho=0.3, m=4)  # 6 + 2 groups
  np.testing.assert_allclose(float(got), np_m_sharpness(params, parts, 0.3, 4, "sam"), rtol=2e-5)


# --------------------------------------------------------------------------
# Adaptive sharpness against a NumPy port of the authors' code.
# --------------------------------------------------------------------------


def np_checkpoints(n_iters):
  p = [0, 0.22]
  w = [0, math.ceil(n_iters * 0.22)]
  while w[-1] < n_iters and w[-1] != w[-2]:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    w.append(math.ceil(p[-1] * n_iters))
  return w[1:]


def np_project_ellipsoid(delta, c, rho):
  """argmin ‖d − δ‖ s.t. ‖d / c‖ ≤ ρ, by Brent's method on the multiplier."""
  flat_d = np.concatenate([np.ravel(v) for v in jax.tree.leaves(delta)])
  flat_c = np.concatenate([np.ravel(v) for v in jax.tree.leaves(c)])
  weighted = lambda lam: math.sqrt(np.sum((flat_d * flat_c / (flat_c ** 2 + 2 * lam)) ** 2))
  if weighted(0.0) <= rho:
    return delta
  lam = scipy.optimize.brentq(lambda lam: weighted(lam) - rho, 0.0, 1e6, xtol=1e-300, rtol=1e-15)
  return np_tree(lambda d, ci: d * ci ** 2 / (ci ** 2 + 2 * lam), delta, c)


def np_apgd_sharpness(params, x, y, rho, n_iters, norm):
  """eval_APGD_sharpness(adaptive=True, rand_init=False, n_restarts=1) on one batch."""
  c = np_tree(np.abs, params)
  zero = np_tree(np.zeros_like, params)
  delta, prev_delta = zero, zero
  model = params  # the weights the next gradient is taken at
  init_loss = worst_loss = np_loss(params, x, y)
  worst_model = params
  step_size = prev_step_size = 2 * rho
  prev_worst_loss, prev_cp, num_of_updates = worst_loss, 0, 0
  checkpoints = np_checkpoints(n_iters)
  for i in range(n_iters):
    backup = delta
    g = np_grad(model, x, y)
    if norm == "l2":
      grad_norm = np_norm(g)
      z = np_tree(lambda d, gi, ci: d + step_size / (grad_norm + 1e-12) * gi * ci, delta, g, c)
      z = np_project_ellipsoid(z, c, rho)
    else:
      z = np_tree(lambda d, gi, ci: d + step_size * np.sign(gi) * ci, delta, g, c)
      z = np_tree(lambda d, ci: np.maximum(np.minimum(d, ci * rho), -ci * rho), z, c)
    delta = np_tree(lambda zi, p: 0.75 * zi + 0.25 * p, z, prev_delta)
    model = np_tree(lambda w, d: w + d, params, delta)
    prev_delta = backup
    curr_loss = np_loss(model, x, y)
    if curr_loss > worst_loss:
      worst_loss, worst_model = curr_loss, model
      num_of_updates += 1
    if i in checkpoints:
      cond1 = num_of_updates < 0.75 * (i - prev_cp)
      cond2 = prev_step_size == step_size and prev_worst_loss == worst_loss
      prev_step_size, prev_worst_loss, prev_cp = step_size, worst_loss, i
      num_of_updates = 0
      if cond1 or cond2:
        step_size *= 0.5
        model = worst_model  # model.load_state_dict(worst_model_dict); delta_dict is kept
  return worst_loss - init_loss


def test_apgd_checkpoints_are_the_authors():
  for n in (1, 5, 20, 37, 100):
    assert sharpness.apgd_checkpoints(n) == np_checkpoints(n)
  # In floating point 0.7 * 20 = 14.000000000000002, so the fourth is 15, not 14.
  assert np_checkpoints(20) == [5, 9, 12, 15, 16, 18, 19, 20]


@pytest.mark.parametrize("norm,rho", [("linf", 0.05), ("l2", 0.3)])
def test_worst_case_adaptive_sharpness_matches_the_authors_algorithm(problem, norm, rho):
  params, batch = problem["params"], problem["batch"]
  parts = [{k: v[:16] for k, v in batch.items()}, {k: v[16:] for k, v in batch.items()}]
  got = sharpness.adaptive_sharpness(loss_fn, params, parts, rho=rho, norm=norm)
  want = np.mean([np_apgd_sharpness(params, part["x"], part["y"], rho, 20, norm)
                  for part in parts])
  np.testing.assert_allclose(float(got), want, rtol=1e-8)
  # More than one step helps: the one-step value is smaller.
  one = np.mean([np_apgd_sharpness(params, part["x"], part["y"], rho, 1, norm) for part in parts])
  assert want > one > 0


@pytest.mark.parametrize("norm,second_moment", [("l2", 1.0), ("linf", 1.0 / 3.0)])
def test_average_case_adaptive_sharpness_is_the_expected_increase(norm, second_moment):
  # At the least-squares solution w* of a quadratic loss plus a small linear
  # term aᵀw, E L(w* + ρ c ⊙ ξ) − L(w*) = (ρ²/2) E[ξ²] Σ_i c_i² H_ii + ρ aᵀ(c ⊙ E ξ)
  # exactly, and E ξ = 0: the noise scale and its symmetry are both checked.
  _, batch = linear_problem()
  features = np.hstack([batch["x"], np.ones((64, 1))])
  solution = np.linalg.lstsq(features, batch["y"], rcond=None)[0]
  w = {"kernel": solution[:-1], "bias": solution[-1]}
  a = jax.tree.map(lambda v: 0.01 * np.sign(v), w)
  loss = lambda w, x, y: linear_loss(w, x, y) + sum(
      jnp.sum(ai * wi) for ai, wi in zip(jax.tree.leaves(a), jax.tree.leaves(w)))
  np_loss_ = lambda w, x, y: np_linear_loss(w, x, y) + sum(
      np.sum(ai * wi) for ai, wi in zip(jax.tree.leaves(a), jax.tree.leaves(w)))
  rho, num_samples = 0.2, 2000
  got = float(sharpness.adaptive_sharpness(loss, w, batch, rho=rho, kind="average", norm=norm,
                                           key=jax.random.key(7), num_samples=num_samples))
  h_kernel = np.repeat((batch["x"] ** 2).mean(0)[:, None], 2, axis=1)  # ∂²L/∂W_ij² = mean x_i²
  c = {"kernel": np.abs(w["kernel"]), "bias": np.abs(w["bias"])}
  want = 0.5 * rho ** 2 * second_moment * (np.sum(c["kernel"] ** 2 * h_kernel)
                                           + np.sum(c["bias"] ** 2))
  # The sampling error of a mean of num_samples draws, from a NumPy Monte Carlo.
  rng = np.random.default_rng(1)
  draw = rng.normal if norm == "l2" else (lambda size: rng.uniform(-1, 1, size))
  base = np_loss_(w, **batch)
  increases = np.array([np_loss_({k: w[k] + rho * c[k] * draw(size=w[k].shape) for k in w},
                                 **batch) - base for _ in range(2000)])
  np.testing.assert_allclose(increases.mean(), want, atol=4 * increases.std() / math.sqrt(2000))
  assert abs(got - want) < 4 * increases.std() / math.sqrt(num_samples), (got, want)


# --------------------------------------------------------------------------
# Sharded inputs and per-device shards.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()[:8]), ("data",))


def test_sharded_params_and_batch_give_the_same_numbers(problem, mesh, top3):
  params, batch = problem["params"], problem["batch"]
  with jax.enable_x64(True):
    sharded_params = jax.tree.map(
        lambda a: jax.device_put(a, NamedSharding(mesh, P(*([None] * (a.ndim - 1)), "data")
                                                  if a.shape[-1] % 8 == 0 else P())), params)
    sharded_batch = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))), batch)
    assert len(sharded_params["dense1"]["kernel"].sharding.device_set) == 8
    got = sharpness.top_hessian_eigenvalues(loss_fn, sharded_params, sharded_batch, k=3,
                                            num_iters=40, key=jax.random.key(1))
    m_got = sharpness.m_sharpness(loss_fn, sharded_params, sharded_batch, rho=0.3, m=8)
    worst_got = sharpness.adaptive_sharpness(loss_fn, sharded_params, sharded_batch, rho=0.05)
  np.testing.assert_allclose(got.eigenvalues, top3.eigenvalues, rtol=1e-9)
  np.testing.assert_allclose(m_got, sharpness.m_sharpness(loss_fn, params, batch, rho=0.3, m=8),
                             rtol=1e-6)
  np.testing.assert_allclose(worst_got, np_apgd_sharpness(params, batch["x"], batch["y"], 0.05, 20,
                                                          "linf"), rtol=1e-8)


def test_axis_name_inside_shard_map_equals_the_whole_batch(problem, mesh, top3, trace100):
  params, batch = problem["params"], problem["batch"]

  def per_device(params, batch):
    top = sharpness.top_hessian_eigenvalues(loss_fn, params, batch, k=3, num_iters=40,
                                            key=jax.random.key(1), axis_name="data")
    trace = sharpness.hessian_trace(loss_fn, params, batch, key=jax.random.key(2),
                                    num_samples=100, axis_name="data")
    m = sharpness.m_sharpness(loss_fn, params, batch, rho=0.3, m=4, axis_name="data")
    worst = sharpness.adaptive_sharpness(loss_fn, params, batch, rho=0.05, axis_name="data")
    return top.eigenvalues, trace.trace, m, worst

  with jax.enable_x64(True):  # under jax.jit: params, batches and keys are tracers
    top, trace, m, worst = jax.jit(jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False))(
            params, batch)
  np.testing.assert_allclose(top, top3.eigenvalues, rtol=1e-9)
  np.testing.assert_allclose(trace, trace100.trace, rtol=1e-9)
  # m = 4 examples per group, 4 per device: the groups of the whole batch.
  np.testing.assert_allclose(m, np_m_sharpness(params, [batch], 0.3, 4, "sam"), rtol=2e-5)
  np.testing.assert_allclose(worst, np_apgd_sharpness(params, batch["x"], batch["y"], 0.05, 20,
                                                      "linf"), rtol=1e-8)


def test_shard_map_with_check_vma_is_refused(mesh):
  # There JAX sums the gradient of replicated params over the axis itself.
  fn = jax.shard_map(
      lambda w, x: sharpness.hessian_trace(lambda w, x: jnp.mean((x @ w) ** 2), w, {"x": x},
                                           key=jax.random.key(0), axis_name="data").trace,
      mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=True)
  with pytest.raises(ValueError, match="check_vma=False"):
    jax.jit(fn)(np.ones(3), np.ones((16, 3)))


# --------------------------------------------------------------------------
# bf16, the optional dependency, bad input.
# --------------------------------------------------------------------------


def test_bf16_params_give_float32_results_close_to_float32():
  w, batch = linear_problem()
  with jax.enable_x64(False):
    bf16, batch16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), (w, batch))
    as32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (bf16, batch16))
    got = sharpness.top_hessian_eigenvalues(linear_loss, bf16, batch16, num_iters=8,
                                            key=jax.random.key(0), return_eigenvectors=True)
    want = sharpness.top_hessian_eigenvalues(linear_loss, *as32, num_iters=8,
                                             key=jax.random.key(0))
  assert got.eigenvalues.dtype == want.eigenvalues.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got.eigenvectors))
  np.testing.assert_allclose(got.eigenvalues, want.eigenvalues, rtol=2e-2)
  features = np.hstack([np.asarray(as32[1]["x"], np.float64), np.ones((64, 1))])
  np.testing.assert_allclose(want.eigenvalues[0], np.linalg.eigvalsh(features.T @ features / 64)[-1],
                             rtol=1e-5)


def test_a_missing_matfree_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "matfree", None)
  for call in (lambda: sharpness.top_hessian_eigenvalues(jnp.sum, jnp.ones(3), num_iters=2,
                                                       key=jax.random.key(0)),
               lambda: sharpness.hessian_trace(jnp.sum, jnp.ones(3), key=jax.random.key(0)),
               lambda: sharpness.hessian_spectral_density(jnp.sum, jnp.ones(3), num_iters=2,
                                                          key=jax.random.key(0))):
    with pytest.raises(ImportError, match=r"pip install 'sam_optax\[sharpness\]'"):
      call()
  # The perturbation measures do not need it.
  value = sharpness.m_sharpness(lambda w, x: jnp.sum((x @ w) ** 2), jnp.ones(2),
                                {"x": jnp.eye(2)}, rho=0.1, m=1)
  assert float(value) > 0
  assert "sharpness" in sam_optax.__all__ and sam_optax.sharpness is sharpness


@pytest.mark.parametrize("call,match", [
    (lambda p, b: sharpness.top_hessian_eigenvalues(lambda p, x, y: jnp.ones(2), p, b,
                                                    key=jax.random.key(0)),
     "loss_fn must return a scalar"),
    (lambda p, b: sharpness.top_hessian_eigenvalues(loss_fn, p, b, k=181, num_iters=181,
                                                    key=jax.random.key(0)),
     r"k=181 must be <= the number of parameters, 180"),
    (lambda p, b: sharpness.top_hessian_eigenvalues(loss_fn, p, b, k=5, num_iters=4,
                                                    key=jax.random.key(0)),
     r"k=5 must be <= num_iters=4"),
    (lambda p, b: sharpness.top_hessian_eigenvalues(loss_fn, p, b, num_iters=200,
                                                    key=jax.random.key(0)),
     r"num_iters=200 .* must be <= the number of parameters, 180"),
    (lambda p, b: sharpness.top_hessian_eigenvalues(loss_fn, p, b, key=None), "key is required"),
    (lambda p, b: sharpness.hessian_trace(loss_fn, p, [], key=jax.random.key(0)),
     "batches is empty"),
    (lambda p, b: sharpness.hessian_trace(loss_fn, p, b, key=jax.random.key(0), num_samples=1),
     "num_samples must be an int >= 2"),
    (lambda p, b: sharpness.hessian_spectral_density(loss_fn, p, b, key=jax.random.key(0),
                                                     sigma=-1.0), "sigma must be finite and > 0"),
    (lambda p, b: sharpness.hessian_spectral_density(loss_fn, p, b, key=jax.random.key(0),
                                                     grid=np.linspace(1, 0, 5)),
     "grid must be strictly increasing"),
    (lambda p, b: sharpness.m_sharpness(loss_fn, p, b, rho=-0.1, m=4), "rho must be finite and >= 0"),
    (lambda p, b: sharpness.m_sharpness(loss_fn, p, b, rho=0.1, m=5),
     r"m=5 must divide the leading \(example\) dimension .* batch\['x'\] has shape \(32, 6\)"),
    (lambda p, b: sharpness.m_sharpness(loss_fn, p, b, rho=0.1, m=4, method="gsam"),
     "method must be one of"),
    (lambda p, b: sharpness.m_sharpness(loss_fn, p, None, rho=0.1, m=4), "batches is required"),
    (lambda p, b: sharpness.adaptive_sharpness(loss_fn, p, b, rho=-1.0), "rho must be finite"),
    (lambda p, b: sharpness.adaptive_sharpness(loss_fn, p, b, rho=0.1, kind="average"),
     "needs a key"),
    (lambda p, b: sharpness.adaptive_sharpness(loss_fn, p, b, rho=0.1, key=jax.random.key(0)),
     "key is an option of kind='average'"),
    (lambda p, b: sharpness.adaptive_sharpness(loss_fn, p, b, rho=0.1, norm="l1"),
     "norm must be one of"),
    (lambda p, b: sharpness.adaptive_sharpness(loss_fn, p, iter([]), rho=0.1), "batches is empty"),
    (lambda p, b: sharpness.hessian_trace(loss_fn, {"w": np.arange(3)}, b, key=jax.random.key(0)),
     r"params\['w'\] has dtype int"),
    (lambda p, b: sharpness.hessian_trace(loss_fn, p, [b, {**b, "z": 1}], key=jax.random.key(0)),
     r"batches\[1\] has key\(s\) \['z'\] that loss_fn\(params, x, y\) does not accept"),
    (lambda p, b: sharpness.m_sharpness(loss_fn, p, {"x": b["x"]}, rho=0.1, m=4),
     r"loss_fn\(params, x, y\) requires \['y'\], but batches has \['x'\]"),
    (lambda p, b: sharpness.hessian_trace(loss_fn, p, b["x"], key=jax.random.key(0)),
     "batches must be None, a mapping"),
])
def test_bad_input_is_a_clear_error(problem, call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call(problem["params"], problem["batch"])
