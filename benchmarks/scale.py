"""``python -m benchmarks.scale``: the trainer's step at the papers' scale, by compilation.

For each paper config (ImageNet ResNet-50, CIFAR-10 WRN-28-10), each method
and each device count, this lowers and compiles the trainer's own training
step (:func:`experiments.train.build_step`, jitted by
:class:`experiments.placement.Placement` exactly as a run jits it) on ``N``
fake CPU devices, with abstract inputs (``jax.ShapeDtypeStruct``) of the
config's true shapes and global batch size, and reads from XLA:

* **flops per device** (``cost_analysis()``), and their ratio to SGD's at
  the same device count;
* **peak memory per device** (``memory_analysis()``: arguments + outputs −
  aliased + temporaries, as in :mod:`benchmarks.measure`);
* the training state's bytes per device (from its shardings) and, for SAF,
  the logit bank's bytes per device beside its total;
* the **collectives** of the compiled step (:func:`benchmarks.measure.collectives_of`):
  count and bytes of every all-reduce, all-gather, reduce-scatter,
  all-to-all and collective-permute in the optimized HLO.

Nothing runs and no state is allocated: the state is built with
``jax.eval_shape`` (SAF's ImageNet bank alone is 15 GB), so these are
compiled estimates, not measured TPU times. Each device count runs in its own
subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be
set before jax starts); the parent writes ``benchmarks/SCALE.md`` and the
raw figures ``benchmarks/scale.json``.

Examples::

  python -m benchmarks.scale                                  # the default set
  python -m benchmarks.scale --configs cifar10_wrn28_10 --methods sgd,sam --devices 8
  python -m benchmarks.scale --configs default:tiny --devices 8 --output /tmp/SCALE.md

The state's layout: :meth:`Placement.state_shardings` where the trainer's
placement has it (SAF's bank split along its example axis over ``'data'``),
else every leaf replicated, as the trainer places it; SCALE.md says which.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_CONFIGS = ("imagenet_resnet50", "cifar10_wrn28_10")
# ASAM, CSAM and the other SAM variants compile to SAM's two gradient
# evaluations (benchmarks/RESULTS.md); leave them to --methods to keep the
# default run near 15 minutes on 2 CPU cores.
DEFAULT_METHODS = ("sgd", "sam", "gsam", "saf", "mesa")
DEFAULT_DEVICES = (8, 64)
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "SCALE.md")

# Training-split sizes, so that no data set has to be present (SAF's bank has
# one row per training example). ``config.num_train_examples`` overrides.
TRAIN_EXAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet2012": 1_281_167}
NUM_CLASSES = {"mnist1d": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
# The methods with a cheap phase: compiled in their full (ascent) step.
PHASED = ("looksam", "interval_sam", "stochastic_sam")

SENTENCE = ("These are compiled estimates, not measured TPU times: every figure is what XLA"
            " reports for the compiled program on fake CPU devices; nothing was run.")


# --------------------------------------------------------------------------
# The worker: one device count, in a process of its own.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataShape:
  """What the trainer reads from an input pipeline, without the data.

  The fields :func:`experiments.train.build_step` and
  :class:`experiments.placement.Placement` read: ``num_classes``,
  ``input_shape``, ``num_train_examples``, ``batch_size``, ``steps_per_epoch``.
  """

  num_classes: int
  input_shape: tuple[int, ...]
  num_train_examples: int
  batch_size: int

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.num_train_examples // self.batch_size)

  @classmethod
  def of(cls, config) -> DataShape:
    """The shapes of ``config.dataset`` at ``config.batch_size``."""
    name = config.dataset
    if name == "mnist1d":
      examples = int(config.mnist1d.num_samples * config.mnist1d.train_split)
      shape: tuple[int, ...] = (40,)
    else:
      examples = TRAIN_EXAMPLES[name]
      size = config.image_size if name == "imagenet2012" else 32
      shape = (size, size, 3)
    examples = config.get("num_train_examples") or examples
    return cls(NUM_CLASSES[name], shape, examples, config.batch_size)


def load_config(spec: str, method: str):
  """``name[:arg]`` of ``experiments/configs/``, with ``method``, data parallel."""
  name, _, arg = spec.partition(":")
  config = importlib.import_module(f"experiments.configs.{name}").get_config(arg or None)
  config.method = method
  config.data_parallel = True  # the ':tiny' forms train on one device
  return config


def _itemsize(dtype) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 8
  return dtype.itemsize


def _sharded_bytes(leaf, sharding) -> int:
  """Bytes one device holds of ``leaf`` under ``sharding``."""
  return math.prod(sharding.shard_shape(leaf.shape)) * _itemsize(leaf.dtype)


def _is_bank(path) -> bool:
  return any(getattr(key, "name", None) == "bank" for key in path)


def compile_step(spec: str, method: str) -> dict[str, Any]:
  """Compiles the trainer's step of ``spec`` for ``method`` on every device; its figures."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from benchmarks import measure  # pylint: disable=import-outside-toplevel
  from experiments import config_checks, train  # pylint: disable=import-outside-toplevel
  from experiments.placement import Placement  # pylint: disable=import-outside-toplevel

  config = load_config(spec, method)
  config_checks.validate_config(config)
  data = DataShape.of(config)
  placement = Placement(config, data)
  if placement.mesh is None:
    raise ValueError("the scale report needs at least 2 devices.")
  model = train.make_model(config, data)
  key = jax.random.key(config.seed)
  abstract_vars = jax.eval_shape(
      functools.partial(train.init_variables, model, data.input_shape), key)
  # MESA averages the initial statistics: any values of their shapes will do.
  batch_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             abstract_vars.get("batch_stats", {}))
  parts = train.build_step(config, data, placement, model, batch_stats)
  abstract_state = jax.eval_shape(parts.initial_state, abstract_vars)

  state_shardings = getattr(placement, "state_shardings", None)
  if callable(state_shardings):  # the trainer's own layout (SAF's bank split)
    shardings, layout = state_shardings(abstract_state), "Placement.state_shardings"
    if "shard_state" in config:
      layout += f" (shard_state={config.shard_state!r})"
  else:
    shardings, layout = jax.tree.map(lambda _: placement.replicated, abstract_state), "replicated"
  state_in = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract_state, shardings)
  batch = config.batch_size
  batch_in = {
      "x": jax.ShapeDtypeStruct((batch,) + tuple(data.input_shape), jnp.float32,
                                sharding=placement.sharded),
      "y": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=placement.sharded),
      "index": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=placement.sharded),
  }
  key_shape = jax.eval_shape(lambda: key)
  rng_in = jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=placement.replicated)

  train_step = parts.train_step
  if method in PHASED:  # the full step of the two (the cheap one has one gradient)
    train_step = functools.partial(train_step, ascent_step=True)
  # The step returns the state in its input shardings, as the trainer's does.
  takes_shardings = "state_shardings" in inspect.signature(placement.jit_step).parameters
  jitted = parts.jit_step(train_step,
                          **({"state_shardings": shardings} if takes_shardings else {}))
  start = time.perf_counter()
  lowered = jitted.lower(state_in, batch_in, rng_in)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s

  leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  shard_leaves = jax.tree.leaves(shardings)
  total = sum(math.prod(s.shape) * _itemsize(s.dtype) for _, s in leaves)
  per_device = sum(_sharded_bytes(s, sh) for (_, s), sh in zip(leaves, shard_leaves))
  bank = [(s, sh) for (path, s), sh in zip(leaves, shard_leaves) if _is_bank(path)]
  params = sum(math.prod(s.shape) for s in jax.tree.leaves(abstract_state.params))
  return {
      "config": spec, "method": method, "devices": jax.device_count(),
      "dataset": config.dataset, "model": config.model,
      "half_precision": bool(config.half_precision),
      "global_batch": batch, "per_device_batch": batch // jax.device_count(),
      "input_shape": list(data.input_shape), "num_train_examples": data.num_train_examples,
      "params": int(params),
      "step": "shard_map (per device)" if parts.axis_name else "jit (GSPMD)",
      "phase": "full step" if method in PHASED else None,
      "layout": layout,
      "flops": measure.flops_of(compiled),
      "memory": measure.memory_of(compiled),
      "state_bytes": int(total), "state_bytes_per_device": int(per_device),
      "bank_bytes": int(sum(math.prod(s.shape) * _itemsize(s.dtype) for s, _ in bank)),
      "bank_bytes_per_device": int(sum(_sharded_bytes(s, sh) for s, sh in bank)),
      "bank_shards": [int(math.prod(s.shape) // max(1, math.prod(sh.shard_shape(s.shape))))
                      for s, sh in bank],
      "collectives": measure.collectives_of(compiled),
      "lower_s": lower_s, "compile_s": compile_s,
  }


def worker(configs: Sequence[str], methods: Sequence[str], out: str) -> None:
  """Compiles every (config, method) on this process's devices; writes ``out`` (JSON)."""
  from benchmarks import report  # pylint: disable=import-outside-toplevel

  rows = []
  result = {"machine": report.machine_info(), "rows": rows}
  for spec in configs:
    for method in methods:
      start = time.perf_counter()
      try:
        row = compile_step(spec, method)
      except Exception as error:  # pylint: disable=broad-except
        row = {"config": spec, "method": method, "error": f"{type(error).__name__}: {error}"}
      row["seconds"] = time.perf_counter() - start
      rows.append(row)
      print(f"  {spec} {method}: {row.get('error') or 'compiled'} ({row['seconds']:.0f} s)",
            file=sys.stderr, flush=True)
      with open(out, "w", encoding="utf-8") as f:  # what is done survives a kill
        json.dump(result, f, indent=1)


# --------------------------------------------------------------------------
# The parent: a worker per device count, then SCALE.md.
# --------------------------------------------------------------------------


def run_workers(configs: Sequence[str], methods: Sequence[str],
                devices: Sequence[int]) -> list[dict[str, Any]]:
  """One worker subprocess per device count; their results."""
  results = []
  with tempfile.TemporaryDirectory() as folder:
    for n in devices:
      out = os.path.join(folder, f"scale-{n}.json")
      env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
      flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
      env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
      print(f"{n} devices:", file=sys.stderr, flush=True)
      command = [sys.executable, "-m", "benchmarks.scale", "--worker", "--out", out,
                 "--configs", ",".join(configs), "--methods", ",".join(methods)]
      code = subprocess.run(command, env=env, check=False).returncode
      if not os.path.exists(out):
        raise RuntimeError(f"the worker for {n} devices failed (exit code {code}).")
      with open(out, encoding="utf-8") as f:
        result = json.load(f)
      result["devices"], result["exit_code"] = n, code
      results.append(result)
  return results


def _size(num_bytes: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.1f} {unit}" if num_bytes < 100 * scale else (
          f"{num_bytes / scale:.0f} {unit}")
  return f"{int(num_bytes)} B"


