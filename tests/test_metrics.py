"""Tests of experiments.metrics against plain NumPy computations.

Each metric is compared with an independent, loop-based NumPy reference on
small inputs (float64, written from the definitions in the docstrings), plus
edge cases and hypothesis properties.
"""

import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import metrics

# --------------------------------------------------------------------------
# NumPy references.
# --------------------------------------------------------------------------


def np_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def np_confidence_correct(logits, labels):
  probs = np.exp(np_log_softmax(logits))
  confidence, correct = [], []
  for row, label in zip(probs, labels):
    confidence.append(row.max())
    correct.append(float(int(np.argmax(row)) == int(label)))
  return np.array(confidence), np.array(correct)


def np_reliability(logits, labels, num_bins):
  """Loop over examples; bin b is (b/M, (b+1)/M], the first also holds 0."""
  confidence, correct = np_confidence_correct(logits, labels)
  count = np.zeros(num_bins, np.int64)
  sum_conf = np.zeros(num_bins)
  sum_acc = np.zeros(num_bins)
  for p, c in zip(confidence, correct):
    for b in range(num_bins):
      lo, hi = b / num_bins, (b + 1) / num_bins
      if lo < p <= hi or (b == 0 and p == 0.0):
        count[b] += 1
        sum_conf[b] += p
        sum_acc[b] += c
        break
  conf = np.array([s / n if n else 0.0 for s, n in zip(sum_conf, count)])
  acc = np.array([s / n if n else 0.0 for s, n in zip(sum_acc, count)])
  ece = sum(n / len(labels) * abs(a - c) for n, a, c in zip(count, acc, conf))
  return conf, acc, count, ece


def np_adaptive_ece(logits, labels, num_bins):
  """Sorted by (confidence, correct); bin b holds ranks [start_b, start_{b+1})."""
  confidence, correct = np_confidence_correct(logits, labels)
  n = len(labels)
  ranked = sorted(zip(confidence, correct))
  base, extra = divmod(n, num_bins)
  total, start = 0.0, 0
  for b in range(num_bins):
    size = base + (1 if b < extra else 0)
    group = ranked[start:start + size]
    start += size
    if group:
      acc = sum(c for _, c in group) / size
      conf = sum(p for p, _ in group) / size
      total += size / n * abs(acc - conf)
  assert start == n
  return total


def random_logits(seed, n=300, c=10):
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.1, 5.0, size=(n, 1))  # confidences across [1/c, 1]
  logits = rng.normal(size=(n, c)) * scale
  labels = rng.integers(0, c, size=n)
  # Make about half of the predictions right so that accuracy varies by bin.
  right = rng.random(n) < 0.5
  labels[right] = logits[right].argmax(axis=1)
  return logits.astype(np.float32), labels


# --------------------------------------------------------------------------
# Accuracy and NLL.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_and_nll_match_numpy(seed):
  logits, labels = random_logits(seed, n=200, c=7)
  expected_acc = sum(int(np.argmax(z)) == y for z, y in zip(logits, labels)) / len(labels)
  log_p = np_log_softmax(logits)
  expected_nll = -np.mean([log_p[i, y] for i, y in enumerate(labels)])
  assert metrics.accuracy(logits, labels) == pytest.approx(expected_acc, abs=1e-12)
  assert metrics.nll(logits, labels) == pytest.approx(expected_nll, rel=1e-5)
  assert isinstance(metrics.accuracy(logits, labels), float)
  assert isinstance(metrics.nll(logits, labels), float)


def test_nll_is_stable_for_large_logits():
  logits = np.array([[1000.0, 0.0], [0.0, 1000.0]], np.float32)
  assert metrics.nll(logits, np.array([0, 0])) == pytest.approx(500.0, rel=1e-6)


