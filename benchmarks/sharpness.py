"""``python -m benchmarks.sharpness``: what each sharpness measurement costs.

For each task (the benchmarks' CPU models, :mod:`benchmarks.tasks`: the
MNIST-1D MLP and the small ResNet-18) this measures every function of
:mod:`sam_optax.sharpness` on the task's batch and writes
``benchmarks/SHARPNESS.md`` (and the raw figures, ``sharpness.json``):

* **Cost.** Each measurement, jitted once (compilation and a first call are
  warm-up, not timed), against one gradient evaluation
  (``jax.value_and_grad`` of the same loss on the same batch):

  - *Hessian-vector products* the algorithm takes (``num_iters`` for Lanczos,
    ``num_samples`` for Hutchinson, their product for SLQ), beside the
    forward passes of the loss counted at run time (a ``jax.debug.callback``
    in the loss of a separate, untimed counting run: every HVP,
    gradient and loss evaluation runs the forward once);
  - *wall time × one gradient*: rounds in which the gradient and every
    measurement run once each, the order rotated every round so that a change
    of machine load hits them alike; per round the measurement's time over the
    gradient's; median and interquartile range over rounds.

* **Lanczos against power iteration** on ``λ_max``: the relative error
  ``|λ − λ_ref| / |λ_ref|`` after ``n`` Hessian-vector products, for power
  iteration (the Rayleigh quotient of the n-th iterate, the method
  ``experiments/metrics.py`` used before) and for
  ``top_hessian_eigenvalues(k=1, num_iters=n)``; ``λ_ref`` is Lanczos with
  ``--reference-iters`` products. Reported: the products Lanczos needs to reach
  power iteration's accuracy after ``--power-iters`` products (the study's 20),
  and the reverse, for each of ``--starts`` random starting vectors.

The losses are the tasks' training losses (mean cross-entropy, BatchNorm in
training mode on the batch) at the initial parameters after ``--train-steps``
SGD steps on the batch, so that the spectrum is not that of a random network.

The default is the MNIST-1D MLP (a few minutes on 2 idle CPU cores). The
ResNet is measured with ``--tasks mnist1d,resnet``: every measurement is two
compiled programs (timed and counted) plus one per Lanczos size of the
comparison, about 30 compilations of ResNet-18 Hessian-vector products, which
take tens of minutes on 2 shared CPU cores. The report is rewritten after each
task.

Examples::

  python -m benchmarks.sharpness                       # the MNIST-1D MLP
  python -m benchmarks.sharpness --tasks mnist1d,resnet
  python -m benchmarks.sharpness --rounds 3 --output /tmp/SHARPNESS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import measure, report, tasks as tasks_lib
from sam_optax import sharpness

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "SHARPNESS.md")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one run measures (the command line, parsed)."""

  tasks: tuple[str, ...] = ("mnist1d",)
  batch: dict[str, int] = dataclasses.field(
      default_factory=lambda: {"mnist1d": 128, "resnet": 32})
  train_steps: int = 100
  rounds: int = 7
  lanczos_iters: int = 20
  top_k: int = 5
  trace_samples: int = 50
  slq_iters: int = 30
  slq_samples: int = 4
  m: int = 16
  rho: float = 0.05
  adaptive_steps: int = 20
  power_iters: int = 20
  power_max_iters: int = 200
  reference_iters: int = 100
  lanczos_counts: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30)
  only: tuple[str, ...] | None = None  # measurement names to run (None: all)
  starts: dict[str, int] = dataclasses.field(
      default_factory=lambda: {"mnist1d": 3, "resnet": 1})
  tasks_factory: dict[str, Callable[..., tasks_lib.Task]] = dataclasses.field(
      default_factory=lambda: dict(tasks_lib.TASKS))


@dataclasses.dataclass
class Measurement:
  """One timed measurement: a jitted ``run(params, batch, key)`` and its product count."""

  name: str
  call: str               # the call, for the table
  hvps: int | None        # Hessian-vector products the algorithm takes (None: not an HVP method)
  run: Callable[..., Any]
  counted: Callable[..., Any]
  samples: list[float] = dataclasses.field(default_factory=list)
  forwards: int = 0
  repeats: int = 1


# --------------------------------------------------------------------------
# The task's loss, trained a little.
# --------------------------------------------------------------------------


def batch_loss(task: tasks_lib.Task) -> Callable[..., jax.Array]:
  """``loss_fn(params, x, y)``: the task's mean training loss, in the library's form."""
  def loss_fn(params, x, y):
    return task.loss_fn(params, {"x": x, "y": y}, task.batch_stats)[0]
  return loss_fn


