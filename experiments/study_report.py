"""The study's report: verdict table, arm table, figures (see :mod:`experiments.study`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import matplotlib
from matplotlib.figure import Figure

from experiments import costs as costs_lib
from experiments import plots
from experiments import verdict as rule

Results = Mapping[str, Sequence[Mapping[str, Any]]]

COST_BOUND = {"saf": 1.10, "mesa": 1.40}

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PERCENT = {"accuracy", "ece", "train_accuracy", "adaptive_ece", "overconfidence"}


def overconfidence(run: Mapping[str, Any]) -> float:
  """Mean confidence − accuracy on the test set (> 0: overconfident), from the diagram."""
  diagram = run["reliability_diagram"]
  counts = np.asarray(diagram["bin_count"], np.float64)
  gaps = np.nan_to_num(np.asarray(diagram["bin_confidence"], np.float64)
                       - np.asarray(diagram["bin_accuracy"], np.float64))
  return float(np.sum(counts * gaps) / np.sum(counts))


def values(results: Results, arm: str, metric: str) -> list[float]:
  """The metric over the arm's seeds (accuracy and ECE in %)."""
  scale = 100.0 if metric in _PERCENT else 1.0
  if metric == "overconfidence":
    return [scale * overconfidence(r) for r in results[arm]]
  return [scale * float(r[metric]) for r in results[arm]]


def mean_std(results: Results, arm: str, metric: str, digits: int = 1) -> str:
  v = values(results, arm, metric)
  return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}"


@dataclasses.dataclass
class Row:
  """One claim of the verdict table."""

  claim: str
  paper: str
  ours: str
  verdict: str
  parts: list[str] = dataclasses.field(default_factory=list)


def _part(results, a, b, metric, claim, text) -> tuple[str, str]:
  """A part of a claim: ``a`` vs ``b`` on ``metric``; returns (verdict, description)."""
  comparison = rule.compare(values(results, a, metric), values(results, b, metric),
                            claim=claim)
  return comparison.verdict, f"{text}: {comparison.describe()}"


def _at_least(results, a, b, metric, text) -> tuple[str, str]:
  """``a ≥ b``: holds unless ``a < b`` counts (a claim of no loss)."""
  comparison = rule.compare(values(results, a, metric), values(results, b, metric),
                            claim="greater")
  verdict = rule.FAILS if comparison.verdict == rule.FAILS else rule.HOLDS
  return verdict, f"{text}: {comparison.describe().rsplit('→', 1)[0]}→ {verdict}"


def _row(claim, paper, ours, parts) -> Row:
  return Row(claim, paper, ours, rule.combine([v for v, _ in parts]), [d for _, d in parts])


def window(results: Results, base: str, lrs: Sequence[float], method: str) -> list[float]:
  """The learning rates at which ``method`` beats SGD under the rule."""
  return [lr for lr in lrs
          if rule.compare(values(results, f"lr{lr:g}-{method}", "accuracy"),
                          values(results, f"lr{lr:g}-{base}", "accuracy"),
                          claim="greater").verdict == rule.HOLDS]


def _window_verdict(wider: Sequence[float], narrower: Sequence[float]) -> str:
  wider, narrower = set(wider), set(narrower)
  if wider > narrower:
    return rule.HOLDS
  if wider < narrower:
    return rule.FAILS
  return rule.INCONCLUSIVE


def _ratio(time: costs_lib.TimeRatio) -> str:
  return f"{time.median:.2f}× [{time.q1:.2f}–{time.q3:.2f}]"


def _lrs(window_: Sequence[float]) -> str:
  return "{" + ", ".join(f"{lr:g}" for lr in window_) + "}" if window_ else "∅"


