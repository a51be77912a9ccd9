"""ESAM: stochastic weight perturbation and sharpness-sensitive data selection."""

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference as ref
import reference_cheap as cheap
import sam_optax
from cheap_cases import run_steps
from sam_cases import jax_problems, to_numpy

RHO, LR, MOMENTUM, STEPS, SEED = 0.2, 0.1, 0.9, 4, 7
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 against float64, over several steps
PROBLEMS = {problem.name: problem for problem in jax_problems()}


def per_example_loss_of(problem):
  def loss_fn(params, batch):
    logits, labels = problem.logits_fn(params, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss_fn


def make_esam_step(tx, loss_fn, pass_losses=True):
  """The documented training step: per-example losses passed to update."""

  def step(params, state, batch):
    mean_loss = lambda p: (lambda l: (l.mean(), l))(loss_fn(p, batch))
    (_, per_example), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    extra = {"per_example_losses": per_example} if pass_losses else {}
    updates, state = tx.update(grads, state, params, batch=batch, **extra)
    return optax.apply_updates(params, updates), state

  return step


def run(problem, steps=STEPS, pass_losses=True, **esam_kwargs):
  loss_fn = per_example_loss_of(problem)
  inner = sam_optax.esam(loss_fn=loss_fn, seed=SEED, **esam_kwargs)
  factory = lambda tx, loss_fn: make_esam_step(tx, loss_fn, pass_losses)
  return run_steps(inner, problem, steps, LR, MOMENTUM, factory, loss_fn)[0]


def documented_masks(params, beta, steps):
  """``bernoulli(split(fold_in(key(seed), t), n_leaves)[j], β)`` per leaf ``j``."""
  leaves, treedef = jax.tree.flatten(params)
  masks = []
  for t in range(steps):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(SEED), t), len(leaves))
    kept = [bool(jax.random.bernoulli(keys[j], beta)) for j in range(len(leaves))]
    masks.append(to_numpy(jax.tree.unflatten(treedef, [np.float64(m) for m in kept])))
  return masks


def numpy_esam(problem, rho, beta, gamma, steps=STEPS):
  masks = documented_masks(problem.params, beta, steps)

  def surrogate(g, w, p, batch, t):
    return cheap.esam(g, w, p, batch, rho, beta, gamma, masks[t])

  return ref.train(problem.numpy, surrogate, ref.SGD(LR, MOMENTUM), steps), masks


@pytest.mark.parametrize("name, beta, gamma, pass_losses", [
    ("logistic", 1.0, 0.5, True), ("mlp", 0.5, 0.5, True), ("mlp", 0.6, 0.3, False),
], ids=["logistic", "mlp", "mlp-losses_recomputed"])
def test_esam_matches_numpy(name, beta, gamma, pass_losses):
  """``pass_losses=False``: ``update`` recomputes ℓ_i(w) itself; the result is the same."""
  problem = PROBLEMS[name]
  history = run(problem, pass_losses=pass_losses, rho=RHO, beta=beta, gamma=gamma)
  expected, masks = numpy_esam(problem, RHO, beta, gamma)
  for got, want in zip(history, expected):
    chex.assert_trees_all_close(to_numpy(got), want, **TOL)
  if beta < 1:  # the masks vary: some tensors kept, some not
    kept = [m for mask in masks for m in ref.leaves(mask)]
    assert 0 < sum(float(m) for m in kept) < len(kept)


def test_beta_and_gamma_one_is_sam():
  problem = PROBLEMS["logistic"]
  history = run(problem, steps=3, rho=RHO, beta=1.0, gamma=1.0)
  expected = ref.train(problem.numpy, lambda g, w, p, b, t: ref.sam(
      g, w, lambda v: p.grad(v, b), RHO), ref.SGD(LR, MOMENTUM), 3)
  chex.assert_trees_all_close(to_numpy(history[-1]), expected[-1], **TOL)


def test_selection_takes_the_sharpest_examples():
  """With a loss whose sharpness per example is known, the chosen ones are the top ⌈γB⌉."""
  batch_size, gamma = 8, 0.3
  weights = jnp.arange(batch_size, dtype=jnp.float32)[::-1]  # example 0 is sharpest
  loss_fn = lambda params, batch: batch["c"] * params["w"] ** 2
  tx = sam_optax.esam(1.0, beta=1.0, gamma=gamma, loss_fn=loss_fn)
  params = {"w": jnp.float32(1.0)}
  batch = {"c": weights}
  grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  # ⌈0.3 · 8⌉ = 3 examples of highest score 3·c_i: c = 7, 6, 5, at ŵ = w + ρ = 2.
  np.testing.assert_allclose(updates["w"], np.mean([7.0, 6.0, 5.0]) * 2 * 2.0, rtol=1e-6)
  with_aux = sam_optax.esam(1.0, beta=1.0, gamma=gamma, has_aux=True,
                            loss_fn=lambda params, batch: (loss_fn(params, batch), {"n": 1}))
  chex.assert_trees_all_equal(
      with_aux.update(grads, with_aux.init(params), params, batch=batch)[0], updates)


