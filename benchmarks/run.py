"""``python -m benchmarks.run``: the cost of every method, in one run.

Measures every method of the method table (:mod:`benchmarks.methods`) on
each task, then how SGD's and SAM's cost grow with the model's width and
with the number of devices, prints the tables while a progress bar runs, and
writes ``RESULTS.md``, ``results-<platform>.json`` and
``benchmark-<platform>.png`` to ``--output-dir`` (``benchmarks/``).

Examples::

  python -m benchmarks.run                  # the full run (~10 min on 2 CPU cores)
  python -m benchmarks.run --quick          # smaller batches, fewer steps
  python -m benchmarks.run --tasks mnist1d --steps 50 --no-scaling

On a CPU the device-scaling study uses fake devices: this module sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax starts.
"""

from __future__ import annotations

import os
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
if "jax" not in sys.modules and _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=wrong-import-position
import argparse
import dataclasses
import shlex
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
from tqdm import tqdm

from benchmarks import measure, methods as methods_lib, report, tasks as tasks_lib

DEFAULT_STEPS = {"resnet": 30, "mnist1d": 1000}
QUICK_STEPS = {"resnet": 10, "mnist1d": 250}
# Steps per timing window (multiples of k): a window of a sub-millisecond
# step must be long enough not to be all timer and scheduler noise.
WINDOWS = {"resnet": methods_lib.CYCLE, "mnist1d": 5 * methods_lib.CYCLE}


@dataclasses.dataclass
class Settings:
  """What one run measures (the command line, parsed)."""

  tasks: list[str]
  methods: list[str] | None
  batch: int
  steps: int | None
  window: int | None
  widths: list[float]
  width_batch: int
  devices: list[int]
  scaling_task: str
  scaling_steps: int
  output_dir: str
  note: str
  quick: bool

  def steps_for(self, task: str) -> int:
    if self.steps is not None:
      return self.steps
    return (QUICK_STEPS if self.quick else DEFAULT_STEPS).get(task, 30)

  def rounds_and_window(self, steps: int, task: str) -> tuple[int, int]:
    window = self.window or WINDOWS.get(task, methods_lib.CYCLE)
    window = max(1, min(window, steps))
    return max(1, steps // window), window


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()] if text else []


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()] if text else []


def parse_args(argv: Sequence[str] | None = None) -> Settings:
  """The command line as :class:`Settings` (``--help`` lists the options)."""
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--tasks", default="resnet,mnist1d",
                      help=f"comma-separated, from {sorted(tasks_lib.TASKS)}")
  parser.add_argument("--methods", default="",
                      help="comma-separated method names (default: all; sgd is always in)")
  parser.add_argument("--batch", type=int, default=None,
                      help="batch size of the main tables (default 128, 32 with --quick)")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per method and task (default: resnet"
                           f" {DEFAULT_STEPS['resnet']}, mnist1d {DEFAULT_STEPS['mnist1d']})")
  parser.add_argument("--window", type=int, default=None,
                      help=f"steps per timing window, a multiple of k (default: {WINDOWS})")
  parser.add_argument("--widths", default=None,
                      help="width multipliers of the scaling study (default 1,2,4)")
  parser.add_argument("--width-batch", type=int, default=32,
                      help="batch size of the width-scaling study")
  parser.add_argument("--devices", default=None,
                      help="device counts of the scaling study (default 1,2,4,8)")
  parser.add_argument("--scaling-task", default="resnet",
                      help="task of the scaling studies")
  parser.add_argument("--scaling-steps", type=int, default=None,
                      help="timed steps per method and size in the scaling studies"
                           " (default 10, 3 with --quick)")
  parser.add_argument("--no-scaling", action="store_true", help="skip the scaling studies")
  parser.add_argument("--quick", action="store_true",
                      help="batch 32, fewer steps, widths 1,2, devices 1,2")
  parser.add_argument("--output-dir", default=os.path.dirname(os.path.abspath(__file__)),
                      help="where RESULTS.md, the JSON and the chart go")
  parser.add_argument("--note", default="", help="a remark printed at the top of the results")
  args = parser.parse_args(argv)
  quick = args.quick
  widths = _floats(args.widths) if args.widths is not None else ([1, 2] if quick else [1, 2, 4])
  devices = _ints(args.devices) if args.devices is not None else ([1, 2] if quick else [1, 2, 4, 8])
  if args.no_scaling:
    widths, devices = [], []
  names = [t for t in args.tasks.split(",") if t]
  for name in names + ([args.scaling_task] if widths or devices else []):
    if name not in tasks_lib.TASKS:
      parser.error(f"unknown task {name!r}; choose from {sorted(tasks_lib.TASKS)}")
  return Settings(
      tasks=names,
      methods=[m for m in args.methods.split(",") if m] or None,
      batch=args.batch or (32 if quick else 128),
      steps=args.steps,
      window=args.window,
      widths=widths,
      width_batch=args.width_batch,
      devices=devices,
      scaling_task=args.scaling_task,
      scaling_steps=args.scaling_steps or (3 if quick else 10),
      output_dir=args.output_dir,
      note=args.note,
      quick=quick,
  )


