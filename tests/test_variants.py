"""Every method under jit, without jit and under pmap, and m-sharpness.

``chex.variants`` runs one body per variant. Under ``with_pmap`` the batch is
sharded over the 8 fake CPU devices (set up by the root conftest) and the
method is built with ``axis_name``: each device perturbs with the gradient of
its own shard (m-sharpness), and only the surrogate gradients are averaged.
The expected values come from the NumPy references, per shard.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import reference as ref
import sam_cases as cases
import sam_optax
from devices import shard as shards

DEVICES = 8
AXIS = "i"
LR = 0.1
STEPS = 2
PROBLEM = cases.JaxProblem(
    ref.LogisticRegression(seed=5, n=2 * DEVICES, d=4, num_classes=3, steps=STEPS),
    cases.cross_entropy_of(cases.logistic_logits), cases.logistic_logits)


def numpy_shards(batch):
  """The same shards as :func:`shards`, as a list of NumPy batches."""
  return [{k: np.split(v, DEVICES)[i] for k, v in batch.items()} for i in range(DEVICES)]


def mean_trees(trees):
  return ref.tree_map(lambda *xs: np.mean(xs, axis=0), *trees)


def sharded_reference(case: cases.Case, w, batch, t):
  """The data-parallel surrogate: each shard's own ascent, then the mean.

  StableSAM rescales the averaged inner surrogate to the norm of the
  averaged incoming gradient.
  """
  problem = PROBLEM.numpy
  parts = numpy_shards(batch)
  grads = [problem.grad(w, part) for part in parts]
  if case.name.startswith("stable_"):
    inner = cases.CASES_BY_NAME[case.name[len("stable_"):]]
    surrogate = mean_trees([inner.reference(g, w, problem, part, t)
                            for g, part in zip(grads, parts)])
    return ref.stable(mean_trees(grads), surrogate)
  return mean_trees([case.reference(g, w, problem, part, t) for g, part in zip(grads, parts)])


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  for g, w in zip(ref.leaves(cases.to_numpy(got)), ref.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


CASE_PARAMS = [(case.name, case.name) for case in cases.CASES]


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.named_parameters(*CASE_PARAMS)
  def test_steps_match_reference(self, name):
    case = cases.CASES_BY_NAME[name]
    pmapped = self.variant.type is chex.ChexVariantType.WITH_PMAP
    tx = optax.chain(case.make(PROBLEM, axis_name=AXIS if pmapped else None),
                     optax.sgd(LR, momentum=0.9))
    step = self.variant(cases.make_step(tx, PROBLEM.loss_fn),
                        broadcast_args_to_devices=False, in_axes=(None, None, 0),
                        reduce_fn=None, axis_name=AXIS)

    params, state = PROBLEM.params, tx.init(PROBLEM.params)
    w, optimizer = ref.as_float64(PROBLEM.numpy.params), ref.SGD(LR)
    ref_state = optimizer.init(w)
    for t in range(STEPS):
      batch = PROBLEM.batch(t)
      params, state = step(params, state, shards(batch) if pmapped else batch)
      if pmapped:
        # Every device applied the same averaged update.
        for leaf in jax.tree.leaves((params, state)):
          np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaf)[:1].repeat(DEVICES, 0))
        params, state = jax.tree.map(lambda x: x[0], (params, state))
        surrogate = sharded_reference(case, w, PROBLEM.numpy.batches[t], t)
      else:
        surrogate = case.reference(PROBLEM.numpy.grad(w, PROBLEM.numpy.batches[t]), w,
                                   PROBLEM.numpy, PROBLEM.numpy.batches[t], t)
      w, ref_state = optimizer.step(w, surrogate, ref_state)
      assert_trees_close(params, w)
    self.assertEqual(int(jax.tree.leaves(state)[0]), STEPS)


# --------------------------------------------------------------------------
# m-sharpness: per-device perturbation against a loop over shards.
# --------------------------------------------------------------------------


def _single_device_surrogate(tx, grads, params, batch):
  return tx.update(grads, tx.init(params), params, batch=batch)[0]


def _pmapped_surrogates(case: cases.Case, params, batch):
  tx = case.make(PROBLEM, axis_name=AXIS)

  def local(params, shard):
    grads = jax.grad(PROBLEM.loss_fn)(params, shard)  # this shard's own gradient
    return _single_device_surrogate(tx, grads, params, shard)

  return jax.pmap(local, axis_name=AXIS, in_axes=(None, 0))(params, shards(batch))


class MSharpnessTest(parameterized.TestCase):

  @parameterized.named_parameters(*CASE_PARAMS)
  def test_each_device_perturbs_with_its_own_gradient(self, name):
    case = cases.CASES_BY_NAME[name]
    params, batch = PROBLEM.params, PROBLEM.batch(0)
    got = _pmapped_surrogates(case, params, batch)
    for leaf in jax.tree.leaves(got):  # averaged: identical on every device
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaf)[:1].repeat(DEVICES, 0))
    got = jax.tree.map(lambda x: x[0], got)

    single = case.make(PROBLEM)  # no axis_name: the one-device method
    parts = [jax.tree.map(lambda x, i=i: x[i], shards(batch)) for i in range(DEVICES)]
    local_grads = [jax.grad(PROBLEM.loss_fn)(params, part) for part in parts]
    mean_grads = jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), 0), *local_grads)

    if name.startswith("stable_"):
      # The inner surrogates are averaged, then rescaled to ‖mean g‖.
      inner = cases.CASES_BY_NAME[name[len("stable_"):]].make(PROBLEM)

      def loop(grads_of):
        s = [_single_device_surrogate(inner, grads_of(k), params, part)
             for k, part in enumerate(parts)]
        mean = jax.tree.map(lambda *x: jnp.mean(jnp.stack(x), 0), *s)
        return cases.to_jax(ref.stable(cases.to_numpy(mean_grads), cases.to_numpy(mean)))
    else:
      def loop(grads_of):
        s = [_single_device_surrogate(single, grads_of(k), params, part)
             for k, part in enumerate(parts)]
        return jax.tree.map(lambda *x: jnp.mean(jnp.stack(x), 0), *s)

    per_device = loop(lambda k: local_grads[k])
    synchronized = loop(lambda k: mean_grads)  # all perturb with the all-reduced g
    chex.assert_trees_all_close(got, per_device, rtol=1e-5, atol=1e-6)
    distance = float(optax.tree.norm(jax.tree.map(jnp.subtract, got, synchronized)))
    self.assertGreater(distance, 1e-3 * float(optax.tree.norm(got)))

  def test_stable_sam_rescales_to_the_norm_of_the_averaged_gradient(self):
    case = cases.CASES_BY_NAME["stable_usam"]
    params, batch = PROBLEM.params, PROBLEM.batch(1)
    got = jax.tree.map(lambda x: x[0], _pmapped_surrogates(case, params, batch))
    parts = [jax.tree.map(lambda x, i=i: x[i], shards(batch)) for i in range(DEVICES)]
    local_norms = [float(optax.tree.norm(jax.grad(PROBLEM.loss_fn)(params, part)))
                   for part in parts]
    full_norm = float(optax.tree.norm(jax.grad(PROBLEM.loss_fn)(params, batch)))
    np.testing.assert_allclose(float(optax.tree.norm(got)), full_norm, rtol=1e-5)
    # The averaged gradient is shorter than the shards' (they disagree).
    self.assertLess(full_norm, 0.9 * np.mean(local_norms))

  def test_stable_sam_rescales_to_the_whole_batch_norm(self):
    """With the inner method's axis, every device rescales to the norm of the
    whole batch's gradient and the devices stay in step (a local norm would
    give each device a different update)."""
    inner = sam_optax.usam(0.1, loss_fn=PROBLEM.loss_fn, perturbation=sam_optax.PerDevice(AXIS))
    tx = sam_optax.stable_sam(inner, axis_name=AXIS)

    def local(params, shard):
      grads = jax.grad(PROBLEM.loss_fn)(params, shard)
      out = tx.update(grads, tx.init(params), params, batch=shard)[0]
      return optax.tree.norm(out), optax.tree.norm(grads)

    norms, local_norms = jax.pmap(local, axis_name=AXIS, in_axes=(None, 0))(
        PROBLEM.params, shards(PROBLEM.batch(0)))
    full_norm = float(optax.tree.norm(jax.grad(PROBLEM.loss_fn)(PROBLEM.params, PROBLEM.batch(0))))
    np.testing.assert_allclose(np.asarray(norms), full_norm, rtol=1e-5)
    self.assertGreater(float(np.ptp(np.asarray(local_norms))), 1e-3)
