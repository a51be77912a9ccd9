"""The main job: train every method on the same setting and compare them.

``python -m experiments.compare`` runs the default comparison
(``experiments/configs/default.py``: a small CNN on MNIST-1D with 20 % of the
training labels flipped; generated in memory, nothing is downloaded) with
every method of ``config.methods`` -- SGD, SAM, CSAM, StableSAM, SAF, MESA,
BSAM, ASAM, GSAM -- and writes to the output folder it prints at the end:

* ``results.md`` -- the table: test accuracy, NLL, ECE (15 bins), adaptive
  ECE, top Hessian eigenvalue, accuracy on the (noisy) training labels and the
  gradient evaluations per step (the cost; step times are measured by
  ``benchmarks/``, methods interleaved, never by back-to-back runs whose
  machine load drifts);
* ``results.json`` -- the same numbers with each method's learning curves,
  reliability diagram, hyperparameters, the config and the machine;
* ``learning_curves.png``, ``reliability_diagrams.png``;
* ``runs/<method>/`` -- each run's ``results.json`` and checkpoints
  (``--resume`` finishes an interrupted comparison).

Every method shares the model, the initialization, the data order, the base
optimizer and the seed; only the transform chained before the base optimizer
differs. The loop over methods only calls :func:`experiments.train.train_and_evaluate`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from experiments import checkpoints, input_pipeline, plots, train
from experiments import main as cli
from experiments.config_checks import validate_config
from experiments.errors import UsageError

_COLUMNS = [
    # (header, key in a row, format)
    ("Method", "method", "{}"),
    ("Test acc. (%)", "accuracy", "{:.1f}"),
    ("NLL", "nll", "{:.3f}"),
    ("ECE (%)", "ece", "{:.1f}"),
    ("Adaptive ECE (%)", "adaptive_ece", "{:.1f}"),
    ("λ_max (Hessian)", "hessian", "{:.1f}"),
    ("Train acc., noisy labels (%)", "train_accuracy", "{:.1f}"),
    ("Gradients / step", "passes", "{}"),
]


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return math.nan, math.nan
  return float(np.mean(values)), float(np.std(values)) if len(values) > 1 else 0.0


def summarize(name: str, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """One row of the table from the runs (seeds) of a method: means and stds."""
  percent = lambda x: None if x is None else 100.0 * x
  fields = {
      "accuracy": [percent(r["test"]["accuracy"]) for r in runs],
      "nll": [r["test"]["nll"] for r in runs],
      "ece": [percent(r["test"]["ece"]) for r in runs],
      "adaptive_ece": [percent(r["test"]["adaptive_ece"]) for r in runs],
      "hessian": [r["hessian_top_eigenvalue"] for r in runs],
      "train_accuracy": [percent(r["train_sample_accuracy"]) for r in runs],
  }
  row: dict[str, Any] = {"method": name, "seeds": len(runs),
                         "evaluated": runs[0].get("evaluated", "trained weights")}
  for key, values in fields.items():
    row[key], row[key + "_std"] = _mean_std(values)
  first = runs[0]
  extra = f" + {first['forwards_per_step']} fwd" if first.get("forwards_per_step") else ""
  row["passes"] = f"{first['gradients_per_step']}{extra}"
  row["hparams"] = first["hparams"]
  return row


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The rows as a Markdown table (``mean ± std`` when there are several seeds)."""
  lines = ["| " + " | ".join(h for h, _, _ in _COLUMNS) + " |",
           "|" + "|".join("---" if k == "method" else "---:" for _, k, _ in _COLUMNS) + "|"]
  for row in rows:
    cells = []
    for _, key, fmt in _COLUMNS:
      value = row.get(key)
      if isinstance(value, float):
        if not math.isfinite(value):
          cells.append("–")
          continue
        text = fmt.format(value)
        std = row.get(key + "_std")
        if row.get("seeds", 1) > 1 and std is not None and math.isfinite(std):
          text += " ± " + fmt.format(std)
        cells.append(text)
      else:
        cells.append(fmt.format(value))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _hparams_text(rows: Sequence[Mapping[str, Any]]) -> str:
  parts = []
  for row in rows:
    if row["hparams"]:
      values = ", ".join(f"{k}={v}" for k, v in row["hparams"].items())
      parts.append(f"{row['method']} ({values})")
  return "; ".join(parts)


def describe(config, rows, wall_time: float, machine: Mapping[str, Any]) -> str:
  """``results.md``: the setting, the table and how it was measured."""
  noise = f"{100 * config.label_noise:g} % of the training labels flipped"
  evaluated_ema = [r["method"] for r in rows if r["evaluated"] != "trained weights"]
  seeds = rows[0]["seeds"] if rows else 0
  text = [
      f"# Comparison: {config.model} on {config.dataset}, {noise}",
      "",
      f"{config.num_epochs} epochs, batch {config.batch_size}, base optimizer"
      f" {config.optimizer} (lr {config.learning_rate}, {config.lr_schedule},"
      f" momentum {config.momentum}, weight decay {config.weight_decay}),"
      f" seed{'s' if seeds > 1 else ''} {', '.join(map(str, config.seeds))}"
      + (" (mean ± std)" if seeds > 1 else "") + ".",
      "",
      markdown_table(rows),
      "",
      "Test metrics on the clean test split; ECE with 15 equal-width bins, adaptive ECE with"
      " 15 equal-mass bins. λ_max: top eigenvalue of the Hessian of the training loss"
      f" (noisy labels, {config.hessian_examples} training examples, evaluation mode) by"
      f" Lanczos, {config.hessian_iters} iterations (`sam_optax.sharpness`). Train acc.:"
      " accuracy on the labels the"
      " model was trained on (flipped ones included) of the same examples -- how much of"
      " the noise it memorized. Gradients / step: the cost in gradient evaluations; step"
      " times against SGD, measured with the methods interleaved, are in"
      " benchmarks/RESULTS.md (runs timed one after the other see a machine whose load"
      " drifts, so they are not compared here).",
  ]
  if evaluated_ema:
    text.append("")
    text.append(f"{', '.join(evaluated_ema)}: evaluated with the EMA weights, as in the paper;"
                " results.json also has the trained weights' metrics.")
  text += [
      "",
      f"Hyperparameters: {_hparams_text(rows)}.",
      "",
      f"Wall time {wall_time:.0f} s on {machine['cpu_count']} CPU cores"
      f" ({machine['platform']}; {machine['jax_device']}; jax {machine['jax']}).",
      "",
      "![learning curves](learning_curves.png)",
      "",
      "![reliability diagrams](reliability_diagrams.png)",
      "",
  ]
  return "\n".join(text)


