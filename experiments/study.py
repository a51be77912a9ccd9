"""The evidence study: does each seed paper's claim hold here, and how sure are we?

``python -m experiments.study --config=experiments/configs/study.py`` trains
every arm of the study over the config's seeds (MNIST-1D, generated in memory;
see ``experiments/configs/study.py`` for the regimes, the papers' defaults and
the tuning grids) and writes to ``--workdir`` (default
``experiments/results/study``):

* ``verdicts.md`` -- one row per claim: the claim, the paper's figure, ours
  (mean ± std over seeds) and the verdict under the rule of
  :mod:`experiments.verdict`; then every arm's numbers;
* ``study.json`` -- the same, with every run's numbers;
* ``lr_window.png``, ``cost.png``, ``reliability_<regime>.png``,
  ``seeds.png``;
* ``runs/<arm>/seed<k>/`` -- each run's ``results.json`` (finished runs are
  reused: rerunning the command resumes an interrupted study).

With ``--config=experiments/configs/frontier.py`` the same command runs the
efficiency frontier instead (:mod:`experiments.frontier`; its config's
``kind`` says so), in ``experiments/results/frontier`` by default.

The cost of each method is not timed here (runs one after the other see a
machine whose load drifts): it is the gradient evaluations per step that the
compiled step performs, and the interleaved step-time ratios of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from experiments import checkpoints, evaluate, input_pipeline, methods, metrics, train
from experiments.configs import default as default_config


@dataclasses.dataclass(frozen=True)
class Arm:
  """One trained setting: a method, its hyperparameters and the regime's config.

  Attributes:
    name: unique name (also the run folder).
    regime: ``'clean'`` or ``'noisy'`` (a field of the study config).
    method: the registry's method name.
    hparams: the method's hyperparameters that differ from the registry's.
    changes: other fields of the training config (dotted names).
    label: how tables and figures name the arm.
  """

  name: str
  regime: str
  method: str
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  changes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  label: str = ""


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """``config[key] = value``; a mapping replaces the whole field."""
  if key not in config:
    raise KeyError(f"the training config has no field {key!r}; it has {sorted(config)}.")
  if isinstance(value, Mapping):
    value = ml_collections.ConfigDict(dict(value))
  config[key] = value


def training_config(study: ml_collections.ConfigDict, arm: Arm, *, seed: int,
                    data_seed: int) -> ml_collections.ConfigDict:
  """The training config of one run of ``arm``."""
  config = default_config.get_config()
  with config.unlocked():
    for key, value in study[arm.regime].items():
      _set(config, key, value)
    for key, value in arm.changes.items():
      _set(config, key, value)
    config.method = arm.method
    for key, value in arm.hparams.items():
      config.hparams[arm.method][key] = value
    config.seed = seed
    config.noise_seed = seed
    config.mnist1d.data_seed = data_seed
    config.hessian_iters = study.hessian_iters
    config.hessian_examples = study.sharpness_examples
  return config


# --------------------------------------------------------------------------
# The arms.
# --------------------------------------------------------------------------

# Hyperparameters chosen on the tuning draw: (study.grids key, method, hparams of a value).
_TUNED: dict[str, tuple[str, Callable[[float], dict[str, Any]]]] = {
    "sam_rho": ("sam", lambda v: {"rho": v}),
    "csam_rho": ("csam", lambda v: {"rho": v}),
    "usam_rho": ("usam", lambda v: {"rho": v}),
    "bsam_rho": ("bsam", lambda v: {"rho_max": v, "rho_min": v}),
    "saf_lam": ("saf", lambda v: {"lam": v}),
    "mesa_decay": ("mesa", lambda v: {"decay": v}),
}


def tuning_arms(study) -> list[tuple[str, float, Arm]]:
  """``(grid key, value, arm)`` for every value of every grid (clean regime)."""
  arms = []
  for key, values in study.grids.items():
    method, hparams = _TUNED[key]
    for value in values:
      arms.append((key, value, Arm(f"tune-{key}-{value:g}", "clean", method, hparams(value))))
  return arms


def study_arms(study, tuned: Mapping[str, float]) -> list[Arm]:
  """Every arm of the study, given the tuned values."""
  paper = study.paper
  epochs = study.clean["num_epochs"]
  t = {key: _TUNED[key][1](value) for key, value in tuned.items()}
  clean = [
      Arm("sgd", "clean", "sgd", label="SGD"),
      Arm("sgd-2x", "clean", "sgd", changes={"num_epochs": 2 * epochs},
          label="SGD, 2× epochs"),
      Arm("sam-paper", "clean", "sam", {"rho": paper.sam_rho}, label=f"SAM ρ={paper.sam_rho:g}"),
      Arm("sam", "clean", "sam", t["sam_rho"], label=f"SAM ρ={tuned['sam_rho']:g} (tuned)"),
      Arm("sam-half", "clean", "sam", t["sam_rho"], changes={"num_epochs": max(1, epochs // 2)},
          label=f"SAM ρ={tuned['sam_rho']:g}, ½ epochs"),
      Arm("csam-paper", "clean", "csam", {"rho": paper.csam_rho, "gamma": paper.csam_gamma},
          label=f"CSAM ρ={paper.csam_rho:g}"),
      Arm("csam", "clean", "csam", {**t["csam_rho"], "gamma": paper.csam_gamma},
          label=f"CSAM ρ={tuned['csam_rho']:g} (tuned)"),
      Arm("bsam-paper", "clean", "bsam", {"rho_max": paper.bsam_rho, "rho_min": paper.bsam_rho},
          label=f"BSAM ρ={paper.bsam_rho:g}"),
      Arm("bsam", "clean", "bsam", t["bsam_rho"], label=f"BSAM ρ={tuned['bsam_rho']:g} (tuned)"),
      Arm("saf-paper", "clean", "saf", {"lam": paper.saf_lam}, label=f"SAF λ={paper.saf_lam:g}"),
      Arm("saf", "clean", "saf", t["saf_lam"], label=f"SAF λ={tuned['saf_lam']:g} (tuned)"),
      Arm("mesa-paper", "clean", "mesa", {"lam": paper.mesa_lam, "decay": paper.mesa_decay},
          label=f"MESA decay={paper.mesa_decay:g}"),
      Arm("mesa", "clean", "mesa", {"lam": paper.mesa_lam, **t["mesa_decay"]},
          label=f"MESA decay={tuned['mesa_decay']:g} (tuned)"),
      # Issue 21's methods at their authors' defaults (no grid yet).
      Arm("sampa-paper", "clean", "sampa", {"rho": paper.sampa_rho, "lam": paper.sampa_lam},
          label=f"SAMPa ρ={paper.sampa_rho:g}, λ={paper.sampa_lam:g}"),
      Arm("gcsam-paper", "clean", "gcsam", {"rho": paper.gcsam_rho},
          label=f"GCSAM ρ={paper.gcsam_rho:g}"),
  ]
  sweep = []
  for lr in study.learning_rates:
    lr_change = {"learning_rate": lr}
    sweep += [
        Arm(f"lr{lr:g}-sgd", "clean", "sgd", changes=lr_change, label="SGD"),
        Arm(f"lr{lr:g}-sam", "clean", "sam", t["sam_rho"], lr_change, "SAM"),
        Arm(f"lr{lr:g}-usam", "clean", "usam", t["usam_rho"], lr_change, "USAM"),
        Arm(f"lr{lr:g}-stable-sam", "clean", "stable_sam", {**t["sam_rho"], "normalize": True},
            lr_change, "StableSAM(SAM)"),
        Arm(f"lr{lr:g}-stable-usam", "clean", "stable_sam",
            {**t["usam_rho"], "normalize": False}, lr_change, "StableSAM(USAM)"),
    ]
  noisy_epochs = study.noisy["num_epochs"]
  noisy = [Arm(f"noisy-{m}", "noisy", m, label=m) for m in
           ("sgd", "sam", "csam", "stable_sam", "bsam", "asam", "gsam", "saf", "mesa",
            "sampa", "gcsam")]
  noisy.insert(1, Arm("noisy-sgd-2x", "noisy", "sgd", changes={"num_epochs": 2 * noisy_epochs},
                      label="sgd, 2× epochs"))
  return clean + sweep + noisy


# --------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------


def sharpness(config, state, pipeline, *, rho: float, m: int) -> float:
  """m-sharpness of the evaluated weights on the pipeline's training sample."""
  model = train.make_model(config, pipeline)
  params, batch_stats = evaluate.evaluated_weights(methods.get_method(config.method), state)
  sample = pipeline.train_sample(config.hessian_examples)
  x, y = np.asarray(sample["x"]), np.asarray(sample["y"])
  batches = [(x[i:i + m], y[i:i + m]) for i in range(0, len(y) - m + 1, m)]

  def loss_fn(params, batch):
    logits = model.apply(evaluate.variables(params, batch_stats), batch[0], train=False)
    return evaluate.per_example_cross_entropy(logits, batch[1]).mean()

  return metrics.m_sharpness(loss_fn, params, batches, rho)


