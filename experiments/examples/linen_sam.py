"""SAM with Flax linen and a TrainState, BatchNorm included, on MNIST-1D.

The library's canonical step with BatchNorm: the loss returns ``(loss,
new_batch_stats)`` and is given to the transform with ``has_aux=True``. The
user's first pass updates the statistics; the transform's re-evaluation at the
perturbed weights (training mode, batch statistics) drops its own::

  python -m experiments.examples.linen_sam --steps 200
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import sam_optax
from experiments.examples import common
from experiments.models import CNN1D


class TrainState(train_state.TrainState):
  batch_stats: dict


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  args = common.parse_args(__doc__.splitlines()[0], argv)
  data = common.load_data(args)
  model = CNN1D(num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 40)))

  def loss_fn(params, batch_stats, x, y):
    logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updated["batch_stats"]

  tx = optax.chain(
      sam_optax.sam(args.rho, loss_fn=loss_fn, has_aux=True),
      optax.sgd(args.lr, momentum=0.9))
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=variables["batch_stats"])

  @jax.jit
  def train_step(state, x, y):
    extra = {"batch_stats": state.batch_stats, "x": x, "y": y}
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, **extra)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, batch_stats=batch_stats)
    return state, loss

  @jax.jit
  def accuracy(state, x, y):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  def step(x, y):
    nonlocal state
    state, loss = train_step(state, x, y)
    return loss

  return common.train_and_report(step, lambda x, y: accuracy(state, x, y), data, args)


if __name__ == "__main__":
  main()