def _gflop(flops: float) -> str:
  return f"{flops / 1e9:,.1f}" if flops >= 1e9 else f"{flops / 1e9:.3g}"


def _collectives(row: dict[str, Any]) -> str:
  parts = [f"{op} {c['count']} ({_size(c['bytes'])})" for op, c in row["collectives"].items()]
  return "; ".join(parts) or "none"


def _bank(row: dict[str, Any]) -> str:
  if not row["bank_bytes"]:
    return "–"
  return f"{_size(row['bank_bytes_per_device'])} of {_size(row['bank_bytes'])}"


HEADER = ("| devices | method | step | batch / device | GFLOP / device | flops × SGD"
          " | peak memory / device | state / device | SAF bank / device | collectives (count, bytes)"
          " | compile s |")


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The markdown table of one config's rows."""
  lines = [HEADER, "|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
  sgd = {r["devices"]: r["flops"] for r in rows if r["method"] == "sgd" and "error" not in r}
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['devices']} | {r['method']} | not compiled: {r['error'][:200]}"
                   " | | | | | | | | |")
      continue
    ratio = f"{r['flops'] / sgd[r['devices']]:.3f}" if r["devices"] in sgd else "–"
    method = r["method"] + (" (full step)" if r.get("phase") else "")
    lines.append(
        f"| {r['devices']} | {method} | {r['step']} | {r['per_device_batch']}"
        f" | {_gflop(r['flops'])} | {ratio} | {_size(r['memory']['peak'])}"
        f" | {_size(r['state_bytes_per_device'])} | {_bank(r)} | {_collectives(r)}"
        f" | {r['compile_s']:.0f} |")
  return lines