def hessian_trace(config, state, pipeline, *, num_samples: int) -> tuple[float, float]:
  """``(trace, standard error)`` of the Hessian of the training loss, evaluated weights.

  The loss, sample and key are λ_max's (:func:`experiments.evaluate.final_report`):
  the mean cross-entropy on ``config.hessian_examples`` training examples, in
  evaluation mode; Hutchinson's estimator with ``num_samples`` Rademacher probes.
  """
  model = train.make_model(config, pipeline)
  weights = evaluate.evaluated_weights(methods.get_method(config.method), state)
  sample = pipeline.train_sample(config.hessian_examples)
  return evaluate.hessian_trace(model, weights, sample, num_samples, config.seed)


def _summary(result, sharp: float, trace: tuple[float, float]) -> dict[str, Any]:
  test = result["test"]
  return {
      "accuracy": test["accuracy"], "ece": test["ece"], "nll": test["nll"],
      "adaptive_ece": test["adaptive_ece"], "hessian": result["hessian_top_eigenvalue"],
      "hessian_trace": trace[0], "hessian_trace_stderr": trace[1],
      "m_sharpness": sharp, "train_accuracy": result["train_sample_accuracy"],
      "gradients_per_step": result["gradients_per_step"],
      "forwards_per_step": result["forwards_per_step"], "epochs": result["epochs"],
      "steps": result["steps"], "hparams": result["hparams"],
      "reliability_diagram": {k: np.asarray(v).tolist()
                              for k, v in result["reliability_diagram"].items()},
      "history": {k: list(v) for k, v in result["history"].items()},
  }


