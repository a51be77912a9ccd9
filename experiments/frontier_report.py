"""The frontier's report: budget table, arm table, figures (see :mod:`experiments.frontier`)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure

from experiments import costs as costs_lib
from experiments import frontier as frontier_lib
from experiments import methods as registry
from experiments import plots
from experiments import verdict as rule
from experiments.study_report import mean_std, values

Results = Mapping[str, Sequence[Mapping[str, Any]]]

#: The benchmark task whose costs the frontier's runs pay (the regimes' MLP).
TASK = "mnist1d"

#: A compute within this fraction above a budget counts as that budget (SAM's
#: 2.006× SGD's flops is a 2× method).
TOLERANCE = 0.05

#: The two measures of compute: XLA flops and interleaved step time.
FLOPS, TIME = "gradient evaluations (XLA flops)", "wall time (this CPU)"

# What frontier.json leaves out of each run's summary (kept in runs/): curves and diagrams.
_PER_EPOCH = ("history", "reliability_diagram")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The benchmark settings that fix a method's cost: (method, hyperparameter, settings field).
_COST_SETTINGS = (("looksam", "k", "cycle"), ("interval_sam", "k", "cycle"),
                  ("stochastic_sam", "p", "probability"), ("esam", "gamma", "esam_gamma"))


def benchmark_rows(method: str, hparams: Mapping[str, Any]) -> tuple[str, ...]:
  """The benchmark rows that measure ``method`` with these hyperparameters.

  Several rows are the same method in different compiled forms (LookSAM's
  ``lax.cond`` step, or a compiled step per phase); the cheaper one is used.
  """
  if method == "stable_sam":
    normalize = hparams.get("normalize", registry_default(method, "normalize"))
    return ("stable_sam(sam)" if normalize else "stable_sam(usam)",)
  if method in ("looksam", "interval_sam", "stochastic_sam"):
    return (method, method + " (static phase)")
  return (method,)


def registry_default(method: str, key: str) -> Any:
  return registry.hparams_for(method)[key]


@dataclasses.dataclass(frozen=True)
class Compute:
  """An arm's compute relative to one SGD run of the regime (SGD at 1× epochs = 1)."""

  flops: float
  time: costs_lib.TimeRatio
  row: str

  def measure(self, which: str) -> float:
    return self.flops if which == FLOPS else self.time.median


def check_settings(config, benchmark: costs_lib.BenchmarkCosts) -> None:
  """The arms' cost-setting hyperparameters are the benchmark's (else its costs are not theirs)."""
  for method, key, field in _COST_SETTINGS:
    if method not in frontier_lib.frontier_methods(config):
      continue
    ours = frontier_lib.paper_hparams(config, method).get(key)
    theirs = benchmark.settings.get(field)
    if ours != theirs:
      raise ValueError(f"{method}'s {key} is {ours!r} in the frontier but the benchmark run"
                       f" {benchmark.path} measured {field} = {theirs!r}; set"
                       f" config.settings.{method}.{key} = {theirs!r} or rerun the benchmark.")


def compute(entry: frontier_lib.Entry, benchmark: costs_lib.BenchmarkCosts) -> Compute:
  """The entry's epochs × its method's per-step cost in the benchmark (cheapest form)."""
  rows = benchmark_rows(entry.method, entry.arm.hparams)
  costs = {row: benchmark.cost(TASK, row) for row in rows}
  row = min(costs, key=lambda r: costs[r].time.median)
  cost, f = costs[row], entry.epochs_factor
  return Compute(cost.flops * f, costs_lib.TimeRatio(cost.time.median * f, cost.time.q1 * f,
                                                      cost.time.q3 * f), row)


def equal_compute(entries: Sequence[frontier_lib.Entry], computes: Mapping[str, Compute],
                  target: float, method: str, which: str = FLOPS) -> frontier_lib.Entry | None:
  """The cheapest arm of ``method`` with at least ``target`` compute, papers' arms aside.

  For SGD its budget arms; for SAM its tuned arm and its budget arms (at the
  tuned radius). ``at least`` within :data:`TOLERANCE`: a compute of
  ``1.05 × c`` counts as ``c``. None when no arm of the method is that large.
  """
  arms = [e for e in entries if e.method == method and e.role != frontier_lib.PAPER
          and computes[e.arm.name].measure(which) * (1 + TOLERANCE) >= target]
  return min(arms, key=lambda e: computes[e.arm.name].measure(which), default=None)