def render(results: Sequence[dict[str, Any]], command: str, seconds: float) -> str:
  """SCALE.md from the workers' results."""
  rows = [dict(r, devices=res["devices"]) for res in results for r in res["rows"]]
  machine = results[0]["machine"] if results else {}
  layouts = sorted({r["layout"] for r in rows if "layout" in r})
  lines = [
      "# Scale report: the trainer's step at the papers' sizes, compiled",
      "",
      "Generated by `python -m benchmarks.scale` (see `benchmarks/scale.py` and"
      " `python -m benchmarks.scale --help`); do not edit by hand.",
      "",
      f"**{SENTENCE}** They say what the step *is* at these sizes (its work, its memory, its"
      " communication), not how long it takes on an accelerator.",
      "",
      "How it is computed: for each config, method and device count, the trainer's own"
      " training step (`experiments.train.build_step`, jitted by"
      " `experiments.placement.Placement` as a run jits it: a `shard_map` per device for the"
      " perturbing methods, `jax.jit` over the `('data',)` mesh for the others) is lowered"
      " and compiled on N fake CPU devices"
      " (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) with abstract inputs"
      " (`jax.ShapeDtypeStruct`) of the config's true input shape and global batch; the"
      " state is built with `jax.eval_shape`, never allocated.",
      "",
      "- **GFLOP / device**: `compiled.cost_analysis()['flops']`, one device's program;"
      " **flops × SGD**: over SGD's at the same device count.",
      "- **peak memory / device**: `compiled.memory_analysis()`, arguments + outputs −"
      " aliased (the state is donated) + temporaries, on XLA:CPU (an accelerator's"
      " compiler schedules and fuses differently).",
      "- **state / device**: the training state's bytes on one device under its"
      " sharding; **SAF bank / device**: the logit bank's, of its total.",
      "- **collectives**: the all-reduce, all-gather, reduce-scatter, all-to-all and"
      " collective-permute instructions of the optimized HLO (`compiled.as_text()`), each"
      " async start/done pair once, with the bytes of their results"
      " (`benchmarks.measure.collectives_of`).",
      "- **compile s**: seconds XLA:CPU took to compile the step here.",
      "",
      f"State layout: **{', '.join(layouts) or '–'}**. "
      + ("`replicated`: every leaf of the state on every device, as this trainer places"
         " it (this checkout's `Placement` has no `state_shardings`), so SAF's bank is"
         " whole on every device. "
         if "replicated" in layouts else "")
      + ("`Placement.state_shardings`: the state's shardings from the trainer's placement"
         " (with `shard_state='auto'`, SAF's bank split along its example axis over"
         " `'data'`, padded to a multiple of the device count; the rest replicated). "
         if any(l.startswith("Placement.state_shardings") for l in layouts) else ""),
      "",
      "ViT: `experiments/configs/` has no ViT config (the model zoo has `vit_small`), so"
      " none is compiled; a config file for one is compiled with `--configs NAME`.",
      "",
      f"Command: `{command}` ({seconds / 60:.1f} min on this machine, compiles included).",
      "",
  ]
  for spec in dict.fromkeys(r["config"] for r in rows):
    config_rows = [r for r in rows if r["config"] == spec]
    first = next((r for r in config_rows if "error" not in r), None)
    lines.append(f"## {spec}")
    lines.append("")
    if first is not None:
      shape = "×".join(str(d) for d in first["input_shape"])
      lines.append(
          f"{first['model']} ({first['params'] / 1e6:.1f} M parameters"
          f"{', bfloat16 activations' if first['half_precision'] else ''}) on"
          f" {first['dataset']} ({shape}, {first['num_train_examples']:,} training examples),"
          f" global batch {first['global_batch']}.")
      lines.append("")
    lines.extend(table(config_rows))
    lines.append("")
  if machine:
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    lines += [
        "## Machine",
        "",
        f"{machine.get('cpu')}, {machine.get('cores')} cores; {machine.get('platform')}"
        f" backend, fake devices; Python {machine.get('python')}; {versions}.",
        f"Generated {datetime.date.today().isoformat()}.",
        "",
    ]
  return "\n".join(lines)