def run_arm(study, arm: Arm, seed: int, data_seed: int, workdir: str,
            pipelines: dict[Any, Any]) -> dict[str, Any]:
  """Trains one run (or reads it if finished) and returns its summary."""
  done = os.path.join(workdir, "summary.json")
  config = training_config(study, arm, seed=seed, data_seed=data_seed)
  if os.path.exists(done):
    with open(done, encoding="utf-8") as stream:
      summary = json.load(stream)
    trained = {"hparams": {k: summary["hparams"].get(k) for k in arm.hparams},
               "epochs": summary["epochs"]}
    asked = {"hparams": dict(arm.hparams), "epochs": config.num_epochs}
    if json.dumps(trained, sort_keys=True) != json.dumps(asked, sort_keys=True):
      raise ValueError(f"{done} was trained with {trained}, but the study now asks for"
                       f" {asked}; remove that folder to train it again.")
    return summary
  data_key = json.dumps({k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
                         for k in ("dataset", "mnist1d", "label_noise", "noise_seed", "seed",
                                   "batch_size", "eval_batch_size")}, sort_keys=True, default=str)
  if data_key not in pipelines:  # a few MB each; at most regimes × seeds × draws
    pipelines[data_key] = input_pipeline.get_pipeline(config, 0, 1)
  pipeline = pipelines[data_key]
  if os.path.isdir(workdir):  # an interrupted run: start it again
    shutil.rmtree(workdir)
  result = train.train_and_evaluate(config, workdir, progress=False, pipeline=pipeline)
  sharp = sharpness(config, result.state, pipeline, rho=study.m_sharpness_rho,
                    m=study.m_sharpness_m)
  trace = hessian_trace(config, result.state, pipeline, num_samples=study.trace_samples)
  summary = _summary(result.report, sharp, trace)
  checkpoints.write_json(done, summary)
  return summary