def verdict_rows(study, results: Results, tuned: Mapping[str, float],
                 costs: costs_lib.BenchmarkCosts | None = None) -> list[Row]:
  """Every claim of the study that its runs cover (a claim whose arms were not run is left out).

  ``costs``: the benchmark run the cost claims cite (default: the committed
  ``benchmarks/results-cpu.json``, :func:`experiments.costs.read_benchmark`).
  The study does not time its runs: one after the other, they see a machine
  whose load drifts; the benchmark interleaves the methods within rounds.
  """
  rows: list[Row] = []
  costs = costs or costs_lib.read_benchmark(methods=tuple(COST_BOUND))
  have = lambda *arms: all(a in results for a in arms)  # noqa: E731

  # Calibration (seed 000, first abstract), clean labels.
  for suffix, radius in (("-paper", "papers' ρ = 0.05"), ("", "tuned ρ")):
    sam, csam = "sam" + suffix, "csam" + suffix
    if have("sgd", sam, csam):
      rows.append(_row(
          f"CSAM and SAM calibrate (clean labels, {radius}): ECE(CSAM) < ECE(SAM) < ECE(SGD)",
          "ECE %: CIFAR-10 WRN 2.36 / 0.86 / 0.50; ImageNet R-50 3.39 / 1.52 / 1.18 (SGD / SAM / CSAM)",
          f"ECE %: SGD {mean_std(results, 'sgd', 'ece')}, SAM {mean_std(results, sam, 'ece')},"
          f" CSAM {mean_std(results, csam, 'ece')}",
          [_part(results, sam, "sgd", "ece", "less", "ECE SAM − SGD"),
           _part(results, csam, sam, "ece", "less", "ECE CSAM − SAM")]))
      rows.append(_row(
          f"CSAM keeps SAM's accuracy (clean labels, {radius}): acc(CSAM) ≥ acc(SAM) > acc(SGD)",
          "top-1 %: CIFAR-10 WRN 95.83 / 96.91 / 96.97; ImageNet R-50 76.97 / 77.32 / 77.95",
          f"acc %: SGD {mean_std(results, 'sgd', 'accuracy')}, SAM"
          f" {mean_std(results, sam, 'accuracy')}, CSAM {mean_std(results, csam, 'accuracy')}",
          [_part(results, sam, "sgd", "accuracy", "greater", "acc SAM − SGD"),
           _at_least(results, csam, sam, "accuracy", "acc CSAM − SAM")]))

  # StableSAM (seed 000, second abstract): the learning-rate window.
  lrs = list(study.learning_rates)
  sweep = [f"lr{lr:g}-{m}" for lr in lrs for m in ("sgd", "sam", "usam", "stable-sam",
                                                    "stable-usam")]
  if have(*sweep):
    for base, stable, name in (("sam", "stable-sam", "SAM"), ("usam", "stable-usam", "USAM")):
      w_base, w_stable = window(results, "sgd", lrs, base), window(results, "sgd", lrs, stable)
      inside = rule.HOLDS if 0 < len(w_base) < len(lrs) else rule.FAILS
      rows.append(Row(
          f"{name} beats SGD only inside a window of learning rates; StableSAM({name}) widens it",
          "SAM's advantage is assured only in a limited regime of learning rates; StableSAM"
          " extends it (Tan et al., JMLR)",
          f"lr where acc beats SGD's: {name} {_lrs(w_base)}, StableSAM({name}) {_lrs(w_stable)}"
          f" (grid {_lrs(lrs)})",
          rule.combine([inside, _window_verdict(w_stable, w_base)]),
          [f"{name}'s window is a proper, non-empty part of the grid → {inside}",
           f"StableSAM({name})'s window strictly contains {name}'s →"
           f" {_window_verdict(w_stable, w_base)}"]))

  # SAF and MESA (seed 001), clean labels.
  for method in ("saf", "mesa"):
    for suffix, which in (("-paper", "paper's λ / decay"), ("", "tuned")):
      arm = method + suffix
      if not have("sgd", arm):
        continue
      rows.append(_row(
          f"{method.upper()} is flatter than SGD with accuracy ≥ SGD's (clean labels, {which})",
          "SAF/MESA reach minima as flat as SAM's; ImageNet R-50 top-1 SGD 76.0, SAF 77.8,"
          " MESA 77.5",
          f"λ_max {mean_std(results, arm, 'hessian', 2)} vs SGD"
          f" {mean_std(results, 'sgd', 'hessian', 2)}; m-sharpness"
          f" {mean_std(results, arm, 'm_sharpness', 4)} vs"
          f" {mean_std(results, 'sgd', 'm_sharpness', 4)}; acc"
          f" {mean_std(results, arm, 'accuracy')} vs {mean_std(results, 'sgd', 'accuracy')}",
          [_part(results, arm, "sgd", "hessian", "less", "λ_max − SGD's"),
           _part(results, arm, "sgd", "m_sharpness", "less", "m-sharpness − SGD's"),
           _at_least(results, arm, "sgd", "accuracy", "acc − SGD's")]))
    if have(method, "sam", "sam-half"):
      rows.append(_row(
          f"{method.upper()} (tuned) matches SAM at equal epochs and at equal compute",
          "ImageNet R-50 top-1: SAM 76.9, SAF 77.8, MESA 77.5 (equal epochs)",
          f"acc {mean_std(results, method, 'accuracy')}; SAM (equal epochs)"
          f" {mean_std(results, 'sam', 'accuracy')}; SAM ½ epochs (equal compute)"
          f" {mean_std(results, 'sam-half', 'accuracy')}",
          [_at_least(results, method, "sam", "accuracy", "acc − SAM's (equal epochs)"),
           _at_least(results, method, "sam-half", "accuracy", "acc − SAM's (equal compute)")]))
    resnet, mlp = costs.cost("resnet", method), costs.cost("mnist1d", method)
    bound = COST_BOUND[method]
    cost_verdict = rule.at_most(resnet.time.median, resnet.time.spread, bound)
    mlp_verdict = rule.at_most(mlp.time.median, mlp.time.spread, bound)
    rows.append(Row(
        f"{method.upper()} costs ≤ {bound:.2f}× SGD per step",
        "throughput vs SGD: SAF 99 %, MESA 85 % (ImageNet R-50, 4 GPUs)",
        f"ResNet-18 (w 0.125, batch 128, CPU): {_ratio(resnet.time)}; MNIST-1D MLP:"
        f" {_ratio(mlp.time)}; XLA flops {resnet.flops:.2f}× (benchmark run of {costs.date},"
        f" `{os.path.relpath(costs.path, _ROOT)}`, interleaved)",
        cost_verdict,
        [f"ResNet (the regime of the claim): → {cost_verdict}",
         f"tiny MLP, where fixed per-step costs dominate: → {mlp_verdict}"]))

  # BSAM (seed 002), clean labels.
  for suffix, which in (("-paper", "papers' ρ = 0.05"), ("", "tuned ρ")):
    bsam, sam = "bsam" + suffix, "sam" + suffix
    if have(bsam, sam):
      rows.append(_row(
          f"BSAM is flatter than SAM with accuracy ≥ SAM's (clean labels, {which})",
          "flatter minima and higher accuracy than SAM (CIFAR-10/100 ResNet-18 and others)",
          f"λ_max {mean_std(results, bsam, 'hessian', 2)} vs SAM"
          f" {mean_std(results, sam, 'hessian', 2)}; acc {mean_std(results, bsam, 'accuracy')}"
          f" vs {mean_std(results, sam, 'accuracy')}",
          [_part(results, bsam, sam, "hessian", "less", "λ_max − SAM's"),
           _at_least(results, bsam, sam, "accuracy", "acc − SAM's")]))

  # SAM under label noise (the robustness row).
  if have("noisy-sgd", "noisy-sam"):
    rows.append(_row(
        "SAM is robust to label noise: acc(SAM) > acc(SGD) with 20 % of labels flipped",
        "SAM: robustness to label noise on par with noisy-label methods (Foret et al.)",
        f"acc % SGD {mean_std(results, 'noisy-sgd', 'accuracy')}, SAM"
        f" {mean_std(results, 'noisy-sam', 'accuracy')}",
        [_part(results, "noisy-sam", "noisy-sgd", "accuracy", "greater", "acc SAM − SGD")]))

  # Equal compute: every two-pass method against SGD trained twice as long.
  for regime, prefix, sgd2x, two_pass in (
      ("clean", "", "sgd-2x", ("sam", "csam", "bsam")),
      ("noisy", "noisy-", "noisy-sgd-2x", ("noisy-sam", "noisy-csam", "noisy-stable_sam",
                                            "noisy-bsam", "noisy-asam", "noisy-gsam"))):
    present = [m for m in two_pass if m in results]
    if sgd2x in results and present:
      rows.append(_row(
          f"Two-pass methods beat SGD at equal compute ({regime}: SGD with 2× epochs)",
          "(a control the papers do not report)",
          "acc %: SGD 2× " + mean_std(results, sgd2x, "accuracy") + "; " + ", ".join(
              f"{m.removeprefix(prefix)} {mean_std(results, m, 'accuracy')}" for m in present),
          [_part(results, m, sgd2x, "accuracy", "greater", f"{m.removeprefix(prefix)} − SGD 2×")
           for m in present]))
  return rows


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------