def _names(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.scale",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                      help="configs of experiments/configs/, NAME[:tiny], comma-separated")
  parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                      help="registry methods, comma-separated")
  parser.add_argument("--devices", default=",".join(map(str, DEFAULT_DEVICES)),
                      help="fake CPU device counts, comma-separated (one worker each)")
  parser.add_argument("--output", default=DEFAULT_OUTPUT, help="the markdown report")
  parser.add_argument("--json", default=None,
                      help="the raw figures (default: scale.json beside --output)")
  parser.add_argument("--worker", action="store_true",
                      help="internal: compile on this process's devices, write --out")
  parser.add_argument("--out", help="internal: the worker's JSON file")
  args = parser.parse_args(argv)
  configs, methods = _names(args.configs), _names(args.methods)
  if args.worker:
    worker(configs, methods, args.out)
    return 0
  devices = [int(n) for n in _names(args.devices)]
  if any(n < 2 for n in devices):
    parser.error("--devices: every count must be at least 2 (data parallel).")
  start = time.perf_counter()
  results = run_workers(configs, methods, devices)
  seconds = time.perf_counter() - start
  command = "python -m benchmarks.scale" + "".join(
      f" --{name} {value}" for name, value, default in (
          ("configs", args.configs, ",".join(DEFAULT_CONFIGS)),
          ("methods", args.methods, ",".join(DEFAULT_METHODS)),
          ("devices", args.devices, ",".join(map(str, DEFAULT_DEVICES))))
      if value != default)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  json_path = args.json or os.path.join(os.path.dirname(os.path.abspath(args.output)),
                                        "scale.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump({"command": command, "seconds": seconds, "results": results}, f, indent=1)
  with open(args.output, "w", encoding="utf-8") as f:
    f.write(render(results, command, seconds))
  print(f"wrote {args.output} and {json_path} ({seconds / 60:.1f} min)", file=sys.stderr)
  failed = [r for res in results for r in res["rows"] if "error" in r]
  return 1 if failed or any(res["exit_code"] for res in results) else 0


if __name__ == "__main__":
  sys.exit(main())
