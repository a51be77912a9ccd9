"""The efficiency frontier: which method is worth its cost, at every budget.

``python -m experiments.study --config=experiments/configs/frontier.py`` trains
every method of the registry on the config's regimes (see
``experiments/configs/frontier.py``), at its papers' hyperparameters and at
hyperparameters tuned on an independent draw of the data, next to SGD and SAM
at other numbers of epochs, and writes to ``--workdir`` (default
:data:`DEFAULT_WORKDIR`):

* ``FRONTIER.md`` -- for each budget (a multiple of an SGD run's compute) the
  method chosen on the tuning draw, its gain over SGD at that budget and the
  verdict under the study's rule (:mod:`experiments.verdict`); every arm
  against SGD and SAM given at least its compute; the tuning grids;
* ``frontier.json`` -- the same, with every run's numbers;
* ``frontier.png`` (accuracy, ECE, λ_max and Hessian trace against compute
  in gradient evaluations, Pareto front drawn) and ``frontier_time.png``
  (accuracy against wall time);
* ``runs/`` -- each run's summary (finished runs are reused: rerunning the
  command resumes an interrupted frontier; ``--config.num_shards`` and
  ``--config.shard_index`` share it between processes, as in the study).

A run's compute is not timed here: it is the arm's number of epochs, times
the method's cost per step relative to SGD's in the committed benchmark run
(``benchmarks/results-cpu.json``, :mod:`experiments.costs`), both in XLA flops
and in interleaved step time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from experiments import methods as registry
from experiments import study as study_lib

DEFAULT_WORKDIR = os.path.join("experiments", "results", "frontier")

# The hyperparameters that are a method's radius; scaled together (their
# ratio kept) by the config's radius_factors. Every other method's is "rho",
# unless the config gives it a grid of its own.
RADII: dict[str, tuple[str, ...]] = {"gsam": ("rho", "rho_min"), "bsam": ("rho_max", "rho_min")}

#: The roles of an arm: the method at its papers' or tuned hyperparameters
#: (one arm where they coincide), or an equal-compute arm of SGD or SAM.
PAPER, TUNED, BOTH, BUDGET = "paper", "tuned", "paper = tuned", "budget"


@dataclasses.dataclass(frozen=True)
class Entry:
  """An arm of the frontier and what it stands for.

  Attributes:
    arm: the trained setting (:class:`experiments.study.Arm`).
    role: :data:`PAPER`, :data:`TUNED`, :data:`BOTH` or :data:`BUDGET`.
    epochs_factor: its epochs as a multiple of the regime's.
  """

  arm: study_lib.Arm
  role: str
  epochs_factor: float = 1.0

  @property
  def regime(self) -> str:
    return self.arm.regime

  @property
  def method(self) -> str:
    return self.arm.method


def frontier_methods(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config's methods (every registry method but SGD when it names none)."""
  names = tuple(config.methods) or tuple(m for m in registry.METHODS if m != "sgd")
  for name in names:
    registry.get_method(name)  # a ValueError naming the choices
    if name == "sgd":
      raise ValueError("config.methods: 'sgd' is not a method to compare; its arms are"
                       " config.sgd_epochs.")
  return names


def _number(value: float) -> float:
  """``value`` without the float noise of a product (0.15000000000000002 → 0.15)."""
  return float(f"{value:.10g}")


def paper_hparams(config, method: str) -> dict[str, Any]:
  """The method's tuned hyperparameters at its papers' values, and its cost settings."""
  defaults = registry.hparams_for(method)
  keys = tuple(config.grids[method]) if method in config.grids else RADII.get(method, ("rho",))
  settings = dict(config.settings.get(method, {}))
  registry.hparams_for(method, settings)  # unknown names are errors
  return {**{key: defaults[key] for key in keys}, **settings}


def candidates(config, method: str) -> list[tuple[str, dict[str, Any]]]:
  """``(value label, hyperparameters)`` of every point of the method's tuning grid."""
  paper = paper_hparams(config, method)
  if method in config.grids:
    grid = dict(config.grids[method])
    if len(grid) != 1:
      raise ValueError(f"config.grids.{method} must name one hyperparameter, got {sorted(grid)}.")
    (key, values), = grid.items()
    return [(f"{key}={v:g}", {**paper, key: _number(v)}) for v in values]
  radii = RADII.get(method, ("rho",))
  return [(f"×{f:g}", {**paper, **{k: _number(paper[k] * f) for k in radii}})
          for f in config.radius_factors]


def _name(regime: str, method: str, hparams: Mapping[str, Any], epochs: int | None) -> str:
  """A folder name that says the setting: ``clean-sam-rho0.5``, ``noisy-sgd-epochs90``."""
  parts = [regime, method] + [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
                              for k, v in hparams.items()]
  if epochs is not None:
    parts.append(f"epochs{epochs}")
  return "-".join(parts)