def log(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: an arm on a seed and a draw of the data, in a folder."""

  arm: Arm
  seed: int
  data_seed: int
  folder: str


#: How often a shard looks for another shard's run that it waits for.
POLL_SECONDS = 10.0


class Shards:
  """Which runs this process trains: every ``count``-th run, from ``index``.

  Runs are counted in the order :meth:`run` sees them, the same in every
  process of a sharded study.
  """

  def __init__(self, index: int, count: int):
    if not 0 <= index < count:
      raise ValueError(f"shard_index must be in [0, num_shards = {count}), got {index}.")
    self.index, self.count, self._seen = index, count, 0
    self.pipelines: dict[Any, Any] = {}

  def run(self, study, runs: Sequence[Run], *, wait: bool,
          describe: Callable[[Run, dict[str, Any]], str] | None = None
          ) -> list[dict[str, Any] | None]:
    """The summaries of ``runs``: trained here if this shard's, read if done.

    A run of another shard that is not done yet is waited for when ``wait``
    (its summary is needed to go on, e.g. a tuning run), else left as None.
    """
    summaries: list[dict[str, Any] | None] = []
    pending = []
    for i, run in enumerate(runs):
      mine = self._seen % self.count == self.index
      self._seen += 1
      summary = None
      if mine or os.path.exists(os.path.join(run.folder, "summary.json")):
        summary = run_arm(study, run.arm, run.seed, run.data_seed, run.folder, self.pipelines)
        if describe:
          log(describe(run, summary))
      else:
        pending.append(i)
      summaries.append(summary)
    for i in pending if wait else ():  # other shards' runs, once this shard's are done
      while not os.path.exists(os.path.join(runs[i].folder, "summary.json")):
        time.sleep(POLL_SECONDS)
      run = runs[i]  # done: run_arm reads it (and checks it is this arm's)
      summaries[i] = run_arm(study, run.arm, run.seed, run.data_seed, run.folder, self.pipelines)
    return summaries


  def results(self, study, runs: Sequence[Run]) -> dict[str, list[dict[str, Any]]] | None:
    """Every arm's summaries over its runs; None (and a log line) while other shards' are due."""
    results: dict[str, list[dict[str, Any]]] = {}
    missing = 0
    for run, summary in zip(runs, self.run(study, runs, wait=False, describe=describe_run)):
      if summary is None:
        missing += 1
      else:
        results.setdefault(run.arm.name, []).append(summary)
    if missing:
      log(f"shard {self.index}/{self.count}: {missing} runs belong to other shards; rerun"
          " with num_shards=1 once they are done to write the report.")
      return None
    return results


def describe_run(run: Run, summary: Mapping[str, Any]) -> str:
  """One log line: the run and its numbers."""
  return (f"{run.arm.name} seed {run.seed}: acc {summary['accuracy']:.4f}"
          f" ece {summary['ece']:.4f} λ_max {summary['hessian']:.2f}"
          + (f" tr H {summary['hessian_trace']:.1f}" if "hessian_trace" in summary else "")
          + f" m-sharpness {summary['m_sharpness']:.4f}")


def run_study(study: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Runs (this shard of) the study; with every run done, writes the report."""
  shards = Shards(study.shard_index, study.num_shards)

  # 1. Tuning, on the independent draw.
  grid = tuning_arms(study)
  summaries = shards.run(
      study, [Run(arm, study.tuning_seed, study.tuning_data_seed,
                  os.path.join(workdir, "runs", "tuning", arm.name)) for _, _, arm in grid],
      wait=True, describe=lambda run, s: f"tuning {run.arm.name}: test acc {s['accuracy']:.4f}")
  tuning: dict[str, dict[float, float]] = {}
  for (key, value, _), summary in zip(grid, summaries):
    tuning.setdefault(key, {})[value] = summary["accuracy"]
  # The best test accuracy on the tuning draw; a tie goes to the first value of the grid.
  tuned = {key: max(study.grids[key], key=lambda v: tuning[key][v]) for key in tuning}
  tuned.update(study.fixed)
  missing_values = sorted(set(_TUNED) - set(tuned))
  if missing_values:
    raise ValueError(f"the study needs a grid or a fixed value for {missing_values}.")
  log(f"tuned: {tuned}")

  # 2. The study's runs, on the reported draw.
  arms = study_arms(study, tuned)
  if study.only_arms:
    arms = [arm for arm in arms if arm.name in study.only_arms]
  runs = [Run(arm, seed, study.data_seed, os.path.join(workdir, "runs", arm.name, f"seed{seed}"))
          for arm in arms for seed in study.seeds]
  results = shards.results(study, runs)
  if results is None:
    return None
  from experiments import study_report  # pylint: disable=import-outside-toplevel
  return study_report.write(study, workdir, arms, results, tuning, tuned)


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  config = flags.FLAGS.config
  if config.get("kind") == "frontier":
    from experiments import frontier  # pylint: disable=import-outside-toplevel
    frontier.run_frontier(config, flags.FLAGS.workdir or frontier.DEFAULT_WORKDIR)
  else:
    run_study(config, flags.FLAGS.workdir or "experiments/results/study")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file(
      "config", "experiments/configs/study.py", "The study's config file.", lock_config=True)
  flags.DEFINE_string("workdir", "", "Where the study writes (default: experiments/results/study,"
                      " or experiments/results/frontier for the frontier's config).")
  app.run(main)
