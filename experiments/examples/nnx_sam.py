"""SAM with Flax NNX and ``nnx.Optimizer``, BatchNorm included, on MNIST-1D.

``nnx.Optimizer.update(model, grads, **kwargs)`` passes its keywords to
``tx.update``, so the library's transforms chain as usual. The loss is written
functionally over ``(params, batch_stats)`` -- ``nnx.merge`` the graph with
them, run the model in training mode, return the new statistics as ``aux`` --
so the transform can re-evaluate it at the perturbed weights; the user's pass
updates the model's statistics, the re-evaluation's are dropped::

  python -m experiments.examples.nnx_sam --steps 200
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sam_optax
from experiments.examples import common


class CNN(nnx.Module):
  """MNIST-1D's small 1-D CNN: three convolutions with BatchNorm, a linear head."""

  def __init__(self, rngs: nnx.Rngs, channels: int = 32, num_classes: int = 10):
    self.convs = nnx.List([
        nnx.Conv(1 if i == 0 else channels, channels, (5,), strides=(1 if i == 0 else 2,),
                 use_bias=False, rngs=rngs) for i in range(3)])
    self.norms = nnx.List([nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)
                           for _ in range(3)])
    self.head = nnx.Linear(channels * 10, num_classes, rngs=rngs)

  def __call__(self, x):
    x = x[..., None]
    for conv, norm in zip(self.convs, self.norms):
      x = nnx.relu(norm(conv(x)))
    return self.head(x.reshape((x.shape[0], -1)))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  args = common.parse_args(__doc__.splitlines()[0], argv)
  data = common.load_data(args)
  model = CNN(nnx.Rngs(0))
  graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)

  def loss_fn(params, batch_stats, x, y):
    """Training-mode loss of the model with these weights and statistics."""
    network = nnx.merge(graphdef, params, batch_stats)
    logits = network(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, nnx.as_pure(nnx.state(network, nnx.BatchStat))

  tx = optax.chain(
      sam_optax.sam(args.rho, loss_fn=loss_fn, has_aux=True),
      optax.sgd(args.lr, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    model.train()
    params = nnx.state(model, nnx.Param)
    batch_stats = nnx.as_pure(nnx.state(model, nnx.BatchStat))  # plain arrays, traced
    (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    optimizer.update(model, grads, batch_stats=batch_stats, x=x, y=y)
    nnx.update(model, new_batch_stats)  # the user's pass sets the statistics
    return loss

  @nnx.jit
  def accuracy(model, x, y):
    model.eval()
    return jnp.mean(jnp.argmax(model(x), -1) == y)

  return common.train_and_report(lambda x, y: train_step(model, optimizer, x, y),
                                 lambda x, y: accuracy(model, x, y), data, args)


if __name__ == "__main__":
  main()