_kernel = hnp.arrays(np.float32, (4, 3), elements=st.floats(-3, 3, width=32))
LOGISTIC = PROBLEMS["logistic"]
_PLAIN = sam_optax.esam(0.0, beta=0.5, gamma=1.0, loss_fn=per_example_loss_of(LOGISTIC))
_ZERO_LOSS = lambda params, batch: 0.0 * batch["y"] * jnp.sum(params["kernel"])
_FLAT = sam_optax.esam(0.1, beta=0.5, gamma=0.5, loss_fn=_ZERO_LOSS)


@jax.jit
def _plain_and_flat(params, batch):
  grads = jax.grad(lambda p: per_example_loss_of(LOGISTIC)(p, batch).mean())(params)
  plain, _ = _PLAIN.update(grads, _PLAIN.init(params), params, batch=batch)
  zero = jax.grad(lambda p: _ZERO_LOSS(p, batch).mean())(params)
  flat, _ = _FLAT.update(zero, _FLAT.init(params), params, batch=batch)
  return grads, plain, flat


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(_kernel)
def test_rho_zero_and_gamma_one_give_the_plain_gradient_and_zero_stays_finite(kernel):
  params = {**LOGISTIC.params, "kernel": jnp.asarray(kernel)}
  grads, plain, flat = _plain_and_flat(params, LOGISTIC.batch(0))
  chex.assert_trees_all_close(plain, grads, rtol=1e-6, atol=1e-7)
  chex.assert_tree_all_finite(flat)
  chex.assert_trees_all_equal(flat, jax.tree.map(jnp.zeros_like, params))


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_esam_step(self):
    pmap = self.variant.type == chex.ChexVariantType.WITH_PMAP
    problem = PROBLEMS["logistic"]
    loss_fn = per_example_loss_of(problem)
    tx = optax.chain(
        sam_optax.esam(RHO, beta=0.5, gamma=0.5, loss_fn=loss_fn, seed=SEED,
                       perturbation=sam_optax.PerDevice("i") if pmap else None),
        optax.sgd(LR, momentum=MOMENTUM))
    step = self.variant(make_esam_step(tx, loss_fn), **({"n_devices": 2} if pmap else {}))
    params, state = problem.params, tx.init(problem.params)
    for t in range(2):
      params, state = step(params, state, problem.batch(t))
    expected, _ = numpy_esam(problem, RHO, 0.5, 0.5, steps=2)
    chex.assert_trees_all_close(to_numpy(params), expected[-1], **TOL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), r"beta must be in \(0, 1\]"),
    (dict(gamma=1.5), r"gamma must be in \(0, 1\]"),
    (dict(rho=-0.1), "rho must be finite and >= 0"),
    (dict(batch_argnames="batch"), "batch_argnames must be a non-empty sequence"),
    (dict(seed=1.5), "seed must be an int"),
])
def test_constructor_errors(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    sam_optax.esam(**kwargs)


def test_update_errors():
  problem = PROBLEMS["logistic"]
  params, batch = problem.params, problem.batch(0)
  grads = jax.grad(problem.loss_fn)(params, batch)
  mean_loss = sam_optax.esam(loss_fn=problem.loss_fn)
  with pytest.raises(ValueError, match="per-example losses, a float array of shape"):
    mean_loss.update(grads, mean_loss.init(params), params, batch=batch)
  tx = sam_optax.esam(loss_fn=lambda params, data: per_example_loss_of(problem)(params, data))
  with pytest.raises(ValueError, match=r"update\(\) got no \['batch'\]"):
    tx.update(grads, tx.init(params), params, data=batch)
  wrong = sam_optax.esam(loss_fn=lambda params, batch, scale: scale[0] * per_example_loss_of(
      problem)(params, batch), batch_argnames=("batch", "scale"))
  with pytest.raises(ValueError, match=r"batch axis first, of size B = 8"):
    wrong.update(grads, wrong.init(params), params, batch=batch, scale=jnp.ones(3))
  tx = sam_optax.esam(loss_fn=per_example_loss_of(problem))
  with pytest.raises(ValueError, match=r"per_example_losses must have the shape \[B\]"):
    tx.update(grads, tx.init(params), params, batch=batch, per_example_losses=jnp.ones(3))