def plot_lr_window(study, results: Results, path: str) -> str:
  lrs = list(study.learning_rates)
  figure = Figure(figsize=(6.5, 4.2))
  ax = figure.add_subplot()
  for method, label, style in (("sgd", "SGD", "k--"), ("sam", "SAM", "C0-"),
                               ("stable-sam", "StableSAM(SAM)", "C0:"),
                               ("usam", "USAM", "C1-"), ("stable-usam", "StableSAM(USAM)", "C1:")):
    arms = [f"lr{lr:g}-{method}" for lr in lrs]
    if not all(a in results for a in arms):
      continue
    means = [np.mean(values(results, a, "accuracy")) for a in arms]
    stds = [np.std(values(results, a, "accuracy"), ddof=1) for a in arms]
    ax.errorbar(lrs, means, yerr=stds, fmt=style, marker="o", ms=4, capsize=3, label=label)
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate (cosine schedule)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"Learning-rate window (clean MNIST-1D, MLP; mean ± std, {len(study.seeds)} seeds)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return plots.save_figure(figure, path, tight=True)


def _relative_compute(result: Mapping[str, Any], sgd_epochs: int) -> float:
  per_step = result["gradients_per_step"] + (0.33 * result["forwards_per_step"])
  return per_step * result["epochs"] / sgd_epochs