def trained_params(task: tasks_lib.Task, steps: int, learning_rate: float = 0.05) -> Any:
  """The task's parameters after ``steps`` SGD steps (momentum 0.9) on its batch."""
  loss_fn = batch_loss(task)
  tx = optax.sgd(learning_rate, momentum=0.9)
  batch = {"x": task.batch["x"], "y": task.batch["y"]}

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss_fn)(params, **batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = task.params, tx.init(task.params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params


def counting(loss_fn: Callable[..., jax.Array], counter: list[int]) -> Callable[..., jax.Array]:
  """``loss_fn`` that adds one to ``counter[0]`` each time its forward pass runs."""
  def increment():
    counter[0] += 1

  def counted(params, **batch):
    jax.debug.callback(increment)
    return loss_fn(params, **batch)
  return counted


# --------------------------------------------------------------------------
# The measurements.
# --------------------------------------------------------------------------


def measurements(settings: Settings, loss_fn, batch_size: int,
                 counter: list[int]) -> list[Measurement]:
  """Every function of :mod:`sam_optax.sharpness`, and the gradient they are compared with."""
  del batch_size
  s = settings

  def build(fn):
    plain = jax.jit(functools.partial(fn, lambda params, **b: loss_fn(params, **b)))
    counted = jax.jit(functools.partial(fn, counting(lambda params, **b: loss_fn(params, **b),
                                                     counter)))
    return plain, counted

  specs = [
      ("gradient", "jax.value_and_grad(loss_fn)", 0,
       lambda f, params, batch, key: jax.value_and_grad(lambda p: f(p, **batch))(params)),
      ("hessian-vector product", "jax.jvp(jax.grad(loss_fn), ...)", 1,
       lambda f, params, batch, key: jax.jvp(lambda p: jax.grad(lambda q: f(q, **batch))(p),
                                             (params,), (params,))[1]),
      ("λ_max (Lanczos)", f"top_hessian_eigenvalues(k=1, num_iters={s.lanczos_iters})",
       s.lanczos_iters,
       lambda f, params, batch, key: sharpness.top_hessian_eigenvalues(
           f, params, batch, k=1, num_iters=s.lanczos_iters, key=key).eigenvalues),
      (f"top-{s.top_k} eigenvalues", f"top_hessian_eigenvalues(k={s.top_k},"
       f" num_iters={s.lanczos_iters})", s.lanczos_iters,
       lambda f, params, batch, key: sharpness.top_hessian_eigenvalues(
           f, params, batch, k=s.top_k, num_iters=s.lanczos_iters, key=key).eigenvalues),
      ("trace (Hutchinson)", f"hessian_trace(num_samples={s.trace_samples})", s.trace_samples,
       lambda f, params, batch, key: sharpness.hessian_trace(
           f, params, batch, key=key, num_samples=s.trace_samples).trace),
      ("spectral density (SLQ)", f"hessian_spectral_density(num_iters={s.slq_iters},"
       f" num_samples={s.slq_samples})", s.slq_iters * s.slq_samples,
       lambda f, params, batch, key: sharpness.hessian_spectral_density(
           f, params, batch, key=key, num_iters=s.slq_iters,
           num_samples=s.slq_samples).density),
      (f"m-sharpness (m = {s.m})", f"m_sharpness(rho={s.rho:g}, m={s.m})", None,
       lambda f, params, batch, key: sharpness.m_sharpness(f, params, batch, rho=s.rho, m=s.m)),
      ("adaptive sharpness (average)", f"adaptive_sharpness(kind='average', rho={s.rho:g},"
       f" num_samples={s.adaptive_steps})", None,
       lambda f, params, batch, key: sharpness.adaptive_sharpness(
           f, params, batch, rho=s.rho, kind="average", key=key,
           num_samples=s.adaptive_steps)),
      ("adaptive sharpness (worst)", f"adaptive_sharpness(kind='worst', rho={s.rho:g},"
       f" num_steps={s.adaptive_steps})", None,
       lambda f, params, batch, key: sharpness.adaptive_sharpness(
           f, params, batch, rho=s.rho, kind="worst", num_steps=s.adaptive_steps)),
  ]
  out = []
  for name, call, hvps, fn in specs:
    if s.only is not None and name not in s.only:
      continue
    plain, counted = build(fn)
    out.append(Measurement(name, call, hvps, plain, counted))
  return out


def time_interleaved(items: Sequence[Measurement], params, batch, key, rounds: int,
                     min_seconds: float = 0.02,
                     on_round: Callable[[int], None] | None = None) -> None:
  """One sample per item per round; the order rotated every round (warm-up excluded).

  A sample is the mean time of ``repeats`` calls in a row, ``repeats`` chosen
  after the warm-up so that a sample lasts at least ``min_seconds`` (a
  sub-millisecond gradient timed once is all timer and scheduler noise).
  """
  for item in items:  # compile and two calls: warm-up, not timed
    jax.block_until_ready(item.run(params, batch, key))
    start = time.perf_counter()
    jax.block_until_ready(item.run(params, batch, key))
    item.repeats = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
  for r in range(rounds):
    order = list(items[r % len(items):]) + list(items[:r % len(items)])
    for item in order:
      start = time.perf_counter()
      for _ in range(item.repeats):
        jax.block_until_ready(item.run(params, batch, key))
      item.samples.append((time.perf_counter() - start) / item.repeats)
    if on_round is not None:
      on_round(r)


def count_forwards(items: Sequence[Measurement], params, batch, key,
                   counter: list[int]) -> None:
  """Each item's forward passes of the loss in one (untimed) run of its counting twin."""
  for item in items:
    jax.block_until_ready(item.counted(params, batch, key))  # compiles; counts too
    jax.effects_barrier()
    counter[0] = 0
    jax.block_until_ready(item.counted(params, batch, key))
    jax.effects_barrier()
    item.forwards = counter[0]


# --------------------------------------------------------------------------
# Lanczos against power iteration.
# --------------------------------------------------------------------------


def power_iteration(loss_fn, num_iters: int) -> Callable[..., jax.Array]:
  """``rayleighs(params, batch, key)``: power iteration's ``λ_n``, ``n = 1..num_iters``, jitted.

  ``u_0`` Gaussian, ``u_{n+1} = H u_n / ‖H u_n‖`` and ``λ_n = u_nᵀ H u_n``:
  one Hessian-vector product per step (forward-over-reverse), in float32, as
  ``experiments/metrics.py`` computed ``λ_max`` before :mod:`sam_optax.sharpness`.
  """
  def norm(tree):
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))

  def rayleighs(params, batch, key):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    vector = jax.tree.unflatten(treedef, [jax.random.normal(k, leaf.shape, jnp.float32)
                                          for k, leaf in zip(keys, leaves)])

    def step(vector, _):
      unit = jax.tree.map(lambda v: v / norm(vector), vector)
      product = jax.jvp(lambda p: jax.grad(lambda q: loss_fn(q, **batch))(p),
                        (params,), (unit,))[1]
      rayleigh = sum(jnp.vdot(u, h) for u, h in zip(jax.tree.leaves(unit),
                                                    jax.tree.leaves(product)))
      return product, rayleigh

    return jax.lax.scan(step, vector, None, length=num_iters)[1]

  return jax.jit(rayleighs)


