"""Bad input gets a clear error naming the problem, at construction or trace."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

NAN, INF = float("nan"), float("inf")

PARAMS = {"kernel": jnp.array([1.0, -2.0, 0.5]), "bias": jnp.array(0.1)}
BATCH = {"x": jnp.array([[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]]), "y": jnp.array([1.0, -1.0])}


def loss_fn(params, batch):
  r = batch["x"] @ params["kernel"] + params["bias"] - batch["y"]
  return jnp.mean(r ** 2)


def logits_fn(params, batch):
  logits = jnp.stack([batch["x"] @ params["kernel"], jnp.zeros(2) + params["bias"]], -1)
  return logits, jnp.array([0, 1])


GRADS = jax.grad(loss_fn)(PARAMS, BATCH)


def update(tx, grads=GRADS, params=PARAMS, **extra):
  extra.setdefault("batch", BATCH)
  return tx.update(grads, tx.init(PARAMS), params, **extra)


# --------------------------------------------------------------------------
# Construction: radii and hyperparameters.
# --------------------------------------------------------------------------

# The radius and eps errors of every constructor: tests/test_common.py.


def test_schedule_checked_at_step_zero():
  with pytest.raises(ValueError, match=r"rho must be finite and >= 0.*schedule's value at step 0"):
    sam_optax.sam(lambda count: -0.1 + 0.0 * count, loss_fn=loss_fn)
  with pytest.raises(ValueError, match=r"bsam: rho_min must be finite"):
    sam_optax.bsam(0.05, optax.constant_schedule(NAN), loss_fn=loss_fn)


def test_rho_of_the_wrong_type():
  with pytest.raises(TypeError, match=r"sam: rho must be a float or an optax schedule, got str"):
    sam_optax.sam("0.05", loss_fn=loss_fn)


@pytest.mark.parametrize("value", [-0.01, NAN, INF])
def test_bad_eta(value):
  with pytest.raises(ValueError, match=r"asam: eta must be finite and >= 0, got eta="):
    sam_optax.asam(0.5, eta=value, loss_fn=loss_fn)


@pytest.mark.parametrize("value", [-0.1, NAN, INF])
def test_bad_alpha(value):
  with pytest.raises(ValueError, match=r"gsam: alpha must be finite and >= 0, got alpha="):
    sam_optax.gsam(0.05, alpha=value, loss_fn=loss_fn)


@pytest.mark.parametrize("value", [-0.5, 2.5, NAN, INF])
def test_gamma_outside_zero_two(value):
  with pytest.raises(ValueError, match=r"csam: gamma must be in \[0.0, 2.0\], got gamma="):
    sam_optax.csam(0.05, gamma=value, logits_fn=logits_fn)


def test_loss_fn_not_callable():
  with pytest.raises(TypeError, match=r"sam: loss_fn must be a function, got int"):
    sam_optax.sam(0.05, loss_fn=3)


def test_axis_name_not_a_string():
  with pytest.raises(TypeError, match=r"PerDevice: axis_name must be a non-empty string .* got 0"):
    sam_optax.PerDevice(0)
  with pytest.raises(TypeError, match=r"stable_sam: axis_name must be a non-empty string or None, got 0"):
    sam_optax.stable_sam(sam_optax.sam(0.05, loss_fn=loss_fn), axis_name=0)


def test_perturbation_not_an_option():
  with pytest.raises(TypeError, match=r"sam: perturbation must be None, sam_optax.PerDevice.*"
                     r"sam_optax.MicroBatches\(n, \.\.\.\), got str 'data'"):
    sam_optax.sam(0.05, loss_fn=loss_fn, perturbation="data")


# The accumulation options' own errors (n, batch_argnames, sequential, the
# methods that refuse one): tests/test_accumulation.py::test_construction_errors.
@pytest.mark.parametrize("make, error, match", [
    (lambda: sam_optax.MicroBatches(-1), ValueError, r"MicroBatches: n must be an int >= 1, got n=-1"),
    (lambda: sam_optax.MicroBatches(True), ValueError, r"MicroBatches: n must be an int >= 1, got n=True"),
    (lambda: sam_optax.MicroBatches(2, batch_argnames=()), TypeError,
     r"MicroBatches: batch_argnames must be a non-empty sequence .*got \(\)"),
    (lambda: sam_optax.Splits(2, sequential="yes"), TypeError,
     r"Splits: sequential must be a bool, got sequential='yes'"),
    (lambda: sam_optax.accumulated_grad(loss_fn, 2, has_aux=1), TypeError,
     r"accumulated_grad: has_aux must be a bool, got has_aux=1"),
])
def test_accumulation_option_errors(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_micro_batch_argument_missing():
  tx = sam_optax.sam(0.05, loss_fn=loss_fn, perturbation=sam_optax.MicroBatches(2))
  with pytest.raises(ValueError, match=r"sam: MicroBatches\(n=2\) splits along axis 0 the extra"
                     r" arguments \['batch'\], but update\(\) got no \['batch'\]"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, data=BATCH)


# --------------------------------------------------------------------------
# The loss: missing, twice, not a scalar, has_aux mismatch, unknown keywords.
# --------------------------------------------------------------------------


def test_loss_fn_missing():
  tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"sam: no loss_fn\. Pass loss_fn=\.\.\. to the constructor"):
    update(tx)


def test_loss_fn_at_update_works_like_the_constructor():
  by_keyword = update(optax.chain(sam_optax.sam(0.05), optax.sgd(0.1)), loss_fn=loss_fn)[0]
  built_in = update(optax.chain(sam_optax.sam(0.05, loss_fn=loss_fn), optax.sgd(0.1)))[0]
  jax.tree.map(np.testing.assert_array_equal, by_keyword, built_in)


def test_loss_fn_given_twice():
  other = lambda params, batch: 2.0 * loss_fn(params, batch)  # noqa: E731
  with pytest.raises(ValueError, match=r"loss_fn was given both to the constructor and to update"):
    update(sam_optax.sam(0.05, loss_fn=loss_fn), loss_fn=other)


def test_loss_not_a_scalar():
  def per_example(params, batch):
    return (batch["x"] @ params["kernel"] - batch["y"]) ** 2

  with pytest.raises(ValueError, match=r"loss_fn must return a scalar float loss, got an array of shape \(2,\)"):
    update(sam_optax.sam(0.05, loss_fn=per_example))


def test_loss_not_a_scalar_under_jit():
  def per_example(params, batch):
    return (batch["x"] @ params["kernel"] - batch["y"]) ** 2

  tx = sam_optax.gsam(0.05, loss_fn=per_example)
  with pytest.raises(ValueError, match=r"gsam: loss_fn must return a scalar float loss"):
    jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))(GRADS, tx.init(PARAMS), PARAMS, BATCH)


def test_has_aux_but_loss_returns_a_scalar():
  with pytest.raises(ValueError, match=r"has_aux=True, so loss_fn must return \(loss, aux\)"):
    update(sam_optax.sam(0.05, loss_fn=loss_fn, has_aux=True))


def test_loss_returns_aux_without_has_aux():
  def with_aux(params, batch):
    return loss_fn(params, batch), {"n": 2}

  with pytest.raises(ValueError, match=r"loss_fn returned a tuple of 2; .*pass has_aux=True"):
    update(sam_optax.bsam(0.05, 0.05, loss_fn=with_aux))


@pytest.mark.parametrize("make", [
    lambda: sam_optax.sam(0.05, loss_fn=loss_fn),
    lambda: sam_optax.stable_sam(sam_optax.asam(0.5, loss_fn=loss_fn)),
    lambda: sam_optax.csam(0.05, logits_fn=logits_fn),
], ids=["sam", "stable_asam", "csam"])
def test_unknown_keyword(make):
  tx = optax.chain(make(), optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"update\(\) got extra argument\(s\) \['btach'\] that (loss_fn|logits_fn)\(params, batch\) does not accept"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, btach=BATCH)


# --------------------------------------------------------------------------
# CSAM's logits_fn.
# --------------------------------------------------------------------------


def test_csam_needs_logits_fn():
  with pytest.raises(TypeError, match=r"logits_fn"):
    sam_optax.csam(0.05)  # pylint: disable=missing-kwoa
  with pytest.raises(TypeError, match=r"csam: logits_fn must be a function, got NoneType"):
    sam_optax.csam(0.05, logits_fn=None)


@pytest.mark.parametrize(
    "bad_logits_fn, match",
    [
        (lambda p, batch: (logits_fn(p, batch)[0], jnp.array([0, 1, 1])),
         r"csam: logits_fn: logits must have shape \[\.\.\., num_classes\] and labels the leading shape \[\.\.\.\], got logits \(2, 2\) and labels \(3,\)"),
        (lambda p, batch: (logits_fn(p, batch)[0][:, 0], jnp.array([0, 1])),
         r"logits must have shape \[\.\.\., num_classes\].*got logits \(2,\) and labels \(2,\)"),
        (lambda p, batch: (logits_fn(p, batch)[0], jnp.array([0.0, 1.0])),
         r"csam: logits_fn: labels must be integer class indices, got dtype float32"),
        (lambda p, batch: logits_fn(p, batch)[0],
         r"csam: logits_fn must return \(logits, labels\)"),
    ],
    ids=["labels-shape", "logits-rank", "float-labels", "no-labels"],
)
def test_csam_bad_logits_fn(bad_logits_fn, match):
  with pytest.raises(ValueError, match=match):
    update(sam_optax.csam(0.05, logits_fn=bad_logits_fn))


def test_csam_has_aux_shape():
  with pytest.raises(ValueError, match=r"as the first element of \(…, aux\) since has_aux=True"):
    update(sam_optax.csam(0.05, logits_fn=lambda p, batch: (1.0, 2.0, 3.0), has_aux=True))


# --------------------------------------------------------------------------
# Inputs of update.
# --------------------------------------------------------------------------


def test_params_none():
  tx = sam_optax.sam(0.05, loss_fn=loss_fn)
  with pytest.raises(ValueError, match=r"sam: update\(\) needs params"):
    tx.update(GRADS, tx.init(PARAMS), None, batch=BATCH)


def test_mismatched_structure():
  grads = {"kernel": GRADS["kernel"], "b": GRADS["bias"]}
  with pytest.raises(ValueError, match=r"asam: the gradient \(updates\) and params must be pytrees of the same structure"):
    update(sam_optax.asam(0.5, loss_fn=loss_fn), grads=grads)


def test_mismatched_shapes():
  grads = {"kernel": GRADS["kernel"][:2], "bias": GRADS["bias"]}
  with pytest.raises(ValueError, match=r"bsam: the gradient \(updates\) and params must be pytrees of the same structure and shapes"):
    update(sam_optax.bsam(loss_fn=loss_fn), grads=grads)


@pytest.mark.parametrize("make", [
    lambda: sam_optax.sam(0.05, loss_fn=loss_fn, perturbation=sam_optax.PerDevice("data")),
    lambda: sam_optax.stable_sam(sam_optax.usam(0.05, loss_fn=loss_fn), axis_name="data"),
], ids=["sam", "stable_sam"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_unbound_axis_name(make, jit):
  tx = make()
  fn = lambda g, s, p, b: tx.update(g, s, p, batch=b)  # noqa: E731
  fn = jax.jit(fn) if jit else fn
  with pytest.raises(ValueError, match=r"axis_name='data' is not bound: call the update inside jax\.pmap"):
    fn(GRADS, tx.init(PARAMS), PARAMS, BATCH)


@pytest.mark.parametrize("inner", [sam_optax.sam, 0.05, None, loss_fn],
                         ids=["constructor", "float", "none", "function"])
def test_stable_sam_needs_a_transform(inner):
  with pytest.raises(TypeError, match=r"stable_sam: inner must be an optax GradientTransformation"):
    sam_optax.stable_sam(inner)
