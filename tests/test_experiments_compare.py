"""The main job (``python -m experiments.compare``) in smoke mode, and the examples."""

import json
import math

import pytest

from experiments import compare
from experiments.examples import linen_sam, nnx_sam
from xla_cache import compilation_cache  # noqa: F401  pylint: disable=unused-import

SMALL = ["compare", "--config=experiments/configs/default.py:tiny", "--noprogress"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("compare") / "out"
  code = compare.main(SMALL + ["--config.methods=sgd,saf,csam", f"--workdir={out}"])
  return code, out


def test_smoke_comparison_writes_table_json_and_figures(smoke, capsys):
  code, out = smoke
  assert code == 0
  for name in ("results.md", "results.json", "learning_curves.png",
               "reliability_diagrams.png"):
    assert (out / name).stat().st_size > 0, name
  assert (out / "runs" / "saf" / "results.json").exists()
  summary = json.loads((out / "results.json").read_text())
  rows = {row["method"]: row for row in summary["table"]}
  assert list(rows) == ["sgd", "saf", "csam"]
  for row in rows.values():
    assert 0 <= row["accuracy"] <= 100 and math.isfinite(row["nll"])
  assert rows["csam"]["passes"] == "2" and rows["saf"]["passes"] == "1"
  assert summary["machine"]["cpu_count"] >= 1 and summary["wall_time_s"] > 0
  table = (out / "results.md").read_text()
  assert "| Method | Test acc. (%) | NLL | ECE (%) |" in table
  assert "ms / step" not in table and "benchmarks/RESULTS.md" in table  # no back-to-back timing
  assert not (out / "time_per_step.png").exists()
  assert table.count("\n| ") == 4  # header + 3 methods
  assert "csam (rho=0.5, gamma=1.0, normalize=True)" in table


def test_resume_reuses_finished_runs(smoke, capsys):
  _, out = smoke
  before = json.loads((out / "results.json").read_text())
  assert compare.main(SMALL + ["--config.methods=sgd,saf,csam", f"--workdir={out}",
                               "--resume"]) == 0
  after = json.loads((out / "results.json").read_text())
  assert [r["accuracy"] for r in after["table"]] == [r["accuracy"] for r in before["table"]]
  assert "Results: " in capsys.readouterr().out


def test_several_seeds_give_mean_and_std(tmp_path):
  out = tmp_path / "seeds"
  assert compare.main(SMALL + ["--config.methods=sgd", "--config.seeds=0,1",
                               f"--workdir={out}"]) == 0
  row = json.loads((out / "results.json").read_text())["table"][0]
  assert row["seeds"] == 2 and row["accuracy_std"] >= 0
  assert " ± " in (out / "results.md").read_text()


def test_markdown_table_formats_missing_values():
  row = {"method": "sgd", "seeds": 1, "accuracy": 91.234, "nll": math.nan, "ece": 1.0,
         "adaptive_ece": 2.0, "hessian": 3.0, "train_accuracy": 80.0, "passes": "1"}
  text = compare.markdown_table([row])
  assert "| sgd | 91.2 | – | 1.0 |" in text


@pytest.mark.parametrize("argv, fragment", [
    (["--config.methods=sgd,adam_sam"], "unknown method 'adam_sam'"),
    (["--config.dataset=mnist2d"], "unknown dataset 'mnist2d'"),
    (["--config.hparams.sam.rhoo=1"], "did you mean hparams.sam.rho?"),
    (["--config.method=sam"], "--config.methods"),
    (["--config.seeds=zero"], "seeds must be integers"),
])
def test_bad_input_writes_nothing(argv, fragment, tmp_path, capsys):
  out = tmp_path / "out"
  assert compare.main(SMALL + argv + [f"--workdir={out}"]) == 2
  err = capsys.readouterr().err
  assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err
  assert not out.exists()


@pytest.mark.parametrize("example", [linen_sam, nnx_sam], ids=["linen", "nnx"])
def test_examples_run(example, capsys):
  result = example.main(["--steps", "4", "--num-samples", "500", "--batch-size", "50"])
  assert math.isfinite(result["loss"]) and 0.0 <= result["test_accuracy"] <= 1.0
  assert "test accuracy" in capsys.readouterr().out
