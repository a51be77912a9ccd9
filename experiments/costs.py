"""A method's measured cost per step, read from the committed benchmark run.

``python -m benchmarks.run`` writes ``benchmarks/results-<platform>.json``:
``tasks`` (``resnet``, ``mnist1d``), each with ``rows``, one per method, that
hold the interleaved step-time ratio to SGD's (``ratio_median``,
``ratio_q1``, ``ratio_q3``: median and interquartile range over rounds in
which the methods alternate) and the ratio of the compiled step's XLA flops
to SGD's (``flops_ratio``). The study cites these numbers
(:mod:`experiments.study_report`) rather than copies of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

#: The committed CPU benchmark run, from the repository's root.
BENCHMARK_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "benchmarks", "results-cpu.json")


@dataclasses.dataclass(frozen=True)
class TimeRatio:
  """A step-time ratio to SGD's: median and interquartile range over rounds."""

  median: float
  q1: float
  q3: float

  @property
  def spread(self) -> float:
    """The interval's larger half-width (the ``spread`` of :func:`experiments.verdict.at_most`)."""
    return max(self.q3 - self.median, self.median - self.q1)


@dataclasses.dataclass(frozen=True)
class MethodCost:
  """One method's cost per step in one benchmark task, relative to SGD's."""

  time: TimeRatio
  flops: float


@dataclasses.dataclass(frozen=True)
class BenchmarkCosts:
  """The costs of a benchmark run: ``costs[task][method]``, with the run's date and file.

  ``settings``: what the run measured with (the methods' fixed hyperparameters,
  e.g. ``cycle``, LookSAM's and interval SAM's k; the batch size).
  """

  costs: Mapping[str, Mapping[str, MethodCost]]
  date: str
  path: str
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def cost(self, task: str, method: str) -> MethodCost:
    if task not in self.costs:
      raise KeyError(f"{self.path} has no task {task!r}; it has {sorted(self.costs)}.")
    if method not in self.costs[task]:
      raise KeyError(f"{self.path} has no row {method!r} in task {task!r}; it has"
                     f" {sorted(self.costs[task])}.")
    return self.costs[task][method]


_ROW_FIELDS = ("method", "ratio_median", "ratio_q1", "ratio_q3", "flops_ratio")


def read_benchmark(path: str = BENCHMARK_JSON,
                   methods: Sequence[str] | None = None) -> BenchmarkCosts:
  """The step-time and flops ratios to SGD of every task's rows in ``path``.

  Args:
    path: a ``results-<platform>.json`` written by ``python -m benchmarks.run``.
    methods: the rows to read (their ``method`` names, e.g. ``'saf'``); None:
      every row. A name missing from a task is an error.

  Example:
    >>> costs = read_benchmark()
    >>> saf = costs.cost("resnet", "saf")
    >>> saf.time.q1 <= saf.time.median <= saf.time.q3 and saf.flops > 0
    True
  """
  with open(path, encoding="utf-8") as stream:
    run: dict[str, Any] = json.load(stream)
  for field in ("tasks", "date"):
    if field not in run:
      raise ValueError(f"{path} is not a benchmark run: it has no {field!r} (fields:"
                       f" {sorted(run)}); write it with `python -m benchmarks.run`.")
  costs: dict[str, dict[str, MethodCost]] = {}
  for task in run["tasks"]:
    rows = {}
    for row in task["rows"]:
      missing = [f for f in _ROW_FIELDS if f not in row]
      if missing:
        raise ValueError(f"{path}: a row of task {task['name']!r} lacks {missing}.")
      if methods is None or row["method"] in methods:
        time = TimeRatio(float(row["ratio_median"]), float(row["ratio_q1"]),
                         float(row["ratio_q3"]))
        if not time.q1 <= time.median <= time.q3:
          raise ValueError(f"{path}: {task['name']}/{row['method']}: the time ratio's"
                           f" quartiles are out of order: {time}.")
        rows[row["method"]] = MethodCost(time, float(row["flops_ratio"]))
    for method in methods or ():
      if method not in rows:
        raise ValueError(f"{path}: task {task['name']!r} has no row {method!r}; it has"
                         f" {sorted(r['method'] for r in task['rows'])}.")
    costs[task["name"]] = rows
  return BenchmarkCosts(costs, str(run["date"]), path, dict(run.get("settings", {})))
