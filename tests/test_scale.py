"""benchmarks/scale.py: the trainer's step compiled on fake devices, read from XLA.

One run of ``python -m benchmarks.scale`` on a tiny config and 8 fake devices
(a subprocess: the device count is fixed before jax starts). What is checked
is what XLA reports about the compiled programs, not any time.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import measure, scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  folder = tmp_path_factory.mktemp("scale")
  output = folder / "SCALE.md"
  completed = subprocess.run(
      [sys.executable, "-m", "benchmarks.scale", "--configs", "default:tiny",
       "--methods", "sgd,sam,saf", "--devices", "8", "--output", str(output)],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert completed.returncode == 0, completed.stderr
  figures = json.loads((folder / "scale.json").read_text())
  rows = {row["method"]: row for row in figures["results"][0]["rows"]}
  return rows, output.read_text()


def test_sam_per_device_step_is_two_gradients(report):
  rows, _ = report
  assert rows["sam"]["devices"] == 8 and rows["sam"]["per_device_batch"] == 10
  assert rows["sam"]["step"].startswith("shard_map")
  assert rows["sgd"]["step"].startswith("jit")
  assert rows["sam"]["flops"] / rows["sgd"]["flops"] == pytest.approx(2.0, rel=0.05)


def test_data_parallel_steps_have_collectives(report):
  rows, _ = report
  for method in ("sgd", "sam", "saf"):
    collectives = rows[method]["collectives"]
    assert sum(c["count"] for c in collectives.values()) > 0, method
    assert sum(c["bytes"] for c in collectives.values()) > 0, method
  # The per-device step averages the gradient over the devices: an all-reduce
  # at least the size of the parameters.
  param_bytes = 4 * rows["sam"]["params"]
  assert rows["sam"]["collectives"]["all-reduce"]["bytes"] >= param_bytes


def test_memory_and_bank_are_reported(report):
  rows, _ = report
  for row in rows.values():
    assert row["memory"]["peak"] > 0 and row["state_bytes_per_device"] > 0
  saf = rows["saf"]
  # (Ẽ + 1) × examples × classes float32 entries, split as the layout says.
  assert saf["bank_bytes"] == 2 * 400 * 10 * 4
  assert saf["bank_bytes_per_device"] * saf["bank_shards"][0] == saf["bank_bytes"]
  assert rows["sgd"]["bank_bytes"] == 0


def test_markdown_says_what_it_is(report):
  _, markdown = report
  assert scale.HEADER in markdown
  assert "compiled estimates, not measured TPU times" in markdown
  assert "do not edit by hand" in markdown
  assert "## default:tiny" in markdown and "## Machine" in markdown


def test_collectives_of_hlo_text():
  hlo = """
  %all-reduce.1 = f32[10,4]{1,0} all-reduce(f32[10,4]{1,0} %p), replica_groups={}
  %ars = (f32[8]{0}, bf16[2]{0}) all-reduce-start(f32[8]{0} %a, bf16[2]{0} %b)
  %ard = (f32[8]{0}, bf16[2]{0}) all-reduce-done((f32[8]{0}, bf16[2]{0}) %ars)
  ROOT %all-gather = s32[64]{0} all-gather(s32[8]{0} %i), dimensions={0}
  %fusion = f32[3]{0} fusion(f32[3]{0} %x), calls=%all-reduce-like
  """
  assert measure.collectives_of(hlo) == {
      "all-reduce": {"count": 2, "bytes": 160 + 32 + 4},
      "all-gather": {"count": 1, "bytes": 256},
  }