def machine_info() -> dict[str, Any]:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "jax_device": str(jax.devices()[0].device_kind), "python": platform.python_version()}


def method_names(config) -> list[str]:
  """``config.methods`` as a list: a tuple of names, or comma-separated names."""
  names = config.methods if isinstance(config.methods, (tuple, list)) else (config.methods,)
  return [n.strip() for item in names for n in item.split(",") if n.strip()]


def compare(config, output_dir: str, *, resume: bool = False,
            progress: bool = True) -> dict[str, Any]:
  """Trains every method of ``config.methods`` with every seed of ``config.seeds``.

  Writes the table and the figures to ``output_dir``.

  Args:
    config: the shared config; ``config.method`` and ``config.seed`` are set
      per run.
    output_dir: the folder for the results (created; must be writable).
    resume: reuse finished runs and resume interrupted ones in ``output_dir``.
    progress: progress bars.

  Returns:
    The JSON-able summary written to ``results.json``.
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  methods_to_run, seeds = method_names(config), list(config.seeds)
  if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise UsageError(f"seeds must be integers, e.g. --config.seeds=0,1,2; got {config.seeds!r}.")
  config = config.copy_and_resolve_references()
  for name in methods_to_run:  # every run checked before the first starts
    config.method = name
    validate_config(config)
  output_dir = checkpoints.check_output_dir(output_dir)
  started = time.perf_counter()
  runs: dict[str, list[dict[str, Any]]] = {}
  pipelines: dict[int, Any] = {}  # one per seed, shared by the methods
  for name in methods_to_run:
    for seed in seeds:
      run_config = config.copy_and_resolve_references()
      run_config.method, run_config.seed = name, seed
      workdir = os.path.join(output_dir, "runs", name if len(seeds) == 1 else f"{name}-seed{seed}")
      done = os.path.join(workdir, "results.json")
      if resume and os.path.exists(done):
        with open(done, encoding="utf-8") as stream:
          result = json.load(stream)
      else:
        if seed not in pipelines:
          pipelines[seed] = input_pipeline.get_pipeline(run_config, jax.process_index(),
                                                        jax.process_count())
        result = train.train_and_evaluate(run_config, workdir, resume=resume, progress=progress,
                                          pipeline=pipelines[seed], validated=True).report
      runs.setdefault(name, []).append(result)
      tqdm.write(f"{name:>10} seed {seed}: test acc {result['test']['accuracy']:.3f},"
                 f" NLL {result['test']['nll']:.3f}, ECE {result['test']['ece']:.3f}")
  wall_time = time.perf_counter() - started

  rows = [summarize(name, results) for name, results in runs.items()]
  machine = machine_info()
  first_seed = {name: results[0] for name, results in runs.items()}
  figures = {
      "learning_curves": plots.plot_learning_curves(
          {name: r["history"] for name, r in first_seed.items()},
          os.path.join(output_dir, "learning_curves.png")),
      "reliability_diagrams": plots.plot_reliability_diagrams(
          {name: r["reliability_diagram"] for name, r in first_seed.items()},
          os.path.join(output_dir, "reliability_diagrams.png")),
  }
  summary = {
      "table": rows,
      "runs": runs,
      "config": config.to_dict(),
      "machine": machine,
      "wall_time_s": wall_time,
      "figures": {k: os.path.basename(v) for k, v in figures.items()},
  }
  checkpoints.write_json(os.path.join(output_dir, "results.json"), summary)
  with open(os.path.join(output_dir, "results.md.tmp"), "w", encoding="utf-8") as stream:
    stream.write(describe(config, rows, wall_time, machine))
  os.replace(os.path.join(output_dir, "results.md.tmp"), os.path.join(output_dir, "results.md"))
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  """The main job; the flags are :mod:`experiments.main`'s (``--workdir``: the results)."""
  argv = list(sys.argv if argv is None else argv)
  try:
    config, options = cli.parse(argv)
    if any(arg.startswith("--config.method=") for arg in argv):
      raise UsageError("experiments.compare trains every method of config.methods:"
                       " set --config.methods=NAME,... instead of --config.method.")
    output_dir = options.workdir or os.path.join(
        "runs", f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = compare(config, output_dir, resume=options.resume, progress=options.progress)
  except cli.ERRORS as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  output_dir = os.path.abspath(output_dir)
  print()
  print(markdown_table(summary["table"]))
  print()
  print(f"Finished in {summary['wall_time_s']:.0f} s. Results: {output_dir}")
  for name in ("results.md", "results.json", *summary["figures"].values()):
    print(f"  {os.path.join(output_dir, name)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