def test_accepts_jax_arrays_and_bfloat16_logits():
  logits, labels = random_logits(3, n=50, c=4)
  expected = metrics.nll(logits, labels)
  got = metrics.nll(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
  assert got == pytest.approx(expected, rel=2e-2)


# --------------------------------------------------------------------------
# ECE, reliability diagram, adaptive ECE.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed,num_bins", [(0, 15), (1, 15), (2, 7), (3, 1)])
def test_reliability_diagram_and_ece_match_loop_reference(seed, num_bins):
  logits, labels = random_logits(seed)
  conf, acc, count, ece = np_reliability(logits, labels, num_bins)
  diagram = metrics.reliability_diagram(logits, labels, num_bins)
  np.testing.assert_array_equal(diagram["bin_count"], count)
  np.testing.assert_allclose(diagram["bin_confidence"], conf, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(diagram["bin_accuracy"], acc, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(diagram["bin_lower"], np.arange(num_bins) / num_bins, atol=1e-15)
  np.testing.assert_allclose(diagram["bin_upper"], np.arange(1, num_bins + 1) / num_bins,
                             atol=1e-15)
  assert diagram["ece"] == pytest.approx(ece, rel=1e-4, abs=1e-7)
  assert metrics.expected_calibration_error(logits, labels, num_bins) == pytest.approx(
      ece, rel=1e-4, abs=1e-7)
  assert ece > 0.01  # a non-trivial case


def test_bin_edges_are_right_closed():
  # Two equal logits: confidence exactly 1/2, an edge for 2 and 4 bins.
  logits = np.zeros((3, 2), np.float32)
  labels = np.array([0, 0, 1])
  assert metrics.reliability_diagram(logits, labels, 2)["bin_count"].tolist() == [3, 0]
  assert metrics.reliability_diagram(logits, labels, 4)["bin_count"].tolist() == [0, 3, 0, 0]
  # Confidence exactly 1 lands in the last bin.
  confident = np.array([[100.0, 0.0]], np.float32)
  assert metrics.reliability_diagram(confident, np.array([0]), 3)["bin_count"].tolist() == [0, 0, 1]


def test_empty_bins_are_zero_and_do_not_count():
  # All confidences near 0.9: 14 of 15 bins are empty.
  logits = np.log(np.array([[0.9, 0.1]] * 10, np.float32))
  labels = np.array([0] * 7 + [1] * 3)
  diagram = metrics.reliability_diagram(logits, labels)
  assert diagram["bin_count"].sum() == 10
  assert (diagram["bin_count"] > 0).sum() == 1
  empty = diagram["bin_count"] == 0
  assert np.all(diagram["bin_accuracy"][empty] == 0) and np.all(diagram["bin_confidence"][empty] == 0)
  assert metrics.expected_calibration_error(logits, labels) == pytest.approx(0.2, abs=1e-6)


def test_confident_and_correct_predictions_have_small_ece():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, size=100)
  logits = 30.0 * np.eye(10, dtype=np.float32)[labels]
  assert metrics.accuracy(logits, labels) == 1.0
  assert metrics.expected_calibration_error(logits, labels) < 1e-6
  assert metrics.adaptive_calibration_error(logits, labels) < 1e-6
  assert metrics.nll(logits, labels) < 1e-6


def test_confident_and_wrong_predictions_have_ece_near_one():
  labels = np.arange(10) % 3
  logits = 30.0 * np.eye(3, dtype=np.float32)[(labels + 1) % 3]
  assert metrics.expected_calibration_error(logits, labels) == pytest.approx(1.0, abs=1e-6)
  assert metrics.adaptive_calibration_error(logits, labels) == pytest.approx(1.0, abs=1e-6)


def test_single_example():
  logits = np.array([[2.0, 0.5, -1.0]], np.float32)
  conf = np.exp(np_log_softmax(logits)).max()
  for label, correct in [(0, 1.0), (2, 0.0)]:
    labels = np.array([label])
    assert metrics.expected_calibration_error(logits, labels) == pytest.approx(abs(correct - conf), rel=1e-6)
    assert metrics.adaptive_calibration_error(logits, labels) == pytest.approx(abs(correct - conf), rel=1e-6)
    assert metrics.accuracy(logits, labels) == correct


@pytest.mark.parametrize("seed,n,num_bins", [(0, 300, 15), (1, 301, 15), (2, 37, 4), (3, 6, 15)])
def test_adaptive_ece_matches_loop_reference(seed, n, num_bins):
  logits, labels = random_logits(seed, n=n)
  expected = np_adaptive_ece(logits, labels, num_bins)
  got = metrics.adaptive_calibration_error(logits, labels, num_bins)
  assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_adaptive_ece_by_hand():
  # Top-label confidences 0.8, 0.65, 0.9, 0.55, in no particular order.
  probs = np.array([[0.2, 0.8], [0.35, 0.65], [0.1, 0.9], [0.45, 0.55]])
  logits = np.log(probs).astype(np.float32)
  labels = np.array([1, 0, 1, 1])
  ace = metrics.adaptive_calibration_error(logits, labels, 2)
  # Equal mass: {0.55, 0.65} (1 of 2 correct), {0.8, 0.9} (2 of 2).
  assert ace == pytest.approx((abs(1 - 1.2) + abs(2 - 1.7)) / 4, rel=1e-5)


@pytest.mark.parametrize("fn", [
    metrics.accuracy, metrics.nll, metrics.expected_calibration_error,
    metrics.adaptive_calibration_error, metrics.reliability_diagram])
def test_bad_inputs_raise_clear_errors(fn):
  logits = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="shape"):
    fn(np.zeros(4, np.float32), np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="labels must have shape"):
    fn(logits, np.zeros(5, np.int32))
  with pytest.raises(ValueError, match="labels must have shape"):
    fn(logits, np.eye(3)[[0, 1, 2, 0]].astype(np.int32))  # one-hot
  with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
    fn(logits, np.array([0, 1, 2, 3]))
  with pytest.raises(TypeError, match="integer class indices"):
    fn(logits, np.zeros(4, np.float32))
  with pytest.raises(ValueError, match="0 examples"):
    fn(np.zeros((0, 3), np.float32), np.zeros(0, np.int32))


@pytest.mark.parametrize("fn", [
    metrics.expected_calibration_error, metrics.adaptive_calibration_error,
    metrics.reliability_diagram])
@pytest.mark.parametrize("num_bins", [0, -3, 2.5, True])
def test_bad_num_bins(fn, num_bins):
  with pytest.raises(ValueError, match="num_bins"):
    fn(np.zeros((2, 2), np.float32), np.array([0, 1]), num_bins)


# Hypothesis: logits drawn from a few rows, so that confidences tie often.
@st.composite
def logits_and_labels(draw):
  num_classes = draw(st.integers(2, 5))
  rows = draw(hnp.arrays(np.float32, (draw(st.integers(1, 4)), num_classes),
                         elements=st.floats(-8, 8, width=32)))
  n = draw(st.integers(1, 40))
  which = draw(hnp.arrays(np.int64, n, elements=st.integers(0, rows.shape[0] - 1)))
  labels = draw(hnp.arrays(np.int64, n, elements=st.integers(0, num_classes - 1)))
  return rows[which], labels


SETTINGS = hypothesis.settings(max_examples=40, deadline=None,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])


