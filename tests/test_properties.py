"""Properties of every method, checked with hypothesis on logistic regression.

* ρ = 0 returns the incoming gradient (CSAM with γ = 0, whose descent loss
  is then the cross-entropy; BSAM with ρ_max = ρ_min = 0 gives
  ``g + (g − ‖g‖/(‖g‖+δ) g) ≈ g``; GSAM's ``g⊥`` vanishes);
* a learning rate of 0 leaves the parameters unchanged (so every update is
  finite), with momentum SGD and with AdamW as the base;
* a zero incoming gradient gives finite updates, never NaN;
* bfloat16 parameters give bfloat16 updates close to the float32 run, and
  the global norm and inner product are accumulated in float32;
* results are identical with and without jit.

Shapes are fixed, so every method is compiled once (a cached jitted function
per method and dtype) and hypothesis varies only the values.
"""

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import sam_cases as cases
import sam_optax
from sam_optax import _ascent

N, D, CLASSES = 6, 3, 3
PROBLEM = cases.JaxProblem(
    ref.LogisticRegression(n=N, d=D, num_classes=CLASSES, steps=1),
    cases.cross_entropy_of(cases.logistic_logits), cases.logistic_logits)

SETTINGS = hypothesis.settings(
    max_examples=10, deadline=None, database=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    # Shrinking re-runs the eager path hundreds of times; the failing example
    # is reported as generated.
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])


def _floats(shape, bound=2.0):
  return hnp.arrays(np.float32, shape,
                    elements=st.floats(-bound, bound, width=32, allow_subnormal=False))


PARAMS = st.fixed_dictionaries({"kernel": _floats((D, CLASSES)), "bias": _floats((CLASSES,))})
BATCH = st.fixed_dictionaries({
    "x": _floats((N, D)),
    "y": hnp.arrays(np.int32, (N,), elements=st.integers(0, CLASSES - 1)),
})

CASE_IDS = [case.name for case in cases.CASES]


def _evaluate(case: cases.Case, params, batch, *, full: bool = True):
  """Everything the properties look at, for one method, params and batch.

  ``full=False`` computes only the surrogate gradient and the update at a
  zero gradient (the bf16 property), to keep each compiled program small.
  """
  grads = jax.grad(PROBLEM.loss_fn)(params, batch)
  out = {"grads": grads}

  tx = case.make(PROBLEM)
  out["surrogate"] = tx.update(grads, tx.init(params), params, batch=batch)[0]
  zeros = jax.tree.map(jnp.zeros_like, grads)
  out["zero_grad"] = tx.update(zeros, tx.init(params), params, batch=batch)[0]
  if not full:
    return out

  zero = case.make_zero(PROBLEM)
  out["rho_zero"] = zero.update(grads, zero.init(params), params, batch=batch)[0]

  for base_name, base in [("sgd", optax.sgd(0.0, momentum=0.9)),
                          ("adamw", optax.adamw(0.0, weight_decay=0.1))]:
    chained = optax.chain(case.make(PROBLEM), base)
    new_params, _ = cases.make_step(chained, PROBLEM.loss_fn)(
        params, chained.init(params), batch)
    out[f"lr_zero_{base_name}"] = new_params
  return out


@functools.cache
def jitted(name: str, full: bool = True):
  """One compiled evaluation per method (and per input dtype, by jax's cache)."""
  return jax.jit(functools.partial(_evaluate, cases.CASES_BY_NAME[name], full=full))


def _assert_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("name", CASE_IDS)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_rho_zero_returns_the_incoming_gradient(name, params, batch):
  out = jitted(name)(params, batch)
  # GSAM, BSAM and StableSAM deviate from g by terms of order δ/‖g‖.
  _assert_close(out["rho_zero"], out["grads"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CASE_IDS)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_learning_rate_zero_leaves_params_unchanged(name, params, batch):
  out = jitted(name)(params, batch)
  for base in ("sgd", "adamw"):
    jax.tree.map(np.testing.assert_array_equal, out[f"lr_zero_{base}"], params)


@pytest.mark.parametrize("name", CASE_IDS)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_zero_gradient_gives_finite_updates(name, params, batch):
  out = jitted(name)(params, batch)
  for leaf in jax.tree.leaves(out["zero_grad"]):
    assert np.all(np.isfinite(leaf)), (name, out["zero_grad"])
  if name.startswith("stable_"):
    # ‖g‖ = 0 rescales the surrogate to zero.
    jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), out["zero_grad"])


