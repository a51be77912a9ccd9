"""Float32 accumulation and dtypes, checked with hypothesis.

The properties every constructor shares (ρ = 0, a zero gradient, a zero
learning rate, bfloat16, jit) are in ``test_common.py``. Here: the global
norm and inner product are accumulated in float32, SAM's bf16 ascent uses
that norm, and the output dtype follows the incoming gradient.
"""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import reference as ref
import sam_cases as cases
import sam_optax
from sam_optax import _numerics

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
  norm = _numerics.global_norm(tree)
  inner = _numerics.vdot(tree, other)
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