@SETTINGS
@hypothesis.given(logits_and_labels(), st.integers(1, 20))
def test_calibration_errors_are_in_unit_interval(data, num_bins):
  logits, labels = data
  for fn in (metrics.expected_calibration_error, metrics.adaptive_calibration_error):
    value = fn(logits, labels, num_bins)
    assert 0.0 <= value <= 1.0 + 1e-12
  diagram = metrics.reliability_diagram(logits, labels, num_bins)
  assert diagram["bin_count"].sum() == len(labels)
  assert np.all((diagram["bin_confidence"] >= diagram["bin_lower"] - 1e-7)
                | (diagram["bin_count"] == 0))
  assert np.all(diagram["bin_confidence"] <= diagram["bin_upper"] + 1e-7)


@SETTINGS
@hypothesis.given(logits_and_labels(), st.integers(1, 20), st.randoms(use_true_random=False))
def test_metrics_are_permutation_invariant(data, num_bins, random):
  logits, labels = data
  order = list(range(len(labels)))
  random.shuffle(order)
  for fn in (metrics.expected_calibration_error, metrics.adaptive_calibration_error):
    assert fn(logits[order], labels[order], num_bins) == pytest.approx(
        fn(logits, labels, num_bins), abs=1e-9)
  assert metrics.accuracy(logits[order], labels[order]) == pytest.approx(
      metrics.accuracy(logits, labels), abs=1e-12)


# --------------------------------------------------------------------------
# Top Hessian eigenvalue.
# --------------------------------------------------------------------------