def pareto(points: Sequence[tuple[float, float]], *, higher_is_better: bool) -> list[int]:
  """Indices of the points no other point beats at no more compute, by compute.

  ``points``: ``(compute, metric)``. A point is on the front when every
  point of no more compute has a worse metric (ties: the cheaper one).

  Example:
    >>> pareto([(1, 0.70), (2, 0.75), (1.5, 0.69), (3, 0.74)], higher_is_better=True)
    [0, 1]
  """
  sign = 1.0 if higher_is_better else -1.0
  order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
  front, best = [], -np.inf
  for i in order:
    if sign * points[i][1] > best:
      front.append(i)
      best = sign * points[i][1]
  return front


@dataclasses.dataclass
class Comparison:
  """An arm against another arm of at least its compute, on test accuracy."""

  other: str | None
  text: str
  verdict: str | None


def versus(results: Results, entry: frontier_lib.Entry, other: frontier_lib.Entry | None
           ) -> Comparison:
  if other is None:
    return Comparison(None, "no arm of that compute", None)
  if other.arm.name == entry.arm.name:
    return Comparison(other.arm.name, "itself", None)
  comparison = rule.compare(values(results, entry.arm.name, "accuracy"),
                            values(results, other.arm.name, "accuracy"), claim="greater")
  return Comparison(other.arm.name, f"{comparison.difference:+.2f} ± {comparison.standard_error:.2f}",
                    comparison.verdict)


@dataclasses.dataclass
class BudgetRow:
  """The method chosen (on the tuning draw) at a budget, and how it does (reported draw)."""

  regime: str
  budget: float
  chosen: str
  tuning_accuracy: float
  compute: float
  sgd: str
  versus_sgd: Comparison


def budget_rows(config, entries, computes, results, tuning, which: str = FLOPS
                ) -> list[BudgetRow]:
  """For every regime and budget (config.sgd_epochs): the best arm within it.

  The candidates are each method's tuned arm and the budget arms of SGD and
  SAM; the choice is by test accuracy on the tuning draw (``tuning``: arm
  name → accuracy), never on the reported draw; it is then compared on the
  reported draw with SGD trained for the budget's epochs.
  """
  rows = []
  for regime in config.regimes:
    pool = [e for e in entries if e.regime == regime and e.role != frontier_lib.PAPER]
    for budget in config.sgd_epochs:
      within = [e for e in pool
                if computes[e.arm.name].measure(which) <= budget * (1 + TOLERANCE)]
      chosen = max(within, key=lambda e: (tuning[e.arm.name],
                                          -computes[e.arm.name].measure(which)))
      sgd = next(e for e in pool if e.method == "sgd" and e.epochs_factor == budget)
      rows.append(BudgetRow(regime, budget, chosen.arm.name, tuning[chosen.arm.name],
                            computes[chosen.arm.name].measure(which), sgd.arm.name,
                            versus(results, chosen, sgd)))
  return rows


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------

_METRICS = (("accuracy", "test accuracy (%)", True), ("ece", "ECE (%)", False),
            ("hessian", "λ_max", False), ("hessian_trace", "Hessian trace", False))


def short_label(entry: frontier_lib.Entry) -> str:
  """How a figure names an arm: ``sam``, ``sam (paper)``, ``sgd 1.5× epochs``."""
  if entry.role == frontier_lib.BUDGET:
    return f"{entry.method} {entry.epochs_factor:g}× epochs"
  return entry.method + (" (paper)" if entry.role == frontier_lib.PAPER else "")


def _limits(means: Sequence[float]) -> tuple[float, float]:
  """The axis range of a panel: the bulk of the points, not a collapsed run far below them."""
  lo, hi = np.percentile(means, [10, 90])
  pad = max(hi - lo, 1e-3)
  lo, hi = max(min(means), lo - 1.5 * pad), min(max(means), hi + 1.5 * pad)
  if hi - lo < 1e-9:  # every point alike: a range around them
    half = 0.05 * max(abs(hi), 1.0)
    return lo - half, hi + half
  return lo, hi


