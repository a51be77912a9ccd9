"""CSAM's calibrated cross-entropy and ``rho_schedule_from_lr`` against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import sam_optax
from sam_optax.losses import calibrated_cross_entropy

GAMMAS = [0.0, 0.5, 1.0, 2.0]


def _logits_and_labels(seed=0, n=16, num_classes=4, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = np.asarray(scale * rng.normal(size=(n, num_classes)), np.float32)
  labels = rng.integers(0, num_classes, size=n).astype(np.int32)
  labels[::2] = logits[::2].argmax(axis=-1)  # confident, correct examples too
  return logits, labels


def _true_class_probability(logits, labels):
  return np.exp(ref.log_softmax(logits.astype(np.float64)))[np.arange(len(labels)), labels]


@pytest.mark.parametrize("kwargs", [dict(seed=0), dict(seed=1), dict(seed=4, n=6, num_classes=3)])
def test_test_data_covers_both_branches(kwargs):
  """The data of the tests below has examples on both sides of p_y = ½."""
  logits, labels = _logits_and_labels(**kwargs)
  p = _true_class_probability(logits, labels)
  assert (p > 0.5).sum() >= 2 and (p <= 0.5).sum() >= 2, p


@pytest.mark.parametrize("gamma", GAMMAS)
def test_calibrated_cross_entropy_matches_numpy(gamma):
  logits, labels = _logits_and_labels()
  got = calibrated_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), gamma)
  want = ref.calibrated_cross_entropy(logits.astype(np.float64), labels, gamma)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_calibrated_cross_entropy_gradient_matches_analytic(gamma):
  logits, labels = _logits_and_labels(seed=1)
  got = jax.grad(calibrated_cross_entropy)(jnp.asarray(logits), jnp.asarray(labels), gamma)
  want = ref.calibrated_cross_entropy_grad(logits.astype(np.float64), labels, gamma)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_reference_gradient_matches_finite_differences(gamma):
  """The hand-derived reference gradient is itself right (float64 central
  differences; no example sits near the p = ½ kink)."""
  logits, labels = _logits_and_labels(seed=4, n=6, num_classes=3)
  p = _true_class_probability(logits, labels)
  assert np.min(np.abs(p - 0.5)) > 1e-3
  numeric = ref.finite_difference_grad(
      lambda z: ref.calibrated_cross_entropy(z, labels, gamma), logits)
  analytic = ref.calibrated_cross_entropy_grad(logits.astype(np.float64), labels, gamma)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_gamma_zero_is_cross_entropy():
  logits, labels = _logits_and_labels(seed=3)
  got = calibrated_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.0)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_modulation_applies_only_above_one_half():
  # p_y = ½ exactly (logits [0, 0]): the plain branch, −log ½.
  half = calibrated_cross_entropy(jnp.zeros((1, 2)), jnp.array([0]), 1.0)
  np.testing.assert_allclose(float(half), math.log(2.0), rtol=1e-6)
  # p_y = σ(1) ≈ 0.73 > ½: −(1 + p)^(−γ) log p.
  p = 1.0 / (1.0 + math.exp(-1.0))
  above = calibrated_cross_entropy(jnp.array([[1.0, 0.0]]), jnp.array([0]), 2.0)
  np.testing.assert_allclose(float(above), -(1.0 + p) ** -2.0 * math.log(p), rtol=1e-6)
  # p_y = σ(−1) < ½ is unmodulated whatever γ.
  below = calibrated_cross_entropy(jnp.array([[1.0, 0.0]]), jnp.array([1]), 2.0)
  np.testing.assert_allclose(float(below), -math.log(1.0 - p), rtol=1e-6)


def test_leading_batch_dimensions_and_low_precision_logits():
  logits, labels = _logits_and_labels(seed=4, n=12)
  flat = calibrated_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 1.0)
  shaped = calibrated_cross_entropy(
      jnp.asarray(logits).reshape(3, 4, -1), jnp.asarray(labels).reshape(3, 4), 1.0)
  np.testing.assert_allclose(float(shaped), float(flat), rtol=1e-6)
  low = calibrated_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), 1.0)
  assert low.dtype == jnp.float32
  want = ref.calibrated_cross_entropy(
      np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64), labels, 1.0)
  np.testing.assert_allclose(float(low), want, rtol=1e-5)


def test_calibrated_cross_entropy_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"labels must be integer"):
    calibrated_cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2), 1.0)
  with pytest.raises(ValueError, match=r"logits must have shape \[\.\.\., num_classes\]"):
    calibrated_cross_entropy(jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32), 1.0)


# --------------------------------------------------------------------------
# rho_schedule_from_lr.
# --------------------------------------------------------------------------


def _numpy_warmup_cosine(count, peak=0.4, warmup=5, total=50, end=0.004):
  if count < warmup:
    return peak * count / warmup
  fraction = min(count - warmup, total - warmup) / (total - warmup)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * fraction))


def test_rho_schedule_is_linear_in_the_learning_rate():
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.4, 5, 50, end_value=0.004)
  rho = sam_optax.rho_schedule_from_lr(lr, rho_max=0.6, rho_min=0.1, lr_max=0.4, lr_min=0.004)
  for count in [5, 10, 27, 49, 50, 60]:
    lr_t = _numpy_warmup_cosine(count)
    want = 0.1 + (0.6 - 0.1) * (lr_t - 0.004) / (0.4 - 0.004)
    np.testing.assert_allclose(float(rho(count)), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(rho(5)), 0.6, rtol=1e-6)   # lr_max → ρ_max
  np.testing.assert_allclose(float(rho(50)), 0.1, rtol=1e-5)  # lr_min → ρ_min


def test_rho_schedule_works_under_jit_with_a_traced_count():
  lr = optax.cosine_decay_schedule(0.1, 20)
  rho = sam_optax.rho_schedule_from_lr(lr, rho_max=0.05, lr_max=0.1)
  counts = jnp.arange(21)
  got = jax.jit(jax.vmap(rho))(counts)
  want = [0.05 * 0.5 * (1 + math.cos(math.pi * c / 20)) for c in range(21)]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho_max=-0.1, lr_max=0.1), r"rho_max must be finite and >= 0"),
        (dict(rho_max=0.1, rho_min=float("nan"), lr_max=0.1), r"rho_min must be finite"),
        (dict(rho_max=0.1, lr_max=0.1, lr_min=0.1), r"need lr_max > lr_min"),
    ],
)
def test_rho_schedule_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sam_optax.rho_schedule_from_lr(optax.constant_schedule(0.1), **kwargs)


def test_rho_schedule_needs_a_schedule():
  with pytest.raises(TypeError, match=r"lr_schedule must be a function"):
    sam_optax.rho_schedule_from_lr(0.1, rho_max=0.05, lr_max=0.1)