def lanczos_top(loss_fn, num_iters: int) -> Callable[..., jax.Array]:
  """``λ_max(params, batch, key)`` by ``num_iters`` Lanczos steps, jitted."""
  return jax.jit(lambda p, b, k: sharpness.top_hessian_eigenvalues(
      loss_fn, p, b, k=1, num_iters=num_iters, key=k).eigenvalues[0])


def lanczos_schedule(settings: Settings) -> list[int]:
  """The Lanczos iteration counts tried (one compilation each)."""
  return [n for n in settings.lanczos_counts if n <= settings.reference_iters]


def compare_lanczos_power(settings: Settings, loss_fn, params, batch, starts_count: int,
                          seed: int = 0, on_start: Callable[[int], None] | None = None
                          ) -> dict[str, Any]:
  """Relative errors of both methods against a long Lanczos run, per random start."""
  s = settings
  starts = []
  schedule = {n: lanczos_top(loss_fn, n) for n in lanczos_schedule(s)}
  longest = lanczos_top(loss_fn, s.reference_iters)
  power_run = power_iteration(loss_fn, s.power_max_iters)
  for start in range(starts_count):
    key = jax.random.key(seed + start)
    # The reference from another start: not a continuation of the runs it judges.
    reference = float(longest(params, batch, jax.random.key(10_000 + seed + start)))
    power = np.asarray(power_run(params, batch, key), np.float64)
    power_error = np.abs(power - reference) / abs(reference)
    lanczos = {n: float(fn(params, batch, key)) for n, fn in schedule.items()}
    lanczos_error = {n: abs(v - reference) / abs(reference) for n, v in lanczos.items()}
    target = float(power_error[s.power_iters - 1])
    reach = next((n for n, e in sorted(lanczos_error.items()) if e <= target), None)
    at_power_iters = lanczos_error.get(s.power_iters)
    reverse = None
    if at_power_iters is not None:
      reverse = next((n + 1 for n, e in enumerate(power_error) if e <= at_power_iters), None)
    starts.append({
        "seed": seed + start,
        "reference": reference,
        "power": power.tolist(),
        "power_error": power_error.tolist(),
        "lanczos": {str(n): v for n, v in lanczos.items()},
        "lanczos_error": {str(n): e for n, e in lanczos_error.items()},
        "power_error_at_budget": target,
        "lanczos_products_to_match": reach,
        "lanczos_error_at_budget": at_power_iters,
        "power_products_to_match": reverse,
        "power_final_error": float(power_error[-1]),
    })
    if on_start is not None:
      on_start(start)
  return {"starts": starts}


