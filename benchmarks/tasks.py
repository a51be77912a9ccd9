"""A benchmark task: a Flax model, one fixed batch and the loss of a training step.

The data's content does not change what a step costs, so every task uses one
synthetic batch (random inputs, random labels, example indices ``0..B-1``)
that is reused for every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
  """A model and a batch to benchmark the training step on.

  Attributes:
    name: short name (``resnet``, ``mnist1d``), used in tables and files.
    description: the model and batch in words, for the results file.
    apply: the Flax ``model.apply``.
    params: initial parameters.
    batch_stats: initial BatchNorm statistics (``{}`` for a model without).
    batch: ``{'x': inputs, 'y': integer labels, 'index': example indices}``.
    num_classes: number of classes.
    num_examples: size of the (notional) training set; SAF's logit bank has
      one row per example.
  """

  name: str
  description: str
  apply: Callable[..., Any]
  params: Any
  batch_stats: Any
  batch: Batch
  num_classes: int
  num_examples: int

  @property
  def has_batch_stats(self) -> bool:
    return bool(jax.tree.leaves(self.batch_stats))

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

  @property
  def param_bytes(self) -> int:
    """Bytes of one copy of the parameters: the unit of the memory figures."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))

  def forward(self, params, batch_stats, x, train: bool = True):
    """``(logits, new_batch_stats)``; ``train`` uses the batch's statistics."""
    if not self.has_batch_stats:
      return self.apply({"params": params}, x, train=train), batch_stats
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
      return self.apply(variables, x, train=False), batch_stats
    logits, mutated = self.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, mutated["batch_stats"]

  def per_example_loss_fn(self, params, batch, batch_stats):
    """Per-example cross-entropy ``[B]`` and ``(new_batch_stats, logits)`` as aux."""
    logits, new_stats = self.forward(params, batch_stats, batch["x"], train=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return losses, (new_stats, logits)

  def loss_fn(self, params, batch, batch_stats):
    """Mean cross-entropy and ``(new_batch_stats, logits)`` as aux.

    The signature ``loss_fn(params, batch, batch_stats)`` is the one the
    sam_optax methods re-evaluate, with ``has_aux=True``.
    """
    losses, aux = self.per_example_loss_fn(params, batch, batch_stats)
    return losses.mean(), aux

  def logits_fn(self, params, batch, batch_stats):
    """``(logits, labels)``: what :func:`sam_optax.csam` re-evaluates."""
    logits, _ = self.forward(params, batch_stats, batch["x"], train=True)
    return logits, batch["y"]


def make_task(
    name: str,
    description: str,
    model: Any,
    input_shape: tuple[int, ...],
    num_classes: int,
    batch_size: int,
    num_examples: int,
    seed: int = 0,
) -> Task:
  """Initializes ``model`` and draws one random batch of ``batch_size``."""
  if batch_size < 1:
    raise ValueError(f"make_task: batch_size must be >= 1, got {batch_size!r}.")
  if num_examples < batch_size:
    raise ValueError(
        f"make_task: num_examples ({num_examples}) must be >= batch_size"
        f" ({batch_size}).")
  init_key, x_key, y_key = jax.random.split(jax.random.key(seed), 3)
  variables = model.init(init_key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
  batch = {
      "x": jax.random.normal(x_key, (batch_size, *input_shape), jnp.float32),
      "y": jax.random.randint(y_key, (batch_size,), 0, num_classes),
      "index": jnp.arange(batch_size, dtype=jnp.int32),
  }
  return Task(
      name=name, description=description, apply=model.apply,
      params=variables["params"], batch_stats=variables.get("batch_stats", {}),
      batch=batch, num_classes=num_classes, num_examples=num_examples,
  )


# The two tasks of issue 7. ``width`` multiplies the channels (ResNet) or the
# hidden units (MNIST-1D MLP); the scaling study uses 1, 2 and 4.
RESNET_WIDTH = 0.125          # ResNet-18 (CIFAR stem) with 8 base channels
MNIST1D_FEATURES = (100, 100)  # MNIST-1D's MLP baseline


def resnet_task(batch_size: int = 128, width: float = 1.0, seed: int = 0) -> Task:
  """ResNet-18 (CIFAR stem, BatchNorm) at ``RESNET_WIDTH × width`` on 32×32×3."""
  from experiments.models import get_model  # pylint: disable=import-outside-toplevel
  channels = RESNET_WIDTH * width
  model = get_model("resnet18", num_classes=10, width=channels)
  base = max(1, int(round(64 * channels)))
  return make_task(
      "resnet",
      f"ResNet-18, CIFAR stem, {base} base channels (width {channels:g}),"
      f" BatchNorm, 32×32×3 inputs, 10 classes, batch {batch_size}",
      model, (32, 32, 3), 10, batch_size, num_examples=50_000, seed=seed,
  )


def mnist1d_task(batch_size: int = 128, width: float = 1.0, seed: int = 0) -> Task:
  """MNIST-1D's default MLP (2 × 100 ReLU units, × ``width``) on length-40 inputs."""
  from experiments.models import get_model  # pylint: disable=import-outside-toplevel
  features = tuple(int(round(f * width)) for f in MNIST1D_FEATURES)
  model = get_model("mlp", num_classes=10, features=features)
  return make_task(
      "mnist1d",
      f"MNIST-1D MLP {' × '.join(map(str, features))} (ReLU), inputs of length 40,"
      f" 10 classes, batch {batch_size}",
      model, (40,), 10, batch_size, num_examples=4_000, seed=seed,
  )


TASKS: dict[str, Callable[..., Task]] = {
    "resnet": resnet_task,
    "mnist1d": mnist1d_task,
}
