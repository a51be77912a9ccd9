"""A method around part of the parameters: ``optax.masked`` / ``multi_transform``.

The loss re-evaluated at the perturbed point needs every parameter, so a
method that ``masked`` or ``multi_transform`` hands only some of them (the
others as ``optax.MaskedNode``) raises an error that says so and points to
``mask=``; the ``mask=`` rewrite it recommends perturbs only the labelled
leaves, checked against the formula.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

RHO = 0.05


def loss_fn(params, x):
  return jnp.mean(jnp.sin(x @ params["body"]) @ params["head"])


PARAMS = {"body": jnp.array([[0.3, -0.2], [0.1, 0.5], [-0.4, 0.2]]), "head": jnp.array([0.7, -1.1])}
X = jnp.array([[1.0, 2.0, -1.0], [0.5, -0.3, 0.8], [0.2, 0.1, 0.4], [-1.0, 0.6, 0.3]])
LABELS = {"body": "sam", "head": "plain"}


def _update(tx):
  grads = jax.grad(loss_fn)(PARAMS, X)
  return tx.update(grads, tx.init(PARAMS), PARAMS, x=X)[0]


MESSAGE = (r"update\(\) got only a part of the parameters \(optax.MaskedNode at \['head'\]\)"
           r": it is inside optax.masked or optax.multi_transform.*needs all of them.*mask=")


@pytest.mark.parametrize("make, method", [
    (lambda: optax.multi_transform(
        {"sam": optax.chain(sam_optax.sam(RHO, loss_fn=loss_fn), optax.sgd(0.1)),
         "plain": optax.sgd(0.1)}, LABELS), "sam"),
    (lambda: optax.masked(sam_optax.gsam(RHO, loss_fn=loss_fn), {"body": True, "head": False}),
     "gsam"),
    (lambda: optax.masked(sam_optax.looksam(RHO, k=2, loss_fn=loss_fn),
                          {"body": True, "head": False}), "looksam"),
    # Wrappers: at once, though eagerly a skipped step would not call the inner method.
    (lambda: optax.masked(sam_optax.with_probability(sam_optax.sam(RHO, loss_fn=loss_fn), 0.0),
                          {"body": True, "head": False}), "with_probability"),
    (lambda: optax.masked(sam_optax.every_k(sam_optax.sam(RHO, loss_fn=loss_fn), 2),
                          {"body": True, "head": False}), "every_k"),
    (lambda: optax.masked(sam_optax.stable_sam(sam_optax.usam(RHO, loss_fn=loss_fn)),
                          {"body": True, "head": False}), "stable_sam"),
])
def test_part_of_the_parameters_is_a_clear_error(make, method):
  with pytest.raises(ValueError, match=rf"{method}: {MESSAGE}"):
    _update(make())


def test_the_mask_rewrite_perturbs_only_the_labelled_leaves():
  """``chain(sam(mask=is_sam), multi_transform(bases, labels))``: the ascent
  ``ε = ρ m⊙g/‖m⊙g‖`` moves only the 'sam' leaves; every leaf gets
  ``∇L(w + ε)``, scaled by the base optimizer of its label."""
  is_sam = lambda params: jax.tree.map(lambda label: label == "sam", LABELS)
  tx = optax.chain(sam_optax.sam(RHO, loss_fn=loss_fn, mask=is_sam),
                   optax.multi_transform({"sam": optax.sgd(0.1), "plain": optax.sgd(0.2)},
                                         LABELS))
  got = _update(tx)

  g = jax.grad(loss_fn)(PARAMS, X)
  body = RHO * g["body"] / jnp.linalg.norm(g["body"])
  g_tilde = jax.grad(loss_fn)({"body": PARAMS["body"] + body, "head": PARAMS["head"]}, X)
  np.testing.assert_allclose(got["body"], -0.1 * g_tilde["body"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["head"], -0.2 * g_tilde["head"], rtol=1e-5, atol=1e-7)
  # Not the unmasked step: perturbing the head too moves the result.
  unmasked = _update(optax.chain(sam_optax.sam(RHO, loss_fn=loss_fn),
                                 optax.multi_transform({"sam": optax.sgd(0.1),
                                                        "plain": optax.sgd(0.2)}, LABELS)))
  assert float(jnp.max(jnp.abs(unmasked["head"] - got["head"]))) > 1e-5


def test_a_loss_missing_required_arguments_names_them():
  """Checked before the loss runs; a default or a keyword given is not missing."""
  def two_inputs(params, x, y, scale=1.0):
    return scale * loss_fn(params, x) + jnp.sum(y)

  tx = sam_optax.gsam(RHO, loss_fn=two_inputs)
  grads = jax.grad(loss_fn)(PARAMS, X)
  with pytest.raises(TypeError, match=r"gsam: loss_fn\(params, x, y, scale=1.0\) requires \['y'\],"
                     r" but update\(\) got \['x'\]: pass them to update\(..., name=value\)"):
    tx.update(grads, tx.init(PARAMS), PARAMS, x=X)
  tx.update(grads, tx.init(PARAMS), PARAMS, x=X, y=jnp.zeros(2))  # complete: runs
