"""A Flax model with BatchNorm trains with SAM; the statistics update once.

The pattern (copy it into your training step): the loss takes the batch
statistics as an extra argument and returns the new ones as ``aux``
(``has_aux=True``). Your own first pass gives the new statistics; the
re-evaluation at the ascent point uses the same inputs, and its ``aux`` is
dropped, so the running statistics are updated once per step, from ``w``::

  def loss_fn(params, batch_stats, batch):
    logits, mutated = model.apply(
        {"params": params, "batch_stats": batch_stats}, batch["x"],
        train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, mutated["batch_stats"]

  tx = optax.chain(sam_optax.sam(0.05, loss_fn=loss_fn, has_aux=True),
                   optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def train_step(params, batch_stats, opt_state, batch):
    (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   batch_stats=batch_stats, batch=batch)
    params = optax.apply_updates(params, updates)
    return params, new_batch_stats, opt_state, loss

The tests below execute this snippet as it is written here.
"""

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

RHO = 0.05  # the ρ of the snippet


class Net(nn.Module):
  """Dense → BatchNorm → ReLU → Dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    return nn.Dense(2)(x)


model = Net()


def _snippet(doc: str) -> str:
  """The indented code block after ``::`` in ``doc``, dedented."""
  lines = doc.split("::\n", 1)[1].splitlines()
  block = []
  for line in lines:
    if line and not line.startswith("  "):
      break
    block.append(line)
  return textwrap.dedent("\n".join(block))


# Run the documented snippet itself, with the names it uses.
_namespace = {"jax": jax, "optax": optax, "sam_optax": sam_optax, "model": model}
exec(compile(_snippet(__doc__), f"{__file__} (module docstring)", "exec"), _namespace)  # pylint: disable=exec-used
loss_fn, tx, train_step = _namespace["loss_fn"], _namespace["tx"], _namespace["train_step"]


# --------------------------------------------------------------------------


def make_batch(key, n=64):
  """Two classes separated by a shifted linear rule (features off-centre, so
  BatchNorm's statistics move away from their initial 0 / 1)."""
  x = 2.0 + 3.0 * jax.random.normal(key, (n, 4))
  y = (x @ jnp.array([1.0, -2.0, 0.5, 1.0]) > 3.0).astype(jnp.int32)
  return {"x": x, "y": y}


@pytest.fixture(scope="module")
def setup():
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)), train=False)
  return variables["params"], variables["batch_stats"]


def eval_loss(params, batch_stats, batch):
  logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"], train=False)
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean())


def test_trains_and_running_statistics_follow(setup):
  params, batch_stats = setup
  opt_state = tx.init(params)
  test_batch = make_batch(jax.random.PRNGKey(99), 256)
  first = eval_loss(params, batch_stats, test_batch)
  losses = []
  for step in range(20):
    batch = make_batch(jax.random.PRNGKey(step))
    params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, batch)
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  # Evaluation with the running statistics works too: they were kept.
  assert eval_loss(params, batch_stats, test_batch) < 0.5 * first
  assert int(opt_state[0].count) == 20


def test_statistics_are_those_of_the_first_pass_only(setup):
  params, batch_stats = setup
  opt_state = tx.init(params)
  batch = make_batch(jax.random.PRNGKey(7))
  # Warm the statistics up so that they differ from their initial values.
  for step in range(3):
    params, batch_stats, opt_state, _ = train_step(
        params, batch_stats, opt_state, make_batch(jax.random.PRNGKey(100 + step)))

  _, new_stats, _, _ = train_step(params, batch_stats, opt_state, batch)

  # A manual single forward pass at w, from the same statistics.
  _, once = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                        train=True, mutable=["batch_stats"])
  # (train_step is jitted, this forward is not: the batch means may sum in
  # another order, a few ulps of the largest statistic, not of one near 0.)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(b)))), new_stats, once["batch_stats"])

  # Updating a second time (the re-evaluation's forward pass at ŵ) would give
  # other statistics: this check can tell them apart.
  grads = jax.grad(lambda p: loss_fn(p, batch_stats, batch)[0])(params)
  scale = RHO / optax.tree.norm(grads)
  perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
  _, twice = model.apply({"params": perturbed, "batch_stats": once["batch_stats"]},
                         batch["x"], train=True, mutable=["batch_stats"])
  difference = optax.tree.norm(jax.tree.map(jnp.subtract, twice["batch_stats"], new_stats))
  assert float(difference) > 1e-3


def test_surrogate_is_the_gradient_at_the_ascent_point(setup):
  """With has_aux the re-evaluation takes the loss, not the statistics, and
  differentiates at ŵ = w + ρ g/‖g‖ with the same extra arguments."""
  params, batch_stats = setup
  batch = make_batch(jax.random.PRNGKey(3))
  grads = jax.grad(lambda p: loss_fn(p, batch_stats, batch)[0])(params)
  sam = sam_optax.sam(RHO, loss_fn=loss_fn, has_aux=True)
  surrogate, _ = sam.update(grads, sam.init(params), params,
                            batch_stats=batch_stats, batch=batch)
  scale = RHO / optax.tree.norm(grads)
  perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
  want = jax.grad(lambda p: loss_fn(p, batch_stats, batch)[0])(perturbed)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               surrogate, want)
  # and not the plain gradient
  assert float(optax.tree.norm(jax.tree.map(jnp.subtract, surrogate, grads))) > 1e-4