def plot_frontier(config, entries, computes, results, path: str, *, which: str = FLOPS,
                  metrics=_METRICS) -> str:
  """Each metric against compute, one row per regime: mean ± std, Pareto front in black.

  A point outside the panel's range (a collapsed run) is drawn on its edge as
  a triangle, with its value.
  """
  regimes = list(config.regimes)
  methods = ["sgd"] + list(frontier_lib.frontier_methods(config))
  color_of = dict(zip(methods, plots.colors(len(methods))))
  # One row per regime; with one metric, the regimes side by side.
  rows, cols = (len(regimes), len(metrics)) if len(metrics) > 1 else (1, len(regimes))
  figure = Figure(figsize=(4.4 * cols + 1.6, 3.8 * rows + 0.4))
  grid = figure.subplots(rows, cols, squeeze=False)
  axes = grid if len(metrics) > 1 else [[grid[0][i]] for i in range(len(regimes))]
  for row, regime in enumerate(regimes):
    shown = [e for e in entries if e.regime == regime and e.arm.name in results]
    for col, (metric, label, higher) in enumerate(metrics):
      ax = axes[row][col]
      means = [float(np.mean(values(results, e.arm.name, metric))) for e in shown]
      lo, hi = _limits(means)
      margin = 0.04 * (hi - lo)
      points = []
      for e, mean in zip(shown, means):
        v = values(results, e.arm.name, metric)
        x = computes[e.arm.name].measure(which)
        color = color_of[e.method]
        if lo - margin <= mean <= hi + margin:
          ax.errorbar(x, mean, yerr=np.std(v, ddof=1) if len(v) > 1 else 0,
                      fmt="s" if e.role == frontier_lib.BUDGET else "o", ms=5, capsize=2,
                      color=color, mfc="none" if e.role == frontier_lib.PAPER else color,
                      label=e.method if row == 0 and col == 0 else None)
        else:
          edge = lo - margin if mean < lo else hi + margin
          ax.plot(x, edge, "v" if mean < lo else "^", color=color, ms=6)
          ax.annotate(f"{short_label(e)}: {mean:.3g}", (x, edge), fontsize=6,
                      xytext=(4, 4 if mean < lo else -8), textcoords="offset points")
        points.append((x, mean))
      front = pareto(points, higher_is_better=higher)
      ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post",
              color="k", lw=1, alpha=0.6)
      for i in front:
        ax.annotate(short_label(shown[i]), points[i], fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
      ax.set_ylim(lo - 2 * margin, hi + 2 * margin)
      ax.set_xlabel("compute (SGD run = 1)")
      ax.set_ylabel(label)
      ax.set_title(f"{regime}: {label}", fontsize=9)
      ax.grid(alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  figure.legend(unique.values(), unique.keys(), loc="center right", fontsize=7)
  figure.suptitle(
      f"MNIST-1D MLP: metrics against compute in {which} (mean ± std, {len(config.seeds)}"
      " seeds).\nFilled: tuned; hollow: papers' hyperparameters; squares: SGD and SAM at other"
      " epochs; black: Pareto front", fontsize=9)
  figure.subplots_adjust(left=0.9 / figure.get_figwidth(),
                         right=1 - 1.5 / figure.get_figwidth(), top=1 - 0.8 / figure.get_figheight(),
                         hspace=0.4, wspace=0.3)
  return plots.save_figure(figure, path)


# --------------------------------------------------------------------------
# The files.
# --------------------------------------------------------------------------


def _hparams(hparams: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in hparams.items())


def _cell(comparison: Comparison) -> str:
  if comparison.verdict is None:
    return comparison.text
  return f"{comparison.other}: {comparison.text} → **{comparison.verdict}**"


def arm_table(config, regime, entries, computes, results) -> str:
  lines = ["| arm | role | hyperparameters | epochs | compute (flops) | compute (time) | seeds"
           " | test acc. (%) | ECE (%) | λ_max | tr H | acc. vs SGD of ≥ its compute"
           " | acc. vs SAM of ≥ its compute |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
  mine = [e for e in entries if e.regime == regime]
  for e in sorted(mine, key=lambda e: computes[e.arm.name].flops):
    c = computes[e.arm.name]
    sgd = versus(results, e, equal_compute(mine, computes, c.flops, "sgd"))
    sam = versus(results, e, equal_compute(mine, computes, c.flops, "sam"))
    cells = [mean_std(results, e.arm.name, k, d)
             for k, d in (("accuracy", 1), ("ece", 1), ("hessian", 2), ("hessian_trace", 1))]
    lines.append(
        f"| {e.arm.name} | {e.role} | {_hparams(e.arm.hparams)} |"
        f" {results[e.arm.name][0]['epochs']} | {c.flops:.2f} |"
        f" {c.time.median:.2f} [{c.time.q1:.2f}–{c.time.q3:.2f}] |"
        f" {len(results[e.arm.name])} | " + " | ".join(cells) + f" | {_cell(sgd)} | {_cell(sam)} |")
  return "\n".join(lines)


def budget_table(rows: Sequence[BudgetRow], results: Results) -> str:
  lines = ["| regime | budget (× SGD run) | best within it (chosen on the tuning draw) |"
           " tuning-draw acc. (%) | its compute | its test acc. (%) | SGD at the budget |"
           " SGD's test acc. (%) | gain (points, ± se) | verdict: beats SGD at equal compute |",
           "|---|---:|---|---:|---:|---:|---|---:|---:|---|"]
  for r in rows:
    gain = r.versus_sgd.text if r.versus_sgd.verdict else "— (SGD itself)"
    verdict = f"**{r.versus_sgd.verdict}**" if r.versus_sgd.verdict else "—"
    lines.append(f"| {r.regime} | {r.budget:g}× | {r.chosen} | {100 * r.tuning_accuracy:.1f} |"
                 f" {r.compute:.2f} | {mean_std(results, r.chosen, 'accuracy')} | {r.sgd} |"
                 f" {mean_std(results, r.sgd, 'accuracy')} | {gain} | {verdict} |")
  return "\n".join(lines)


def not_worth_it(config, entries, computes, results) -> list[str]:
  """The tuned methods that do not beat SGD given at least their compute, plainly."""
  lines = []
  for regime in config.regimes:
    mine = [e for e in entries if e.regime == regime]
    for e in mine:
      if e.role not in (frontier_lib.TUNED, frontier_lib.BOTH):
        continue
      c = computes[e.arm.name].flops
      comparison = versus(results, e, equal_compute(mine, computes, c, "sgd"))
      if comparison.verdict in (rule.FAILS, rule.INCONCLUSIVE):
        lines.append(f"- {regime}: **{e.method}** ({c:.2f}× compute) against"
                     f" {comparison.other}: {comparison.text} points → {comparison.verdict}")
      elif comparison.verdict is None and comparison.other is None:
        lines.append(f"- {regime}: **{e.method}** ({c:.2f}× compute): no SGD arm of that"
                     " compute")
  return lines


def tuning_table(config, tuning: Mapping[str, float],
                 chosen: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
  """Each grid's accuracies on the tuning draw; a choice at an end of the grid is marked."""
  lines = ["| regime | method | grid: test acc. on the tuning draw (%) | chosen |",
           "|---|---|---|---|"]
  for regime in config.regimes:
    for method in frontier_lib.frontier_methods(config):
      grid = frontier_lib.candidates(config, method)
      cells = [f"{label}: {100 * tuning[frontier_lib.arm_of(config, regime, method, h).name]:.1f}"
               for label, h in grid]
      choice = _hparams(chosen[(regime, method)])
      if dict(chosen[(regime, method)]) in (grid[0][1], grid[-1][1]):
        choice += " (an end of the grid: the best value may lie beyond it)"
      lines.append(f"| {regime} | {method} | {'; '.join(cells)} | {choice} |")
  return "\n".join(lines)


def write(config, workdir: str, entries: Sequence[frontier_lib.Entry], results: Results,
          tuning: Mapping[str, float], chosen: Mapping[tuple[str, str], Mapping[str, Any]],
          benchmark: costs_lib.BenchmarkCosts | None = None,
          recorded: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes FRONTIER.md, frontier.json and the figures; returns the JSON summary.

  ``benchmark``: the run the costs are read from (default: the committed
  ``benchmarks/results-cpu.json``). ``recorded``: a frontier.json whose
  ``machine`` (where the runs were trained) is kept (default: this machine).
  """
  benchmark = benchmark or costs_lib.read_benchmark()
  check_settings(config, benchmark)
  computes = {e.arm.name: compute(e, benchmark) for e in entries}
  figures = {
      "frontier": plot_frontier(config, entries, computes, results,
                                os.path.join(workdir, "frontier.png")),
      "frontier_time": plot_frontier(config, entries, computes, results,
                                     os.path.join(workdir, "frontier_time.png"), which=TIME,
                                     metrics=_METRICS[:1]),
  }
  budgets = {which: budget_rows(config, entries, computes, results, tuning, which)
             for which in (FLOPS, TIME)}
  summary = {
      "rule": rule.RULE,
      "tolerance": TOLERANCE,
      "benchmark": {"path": os.path.relpath(benchmark.path, _ROOT), "date": benchmark.date,
                    "task": TASK},
      "budgets": {which: [dataclasses.asdict(r) for r in rows] for which, rows in budgets.items()},
      "tuning": dict(tuning),
      "chosen": {f"{regime}/{method}": dict(h) for (regime, method), h in chosen.items()},
      "arms": {e.arm.name: {"regime": e.regime, "method": e.method, "role": e.role,
                            "epochs_factor": e.epochs_factor, "hparams": dict(e.arm.hparams),
                            "compute": {"flops": computes[e.arm.name].flops,
                                        "time": dataclasses.asdict(computes[e.arm.name].time),
                                        "benchmark_row": computes[e.arm.name].row},
                            "runs": [{k: v for k, v in run.items() if k not in _PER_EPOCH}
                                     for run in results[e.arm.name]]}
               for e in entries},
      "config": config.to_dict(),
      "machine": recorded["machine"] if recorded else {
          "platform": platform.platform(), "processor": platform.processor(),
          "cpus": os.cpu_count(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()]},
      "figures": {k: os.path.basename(v) for k, v in figures.items()},
  }
  with open(os.path.join(workdir, "frontier.json"), "w", encoding="utf-8") as stream:
    json.dump(summary, stream, indent=1, default=float)
  text = describe(config, entries, computes, results, tuning, chosen, budgets, benchmark,
                  summary["figures"])
  with open(os.path.join(workdir, "FRONTIER.md"), "w", encoding="utf-8") as stream:
    stream.write(text)
  return summary


def describe(config, entries, computes, results, tuning, chosen, budgets, benchmark,
             figures) -> str:
  seeds = len(config.seeds)
  lines = not_worth_it(config, entries, computes, results)
  regimes = "\n\n".join(f"### {regime}\n\n" + arm_table(config, regime, entries, computes, results)
                        for regime in config.regimes)
  return f"""# The efficiency frontier

Generated by `python -m experiments.study --config=experiments/configs/frontier.py`
({len(entries)} arms, {seeds} seeds each on the reported draw `data_seed = {config.data_seed}`;
hyperparameters and the best method per budget chosen on the independent draw
`tuning_data_seed = {config.tuning_data_seed}`, one seed). Regimes: {', '.join(config.regimes)}
(`experiments/configs/frontier.py`). Every number is the mean ± std over {seeds} seeds.

**Compute** is an arm's epochs × its method's cost per step relative to SGD's, read from the
benchmark run of {benchmark.date} (`{os.path.relpath(benchmark.path, _ROOT)}`, task
`{TASK}`): *flops* is XLA's flop count of the compiled step (gradient evaluations), *time* the
median [IQR] interleaved step time on this CPU (the cheaper compiled form where a method has
two). SGD for the regime's epochs is 1. A compute within {100 * TOLERANCE:.0f} % above a budget
counts as that budget.

**Verdicts** use the study's rule: {rule.RULE}

## Budget → best method (compute in {FLOPS})

For each budget, the best arm whose compute fits it, chosen by test accuracy on the tuning draw
among each method's tuned arm and the SGD and SAM arms at other epochs; then compared on the
reported draw with SGD trained for the budget's epochs.

{budget_table(budgets[FLOPS], results)}

## Budget → best method (compute in {TIME})

{budget_table(budgets[TIME], results)}

## Tuned methods that do not beat SGD given at least their compute

{chr(10).join(lines) if lines else "None: every tuned method beats SGD at equal compute."}

## Every arm

Roles: *paper* (the constructor's default, its paper's value), *tuned* (chosen on the tuning
draw), *paper = tuned* (the tuning chose the papers' value), *budget* (SGD and SAM at other
epochs). The last two columns compare test accuracy (points, ± se) with the cheapest SGD and
SAM arm of at least the arm's compute (flops).

{regimes}

## Tuning (test accuracy on the tuning draw, one seed)

{tuning_table(config, tuning, chosen)}

## Figures

![frontier]({figures['frontier']})

![frontier in wall time]({figures['frontier_time']})
"""


def rewrite(workdir: str) -> dict[str, Any]:
  """Writes the report again from ``workdir/frontier.json``, training nothing.

  The comparisons are recomputed from the recorded runs, and the compute from
  the committed benchmark run (:mod:`experiments.costs`): a new benchmark run
  moves the compute axis without retraining. ``python -m
  experiments.frontier_report`` calls it.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel

  with open(os.path.join(workdir, "frontier.json"), encoding="utf-8") as stream:
    recorded = json.load(stream)
  config = ml_collections.ConfigDict(recorded["config"])
  entries = [frontier_lib.Entry(frontier_lib.study_lib.Arm(name, arm["regime"], arm["method"],
                                                           arm["hparams"]),
                                arm["role"], arm["epochs_factor"])
             for name, arm in recorded["arms"].items()]
  results = {name: arm["runs"] for name, arm in recorded["arms"].items()}
  chosen = {tuple(key.split("/")): hparams for key, hparams in recorded["chosen"].items()}
  return write(config, workdir, entries, results, recorded["tuning"], chosen, recorded=recorded)


if __name__ == "__main__":
  import argparse  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(
      prog="python -m experiments.frontier_report",
      description="Writes the frontier's report again from its frontier.json (no training).")
  parser.add_argument("--workdir", default=frontier_lib.DEFAULT_WORKDIR)
  rewrite(parser.parse_args().workdir)