# --------------------------------------------------------------------------
# One task, the report.
# --------------------------------------------------------------------------


def run_task(settings: Settings, name: str, log: Callable[[str], None]) -> dict[str, Any]:
  batch_size = settings.batch.get(name, 32)
  task = settings.tasks_factory[name](batch_size=batch_size)
  log(f"{name}: {task.description}, {task.num_params:,} parameters")
  loss_fn = batch_loss(task)
  params = trained_params(task, settings.train_steps)
  batch = {"x": task.batch["x"], "y": task.batch["y"]}
  key = jax.random.key(0)
  counter = [0]
  items = measurements(settings, loss_fn, batch_size, counter)
  count_forwards(items, params, batch, key, counter)
  time_interleaved(items, params, batch, key, settings.rounds,
                   on_round=lambda r: log(f"{name}: timing round {r + 1}/{settings.rounds}"))
  gradient = items[0].samples
  rows = []
  for item in items:
    ratios = [t / g for t, g in zip(item.samples, gradient)]
    rows.append({"name": item.name, "call": item.call, "hvps": item.hvps,
                 "forwards": item.forwards, "seconds": measure.summary(item.samples),
                 "ratio": measure.summary(ratios)})
  log(f"{name}: Lanczos against power iteration")
  comparison = compare_lanczos_power(settings, loss_fn, params, batch,
                                     settings.starts.get(name, 1),
                                     on_start=lambda i: log(f"{name}: start {i + 1} done"))
  return {"name": name, "description": task.description, "num_params": task.num_params,
          "batch": batch_size, "rows": rows, "comparison": comparison}


def _ratio(r: dict[str, float]) -> str:
  return f"{r['median']:.1f} [{r['q1']:.1f}–{r['q3']:.1f}]"


def _error(e: float | None) -> str:
  return "–" if e is None else f"{e:.1e}"