def _epochs(config, regime: str, factor: float) -> int:
  epochs = config[regime]["num_epochs"] * factor
  if abs(epochs - round(epochs)) > 1e-9 or round(epochs) < 1:
    raise ValueError(f"{factor:g} × {regime}'s {config[regime]['num_epochs']} epochs is not a"
                     " whole number of epochs.")
  return int(round(epochs))


def arm_of(config, regime: str, method: str, hparams: Mapping[str, Any],
           factor: float = 1.0) -> study_lib.Arm:
  """The arm of ``method`` with ``hparams`` in ``regime``, at ``factor`` × its epochs."""
  changes = {} if factor == 1.0 else {"num_epochs": _epochs(config, regime, factor)}
  epochs = _epochs(config, regime, factor) if method == "sgd" or factor != 1.0 else None
  return study_lib.Arm(_name(regime, method, hparams, epochs), regime, method, dict(hparams),
                       changes)


def sgd_entries(config, regime: str) -> list[Entry]:
  return [Entry(arm_of(config, regime, "sgd", {}, f), BUDGET, f) for f in config.sgd_epochs]


def sam_entries(config, regime: str, tuned_sam: Mapping[str, Any]) -> list[Entry]:
  return [Entry(arm_of(config, regime, "sam", tuned_sam, f), BUDGET, f) for f in config.sam_epochs]


def tuning_entries(config) -> list[Entry]:
  """Every tuning run's arm (one seed, the tuning draw): each grid, and SGD's budgets."""
  entries = []
  for regime in config.regimes:
    for method in frontier_methods(config):
      entries += [Entry(arm_of(config, regime, method, hparams), TUNED)
                  for _, hparams in candidates(config, method)]
    entries += sgd_entries(config, regime)
  return entries


def choose(config, tuning: Mapping[str, float]) -> dict[tuple[str, str], dict[str, Any]]:
  """``{(regime, method): hparams}``: each grid's best test accuracy on the tuning draw.

  ``tuning`` maps a tuning arm's name to its accuracy; a tie goes to the
  first point of the grid (the papers' value first).
  """
  chosen = {}
  for regime in config.regimes:
    for method in frontier_methods(config):
      grid = [arm_of(config, regime, method, hparams) for _, hparams in candidates(config, method)]
      best = max(grid, key=lambda arm: tuning[arm.name])
      chosen[(regime, method)] = dict(best.hparams)
  return chosen


def frontier_entries(config, chosen: Mapping[tuple[str, str], Mapping[str, Any]]) -> list[Entry]:
  """Every arm on the reported draw, given the tuned hyperparameters."""
  entries = []
  for regime in config.regimes:
    entries += sgd_entries(config, regime)
    for method in frontier_methods(config):
      paper, tuned = paper_hparams(config, method), chosen[(regime, method)]
      if paper == tuned:
        entries.append(Entry(arm_of(config, regime, method, paper), BOTH))
      else:
        entries += [Entry(arm_of(config, regime, method, paper), PAPER),
                    Entry(arm_of(config, regime, method, tuned), TUNED)]
    if "sam" in frontier_methods(config):
      entries += sam_entries(config, regime, chosen[(regime, "sam")])
  return entries


def run_frontier(config: ml_collections.ConfigDict, workdir: str = DEFAULT_WORKDIR
                 ) -> dict[str, Any] | None:
  """Runs (this shard of) the frontier; with every run done, writes the report."""
  shards = study_lib.Shards(config.shard_index, config.num_shards)


  def tune(entries: Sequence[Entry]) -> dict[str, float]:
    """Test accuracy on the tuning draw (one seed) by arm name; waits for other shards'."""
    runs = [study_lib.Run(e.arm, config.tuning_seed, config.tuning_data_seed,
                          os.path.join(workdir, "runs", "tuning", e.arm.name)) for e in entries]
    summaries = shards.run(config, runs, wait=True, describe=lambda run, s: (
        f"tuning {run.arm.name}: test acc {s['accuracy']:.4f}"))
    return {run.arm.name: summary["accuracy"] for run, summary in zip(runs, summaries)}

  # 1. Tuning, on the independent draw: every grid and SGD's budgets; then SAM's
  #    budgets at its tuned radius (with SGD's, the candidates of the budget table).
  tuning = tune(tuning_entries(config))
  chosen = choose(config, tuning)
  study_lib.log(f"tuned: { {f'{r}/{m}': h for (r, m), h in chosen.items()} }")
  if "sam" in frontier_methods(config):
    tuning.update(tune([e for regime in config.regimes
                        for e in sam_entries(config, regime, chosen[(regime, "sam")])]))

  # 2. Every arm, on the reported draw.
  entries = frontier_entries(config, chosen)
  reported = [study_lib.Run(e.arm, seed, config.data_seed,
                            os.path.join(workdir, "runs", e.arm.name, f"seed{seed}"))
              for e in entries for seed in config.seeds]
  results = shards.results(config, reported)
  if results is None:
    return None
  from experiments import frontier_report  # pylint: disable=import-outside-toplevel
  return frontier_report.write(config, workdir, entries, results, tuning, chosen)