# --------------------------------------------------------------------------
# The studies.
# --------------------------------------------------------------------------


def text_table(task: dict[str, Any]) -> str:
  """A task's rows as fixed-width text for the terminal."""
  lines = [f"{task['name']}: {task['description']}",
           f"{'method':34s} {'theory':>6s} {'flops×':>7s} {'time×':>6s} {'IQR':>11s}"
           f" {'ms/step':>9s} {'+mem':>6s} {'+state':>6s}"]
  for r in task["rows"]:
    lines.append(
        f"{r['method']:34s} {r['theory']:6.3g} {r['flops_ratio']:7.3f}"
        f" {r['ratio_median']:6.2f} {r['ratio_q1']:5.2f}–{r['ratio_q3']:<5.2f}"
        f" {r['time_median'] * 1e3:9.2f} {r['extra_peak_copies']:+6.2f}"
        f" {r['extra_state_copies']:+6.2f}")
  return "\n".join(lines)


def measure_task(
    task: tasks_lib.Task,
    table: Sequence[methods_lib.Method],
    rounds: int,
    window: int,
    bar: tqdm,
    mesh=None,
) -> dict[str, measure.Compiled]:
  """Compiles every method of ``table`` on ``task`` and times them interleaved."""
  def compiled(name):
    bar.set_postfix_str(f"{task.name}: compiled {name}")
    bar.update(1)

  def timed(name):
    bar.set_postfix_str(f"{task.name}: timing {name}")
    bar.update(1)

  results = measure.measure_methods(task, table, mesh, on_compiled=compiled)
  measure.time_interleaved([c.runner for c in results.values()], rounds, window, timed)
  return results


def run_tasks(settings: Settings, table, bar: tqdm) -> list[dict[str, Any]]:
  out = []
  for name in settings.tasks:
    task = tasks_lib.TASKS[name](batch_size=settings.batch)
    rounds, window = settings.rounds_and_window(settings.steps_for(name), name)
    fraction = measure.forward_fraction(task)
    results = measure_task(task, table, rounds, window, bar)
    entry = {
        "name": name, "description": task.description, "num_params": task.num_params,
        "param_bytes": task.param_bytes, "forward_fraction": fraction,
        "rounds": rounds, "window": window, "batch": settings.batch,
        "rows": report.task_rows(results, table, task.param_bytes, fraction),
    }
    tqdm.write(text_table(entry) + "\n")
    out.append(entry)
  return out


def _scaling_rows(results, table, task, key, value) -> list[dict[str, Any]]:
  rows = report.task_rows(results, table, task.param_bytes, 0.0)
  for r in rows:
    r[key] = value
    r["param_bytes"] = task.param_bytes
  return rows