def render(result: dict[str, Any]) -> str:
  """SHARPNESS.md from the figures of one run."""
  s = result["settings"]
  m = result["machine"]
  versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
  lines = [
      "# Sharpness measurements: cost, and Lanczos against power iteration",
      "",
      "Generated by `python -m benchmarks.sharpness` (see `benchmarks/sharpness.py`);"
      " do not edit by hand.",
      "",
      f"Machine: {m['cpu']}, {m['cores']} cores, jax backend `{m['platform']}`; Python"
      f" {m['python']}; {versions}; matfree {result['matfree']}. Generated {result['date']}"
      f" (command `{result['command']}`, {result['seconds'] / 60:.1f} min).",
      "",
      "The loss of each task is its mean training cross-entropy on one fixed batch (BatchNorm"
      f" in training mode), at the initial parameters after {s['train_steps']} SGD steps on"
      " that batch. Every measurement is jitted once; compilation and a first call are warm-up,"
      " not timed.",
      "",
      "- **HVPs**: the Hessian-vector products the algorithm takes (forward-over-reverse,"
      " `jax.jvp` of `jax.grad`).",
      "- **forward passes**: the loss's forward passes counted at run time (a"
      " `jax.debug.callback` in the loss, in a separate untimed run): each HVP, gradient and"
      " loss evaluation runs the forward once. m-sharpness takes one gradient and one loss"
      " evaluation per group of m examples (its forward passes are the groups', each on m"
      " examples); worst-case adaptive sharpness one gradient and one loss evaluation per"
      " ascent step, average-case one loss evaluation per noise sample.",
      "- **time × gradient**: rounds in which one gradient evaluation"
      " (`jax.value_and_grad` on the same batch) and every measurement run once each, the"
      " order rotated every round; per round the measurement's time over the gradient's;"
      f" median [interquartile range] over {s['rounds']} rounds.",
      "",
  ]
  for task in result["tasks"]:
    lines += [f"## {task['name']}: {task['description']}", "",
              f"{task['num_params']:,} parameters, batch {task['batch']}.", "",
              "| measurement | call | HVPs | forward passes | time × gradient | ms |",
              "|---|---|---:|---:|---:|---:|"]
    for r in task["rows"]:
      hvps = "–" if r["hvps"] is None else str(r["hvps"])
      lines.append(f"| {r['name']} | `{r['call']}` | {hvps} | {r['forwards']} |"
                   f" {_ratio(r['ratio'])} | {1e3 * r['seconds']['median']:.1f} |")
    starts = task["comparison"]["starts"]
    lines += [
        "",
        f"**λ_max: Lanczos against power iteration** ({len(starts)} random starts, one row"
        f" each). Reference: Lanczos with {s['reference_iters']} products. Power iteration's"
        f" relative error after {s['power_iters']} products (the study's setting), the"
        " products Lanczos needs to reach it, Lanczos's error after the same"
        f" {s['power_iters']} products, and the products power iteration needs to reach that"
        f" (– : not within {s['power_max_iters']}).",
        "",
        "| start | λ_ref | power: error at budget | Lanczos: products to match |"
        " Lanczos: error at budget | power: products to match |"
        f" power: error after {s['power_max_iters']} |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for st in starts:
      lines.append(
          f"| {st['seed']} | {st['reference']:.4f} | {_error(st['power_error_at_budget'])} |"
          f" {st['lanczos_products_to_match'] or '–'} |"
          f" {_error(st['lanczos_error_at_budget'])} |"
          f" {st['power_products_to_match'] or '–'} | {_error(st['power_final_error'])} |")
    lines.append("")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, str]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.sharpness",
                                   description=__doc__.split("\n\n")[0])
  defaults = Settings()
  parser.add_argument("--tasks", default=",".join(defaults.tasks),
                      help=f"comma-separated, from {sorted(tasks_lib.TASKS)}")
  parser.add_argument("--rounds", type=int, default=defaults.rounds)
  parser.add_argument("--train-steps", type=int, default=defaults.train_steps)
  parser.add_argument("--trace-samples", type=int, default=defaults.trace_samples)
  parser.add_argument("--power-iters", type=int, default=defaults.power_iters)
  parser.add_argument("--power-max-iters", type=int, default=defaults.power_max_iters)
  parser.add_argument("--reference-iters", type=int, default=defaults.reference_iters)
  parser.add_argument("--starts", type=int, default=None,
                      help=f"random starts of the Lanczos / power comparison (default"
                           f" {defaults.starts})")
  parser.add_argument("--output", default=DEFAULT_OUTPUT, help="the markdown report")
  args = parser.parse_args(argv)
  names = tuple(t for t in args.tasks.split(",") if t)
  for name in names:
    if name not in tasks_lib.TASKS:
      parser.error(f"unknown task {name!r}; choose from {sorted(tasks_lib.TASKS)}")
  settings = dataclasses.replace(
      defaults, tasks=names, rounds=args.rounds, train_steps=args.train_steps,
      trace_samples=args.trace_samples, power_iters=args.power_iters,
      power_max_iters=args.power_max_iters, reference_iters=args.reference_iters,
      starts=(defaults.starts if args.starts is None
              else {name: args.starts for name in names}))
  return settings, args.output


def run(settings: Settings, output: str, command: str,
        log: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
  """Measures every task of ``settings``; writes ``output`` and ``sharpness.json`` beside it."""
  start = time.perf_counter()
  result = {
      "settings": {k: v for k, v in dataclasses.asdict(settings).items()
                   if k != "tasks_factory"},
      "machine": report.machine_info(), "matfree": importlib.metadata.version("matfree"),
      "command": command, "tasks": [],
  }
  folder = os.path.dirname(os.path.abspath(output))
  os.makedirs(folder, exist_ok=True)
  for name in settings.tasks:  # the files rewritten after each task
    result["tasks"].append(run_task(settings, name, log))
    result.update(date=report.now(), seconds=time.perf_counter() - start)
    with open(os.path.join(folder, "sharpness.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    with open(output, "w", encoding="utf-8") as f:
      f.write(render(result))
  return result


def main(argv: Sequence[str] | None = None) -> int:
  settings, output = parse_args(argv)
  command = "python -m benchmarks.sharpness" + (" " + " ".join(argv) if argv else "")
  if argv is None and len(sys.argv) > 1:
    command = "python -m benchmarks.sharpness " + " ".join(sys.argv[1:])
  run(settings, output, command, log=lambda text: print(text, file=sys.stderr, flush=True))
  print(f"wrote {output}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