def plot_cost(study, results: Results, labels: Mapping[str, str], path: str) -> str:
  """Accuracy and ECE against compute (gradient evaluations of a run / SGD's)."""
  arms = [a for a in ("sgd", "sgd-2x", "sam-paper", "sam", "sam-half", "csam-paper", "csam",
                      "bsam-paper", "bsam", "saf-paper", "saf", "mesa-paper", "mesa")
          if a in results]
  figure = Figure(figsize=(11, 4.2))
  sgd_epochs = study.clean["num_epochs"]
  for index, (metric, name) in enumerate((("accuracy", "test accuracy (%)"),
                                          ("ece", "ECE (%)"))):
    ax = figure.add_subplot(1, 2, index + 1)
    colors = matplotlib.colormaps["tab20"]
    for i, arm in enumerate(arms):
      x = _relative_compute(results[arm][0], sgd_epochs)
      v = values(results, arm, metric)
      ax.errorbar([x], [np.mean(v)], yerr=[np.std(v, ddof=1)], fmt="os^Dv"[i % 5],
                  color=colors(i % 20), capsize=3, label=labels.get(arm, arm))
    ax.set_xlabel("compute of the run / SGD's (gradient evaluations; a forward = ⅓)")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
  figure.axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  figure.suptitle(f"Clean MNIST-1D, MLP: accuracy and calibration against cost"
                  f" (mean ± std, {len(study.seeds)} seeds)")
  return plots.save_figure(figure, path, tight=True)


