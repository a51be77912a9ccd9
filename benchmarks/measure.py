"""Compile a program, read its flops and memory from XLA, and time it.

Definitions used in every table:

* **flops**: ``compiled.cost_analysis()['flops']`` of the jitted step, per
  device, times the calls of one full step. XLA counts a ``lax.cond`` as its
  most expensive branch, so for a method whose step is a condition on its
  step count (LookSAM, interval SAM) the step count is folded into the
  program as a constant, XLA keeps only the branch that runs, and the flops
  are the weighted mean over one cycle (:func:`phase_flops`).
* **peak memory**: from ``compiled.memory_analysis()``,
  ``argument_size + output_size − alias_size + temp_size`` (bytes): inputs,
  outputs not written in place of a donated input, and XLA's scratch buffers.
  The training state is donated (``donate_argnums=0``), as in a real
  training loop, so the new state overwrites the old one.
* **state**: bytes of the training state (parameters, BatchNorm statistics,
  optimizer state), included in the peak.
* **time**: each call is followed by ``jax.block_until_ready``; the calls are
  grouped in windows of ``window`` full steps (a multiple of the cycle of the
  conditional methods, so each window holds the same mix of cheap and full
  steps); one sample = a window's time divided by its steps. The methods are
  timed in interleaved rounds (one window each per round, the order rotated
  every round), so that a change of machine load hits them all alike.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sam_optax
from benchmarks.methods import Method, Program
from benchmarks.tasks import Batch, Task

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes",
                 "alias_size_in_bytes", "temp_size_in_bytes")


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of ``tree``."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def copy_tree(tree: Any) -> Any:
  """Fresh buffers (a donated state must not alias the task's arrays)."""
  return jax.tree.map(jnp.copy, tree)


def memory_of(compiled: Any) -> dict[str, int]:
  """The fields of ``memory_analysis()`` and ``peak = arg + out − alias + temp``."""
  stats = compiled.memory_analysis()
  out = {name.removesuffix("_size_in_bytes"): int(getattr(stats, name))
         for name in MEMORY_FIELDS}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def flops_of(compiled: Any) -> float:
  """``cost_analysis()['flops']`` (one device's share under sharding)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis["flops"])


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_CONV_LAYOUT = re.compile(r" convolution\([^\n]*?dim_labels=([\w>\-]+)")
_INSTRUCTION = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* ([a-z][\w\-]*)\(")


def hlo_summary(compiled: Any) -> dict[str, int]:
  """Counts in the optimized HLO: convolutions and dots, copies and their size.

  A recomputed forward shows up as extra convolutions / dots, a defensive
  copy of a buffer as copy bytes; ``conv_layouts`` counts the convolutions
  by ``dim_labels`` (XLA:CPU runs its fast Eigen convolution on one layout
  family only).
  """
  counts: collections.Counter[str] = collections.Counter()
  copy_bytes = 0
  text = compiled.as_text()
  for dtype, dims, opcode in _INSTRUCTION.findall(text):
    counts[opcode] += 1
    if opcode == "copy":
      elements = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
      copy_bytes += elements * _BYTES.get(dtype, 4)
  return {
      "matmuls": counts["convolution"] + counts["dot"],
      "copies": counts["copy"],
      "copy_bytes": copy_bytes,
      "fusions": counts["fusion"],
      "conv_layouts": dict(collections.Counter(_CONV_LAYOUT.findall(text))),
  }


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
# ``%name = <result type> <opcode>(``; an async pair is ``<op>-start`` /
# ``<op>-done``, counted once, at its ``-done`` (whose result is the op's).
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<phase>-start|-done)?\(", re.MULTILINE)
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def shape_bytes(text: str) -> int:
  """Bytes of every array shape in an HLO result type (a tuple: their sum)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    elements = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    total += elements * _BYTES.get(dtype, 4)
  return total


def collectives_of(compiled: Any) -> dict[str, dict[str, int]]:
  """The collectives of a compiled program, from its optimized HLO text.

  ``{opcode: {"count": n, "bytes": b}}`` for each of :data:`COLLECTIVES`
  found: ``n`` instructions in the HLO (an async ``-start`` / ``-done`` pair
  counts once; one inside a loop body counts once, not per iteration) and
  ``b`` the bytes of their result shapes (all-reduce: the reduced buffers;
  all-gather: the gathered ones; reduce-scatter: each device's part).
  """
  out: dict[str, dict[str, int]] = {}
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  for match in _COLLECTIVE.finditer(text):
    if match["phase"] == "-start":
      continue
    entry = out.setdefault(match["op"], {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += shape_bytes(match["type"])
  return out


# --------------------------------------------------------------------------
# Sharding for the device-scaling study.
# --------------------------------------------------------------------------

AXIS = "data"


def data_mesh(num_devices: int) -> Mesh:
  """A one-axis mesh over the first ``num_devices`` devices."""
  devices = jax.devices()
  if num_devices > len(devices):
    raise ValueError(
        f"{num_devices} devices requested, {len(devices)} available; set"
        " XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts"
        " (python -m benchmarks.run does).")
  return Mesh(np.array(devices[:num_devices]), (AXIS,))


def sharded_step(program: Program, mesh: Mesh) -> Callable[..., Any]:
  """``program.step`` in ``shard_map``: state replicated, batch split on axis 0."""
  replicated, split = PartitionSpec(), PartitionSpec(AXIS)
  # check_vma=False: the gradient of the replicated parameters is the device's
  # own (with the check, autodiff sums it over the axis: an extra all-reduce).
  return jax.shard_map(program.step, mesh=mesh, in_specs=(replicated, split),
                       out_specs=(replicated, replicated), check_vma=False)


def place(state: Any, batch: Batch, mesh: Mesh | None) -> tuple[Any, Batch]:
  """The state replicated and the batch split over ``mesh`` (as is without)."""
  if mesh is None:
    return copy_tree(state), batch
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec(AXIS))
  return (jax.device_put(copy_tree(state), replicated),
          jax.device_put(batch, split))


# --------------------------------------------------------------------------
# Compiling and running one program.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
  """A compiled program with its own training state, ready to time."""

  name: str
  compiled: Any  # or {ascent_step: compiled} for a static-phase program
  state: Any
  batch: Batch
  calls_per_step: int
  samples: list[float] = dataclasses.field(default_factory=list)
  call_times: list[tuple[int, float]] = dataclasses.field(default_factory=list)
  calls: int = 0
  last_loss: float = float("nan")

  def call(self) -> tuple[Any, jax.Array]:
    """One call; a static-phase program runs the step its state names."""
    compiled = self.compiled
    if isinstance(compiled, dict):
      compiled = compiled[sam_optax.takes_ascent_step(self.state[-1])]
    return compiled(self.state, self.batch)

  def run(self, steps: int, record: bool = True) -> float:
    """Runs ``steps`` full steps; returns the seconds per full step.

    With ``record``, every call's ``(index, seconds)`` is kept in
    ``call_times`` (the index counts every call since compilation, so
    ``index % k`` is the phase of a method that branches every k steps).
    """
    elapsed = 0.0
    loss = None
    for _ in range(steps * self.calls_per_step):
      start = time.perf_counter()
      self.state, loss = self.call()
      jax.block_until_ready((self.state, loss))
      seconds = time.perf_counter() - start
      elapsed += seconds
      if record:
        self.call_times.append((self.calls, seconds))
      self.calls += 1
    if loss is not None:
      self.last_loss = float(loss)
    return elapsed / max(steps, 1)

  def phase_times(self, cycle: int) -> tuple[float, float]:
    """Median seconds of the calls with ``index % cycle == 0`` and of the others."""
    full = [t for i, t in self.call_times if i % cycle == 0]
    rest = [t for i, t in self.call_times if i % cycle != 0]
    return summary(full)["median"], summary(rest)["median"]


@dataclasses.dataclass
class Compiled:
  """What XLA says about a program, and the runner that times it."""

  runner: Runner
  flops: float
  max_flops: float
  memory: dict[str, int]
  state_bytes: int
  hlo: dict[str, int]
  compile_s: float
  phase_flops: tuple[float, ...] = ()


def compile_program(
    name: str,
    program: Program,
    task: Task,
    mesh: Mesh | None = None,
    phases: Sequence[tuple[float, int | None]] = (),
    static_phase: float | None = None,
) -> Compiled:
  """Lowers and compiles ``program`` on ``task.batch``; reads flops and memory.

  ``phases``: see :class:`benchmarks.methods.Method`; the flops are then the
  weighted mean over the phases, each compiled with its step count folded.
  ``static_phase``: the fraction of ascent steps of a program compiled once
  per phase (:func:`compile_static_phases`).
  """
  if static_phase is not None:
    return compile_static_phases(name, program, task, mesh, static_phase)
  step = program.step if mesh is None else sharded_step(program, mesh)
  state, batch = place(program.init(), task.batch, mesh)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  runner = Runner(name, compiled, state, batch, program.calls_per_step)
  max_flops = flops = flops_of(compiled)
  per_phase: tuple[float, ...] = ()
  if phases:
    folded = [t for _, t in phases if t is not None]
    counts = dict(zip(folded, phase_flops(step, compiled, program.init(), batch, mesh,
                                          folded))) if folded else {}
    per_phase = tuple(max_flops if t is None else counts[t] for _, t in phases)
    flops = float(sum(w * f for (w, _), f in zip(phases, per_phase)))
  return Compiled(
      runner=runner,
      flops=flops * program.calls_per_step,
      max_flops=max_flops * program.calls_per_step,
      memory=memory_of(compiled),
      state_bytes=tree_bytes(runner.state),
      hlo=hlo_summary(compiled),
      compile_s=compile_s,
      phase_flops=per_phase,
  )


def compile_static_phases(name: str, program: Program, task: Task, mesh: Mesh | None,
                          weight: float) -> Compiled:
  """A method with a cheap phase in its static form: a compiled step per phase.

  Each call runs the step that ``sam_optax.takes_ascent_step`` reads from the
  state (as a training loop does). Flops: ``weight · full + (1 − weight) ·
  cheap``; memory, HLO counts: the full step's (the larger).
  """
  if mesh is not None or program.phase_step is None:
    raise ValueError(f"{name}: the static phase is benchmarked on one device, with a"
                     " program that has a phase_step.")
  state, batch = place(program.init(), task.batch, None)
  start = time.perf_counter()
  compiled = {phase: jax.jit(program.phase_step(phase), donate_argnums=0)
              .lower(state, batch).compile() for phase in (True, False)}
  compile_s = time.perf_counter() - start
  full, cheap = flops_of(compiled[True]), flops_of(compiled[False])
  return Compiled(
      runner=Runner(name, compiled, state, batch, program.calls_per_step),
      flops=weight * full + (1 - weight) * cheap,
      max_flops=full,
      memory=max((memory_of(c) for c in compiled.values()), key=lambda m: m["peak"]),
      state_bytes=tree_bytes(state),
      hlo=hlo_summary(compiled[True]),
      compile_s=compile_s,
      phase_flops=(full, cheap),
  )


def _is_count(leaf: Any) -> bool:
  return jnp.issubdtype(leaf.dtype, jnp.integer) and leaf.shape == ()


def folded_flops(step: Callable[..., Any], state: Any, batch: Batch) -> float:
  """Flops of ``step`` with the scalar integer leaves of ``state`` as constants.

  With the step counts constant XLA simplifies every ``lax.cond`` on them to
  the branch taken, so the flops are those of this step, not of the most
  expensive branch.
  """
  leaves, treedef = jax.tree.flatten(state)
  fixed = {i: np.asarray(leaf) for i, leaf in enumerate(leaves) if _is_count(leaf)}
  free = [leaf for i, leaf in enumerate(leaves) if i not in fixed]

  def with_counts(free_leaves, batch):
    rest = iter(free_leaves)
    full = [jnp.asarray(fixed[i]) if i in fixed else next(rest)
            for i in range(len(leaves))]
    return step(jax.tree.unflatten(treedef, full), batch)

  return flops_of(jax.jit(with_counts).lower(free, batch).compile())


def phase_flops(
    step: Callable[..., Any],
    compiled: Any,
    initial_state: Any,
    batch: Batch,
    mesh: Mesh | None,
    steps_taken: Sequence[int],
) -> tuple[float, ...]:
  """Flops of the step taken after each of ``steps_taken`` steps."""
  state, _ = place(initial_state, batch, mesh)
  states = {}
  for t in range(max(steps_taken) + 1):
    states[t] = copy_tree(state)
    state, _ = compiled(state, batch)
  return tuple(folded_flops(step, states[t], batch) for t in steps_taken)


def forward_fraction(task: Task) -> float:
  """Flops of one forward pass (evaluation mode) / one gradient evaluation.

  A gradient evaluation is ``value_and_grad`` of the training loss; MESA's
  extra forward runs the EMA weights in evaluation mode, without gradient.
  """
  def forward(params, batch_stats, batch):
    return task.forward(params, batch_stats, batch["x"], train=False)[0]

  def gradient(params, batch_stats, batch):
    return jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, batch_stats)

  args = (task.params, task.batch_stats, task.batch)
  fwd = flops_of(jax.jit(forward).lower(*args).compile())
  grad = flops_of(jax.jit(gradient).lower(*args).compile())
  return fwd / grad


def time_interleaved(
    runners: Sequence[Runner],
    rounds: int,
    window: int,
    on_window: Callable[[str], None] | None = None,
) -> None:
  """Appends one sample (seconds per step) per round to every runner.

  Round ``r`` times one window of every runner, starting from runner
  ``r mod len(runners)``.
  """
  for r in range(rounds):
    order = list(runners[r % len(runners):]) + list(runners[:r % len(runners)])
    for runner in order:
      runner.samples.append(runner.run(window))
      if on_window is not None:
        on_window(runner.name)


def summary(samples: Sequence[float]) -> dict[str, float]:
  """Median and quartiles of ``samples`` (NaN if there are none)."""
  if not samples:
    return {"median": float("nan"), "q1": float("nan"), "q3": float("nan")}
  q1, median, q3 = np.percentile(np.asarray(samples), [25, 50, 75])
  return {"median": float(median), "q1": float(q1), "q3": float(q3)}


def measure_methods(
    task: Task,
    methods: Sequence[Method],
    mesh: Mesh | None = None,
    on_compiled: Callable[[str], None] | None = None,
) -> dict[str, Compiled]:
  """Compiles every method's program on ``task`` (and warms it up by one call)."""
  out = {}
  axis_name = None if mesh is None else AXIS
  for method in methods:
    program = method.build(task, axis_name)
    compiled = compile_program(method.name, program, task, mesh, method.phases,
                               method.static_phase)
    compiled.runner.run(1, record=False)  # warm-up: first-call allocations
    out[method.name] = compiled
    if on_compiled is not None:
      on_compiled(method.name)
  for method in methods:
    if method.branches_like is not None:
      out[method.name] = with_branch_flops(out[method.name], out, *method.branches_like)
  return out


def with_branch_flops(
    compiled: Compiled, others: dict[str, Compiled], like: str, probability: float,
) -> Compiled:
  """Expected flops of a random ``lax.cond``, its branches measured on ``like``.

  ``p · full + (1 − p) · cheap + (own costliest branch − like's costliest)``:
  the last term is what the method computes besides the two shared branches
  (drawing the random number). Without ``like``, the costliest branch stays.
  """
  other = others.get(like)
  if other is None or len(other.phase_flops) != 2:
    return compiled
  full, cheap = other.phase_flops
  own = compiled.max_flops - other.max_flops
  flops = probability * full + (1 - probability) * cheap + own
  return dataclasses.replace(compiled, flops=flops, phase_flops=(full + own, cheap + own))
