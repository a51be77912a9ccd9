"""Smoke tests of benchmarks/: the harness runs, counts what it should, writes its files.

No timed assertion: the step times of a shared CI machine mean nothing. What
is checked is what XLA reports about the compiled programs (flops, matmul
counts, memory), which does not depend on the machine's load.
"""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import sam_optax
from benchmarks import measure, methods, report, run, tasks


class TinyMLP(nn.Module):
  """6 → 8 → 3, ReLU: compiles in a fraction of a second; its activations
  (batch 64) outweigh its parameters, as in a real network."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


@pytest.fixture(scope="module")
def task():
  return tasks.make_task("tiny", "a 6-8-3 MLP, batch 64", TinyMLP(), (6,), 3,
                         batch_size=64, num_examples=128)


@pytest.fixture(scope="module")
def table():
  return methods.method_table()


@pytest.fixture(scope="module")
def compiled(task, table):
  results = measure.measure_methods(task, table)
  measure.time_interleaved([c.runner for c in results.values()], rounds=2, window=1)
  return results


@pytest.fixture(scope="module")
def rows(compiled, table, task):
  return report.task_rows(compiled, table, task.param_bytes, measure.forward_fraction(task))


def test_table_has_every_method_of_the_library(table):
  names = {m.name for m in table}
  assert {"sgd", "sam", "usam", "asam", "gsam", "bsam", "csam", "stable_sam(sam)",
          "stable_sam(usam)", "hand-written fused SAM", "optax.contrib.sam (opaque)",
          "optax.contrib.sam (transparent)"} <= names
  for name in ("saf", "mesa", "looksam", "interval_sam", "stochastic_sam", "esam"):
    assert (name in names) == hasattr(sam_optax, name)


def test_method_table_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown method"):
    methods.method_table(["sam", "no_such_method"])


def test_every_method_trains_and_is_measured(rows, compiled):
  for r in rows:
    assert math.isfinite(r["final_loss"]), r["method"]
    assert r["flops"] > 0 and r["memory"]["peak"] > 0, r["method"]
    assert len(r["samples"]) == 2 and all(t > 0 for t in r["samples"]), r["method"]
  # The state is donated: every state buffer is written in place.
  for name, c in compiled.items():
    assert c.memory["alias"] > 0, name


def test_sam_re_evaluates_once_and_costs_two_gradients(compiled, rows):
  by_name = {r["method"]: r for r in rows}
  sgd = compiled["sgd"].hlo["matmuls"]
  # One re-evaluation: exactly twice SGD's dots (no recomputed forward).
  for name in ("sam", "hand-written fused SAM", "optax.contrib.sam (opaque)"):
    assert compiled[name].hlo["matmuls"] == 2 * sgd, name
  assert compiled["bsam"].hlo["matmuls"] == 3 * sgd
  assert by_name["sam"]["flops_ratio"] == pytest.approx(2.0, rel=0.1)
  assert by_name["bsam"]["flops_ratio"] == pytest.approx(3.0, rel=0.1)
  # Two update calls make one SAM step of the transparent mode.
  transparent = compiled["optax.contrib.sam (transparent)"]
  assert transparent.runner.calls_per_step == 2
  assert transparent.flops == 2 * measure.flops_of(transparent.runner.compiled)


def test_gsam_keeps_one_gradient_more_than_sam(compiled, task):
  # (1 + αc) g_p − α g in one pass over the leaves: no g_⊥ tree besides g
  # (ResNet-18: +1.93 parameter copies before, +1.01 after; SAM +0.80).
  extra = compiled["gsam"].memory["peak"] - compiled["sam"].memory["peak"]
  assert extra <= 1.1 * task.param_bytes


def test_bsam_runs_its_passes_one_after_the_other(compiled, task):
  # Run together, the two re-evaluations would hold both passes' activations
  # (here ~16 parameter copies more than SAM); one after the other, BSAM keeps
  # only a few more gradients than SAM.
  extra = compiled["bsam"].memory["temp"] - compiled["sam"].memory["temp"]
  assert extra <= 5 * task.param_bytes


@pytest.mark.skipif(not hasattr(sam_optax, "interval_sam"), reason="no interval_sam yet")
def test_conditional_methods_are_counted_per_branch(compiled):
  interval = compiled["interval_sam"]
  full, cheap = interval.phase_flops
  sam, sgd = compiled["sam"].flops, compiled["sgd"].flops
  # XLA counts the costliest branch; folding the step count leaves the cheap one.
  assert full == interval.max_flops
  assert full == pytest.approx(sam, rel=0.05)
  assert cheap == pytest.approx(sgd, rel=0.05)
  k = methods.CYCLE
  assert interval.flops == pytest.approx(full / k + cheap * (k - 1) / k)


def test_static_phase_rows_compile_one_step_per_phase(compiled):
  # The trainer's CPU form: two compiled steps, the one the state names is called.
  for name in ("interval_sam", "looksam"):
    static, cond = compiled[name + methods.STATIC], compiled[name]
    assert set(static.runner.compiled) == {True, False}
    assert static.phase_flops == pytest.approx(cond.phase_flops, rel=0.05)
    assert static.flops == pytest.approx(cond.flops, rel=0.05)
    # 1 warm-up + 2 timed calls: steps 0 (ascent), 1, 2.
    assert int(static.runner.state[-1][0].count) == 3
  stochastic = compiled["stochastic_sam" + methods.STATIC]
  full, cheap = stochastic.phase_flops
  p = methods.PROBABILITY
  assert stochastic.flops == pytest.approx(p * full + (1 - p) * cheap)
  assert full == pytest.approx(compiled["sam"].flops, rel=0.05)
  assert cheap == pytest.approx(compiled["sgd"].flops, rel=0.05)


def test_folded_flops_sees_the_branch_taken():
  def step(state, batch):
    x = jax.lax.cond(state["count"] % 2 == 0, lambda x: x @ x @ x, lambda x: x + 1.0,
                     state["x"])
    return {"count": state["count"] + 1, "x": x}, batch

  x = jnp.ones((16, 16))
  full = measure.folded_flops(step, {"count": jnp.int32(0), "x": x}, jnp.zeros(()))
  cheap = measure.folded_flops(step, {"count": jnp.int32(1), "x": x}, jnp.zeros(()))
  assert full >= 2 * 2 * 16**3
  assert cheap < 16 * 16 * 2


def test_memory_peak_is_arguments_outputs_and_temp():
  compiled = jax.jit(lambda x: jnp.tanh(x @ x) @ x).lower(jnp.ones((64, 64))).compile()
  memory = measure.memory_of(compiled)
  assert memory["argument"] == 64 * 64 * 4
  assert memory["output"] == 64 * 64 * 4
  assert memory["peak"] == (memory["argument"] + memory["output"] - memory["alias"]
                            + memory["temp"])


def test_targets_and_markdown(rows, task):
  entry = {"name": task.name, "description": task.description, "num_params": task.num_params,
           "param_bytes": task.param_bytes, "forward_fraction": 0.3, "rounds": 2,
           "window": 1, "rows": rows}
  targets = report.check_targets(entry)
  by_target = {t["target"]: t for t in targets}
  assert "sam flops ≤ 2.05× SGD" in by_target
  assert all(isinstance(t["met"], bool) for t in targets)
  table = report.task_table(entry)
  for r in rows:
    assert f"| {r['method']} |" in table


def test_results_md_renders_the_committed_figures():
  """RESULTS.md, its diagnosis of ``lax.cond`` included, says what its own figures say."""
  folder = os.path.dirname(os.path.abspath(report.__file__))
  results = []
  for name in sorted(f for f in os.listdir(folder) if f.startswith("results-")):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
      results.append(json.load(f))
  with open(os.path.join(folder, "RESULTS.md"), encoding="utf-8") as f:
    assert f.read() == report.render(results)
  cpu = {t["name"]: t for t in results[0]["tasks"]}
  name = "interval_sam"
  # ResNet on CPU: lax.cond is the slow form and the static phase the fix, by its ratio.
  rows = {r["method"]: r for r in cpu["resnet"]["rows"]}
  cond, static = rows[name], rows[name + methods.STATIC]
  assert static["ratio_median"] < 0.7 * cond["ratio_median"]
  assert (f"**{static['method']}** takes {static['ratio_median']:.2f}× SGD's step time"
          f" against {cond['ratio_median']:.2f}× here") in "\n".join(
              report.diagnose(cpu["resnet"]))
  # The MLP's sub-millisecond steps: the host read of the phase costs more than lax.cond.
  rows = {r["method"]: r for r in cpu["mnist1d"]["rows"]}
  cond, static = rows[name], rows[name + methods.STATIC]
  assert static["ratio_median"] > 1.5 * cond["ratio_median"]
  assert (f"**{static['method']}**: {static['ratio_median']:.2f}× SGD's step time against"
          f" {cond['ratio_median']:.2f}× with `lax.cond`") in "\n".join(
              report.diagnose(cpu["mnist1d"]))


def test_command_line_writes_results(tmp_path):
  result = run.main([
      "--tasks", "mnist1d", "--methods", "sam,saf", "--steps", "2", "--window", "1",
      "--batch", "16", "--scaling-task", "mnist1d", "--widths", "1,2", "--devices", "1,2",
      "--scaling-steps", "1", "--output-dir", str(tmp_path), "--note", "smoke test"])
  assert sorted(os.listdir(tmp_path)) == ["RESULTS.md", "benchmark-cpu.png", "results-cpu.json"]
  with open(tmp_path / "benchmark-cpu.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  markdown = (tmp_path / "RESULTS.md").read_text()
  for text in ("smoke test", "| sam |", "jax 0.", "cores", "Scaling with the model's width",
               "Scaling with the device count", "python -m benchmarks.run --tasks mnist1d"):
    assert text in markdown, text
  saved = json.loads((tmp_path / "results-cpu.json").read_text())
  assert [r["method"] for r in saved["tasks"][0]["rows"]][:2] == ["sgd", "sam"]
  assert {r["devices"] for r in result["devices_scaling"]["rows"]} == {1, 2}
  assert {r["width"] for r in result["width_scaling"]["rows"]} == {1.0, 2.0}
  # Sharded over two devices, each device computes about half the flops.
  rows = {(r["devices"], r["method"]): r for r in result["devices_scaling"]["rows"]}
  assert rows[2, "sgd"]["flops"] < 0.6 * rows[1, "sgd"]["flops"]


def test_sharpness_benchmark_counts_products_and_writes_its_report(tmp_path, task):
  from benchmarks import sharpness as sharpness_bench  # pylint: disable=import-outside-toplevel
  settings = sharpness_bench.Settings(
      tasks=("tiny",), batch={"tiny": 64}, train_steps=2, rounds=2, lanczos_iters=4, top_k=2,
      trace_samples=3, slq_iters=3, slq_samples=2, m=16, adaptive_steps=2, power_iters=3,
      power_max_iters=8, reference_iters=12, lanczos_counts=(2,), starts={"tiny": 1},
      tasks_factory={"tiny": lambda batch_size: task},
      # Each measurement compiles twice (timed, counted): top-k, SLQ and adaptive sharpness,
      # built the same way, are left out to keep the test fast.
      only=("gradient", "hessian-vector product", "λ_max (Lanczos)", "trace (Hutchinson)",
            "m-sharpness (m = 16)"))
  output = tmp_path / "SHARPNESS.md"
  result = sharpness_bench.run(settings, str(output), "python -m benchmarks.sharpness --test")
  (entry,) = result["tasks"]
  rows = {r["name"]: r for r in entry["rows"]}
  # The forward passes counted at run time are the products the algorithm takes.
  assert rows["gradient"]["forwards"] == 1 and rows["hessian-vector product"]["forwards"] == 1
  assert list(rows) == list(settings.only)
  for name, products in (("λ_max (Lanczos)", 4), ("trace (Hutchinson)", 3)):
    assert rows[name]["hvps"] == rows[name]["forwards"] == products, name
  assert rows["m-sharpness (m = 16)"]["forwards"] == 2 * (64 // 16)  # a gradient and a loss per group
  for r in entry["rows"]:
    assert len(r["ratio"]) == 3 and r["seconds"]["median"] > 0, r["name"]
  assert rows["gradient"]["ratio"]["median"] == pytest.approx(1.0)
  (start,) = entry["comparison"]["starts"]
  assert set(start["lanczos_error"]) == {"2"} and len(start["power_error"]) == 8
  assert start["reference"] > 0 and start["power_final_error"] < 1.0
  text = output.read_text()
  assert "Lanczos against power iteration" in text and "| λ_max (Lanczos) |" in text
  assert json.loads((tmp_path / "sharpness.json").read_text())["tasks"][0]["name"] == "tiny"