def symmetric_with_spectrum(eigenvalues, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
  return (q * np.asarray(eigenvalues)) @ q.T


def unflatten(vector):
  """A 10-vector as the pytree {'a': (2, 3), 'b': (4,)}."""
  return {"a": jnp.asarray(vector[:6].reshape(2, 3), jnp.float32),
          "b": jnp.asarray(vector[6:], jnp.float32)}


def flatten(params):
  return jnp.concatenate([params["a"].reshape(-1), params["b"]])


@pytest.mark.parametrize("spectrum", [
    [5.0, 2.0, 1.0, 0.5, -0.5, -1.0, 0.1, 0.2, 0.3, 0.0],     # positive dominant
    [-6.0, 3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.3, 0.2],    # negative dominant
])
def test_top_eigenvalue_of_quadratic_matches_eigvalsh(spectrum):
  a = symmetric_with_spectrum(spectrum)
  a32 = jnp.asarray(a, jnp.float32)
  loss_fn = lambda p: 0.5 * flatten(p) @ a32 @ flatten(p) + jnp.sum(flatten(p))
  # The largest eigenvalue, not the largest in magnitude (power iteration's
  # answer, -6, in the second case): λ_max = 3 there.
  expected = np.linalg.eigvalsh(a)[-1]
  params = unflatten(np.random.default_rng(1).normal(size=10))
  got = metrics.top_hessian_eigenvalue(loss_fn, params, num_iters=60)  # 10 parameters: 10 steps
  assert isinstance(got, float)
  assert got == pytest.approx(expected, rel=1e-4)


def test_top_eigenvalue_converges_in_fewer_iterations_than_parameters():
  # 60 parameters, a decaying spectrum with a gap at the top: 20 Lanczos steps suffice.
  spectrum = np.concatenate([[10.0, 6.0], np.linspace(2.0, -1.0, 58)])
  a = jnp.asarray(symmetric_with_spectrum(spectrum, seed=2), jnp.float32)
  loss_fn = lambda w: 0.5 * w @ a @ w
  got = metrics.top_hessian_eigenvalue(loss_fn, jnp.ones(60), num_iters=20,
                                       key=jax.random.key(5))
  assert got == pytest.approx(10.0, rel=1e-4)
  assert got != pytest.approx(metrics.top_hessian_eigenvalue(loss_fn, jnp.ones(60), num_iters=2),
                              rel=1e-4)  # two steps are not enough: the iterations are used


def logistic_problem(seed=0, n=64):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)) * np.array([3.0, 1.5, 1.0, 0.5, 0.2])
  y = (rng.random(n) < 0.5).astype(np.float64)
  w = rng.normal(size=5) * 0.3
  b = 0.2
  return x, y, w, b


def np_logistic_hessian(x, y, w, b, l2):
  """Analytic ∇² of mean(softplus(z) − y z) + l2/2 ‖w‖², z = x w + b, in (w, b)."""
  del y  # the Hessian of the logistic loss does not depend on the labels
  x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  s = 1.0 / (1.0 + np.exp(-(x1 @ np.append(w, b))))
  hessian = (x1 * (s * (1 - s))[:, None]).T @ x1 / len(x)
  hessian[:5, :5] += l2 * np.eye(5)
  return hessian


def logistic_loss(x, y, l2):
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss_fn(params):
    z = xj @ params["w"] + params["b"]
    return jnp.mean(jax.nn.softplus(z) - yj * z) + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  return loss_fn


def test_top_eigenvalue_of_logistic_regression_matches_analytic_hessian():
  x, y, w, b = logistic_problem()
  l2 = 0.05
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.float32(b)}
  expected = np.linalg.eigvalsh(np_logistic_hessian(x, y, w, b, l2))[-1]
  got = metrics.top_hessian_eigenvalue(logistic_loss(x, y, l2), params, num_iters=4,
                                       key=jax.random.key(3))
  assert got == pytest.approx(expected, rel=1e-3)


@pytest.mark.xfail(strict=True, reason="sam_optax.sharpness: Lanczos breaks down on H = 0 (NaN)")
def test_top_eigenvalue_of_flat_loss_is_zero():
  loss_fn = lambda p: jnp.sum(p["a"]) + 3.0 * jnp.sum(p["b"])  # linear: H = 0
  assert metrics.top_hessian_eigenvalue(loss_fn, unflatten(np.ones(10))) == 0.0
  assert metrics.hessian_trace(loss_fn, unflatten(np.ones(10))) == (0.0, 0.0)


def test_hessian_trace_matches_analytic_hessian_within_its_standard_error():
  x, y, w, b = logistic_problem(seed=1)
  l2 = 0.05
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.float32(b)}
  hessian = np_logistic_hessian(x, y, w, b, l2)
  trace, stderr = metrics.hessian_trace(logistic_loss(x, y, l2), params, num_samples=200,
                                        key=jax.random.key(4))
  assert isinstance(trace, float) and isinstance(stderr, float)
  # Rademacher: Var(vᵀHv) = 2 Σ_{i≠j} H_ij², so the standard error is known.
  off = hessian - np.diag(np.diag(hessian))
  assert stderr == pytest.approx(np.sqrt(2 * np.sum(off ** 2) / 200), rel=0.3)
  assert abs(trace - np.trace(hessian)) <= 3 * stderr
  # A diagonal Hessian: every probe gives the trace exactly.
  exact, zero = metrics.hessian_trace(lambda p: jnp.sum(jnp.arange(1.0, 4.0) * p ** 2),
                                      jnp.ones(3), num_samples=5)
  assert exact == pytest.approx(12.0, rel=1e-6) and zero == pytest.approx(0.0, abs=1e-6)


