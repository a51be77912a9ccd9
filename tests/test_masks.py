"""Perturbation masks (``mask=``) against the float64 NumPy references.

A mask restricts the perturbation ``ε`` and the norm that scales it to the
masked leaves; the gradient is re-evaluated on every leaf, every leaf is
updated with it, and the rest of a method's rule (GSAM's decomposition,
LookSAM's ``g_v``, BSAM's flatness term) sees every leaf. Checked over
several training steps of the tiny MLP (two layers, so a mask can pick one
layer: layer-wise SAM) against ``reference.py`` with the mask given there.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import reference_cheap as cheap
import sam_cases as cases
import sam_optax
from cheap_cases import run_steps
from sam_cases import jax_problems, to_numpy

LR, MOMENTUM, STEPS = 0.1, 0.9, 4
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 against float64, over several steps
MLP = {problem.name: problem for problem in jax_problems()}["mlp"]

# The hidden layer's kernel only, and (as a prefix) the whole output layer.
MASKS = {
    "hidden_kernel": {"hidden": {"kernel": True, "bias": False}, "out": False},
    "out_layer": {"hidden": False, "out": True},
}


def _grad_at(batch):
  return lambda w: MLP.numpy.grad(w, batch)


def _reference(name, mask):
  """``surrogate(g, w, problem, batch, t)`` of method ``name`` with ``mask``."""
  rho = cases.RHO
  by_name = {
      "sam": lambda g, w, b: ref.sam(g, w, _grad_at(b), rho, mask=mask),
      "usam": lambda g, w, b: ref.usam(g, w, _grad_at(b), rho, mask=mask),
      "asam": lambda g, w, b: ref.asam(g, w, _grad_at(b), cases.ASAM_RHO, cases.ETA,
                                       mask=mask),
      "gsam": lambda g, w, b: ref.gsam(g, w, _grad_at(b), rho, cases.ALPHA, mask=mask),
      "bsam": lambda g, w, b: ref.bsam(g, w, _grad_at(b), cases.RHO_MAX, cases.RHO_MIN,
                                       mask=mask),
      "csam": lambda g, w, b: ref.csam(
          g, w, lambda v: MLP.numpy.calibrated_grad(v, b, cases.GAMMA), rho, mask=mask),
  }
  if name == "looksam":
    return cheap.LookSAM(rho, 2, 0.7, mask=mask)
  return lambda g, w, problem, batch, t: by_name[name](g, w, batch)


def _method(name, mask):
  loss_fn = MLP.loss_fn
  return {
      "sam": lambda: sam_optax.sam(cases.RHO, loss_fn=loss_fn, mask=mask),
      "usam": lambda: sam_optax.usam(cases.RHO, loss_fn=loss_fn, mask=mask),
      "asam": lambda: sam_optax.asam(cases.ASAM_RHO, eta=cases.ETA, loss_fn=loss_fn,
                                     mask=mask),
      "gsam": lambda: sam_optax.gsam(cases.RHO, alpha=cases.ALPHA, loss_fn=loss_fn,
                                     mask=mask),
      "bsam": lambda: sam_optax.bsam(cases.RHO_MAX, cases.RHO_MIN, loss_fn=loss_fn,
                                     mask=mask),
      "csam": lambda: sam_optax.csam(cases.RHO, gamma=cases.GAMMA,
                                     logits_fn=MLP.logits_fn, mask=mask),
      "looksam": lambda: sam_optax.looksam(cases.RHO, k=2, alpha=0.7, loss_fn=loss_fn,
                                           mask=mask),
      # ESAM with β = γ = 1 is SAM (its SWP mask keeps every tensor).
      "esam": lambda: sam_optax.esam(
          cases.RHO, beta=1.0, gamma=1.0, mask=mask,
          loss_fn=lambda p, batch: optax.softmax_cross_entropy_with_integer_labels(
              *cases.mlp_logits(p, batch))),
  }[name]()


METHODS = ["sam", "usam", "asam", "gsam", "bsam", "csam", "looksam", "esam"]


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("name", METHODS)
def test_masked_method_matches_numpy(name, mask_name):
  mask = MASKS[mask_name]
  history, _ = run_steps(_method(name, mask), MLP, STEPS, LR, MOMENTUM)
  reference = _reference("sam" if name == "esam" else name, mask)
  expected = ref.train(MLP.numpy, reference, ref.SGD(LR, MOMENTUM), STEPS)
  for got, want in zip(history, expected):
    chex.assert_trees_all_close(to_numpy(got), want, **TOL)
  # The mask matters: unmasked training ends elsewhere.
  unmasked = ref.train(MLP.numpy, _reference("sam" if name == "esam" else name, None),
                       ref.SGD(LR, MOMENTUM), STEPS)
  assert ref.norm(ref.add(expected[-1], -1.0, unmasked[-1])) > 1e-4


def test_every_leaf_is_updated_with_the_perturbed_gradient():
  """Leaves outside the mask get ∇L(ŵ), not the clean gradient."""
  mask = MASKS["out_layer"]
  params, batch = MLP.params, MLP.batch(0)
  grads = jax.grad(MLP.loss_fn)(params, batch)
  tx = sam_optax.sam(cases.RHO, loss_fn=MLP.loss_fn, mask=mask)
  got = tx.update(grads, tx.init(params), params, batch=batch)[0]
  want = ref.sam(to_numpy(grads), to_numpy(params), _grad_at(MLP.numpy.batches[0]),
                 cases.RHO, mask=mask)
  chex.assert_trees_all_close(to_numpy(got), want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got["hidden"]["kernel"], grads["hidden"]["kernel"])


def test_mask_function_equals_mask_tree_and_all_true_equals_no_mask():
  params, batch = MLP.params, MLP.batch(0)
  grads = jax.grad(MLP.loss_fn)(params, batch)

  def surrogate(mask):
    tx = sam_optax.gsam(cases.RHO, alpha=cases.ALPHA, loss_fn=MLP.loss_fn, mask=mask)
    return tx.update(grads, tx.init(params), params, batch=batch)[0]

  by_tree = surrogate(MASKS["hidden_kernel"])
  by_function = surrogate(lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path) == "['hidden']['kernel']", p))
  chex.assert_trees_all_equal(by_tree, by_function)
  chex.assert_trees_all_equal(surrogate(True), surrogate(None))
  # A mask of bool arrays (one per element) works under jit too.
  elementwise = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
  chex.assert_trees_all_close(
      jax.jit(lambda: surrogate(elementwise))(), surrogate(None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask, error, match", [
    ({"hidden": True}, ValueError, r"sam: mask must be a pytree of bools with the structure"
                                   r" of params \(or a prefix of it\)"),
    ({"hidden": 1, "out": True}, TypeError, r"sam: mask leaves must be bools .* got int 1"),
    ({"hidden": False, "out": False}, ValueError, r"sam: mask selects no parameter"),
])
def test_bad_masks(mask, error, match):
  params, batch = MLP.params, MLP.batch(0)
  grads = jax.grad(MLP.loss_fn)(params, batch)
  with pytest.raises(error, match=match):
    tx = sam_optax.sam(cases.RHO, loss_fn=MLP.loss_fn, mask=lambda p: mask)
    tx.update(grads, tx.init(params), params, batch=batch)


def test_a_bad_mask_tree_fails_at_construction():
  with pytest.raises(ValueError, match="sam: mask selects no parameter"):
    sam_optax.sam(0.1, mask={"w": False})


def test_masked_training_under_jit_and_chained_with_a_schedule():
  """SAM-ON-style mask given as a function, inside optax.inject_hyperparams."""
  mask = lambda p: {"hidden": False, "out": True}  # noqa: E731
  tx = optax.inject_hyperparams(sam_optax.sam, static_args=("loss_fn", "mask"))(
      rho=cases.RHO, loss_fn=MLP.loss_fn, mask=mask)
  history, _ = run_steps(tx, MLP, STEPS, LR, MOMENTUM)
  expected = ref.train(MLP.numpy, _reference("sam", mask(None)), ref.SGD(LR, MOMENTUM), STEPS)
  chex.assert_trees_all_close(to_numpy(history[-1]), expected[-1], **TOL)
