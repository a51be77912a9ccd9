"""Turn measurements into rows, check the targets, write RESULTS.md and the chart.

One run writes ``results-<platform>.json`` (the raw figures) and a chart
``benchmark-<platform>.png``; ``RESULTS.md`` is then rendered from every
``results-*.json`` in the output folder, so figures taken on an accelerator
sit beside the CPU ones, each with the machine behind it.
"""

from __future__ import annotations

import datetime
import glob
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks import measure
from benchmarks.methods import STATIC, Method

SGD = "sgd"
FUSED = "hand-written fused SAM"
OPAQUE = "optax.contrib.sam (opaque)"
TRANSPARENT = "optax.contrib.sam (transparent)"
THEORY_TOLERANCE = 0.05

# Targets of issues 7 and 4, on the step-time ratio to SGD (``time``).
# LookSAM and interval SAM: in the form the trainer uses on CPU (the static
# phase, two compiled steps); their lax.cond form is reported beside them.
TIME_TARGETS = {"saf": 1.10, "mesa": 1.40, "looksam (static phase)": 1.30,
                "interval_sam (static phase)": 1.30}
FLOP_TARGETS = {"sam": 2.05, "bsam": 3.05, "saf": 1.05}


# --------------------------------------------------------------------------
# Machine and versions.
# --------------------------------------------------------------------------


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (``platform.processor()`` else)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
  """CPU, cores, jax backend and devices, library versions."""
  import jax  # pylint: disable=import-outside-toplevel
  versions = {}
  for name in ("jax", "jaxlib", "optax", "flax", "chex", "numpy", "sam_optax"):
    try:
      module = __import__(name)
      versions[name] = getattr(module, "__version__", "?")
    except ImportError:
      versions[name] = "not installed"
  devices = jax.devices()
  return {
      "cpu": cpu_model(),
      "cores": os.cpu_count(),
      "platform": devices[0].platform,
      "device": devices[0].device_kind,
      "num_devices": len(devices),
      "python": platform.python_version(),
      "versions": versions,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


# --------------------------------------------------------------------------
# Rows.
# --------------------------------------------------------------------------


def _ratio_stats(samples: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
  """Median and quartiles of the per-round ratios ``samples[r] / reference[r]``."""
  n = min(len(samples), len(reference))
  ratios = [samples[r] / reference[r] for r in range(n) if reference[r] > 0]
  return measure.summary(ratios)


def task_rows(
    compiled: Mapping[str, measure.Compiled],
    methods: Sequence[Method],
    param_bytes: int,
    forward_fraction: float,
) -> list[dict[str, Any]]:
  """One row per method: ratios to SGD's flops, time and memory.

  Time ratios are the median (and quartiles) over rounds of the ratio of the
  method's window to SGD's window in the same round.
  """
  sgd = compiled[SGD]
  rows = []
  for method in methods:
    c = compiled[method.name]
    time = measure.summary(c.runner.samples)
    ratio = _ratio_stats(c.runner.samples, sgd.runner.samples)
    theory = method.theory(forward_fraction)
    flops_ratio = c.flops / sgd.flops
    rows.append({
        "method": method.name,
        "group": method.group,
        "note": method.note,
        "theory": theory,
        "flops": c.flops,
        "flops_ratio": flops_ratio,
        "theory_deviation": flops_ratio / theory - 1,
        "phase_flops": list(c.phase_flops),
        "time_median": time["median"], "time_q1": time["q1"], "time_q3": time["q3"],
        "ratio_median": ratio["median"], "ratio_q1": ratio["q1"], "ratio_q3": ratio["q3"],
        "samples": list(c.runner.samples),
        "memory": dict(c.memory),
        "state_bytes": c.state_bytes,
        "extra_peak_copies": (c.memory["peak"] - sgd.memory["peak"]) / param_bytes,
        "extra_state_copies": (c.state_bytes - sgd.state_bytes) / param_bytes,
        "extra_temp_copies": (c.memory["temp"] - sgd.memory["temp"]) / param_bytes,
        "hlo": dict(c.hlo),
        "extra_copy_copies": (c.hlo["copy_bytes"] - sgd.hlo["copy_bytes"]) / param_bytes,
        "compile_s": c.compile_s,
        "final_loss": c.runner.last_loss,
    })
    if method.phases:
      k = round(1 / method.phases[0][0])
      rows[-1]["phase_times"] = list(c.runner.phase_times(k))
  return rows


def pair_ratio(rows: Sequence[Mapping[str, Any]], a: str, b: str) -> dict[str, float] | None:
  """Median / quartiles of ``a``'s time over ``b``'s, round by round."""
  by_name = {r["method"]: r for r in rows}
  if a not in by_name or b not in by_name:
    return None
  return _ratio_stats(by_name[a]["samples"], by_name[b]["samples"])


# --------------------------------------------------------------------------
# Targets.
# --------------------------------------------------------------------------


def check_targets(task: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Every target of issues 7 and 4 that this task's rows can be checked on.

  Returns ``{'target', 'value', 'limit', 'met', 'task'}`` dicts; ``value``
  and ``limit`` are ratios.
  """
  rows = task["rows"]
  by_name = {r["method"]: r for r in rows}
  out = []

  def add(target, value, limit):
    if value is None or not math.isfinite(value):
      return
    out.append({"task": task["name"], "target": target, "value": value,
                "limit": limit, "met": bool(value <= limit)})

  for other, label, limit in ((FUSED, "hand-written fused SAM", 1.02),
                              (OPAQUE, "optax.contrib.sam (opaque)", 1.0),
                              (TRANSPARENT, "optax.contrib.sam (transparent)", 1.0)):
    ratio = pair_ratio(rows, "sam", other)
    if ratio is not None:
      add(f"sam step time ≤ {limit:g}× {label}", ratio["median"], limit)
  for name, limit in FLOP_TARGETS.items():
    if name in by_name:
      add(f"{name} flops ≤ {limit:g}× SGD", by_name[name]["flops_ratio"], limit)
  if "sam" in by_name:
    add("sam extra memory ≤ 1 parameter copy", by_name["sam"]["extra_peak_copies"], 1.0)
    if "gsam" in by_name:
      # GSAM's update (1 + αc) g_p − α g needs the clean gradient g after the
      # second pass; where activations dominate, XLA fits it in their buffers.
      add("gsam extra memory ≤ 1 parameter copy", by_name["gsam"]["extra_peak_copies"], 1.0)
  for name, limit in TIME_TARGETS.items():
    if name in by_name:
      add(f"{name} step time ≤ {limit:g}× SGD", by_name[name]["ratio_median"], limit)
  for r in rows:
    if r["group"] == "sam_optax":
      add(f"{r['method']} flops within 5% of {r['theory']:.3g} gradient evaluations",
          abs(r["theory_deviation"]), THEORY_TOLERANCE)
  return out


# --------------------------------------------------------------------------
# Diagnosis from the HLO.
# --------------------------------------------------------------------------


def diagnose(task: Mapping[str, Any]) -> list[str]:
  """Findings from the compiled HLO and the memory analysis, row by row.

  * copies: SGD's copies (mostly layout changes of activations around the
    convolutions) times the row's passes (its convolutions / dots over
    SGD's) is what a method is expected to copy; more than that by half a
    parameter copy is reported;
  * working memory: a method that re-evaluates the gradient should need no
    more scratch memory than SAM, plus the gradients it keeps; more than SAM's
    by 3 parameter copies and 10% is reported;
  * a method's SAM steps inside its ``lax.cond`` more than 1.5× slower than
    SAM's step (XLA:CPU's convolutions in a conditional), with its static
    phase's time; a static phase more than 1.5× slower than its ``lax.cond``
    (the host read of the phase, on sub-millisecond steps);
  * flops more than 5% away from the theoretical count.
  """
  rows = task["rows"]
  by_name = {r["method"]: r for r in rows}
  sgd, sam = by_name[SGD], by_name.get("sam")
  param_bytes = task["param_bytes"]
  lines = []
  fused = by_name.get(FUSED)
  if sam is not None and fused is not None:
    same = all(sam["hlo"][k] == fused["hlo"][k] for k in ("matmuls", "copies", "copy_bytes"))
    lines.append(
        f"**sam** against the hand-written fused step: flops"
        f" {sam['flops'] / fused['flops']:.4f}×, scratch memory"
        f" {(sam['memory']['temp'] - fused['memory']['temp']) / param_bytes:+.2f}"
        f" parameter copies, {sam['hlo']['matmuls']} vs {fused['hlo']['matmuls']}"
        f" convolutions/dots, {sam['hlo']['copies']} vs {fused['hlo']['copies']} copies"
        + (" — the same work, so a difference in their times comes from fusion"
           " choices or the machine's noise." if same else "."))
  for r in rows:
    if r["method"] == SGD:
      continue
    passes = r["hlo"]["matmuls"] / max(sgd["hlo"]["matmuls"], 1)
    excess = (r["hlo"]["copy_bytes"] - passes * sgd["hlo"]["copy_bytes"]) / param_bytes
    state = r["extra_state_copies"]
    if r["method"] == "saf" and state > 0.5 and excess > 1.5 * state:
      lines.append(
          f"**saf**: the optimized HLO copies the logit bank twice per step"
          f" ({excess:.1f} parameter copies of copies more than SGD; the bank is"
          f" {state:.1f} parameter copies). `saf_target` gathers from the bank and"
          " `update` scatters into it with no data dependency between the two, so"
          " XLA cannot order the read before the in-place write and copies the"
          " donated buffer. Fix (the `update` of `sam_optax.saf`): make the written"
          " logits depend on the incoming gradient, which depends on the read —"
          " `s = jax.tree.leaves(updates)[0].ravel()[0]; logits = logits +"
          " jnp.where(jnp.isfinite(s), s, 0.0) * 0.0` (exact) — after which the"
          " scatter is in place (measured on MNIST-1D: the copies go, temp memory"
          " −10 parameter copies, step 0.89 → 0.51 ms).")
    elif excess > 0.5 and excess > 0.05 * passes * sgd["hlo"]["copy_bytes"] / param_bytes:
      lines.append(
          f"**{r['method']}**: its optimized HLO copies {excess:.1f} parameter copies"
          f" more than SGD's copies × its {passes:.2f} passes.")
    if sam is not None and r["theory"] >= 2 and r["method"] != "sam":
      extra = (r["memory"]["temp"] - sam["memory"]["temp"]) / param_bytes
      if extra > 3 and extra * param_bytes > 0.1 * sam["memory"]["temp"]:
        lines.append(
            f"**{r['method']}**: {extra:.1f} parameter copies more scratch memory"
            " than SAM: more than the gradients it keeps; independent"
            " re-evaluations scheduled together hold the activations of several"
            " passes at once.")
    if r.get("phase_times") and sam is not None:
      full, cheap = r["phase_times"]
      if full > 1.5 * sam["time_median"]:
        odd = {label: n for label, n in r["hlo"].get("conv_layouts", {}).items()
               if label not in sgd["hlo"].get("conv_layouts", {})}
        layouts = (f"; {sum(odd.values())} of its convolutions have layouts"
                   f" ({', '.join(sorted(odd))}) that SGD's and SAM's compiled steps do"
                   " not have" if odd else "")
        static = by_name.get(r["method"] + STATIC)
        lines.append(
            f"**{r['method']}**: its SAM steps (inside `lax.cond`) take"
            f" {full * 1e3:.1f} ms against {sam['time_median'] * 1e3:.1f} ms for sam's"
            f" step, its other steps {cheap * 1e3:.1f} ms against SGD's"
            f" {sgd['time_median'] * 1e3:.1f} ms{layouts}. XLA:CPU does not give the"
            " convolutions of a conditional's branch the layout of its fast (Eigen)"
            " convolution and runs them through its naive loop emitter"
            " (jax-ml/jax#12868, convolutions in a loop body). The flops are those of"
            " 1 + 1/k gradients; the time is not, on CPU. The static phase"
            " (`update(..., ascent_step=sam_optax.takes_ascent_step(opt_state))`, a"
            " compiled step per phase, no `lax.cond`) avoids it"
            + (f": **{static['method']}** takes {static['ratio_median']:.2f}× SGD's step"
               f" time against {r['ratio_median']:.2f}× here" if static is not None else "")
            + "; the trainer uses it on CPU for models with convolutions"
            " (`config.phase='auto'`).")
    cond = by_name.get(r["method"].removesuffix(STATIC)) if r["method"].endswith(STATIC) else None
    if cond is not None and r["ratio_median"] > 1.5 * cond["ratio_median"]:
      lines.append(
          f"**{r['method']}**: {r['ratio_median']:.2f}× SGD's step time against"
          f" {cond['ratio_median']:.2f}× with `lax.cond`: before each call the phase of"
          " the step is read on the host (`sam_optax.takes_ascent_step`), which waits for"
          f" the previous step, and here SGD's step takes {sgd['time_median'] * 1e3:.2f} ms."
          " For models without convolutions the trainer keeps `lax.cond`"
          " (`config.phase='auto'`).")
    if r["group"] == "sam_optax" and abs(r["theory_deviation"]) > THEORY_TOLERANCE:
      lines.append(
          f"**{r['method']}**: flops {r['flops_ratio']:.3f}× SGD against"
          f" {r['theory']:.3g} in theory; {r['hlo']['matmuls']} convolutions/dots in"
          f" the HLO, {passes:.2f}× SGD's.")
  return lines


# --------------------------------------------------------------------------
# Markdown.
# --------------------------------------------------------------------------


def _fmt_ratio(median: float, q1: float, q3: float) -> str:
  if not math.isfinite(median):
    return "–"
  return f"{median:.2f} [{q1:.2f}–{q3:.2f}]"


def _ms(seconds: float) -> str:
  return "–" if not math.isfinite(seconds) else f"{seconds * 1e3:.2f}"


def task_table(task: Mapping[str, Any]) -> str:
  """The main table of one task, in markdown."""
  head = ("| method | theory (grad evals) | flops × SGD | step time × SGD, median [IQR] |"
          " ms / step, median [IQR] | extra memory (param copies): peak / state / temp |"
          " note |\n|---|---:|---:|---:|---:|---:|---|\n")
  body = []
  for r in task["rows"]:
    body.append(
        f"| {r['method']} | {r['theory']:.3g} | {r['flops_ratio']:.3f} |"
        f" {_fmt_ratio(r['ratio_median'], r['ratio_q1'], r['ratio_q3'])} |"
        f" {_ms(r['time_median'])} [{_ms(r['time_q1'])}–{_ms(r['time_q3'])}] |"
        f" {r['extra_peak_copies']:+.2f} / {r['extra_state_copies']:+.2f} /"
        f" {r['extra_temp_copies']:+.2f} | {r['note']} |")
  return head + "\n".join(body) + "\n"


def scaling_table(scaling: Mapping[str, Any], key: str, label: str) -> str:
  """Width or device scaling: time and memory per method and size."""
  head = (f"| {label} | method | ms / step (median) | time × SGD | growth vs {label} ="
          " first | flops × SGD | extra memory (param copies) | peak MB / device |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|\n")
  first = {}
  body = []
  for r in scaling["rows"]:
    first.setdefault(r["method"], r["time_median"])
    growth = r["time_median"] / first[r["method"]]
    body.append(
        f"| {r[key]:g} | {r['method']} | {_ms(r['time_median'])} |"
        f" {r['ratio_median']:.2f} | {growth:.2f} | {r['flops_ratio']:.3f} |"
        f" {r['extra_peak_copies']:+.2f} | {r['memory']['peak'] / 2**20:.1f} |")
  return head + "\n".join(body) + "\n"


def render_platform(result: Mapping[str, Any]) -> str:
  """The section of RESULTS.md for one results file."""
  m = result["machine"]
  v = m["versions"]
  s = result["settings"]
  out = [
      f"## {m['platform'].upper()}: " + (f"{m['cpu']}, {m['cores']} cores"
                                          if m["platform"] == "cpu" else m["device"]),
      "",
      f"- Date: {result['date']}; command: `{result['command']}`",
      f"- Machine: {m['cpu']}, {m['cores']} cores; jax backend `{m['platform']}`"
      f" ({m['num_devices']} devices: {m['device']}); Python {m['python']}",
      f"- Versions: jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']},"
      f" flax {v['flax']}, chex {v['chex']}, sam_optax {v['sam_optax']}",
      f"- Load average (1 min) at start / end: {result['load'][0]:.2f} / {result['load'][1]:.2f};"
      f" total run time {result['elapsed_s'] / 60:.1f} min",
      f"- Settings: base optimizer SGD(lr {s['learning_rate']}, momentum {s['momentum']}),"
      f" ρ = {s['rho']}, k = {s['cycle']}, p = {s['probability']}, ESAM β = 0.5,"
      f" γ = {s.get('esam_gamma', 0.5)}; timing in windows of steps, methods interleaved"
      " round by round (rounds × window under each task).",
  ]
  if result.get("note"):
    out += ["", f"> {result['note']}"]
  chart = result.get("chart")
  if chart:
    out += ["", f"![{m['platform']} benchmark]({chart})"]
  for task in result["tasks"]:
    out += [
        "", f"### {task['name']}: {task['description']}", "",
        f"{task['num_params']:,} parameters ({task['param_bytes'] / 2**20:.2f} MB, the unit"
        f" of the memory columns); one forward = {task['forward_fraction']:.3f} of a"
        f" gradient evaluation (measured flops); {task['rounds']} rounds ×"
        f" {task['window']} steps timed per method.", "",
        task_table(task),
    ]
    pairs = []
    for other in (FUSED, OPAQUE, TRANSPARENT):
      ratio = pair_ratio(task["rows"], "sam", other)
      if ratio is not None:
        pairs.append(f"sam / {other}: {_fmt_ratio(ratio['median'], ratio['q1'], ratio['q3'])}")
    if pairs:
      out += ["Step time, round by round: " + "; ".join(pairs) + ".", ""]
    phases = [r for r in task["rows"] if r["phase_flops"]]
    if phases:
      out += ["Flops of the conditional steps, per phase (the count folded as a constant):"]
      for r in phases:
        out.append(f"- {r['method']}: " + ", ".join(f"{f / 1e9:.3f} GFLOP"
                                                    for f in r["phase_flops"]))
      out.append("")
  targets = [t for task in result["tasks"] for t in check_targets(task)]
  if targets:
    out += ["", "### Targets", "", "| task | target | measured | met |", "|---|---|---:|:---:|"]
    for t in targets:
      out.append(f"| {t['task']} | {t['target']} | {t['value']:.3f} |"
                 f" {'yes' if t['met'] else '**no**'} |")
  findings = [line for task in result["tasks"] for line in
              [f"{task['name']}: {d}" for d in diagnose(task)]]
  if findings:
    out += ["", "### What the HLO shows", ""] + [f"- {line}" for line in findings]
  for key, label, title in (("width", "width", "Scaling with the model's width"),
                            ("devices", "devices", "Scaling with the device count")):
    scaling = result.get(f"{key}_scaling")
    if scaling and scaling["rows"]:
      out += ["", f"### {title}", "", scaling["description"], "",
              scaling_table(scaling, key, label)]
  return "\n".join(out) + "\n"


HEADER = """# Benchmark results

Generated by `python -m benchmarks.run` (see `benchmarks/__init__.py` and
`python -m benchmarks.run --help`); do not edit by hand. Each section holds the
figures of one machine, all measured in one process so that the ratios are
comparable.

How to read the tables:

- **theory**: gradient evaluations per step (SGD = 1, SAM = 2, BSAM = 3,
  LookSAM / interval SAM with k = 5: 1 + 1/5, stochastic SAM: 1 + p, SAF: 1,
  MESA: 1 + one forward, measured as the ratio of the compiled forward's
  flops to the compiled gradient's).
- **flops × SGD**: `compiled.cost_analysis()['flops']` of the jitted training
  step over SGD's. XLA counts a `lax.cond` as its costliest branch, so the
  methods that branch on their step count (LookSAM, interval SAM) are
  compiled once per phase with the count folded in as a constant (XLA then
  keeps only the branch taken) and weighted over a cycle of k steps;
  stochastic SAM takes the same two branches with probability p, so its
  flops are p · full + (1 − p) · cheap with the branches measured on interval
  SAM (plus the flops of its random draw). MESA's one `lax.cond` (the
  teacher's forward, off before its start epoch) is counted as its costly
  branch, the one that runs in the timed steps.
- **step time × SGD**: per round, the method's mean time per step over a
  window of steps divided by SGD's in the same round; median and
  interquartile range over rounds. Every call is followed by
  `block_until_ready`. The transparent mode of `optax.contrib.sam` takes two
  `update` calls per SAM step; it is counted per SAM step (two calls).
  The windows hold a multiple of k steps, so the conditional methods are
  timed over whole cycles (one SAM step in five); stochastic SAM's windows
  hold however many SAM steps its draws gave (p = 0.2 on average), so its
  time is noisier than interval SAM's.
- **extra memory** in parameter copies, from `compiled.memory_analysis()`:
  **peak** = `argument_size + output_size − alias_size + temp_size` (the
  training state is donated, so the new state overwrites the old); **state**
  = bytes of the training state (parameters, BatchNorm statistics, optimizer
  state); **temp** = `temp_size` (XLA's scratch buffers); each minus SGD's,
  over the bytes of one copy of the parameters.
"""


def render(results: Sequence[Mapping[str, Any]]) -> str:
  """RESULTS.md from the results of every platform."""
  return HEADER + "\n" + "\n".join(render_platform(r) for r in results)


def write(result: dict[str, Any], output_dir: str) -> tuple[str, str]:
  """Writes ``results-<platform>.json``, the chart, and re-renders RESULTS.md."""
  os.makedirs(output_dir, exist_ok=True)
  name = result["machine"]["platform"]
  chart = f"benchmark-{name}.png"
  result["chart"] = chart
  plot(result, os.path.join(output_dir, chart))
  with open(os.path.join(output_dir, f"results-{name}.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=float)
  results = []
  for path in sorted(glob.glob(os.path.join(output_dir, "results-*.json"))):
    with open(path, encoding="utf-8") as f:
      results.append(json.load(f))
  markdown = os.path.join(output_dir, "RESULTS.md")
  with open(markdown, "w", encoding="utf-8") as f:
    f.write(render(results))
  return markdown, os.path.join(output_dir, chart)


# --------------------------------------------------------------------------
# The chart.
# --------------------------------------------------------------------------


def plot(result: Mapping[str, Any], path: str) -> None:
  """Bar chart: step time and flops relative to SGD per method and task,
  plus the scaling studies."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel

  tasks = result["tasks"]
  scalings = [(k, result.get(f"{k}_scaling")) for k in ("width", "devices")]
  scalings = [(k, s) for k, s in scalings if s and s["rows"]]
  height = max((len(t["rows"]) for t in tasks), default=1)
  fig, axes = plt.subplots(
      1 + bool(scalings), max(len(tasks), len(scalings), 1),
      figsize=(7 * max(len(tasks), len(scalings), 1), 0.35 * height + 3 + 4 * bool(scalings)),
      squeeze=False, gridspec_kw={"height_ratios": [0.35 * height + 2] + [4] * bool(scalings)})
  for ax, task in zip(axes[0], tasks):
    rows = task["rows"]
    y = np.arange(len(rows))
    ratio = np.array([r["ratio_median"] for r in rows])
    err = np.array([[r["ratio_median"] - r["ratio_q1"] for r in rows],
                    [r["ratio_q3"] - r["ratio_median"] for r in rows]])
    colors = {"baseline": "0.6", "alternative": "tab:orange", "sam_optax": "tab:blue"}
    ax.barh(y - 0.2, ratio, 0.4, xerr=np.nan_to_num(err), capsize=2,
            color=[colors.get(r["group"], "tab:blue") for r in rows])
    ax.barh(y + 0.2, [r["flops_ratio"] for r in rows], 0.4, color="0.85", edgecolor="0.4")
    ax.scatter([r["theory"] for r in rows], y + 0.2, marker="|", s=120, color="k", zorder=3)
    ax.set_yticks(y, [r["method"] for r in rows])
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.5)
    ax.set_xlabel("× SGD (median, IQR)")
    ax.set_title(f"{task['name']} ({result['machine']['device']})", fontsize=9)
    handles = [Patch(color=colors["sam_optax"], label="step time, sam_optax"),
               Patch(color=colors["alternative"], label="step time, alternatives"),
               Patch(facecolor="0.85", edgecolor="0.4", label="XLA flops"),
               Line2D([], [], marker="|", color="k", ls="", markersize=10, label="theory")]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
  for ax in axes[0][len(tasks):]:
    ax.axis("off")
  if scalings:
    for ax, (key, scaling) in zip(axes[1], scalings):
      methods = [m for m in dict.fromkeys(r["method"] for r in scaling["rows"]) if m != SGD]
      sizes = sorted({r[key] for r in scaling["rows"]})
      width = 0.8 / max(len(methods), 1)
      for i, method in enumerate(methods):
        rows = {r[key]: r for r in scaling["rows"] if r["method"] == method}
        x = np.arange(len(sizes)) + (i - (len(methods) - 1) / 2) * width
        ratio = [rows[s]["ratio_median"] if s in rows else np.nan for s in sizes]
        err = [[rows[s]["ratio_median"] - rows[s]["ratio_q1"] if s in rows else 0 for s in sizes],
               [rows[s]["ratio_q3"] - rows[s]["ratio_median"] if s in rows else 0 for s in sizes]]
        ax.bar(x, ratio, width, yerr=np.nan_to_num(err), capsize=2, label=method)
      ax.axhline(2.0, color="k", lw=0.5, ls="--", label="2 gradient evaluations")
      ax.set_xticks(np.arange(len(sizes)), [f"{s:g}" for s in sizes])
      ax.set_xlabel(key)
      ax.set_ylabel("step time × SGD at the same size")
      ax.set_title(f"cost relative to SGD vs {key} ({scaling['task']})", fontsize=9)
      ax.legend(fontsize=7)
    for ax in axes[1][len(scalings):]:
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def now() -> str:
  return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