def run_width_scaling(settings: Settings, table, bar: tqdm) -> dict[str, Any]:
  rows, rounds, window = [], *settings.rounds_and_window(
      settings.scaling_steps, settings.scaling_task)
  make = tasks_lib.TASKS[settings.scaling_task]
  for width in settings.widths:
    task = make(batch_size=settings.width_batch, width=width)
    results = measure_task(task, table, rounds, window, bar)
    rows += _scaling_rows(results, table, task, "width", width)
  return {
      "task": settings.scaling_task, "rows": rows,
      "description": (
          f"{make(batch_size=settings.width_batch).description}, channels / units"
          f" × {', '.join(f'{w:g}' for w in settings.widths)}; {rounds} rounds ×"
          f" {window} steps per method and width. Memory in copies of that width's"
          " parameters."),
  }


def run_device_scaling(settings: Settings, table, bar: tqdm) -> dict[str, Any]:
  rows, rounds, window = [], *settings.rounds_and_window(
      settings.scaling_steps, settings.scaling_task)
  task = tasks_lib.TASKS[settings.scaling_task](batch_size=settings.batch)
  for count in settings.devices:
    mesh = measure.data_mesh(count)
    results = measure_task(task, table, rounds, window, bar, mesh=mesh)
    rows += _scaling_rows(results, table, task, "devices", count)
  platform = jax.devices()[0].platform
  fake = " (fake CPU devices sharing the same cores)" if platform == "cpu" else ""
  return {
      "task": settings.scaling_task, "rows": rows,
      "description": (
          f"{task.description}, the batch split across 1–{max(settings.devices)}"
          f" devices{fake}: `jit(shard_map(step))` over a one-axis mesh, state"
          " replicated. SGD averages its gradient across devices; SAM perturbs"
          " with each device's own gradient and averages the surrogate once"
          " (m-sharpness). Flops and memory are per device."
          f" {rounds} rounds × {window} steps per method and device count."),
  }


def total_units(settings: Settings, table, scaling_table) -> int:
  units = 0
  for name in settings.tasks:
    rounds, _ = settings.rounds_and_window(settings.steps_for(name), name)
    units += len(table) * (1 + rounds)
  rounds, _ = settings.rounds_and_window(settings.scaling_steps, settings.scaling_task)
  units += (len(settings.widths) + len(settings.devices)) * len(scaling_table) * (1 + rounds)
  return units


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark; returns the results written to ``results-<platform>.json``."""
  settings = parse_args(argv)
  warnings.filterwarnings("ignore", message=".*donated buffers.*")
  table = methods_lib.method_table(settings.methods)
  scaling_table = [m for m in table if m.sharded]
  start, load = time.time(), os.getloadavg()[0]
  command = shlex.join(["python", "-m", "benchmarks.run",
                        *(argv if argv is not None else sys.argv[1:])])
  with tqdm(total=total_units(settings, table, scaling_table), unit="op",
            dynamic_ncols=True) as bar:
    result: dict[str, Any] = {
        "machine": report.machine_info(),
        "date": report.now(),
        "command": command,
        "note": settings.note,
        "settings": {
            "learning_rate": methods_lib.LEARNING_RATE, "momentum": methods_lib.MOMENTUM,
            "rho": methods_lib.RHO, "cycle": methods_lib.CYCLE,
            "probability": methods_lib.PROBABILITY, "esam_gamma": methods_lib.ESAM_GAMMA,
            **{k: v for k, v in dataclasses.asdict(settings).items()
               if k not in ("output_dir", "note")},
        },
        "tasks": run_tasks(settings, table, bar),
    }
    if settings.widths:
      result["width_scaling"] = run_width_scaling(settings, scaling_table, bar)
    if settings.devices:
      result["devices_scaling"] = run_device_scaling(settings, scaling_table, bar)
  result["elapsed_s"] = time.time() - start
  result["load"] = [load, os.getloadavg()[0]]
  markdown, chart = report.write(result, settings.output_dir)
  for task in result["tasks"]:
    for target in report.check_targets(task):
      print(f"[{'met' if target['met'] else 'MISSED'}] {task['name']}: {target['target']}:"
            f" {target['value']:.3f}")
  print(f"wrote {markdown} and {chart} in {result['elapsed_s'] / 60:.1f} min")
  return result


if __name__ == "__main__":
  main()
