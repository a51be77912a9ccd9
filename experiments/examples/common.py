"""What the two examples share: their flags, the data and the loop that reports."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments.input_pipeline import make_mnist1d


def parse_args(description: str, argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--steps", type=int, default=200, help="training steps")
  parser.add_argument("--batch-size", type=int, default=100, help="batch size")
  parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
  parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius ρ")
  parser.add_argument("--num-samples", type=int, default=5000, help="MNIST-1D size")
  return parser.parse_args(argv)


def load_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
  """MNIST-1D, generated in memory (no download)."""
  return make_mnist1d(num_samples=args.num_samples)


def train_and_report(step: Callable[[np.ndarray, np.ndarray], Any],
                     accuracy: Callable[[np.ndarray, np.ndarray], Any],
                     data: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, float]:
  """Runs ``step(x, y) -> loss`` on random batches; returns the last loss and test accuracy."""
  rng = np.random.default_rng(0)
  loss = float("nan")
  for index in range(args.steps):
    batch = rng.choice(len(data["y"]), args.batch_size, replace=False)
    loss = step(data["x"][batch], data["y"][batch])
    if (index + 1) % 100 == 0 or index + 1 == args.steps:
      print(f"step {index + 1}: loss {float(loss):.4f}")
  result = {"loss": float(loss), "test_accuracy": float(accuracy(data["x_test"], data["y_test"]))}
  print(f"test accuracy {result['test_accuracy']:.4f}")
  return result