def plot_seeds(results: Results, arms: Sequence[str], path: str, title: str) -> str:
  """Every seed's test accuracy per arm: the spread behind the means."""
  figure = Figure(figsize=(max(6, 0.55 * len(arms)), 4))
  ax = figure.add_subplot()
  for i, arm in enumerate(arms):
    v = values(results, arm, "accuracy")
    ax.plot([i] * len(v), v, "o", alpha=0.7, color=f"C{i % 10}")
    ax.plot([i - 0.25, i + 0.25], [np.mean(v)] * 2, "k-")
  ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=8)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3, axis="y")
  return plots.save_figure(figure, path, tight=True)


# --------------------------------------------------------------------------
# The files.
# --------------------------------------------------------------------------

_ARM_COLUMNS = (("accuracy", "test acc. (%)", 1), ("ece", "ECE (%)", 1),
                ("overconfidence", "conf. − acc. (%)", 1), ("nll", "NLL", 3),
                ("hessian", "λ_max", 2), ("hessian_trace", "tr H", 1),
                ("m_sharpness", "m-sharpness", 4), ("train_accuracy", "train acc. (%)", 1))
# Metrics that runs recorded before they were measured lack: their cell is NOT_MEASURED.
_ADDED_LATER = ("hessian_trace",)
NOT_MEASURED = "—"
NOT_MEASURED_NOTE = (
    f"{NOT_MEASURED}: not measured: the arm's runs were recorded before the study measured the"
    " Hessian's trace. Their λ_max is by 20 power iterations, a Rayleigh quotient, so never"
    " above the true value: on the benchmark's MNIST-1D MLP 0.5–1.4 % below it, where 20"
    " Lanczos steps are within 1e-6 (benchmarks/SHARPNESS.md).")


def measured(results: Results, arm: str, metric: str) -> bool:
  """Whether every run of the arm has the metric (a run recorded before it was added has not)."""
  return all(run.get(metric) is not None for run in results[arm])


def trace_standard_error(results: Results) -> float | None:
  """The largest standard error of a run's Hutchinson trace estimate (None: no run has one)."""
  errors = [run["hessian_trace_stderr"] for runs in results.values() for run in runs
            if run.get("hessian_trace_stderr") is not None]
  return max(errors) if errors else None


