"""The Hessian's eigenvalue density of the main job's models, SGD against SAM.

``python -m experiments.spectrum`` trains the comparison's models
(``experiments/configs/default.py``: the 1-D CNN on MNIST-1D with 20 % of the
training labels flipped, seed 0) with SGD and with SAM, exactly as
``python -m experiments.compare`` trains them, then measures the Hessian of
the training loss that the comparison's λ_max column uses (mean cross-entropy
on ``config.hessian_examples`` training examples, noisy labels, evaluation
mode) with :mod:`sam_optax.sharpness`:

* its eigenvalue density by stochastic Lanczos quadrature
  (:func:`sam_optax.sharpness.hessian_spectral_density`), drawn on a log scale
  by :func:`experiments.plots.plot_spectral_density`;
* λ_max by Lanczos (the run's own report) and the trace by Hutchinson.

It writes ``spectral_density.png`` and ``spectral_density.json`` to
``--output-dir`` (default ``experiments/results/mnist1d``, beside the
comparison, whose ``results.json`` holds the λ_max that 20 power iterations
gave, on models trained the same way: the JSON puts both side by side when
the retrained models match the recorded ones). The committed figure took 14 min
of CPU (52 min of wall time on the shared, heavily loaded 2-core machine);
``--epochs`` shortens the training for a quick look.

  python -m experiments.spectrum
  python -m experiments.spectrum --methods sgd --epochs 2 --output-dir /tmp/spectrum
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from experiments import evaluate, input_pipeline, methods, plots, train
from experiments.configs import default as default_config
from sam_optax import sharpness

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mnist1d")


def spectrum_of(config, result, pipeline, *, num_iters: int, num_samples: int,
                trace_samples: int) -> dict[str, Any]:
  """The density, λ_max and trace of the trained model's training-loss Hessian."""
  model = train.make_model(config, pipeline)
  weights = evaluate.evaluated_weights(methods.get_method(config.method), result.state)
  sample = pipeline.train_sample(config.hessian_examples)
  loss_fn, params = evaluate.sample_loss(model, weights, sample)
  key = jax.random.key(config.seed)
  density = jax.jit(lambda p, k: sharpness.hessian_spectral_density(
      loss_fn, p, key=k, num_iters=num_iters, num_samples=num_samples))(params, key)
  trace, stderr = evaluate.hessian_trace(model, weights, sample, trace_samples, config.seed)
  return {
      "density": density,
      "lambda_max_lanczos": result.report["hessian_top_eigenvalue"],
      "trace": trace, "trace_stderr": stderr,
      "test_accuracy": result.report["test"]["accuracy"],
      "test_nll": result.report["test"]["nll"],
  }


def committed_power_iteration(output_dir: str) -> dict[str, Any]:
  """``{method: run}`` of the comparison's ``results.json`` there, if any (seed 0)."""
  path = os.path.join(output_dir, "results.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as stream:
    runs = json.load(stream)["runs"]
  return {name: results[0] for name, results in runs.items()}


def run(method_names: Sequence[str], output_dir: str, *, epochs: int | None = None,
        num_iters: int = 40, num_samples: int = 8, trace_samples: int = 100,
        log=lambda text: None) -> dict[str, Any]:
  """Trains each method, measures its spectrum, writes the figure and the JSON."""
  started = time.perf_counter()
  committed = committed_power_iteration(output_dir)
  pipeline = None
  out: dict[str, Any] = {}
  for name in method_names:
    config = default_config.get_config()
    config.method, config.seed = name, 0
    if epochs is not None:
      config.num_epochs = epochs
    if pipeline is None:
      pipeline = input_pipeline.get_pipeline(config, 0, 1)
    with tempfile.TemporaryDirectory() as workdir:
      result = train.train_and_evaluate(config, workdir, progress=False, pipeline=pipeline)
    out[name] = spectrum_of(config, result, pipeline, num_iters=num_iters,
                            num_samples=num_samples, trace_samples=trace_samples)
    previous = committed.get(name)
    same_model = (previous is not None and epochs is None
                  and previous["test"]["accuracy"] == out[name]["test_accuracy"]
                  and previous["test"]["nll"] == out[name]["test_nll"])
    out[name]["lambda_max_power_iteration"] = (
        previous["hessian_top_eigenvalue"] if same_model else None)
    log(f"{name}: λ_max {out[name]['lambda_max_lanczos']:.4f} (Lanczos)"
        + (f", {previous['hessian_top_eigenvalue']:.4f} (20 power iterations, results.json)"
           if same_model else "")
        + f"; trace {out[name]['trace']:.1f} ± {out[name]['trace_stderr']:.1f}")
  figure = plots.plot_spectral_density(
      {name: v["density"] for name, v in out.items()},
      os.path.join(output_dir, "spectral_density.png"),
      title="Hessian eigenvalue density, MNIST-1D 1-D CNN (20 % noisy labels)")
  summary = {
      "command": "python -m experiments.spectrum" + (
          f" --methods {','.join(method_names)}" if list(method_names) != ["sgd", "sam"] else "")
      + (f" --epochs {epochs}" if epochs is not None else ""),
      "settings": {"num_iters": num_iters, "num_samples": num_samples,
                   "trace_samples": trace_samples, "seed": 0, "epochs": epochs},
      "seconds": time.perf_counter() - started,
      "figure": os.path.basename(figure),
      "methods": {name: {**{k: v for k, v in values.items() if k != "density"},
                         "grid": np.asarray(values["density"].grid).tolist(),
                         "density": np.asarray(values["density"].density).tolist(),
                         "nodes": np.asarray(values["density"].nodes).tolist(),
                         "weights": np.asarray(values["density"].weights).tolist()}
                  for name, values in out.items()},
  }
  with open(os.path.join(output_dir, "spectral_density.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, default=float)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.spectrum",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", default="sgd,sam", help="registry methods, comma-separated")
  parser.add_argument("--epochs", type=int, default=None,
                      help="train this many epochs instead of the config's (a quick look)")
  parser.add_argument("--num-iters", type=int, default=40, help="Lanczos iterations of SLQ")
  parser.add_argument("--num-samples", type=int, default=8, help="probe vectors of SLQ")
  parser.add_argument("--output-dir", default=DEFAULT_OUTPUT)
  args = parser.parse_args(argv)
  names = [n for n in args.methods.split(",") if n]
  os.makedirs(args.output_dir, exist_ok=True)
  run(names, args.output_dir, epochs=args.epochs, num_iters=args.num_iters,
      num_samples=args.num_samples, log=lambda text: print(text, file=sys.stderr, flush=True))
  print(f"wrote {os.path.join(args.output_dir, 'spectral_density.png')}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