@pytest.mark.parametrize("name", CASE_IDS)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_jit_and_eager_agree(name, params, batch):
  case = cases.CASES_BY_NAME[name]
  eager = _evaluate(case, params, batch, full=False)
  compiled = jitted(name, full=False)(params, batch)
  # XLA may fuse and reorder float32 arithmetic under jit: a few ulps, of the
  # largest terms that enter a component (GSAM's g_p − α g⊥ and BSAM's
  # g + g_max − r·g_min cancel), so the absolute part scales with the norms.
  scale = float(optax.tree.norm(eager["surrogate"]) + optax.tree.norm(eager["grads"]))
  _assert_close(compiled["surrogate"], eager["surrogate"], rtol=1e-6, atol=2e-6 * scale)


@pytest.mark.parametrize("name", CASE_IDS)
@SETTINGS
@hypothesis.given(params=PARAMS, batch=BATCH)
def test_bfloat16_params(name, params, batch):
  params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  # The float32 run starts from the same (bf16-representable) values.
  params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params16)
  out16 = jitted(name, full=False)(params16, batch)
  out32 = jitted(name, full=False)(params32, batch)
  for leaf in jax.tree.leaves(out16["surrogate"]) + jax.tree.leaves(out16["zero_grad"]):
    assert leaf.dtype == jnp.bfloat16
  # bf16 keeps 8 significant bits: the ascent point and every output are
  # rounded to ~0.4 %; allow a few of those relative to the gradient's size.
  scale = float(optax.tree.norm(out32["surrogate"])) + float(optax.tree.norm(out32["grads"]))
  difference = float(_ascent.global_norm(jax.tree.map(
      lambda a, b: jnp.asarray(a, jnp.float32) - b, out16["surrogate"], out32["surrogate"])))
  assert difference <= 0.05 * scale + 1e-3, (difference, scale)


# --------------------------------------------------------------------------
# Norms accumulated in float32 (the shared helpers every method uses).
# --------------------------------------------------------------------------


@SETTINGS
@hypothesis.given(
    steps=hnp.arrays(np.int32, (3, 64), elements=st.integers(-127, 127)),
    signs=hnp.arrays(np.int32, (3, 64), elements=st.sampled_from([-1, 1])))
def test_norm_and_inner_product_accumulate_in_float32(steps, signs):
  """On bf16 values ``±(1 + k·2⁻⁷)`` (exact in bf16, whose squares are not),
  the float32 results equal the float64 ones to float32 precision; squares
  or sums kept in bf16 would be off by ~1e-4 or more."""
  values = signs * (1.0 + steps * 2.0 ** -7)
  tree = {"a": jnp.asarray(values[0], jnp.bfloat16),
          "b": {"c": jnp.asarray(values[1:].reshape(2, 8, 8), jnp.bfloat16)}}
  other = jax.tree.map(lambda x: x[::-1], tree)
  flat = np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])
  flat_other = np.concatenate(
      [np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(other)])
  norm = _ascent.global_norm(tree)
  inner = _ascent.vdot(tree, other)
  assert norm.dtype == jnp.float32 and inner.dtype == jnp.float32
  np.testing.assert_allclose(float(norm), np.linalg.norm(flat), rtol=2e-7)
  np.testing.assert_allclose(float(inner), flat @ flat_other,
                             rtol=1e-6, atol=1e-6 * float(flat @ flat))


def test_bfloat16_sam_perturbs_with_the_float32_norm():
  """The SAM ascent of bf16 params uses ‖g‖ from float32 accumulation: with a
  loss whose gradient at ŵ is ŵ itself, the result is w + ρ g/‖g‖ rounded
  once to bf16, with ‖g‖ of the bf16 gradient taken exactly."""
  values = 1.0 + np.arange(-64, 64) * 2.0 ** -7
  params = jnp.asarray(values, jnp.bfloat16)
  grads = jnp.asarray(values[::-1], jnp.bfloat16)
  tx = sam_optax.sam(0.5, loss_fn=lambda w: 0.5 * jnp.sum(jnp.asarray(w, jnp.float32) ** 2))
  out = tx.update(grads, tx.init(params), params)[0]
  g64 = np.asarray(grads, np.float64)
  want = np.asarray(jnp.asarray(
      np.asarray(params, np.float64) + 0.5 * g64 / np.linalg.norm(g64), jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float64), np.asarray(want, np.float64))


def test_output_dtype_follows_the_incoming_gradient():
  """bf16 params with float32 gradients (mixed precision): every method
  returns float32, the dtype of its input, although the re-evaluated
  gradients at the bf16 ascent point are bf16."""
  params = cases.to_jax(PROBLEM.numpy.params)
  batch = cases.to_jax(PROBLEM.numpy.batches[0])
  params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  grads = jax.grad(PROBLEM.loss_fn)(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params16),
                                    batch)
  for case in cases.CASES:
    tx = case.make(PROBLEM)
    out = tx.update(grads, tx.init(params16), params16, batch=batch)[0]
    for leaf in jax.tree.leaves(out):
      assert leaf.dtype == jnp.float32, (case.name, leaf.dtype)