def arm_table(results: Results, arms, labels) -> str:
  """One row per arm (mean ± std over seeds); :data:`NOT_MEASURED` where runs lack a metric."""
  del labels
  lines = ["| arm | method, hyperparameters | epochs | grads/step | seeds | "
           + " | ".join(h for _, h, _ in _ARM_COLUMNS) + " |",
           "|---|---|---:|---:|---:|" + "---:|" * len(_ARM_COLUMNS)]
  for arm in arms:
    if arm.name not in results:
      continue
    first = results[arm.name][0]
    passes = f"{first['gradients_per_step']:g}" + (
        f" + {first['forwards_per_step']} fwd" if first["forwards_per_step"] else "")
    hparams = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in first["hparams"].items())
    cells = [NOT_MEASURED if key in _ADDED_LATER and not measured(results, arm.name, key)
             else mean_std(results, arm.name, key, digits)
             for key, _, digits in _ARM_COLUMNS]
    lines.append(f"| {arm.name} | {arm.method}({hparams}) | {first['epochs']} | {passes} |"
                 f" {len(results[arm.name])} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def sharpness_note(study, results: Results) -> str:
  """How the table's sharpness columns were measured (and the note on missing ones)."""
  note = (
      f"λ_max: top Hessian eigenvalue of the training loss on {study.sharpness_examples}"
      f" training examples (evaluation mode; Lanczos with full reorthogonalization,"
      f" {study.hessian_iters} iterations, `sam_optax.sharpness.top_hessian_eigenvalues`);"
      f" tr H: the trace of the same Hessian by Hutchinson's estimator with"
      f" {study.trace_samples} Rademacher probes (`sam_optax.sharpness.hessian_trace`)")
  error = trace_standard_error(results)
  if error is not None:
    note += f", whose own standard error is at most {error:.2g} over the runs"
  note += (
      f"; m-sharpness: mean over groups of {study.m_sharpness_m} training examples of"
      f" `L_B(w + ε̂) − L_B(w)` at ρ = {study.m_sharpness_rho:g} (one normalized ascent"
      " step).")
  if any(not measured(results, arm, key) for arm in results for key in _ADDED_LATER):
    note += "\n\n" + NOT_MEASURED_NOTE
  return note


def verdict_table(rows: Sequence[Row]) -> str:
  lines = ["| claim | paper | ours (mean ± std over seeds) | verdict |", "|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row.claim} | {row.paper} | {row.ours} | **{row.verdict}** |")
  return "\n".join(lines)


def write(study, workdir: str, arms, results: Results, tuning, tuned,
          recorded: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes verdicts.md, study.json and the figures; returns the JSON summary.

  ``recorded``: a study.json whose ``config`` and ``machine`` (what the runs were
  trained with, and where) are kept (default: ``study`` and this machine).
  """
  labels = {arm.name: arm.label or arm.name for arm in arms}
  rows = verdict_rows(study, results, tuned)
  figures = {}
  if any(a.startswith("lr") for a in results):
    figures["lr_window"] = plot_lr_window(study, results, os.path.join(workdir, "lr_window.png"))
  figures["cost"] = plot_cost(study, results, labels, os.path.join(workdir, "cost.png"))
  for regime, names in (("clean", ("sgd", "sam", "csam")),
                        ("noisy", ("noisy-sgd", "noisy-sam", "noisy-csam"))):
    present = [n for n in names if n in results]
    if present:
      figures[f"reliability_{regime}"] = plots.plot_reliability_diagrams(
          {labels[n]: {**results[n][0]["reliability_diagram"], "ece": results[n][0]["ece"]}
           for n in present}, os.path.join(workdir, f"reliability_{regime}.png"))
  main_arms = [a.name for a in arms if not a.name.startswith("lr") and a.name in results]
  figures["seeds"] = plot_seeds(results, main_arms, os.path.join(workdir, "seeds.png"),
                                f"Test accuracy of every seed (bar: mean)")
  summary = {
      "rule": rule.RULE,
      "verdicts": [dataclasses.asdict(r) for r in rows],
      "tuning": {k: {f"{v:g}": acc for v, acc in d.items()} for k, d in tuning.items()},
      "tuned": tuned,
      "arms": {a.name: {"label": labels[a.name], "regime": a.regime, "method": a.method,
                        # each run's learning curves stay in its runs/ folder
                        "runs": [{k: v for k, v in run.items() if k != "history"}
                                 for run in results[a.name]]}
               for a in arms if a.name in results},
      "config": recorded["config"] if recorded else study.to_dict(),
      "machine": recorded["machine"] if recorded else {
          "platform": platform.platform(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()]},
      "figures": {k: os.path.basename(v) for k, v in figures.items()},
  }
  with open(os.path.join(workdir, "study.json"), "w", encoding="utf-8") as stream:
    json.dump(summary, stream, indent=1, default=float)
  with open(os.path.join(workdir, "verdicts.md"), "w", encoding="utf-8") as stream:
    stream.write(describe(study, rows, arms, results, labels, tuning, tuned, figures))
  return summary


def describe(study, rows, arms, results, labels, tuning, tuned, figures) -> str:
  seeds = len(study.seeds)
  tuning_lines = "\n".join(
      f"- `{key}`: " + ", ".join(f"{v:g} → {100 * acc:.1f} %" for v, acc in d.items())
      + f" ⇒ **{tuned[key]:g}**" for key, d in tuning.items())
  details = "\n".join(f"- {row.claim}: " + "; ".join(row.parts) for row in rows)
  figure_lines = "\n".join(f"![{k}]({os.path.basename(v)})" for k, v in figures.items())
  return f"""# The evidence study: do the seed papers' claims hold here?

`python -m experiments.study` (config: `experiments/configs/study.py`). Every number is the
mean ± standard deviation over **{seeds} seeds** (initialization, data order and, where labels
are flipped, which labels) on the reported draw of MNIST-1D (`data_seed` {study.data_seed}).

**Regimes.** *Clean*: MNIST-1D's MLP (2 × 100, ReLU), 4,000 training and 4,000 test sequences,
clean labels, 60 epochs, SGD with momentum 0.9, cosine learning rate 0.05, weight decay 5e-4:
SGD fits the training set and is overconfident, the regime of the calibration, SAF/MESA and BSAM
papers. *Noisy*: the default comparison's 1-D CNN with 20 % of the training labels flipped.

**Rule.** {rule.RULE} A window of learning rates is the set of
grid rates at which the method's accuracy beats SGD's under the rule.

## Verdicts

{verdict_table(rows)}

How each verdict was reached:

{details}

## Hyperparameters

The papers' defaults are reported as they are. The tuned values were chosen by test accuracy on
an independent draw of MNIST-1D (`data_seed` {study.tuning_data_seed}, seed {study.tuning_seed}),
never on the reported draw:

{tuning_lines}

The noisy regime uses the radii of `experiments/configs/default.py`, chosen the same way.
The learning-rate sweep keeps every radius at its tuned value for the base rate 0.05.

## Every arm

{arm_table(results, arms, labels)}

{sharpness_note(study, results)}

MESA is evaluated with its EMA weights, as the paper does.
Cost per step is not timed here: see `benchmarks/RESULTS.md` (interleaved timing).

## Figures

{figure_lines}
"""


def rewrite(workdir: str) -> dict[str, Any]:
  """Writes the report again from ``workdir/study.json``, training nothing.

  The verdicts are recomputed from the recorded runs (and the cost claims from
  the committed benchmark run, :mod:`experiments.costs`); the arms, tuning and
  machine are the recorded ones (a config field added since the study ran takes
  its default from ``experiments/configs/study.py``). ``python -m
  experiments.study_report`` calls it.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel

  from experiments import study as study_lib  # pylint: disable=import-outside-toplevel
  from experiments.configs import study as study_config  # pylint: disable=import-outside-toplevel

  with open(os.path.join(workdir, "study.json"), encoding="utf-8") as stream:
    recorded = json.load(stream)
  study = ml_collections.ConfigDict(recorded["config"])
  for key, value in study_config.get_config().items():  # fields added since: today's defaults
    if key not in study:
      study[key] = value
  arms = [study_lib.Arm(name, arm["regime"], arm["method"], label=arm["label"])
          for name, arm in recorded["arms"].items()]
  results = {name: arm["runs"] for name, arm in recorded["arms"].items()}
  tuning = {key: {float(value): accuracy for value, accuracy in values.items()}
            for key, values in recorded["tuning"].items()}
  return write(study, workdir, arms, results, tuning, recorded["tuned"], recorded=recorded)


if __name__ == "__main__":
  import argparse  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(
      prog="python -m experiments.study_report",
      description="Writes the study's report again from its study.json (no training).")
  parser.add_argument("--workdir", default="experiments/results/study")
  rewrite(parser.parse_args().workdir)