def test_top_eigenvalue_traces_the_loss_once():
  a = jnp.asarray(symmetric_with_spectrum([3.0, 1.0, 0.5, 0.2, 0.1, 0, 0, 0, 0, 0]), jnp.float32)
  traces = []

  def loss_fn(p):
    traces.append(1)  # runs only while tracing
    return 0.5 * flatten(p) @ a @ flatten(p)

  got = metrics.top_hessian_eigenvalue(loss_fn, unflatten(np.ones(10)), num_iters=10)
  assert got == pytest.approx(3.0, rel=1e-4)
  assert 1 <= len(traces) <= 2  # 10 products in one loop, one trace (+1 for the scalar check)


def test_m_sharpness_compiles_once_whatever_the_number_of_batches():
  def traces_for(num_batches):
    traces = []

    def loss_fn(w, batch):
      traces.append(1)  # runs only while tracing
      return jnp.mean((batch @ w) ** 2)

    batches = [jnp.ones((4, 3)) * i for i in range(num_batches)]
    metrics.m_sharpness(loss_fn, jnp.ones(3), batches, 0.1)
    return len(traces)

  assert 1 <= traces_for(2) == traces_for(12) <= 10  # batches stacked and scanned over


def test_top_eigenvalue_and_trace_bad_inputs():
  params = unflatten(np.ones(10))
  loss_fn = lambda p: jnp.sum(flatten(p) ** 2)
  with pytest.raises(ValueError, match="num_iters"):
    metrics.top_hessian_eigenvalue(loss_fn, params, num_iters=0)
  with pytest.raises(TypeError, match="loss_fn"):
    metrics.top_hessian_eigenvalue(None, params)
  with pytest.raises(TypeError, match="float"):
    metrics.top_hessian_eigenvalue(loss_fn, {"a": jnp.arange(3)})
  with pytest.raises(ValueError, match="scalar"):
    metrics.top_hessian_eigenvalue(lambda p: flatten(p) ** 2, params)
  with pytest.raises(ValueError, match="num_samples"):
    metrics.hessian_trace(loss_fn, params, num_samples=1)
  with pytest.raises(ValueError, match="scalar"):
    metrics.hessian_trace(lambda p: flatten(p) ** 2, params)


# --------------------------------------------------------------------------
# m-sharpness.
# --------------------------------------------------------------------------


def np_m_sharpness(x, y, w, b, rho, m):
  """Least squares L_B = mean (x w + b − y)² / 2 over groups of m examples."""
  values = []
  for start in range(0, len(x), m):
    xb, yb = x[start:start + m], y[start:start + m]
    loss = lambda w_, b_: 0.5 * np.mean((xb @ w_ + b_ - yb) ** 2)
    r = xb @ w + b - yb
    g_w, g_b = xb.T @ r / len(xb), r.mean()
    norm = math.sqrt(g_w @ g_w + g_b ** 2)
    values.append(loss(w + rho * g_w / norm, b + rho * g_b / norm) - loss(w, b))
  return np.mean(values)


@pytest.mark.parametrize("m", [4, 16, 64])
def test_m_sharpness_matches_numpy_on_quadratic(m):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(64, 5)), rng.normal(size=64)
  w, b = rng.normal(size=5), 0.3
  rho = 0.1

  def loss_fn(params, batch):
    xb, yb = batch
    return 0.5 * jnp.mean((xb @ params["w"] + params["b"] - yb) ** 2)

  batches = [(jnp.asarray(x[i:i + m], jnp.float32), jnp.asarray(y[i:i + m], jnp.float32))
             for i in range(0, 64, m)]
  params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.float32(b)}
  got = metrics.m_sharpness(loss_fn, params, batches, rho)
  expected = np_m_sharpness(x, y, w, b, rho, m)
  assert got == pytest.approx(expected, rel=1e-4)
  assert metrics.m_sharpness(loss_fn, params, iter(batches), 0.0) == 0.0


def test_m_sharpness_bad_inputs():
  loss_fn = lambda p, batch: jnp.sum(p * batch)
  params = jnp.ones(3)
  with pytest.raises(ValueError, match="batches is empty"):
    metrics.m_sharpness(loss_fn, params, [], 0.1)
  for rho in (-0.1, float("nan"), "0.1"):
    with pytest.raises(ValueError, match="rho"):
      metrics.m_sharpness(loss_fn, params, [jnp.ones(3)], rho)
  with pytest.raises(ValueError, match="scalar"):
    metrics.m_sharpness(lambda p, batch: p * batch, params, [jnp.ones(3)], 0.1)
  with pytest.raises(ValueError, match=r"same number m >= 1 .* \[2, 3\]"):
    metrics.m_sharpness(loss_fn, params, [jnp.ones(3), jnp.ones(2)], 0.1)
