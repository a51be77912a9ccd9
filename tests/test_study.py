"""The evidence study: its verdict rule, and its config run end to end in a tiny form."""

import concurrent.futures
import json
import os
import time

import numpy as np
import pytest

from experiments import checkpoints, study, study_report
from experiments import verdict as rule
from experiments.configs import study as study_config
from xla_cache import compilation_cache  # noqa: F401  (autouse: the seeds' runs compile once)


class TestRule:

  def test_difference_beyond_two_standard_errors_counts(self):
    # se = hypot(std([1, 2, 3], ddof=1) / sqrt(3), same) = sqrt(2/3) ≈ 0.816.
    a, b = [1.0, 2.0, 3.0], [3.0, 4.0, 5.0]
    comparison = rule.compare(b, a, claim="greater")
    assert comparison.difference == pytest.approx(2.0)
    assert comparison.standard_error == pytest.approx(np.sqrt(2 / 3))
    assert comparison.verdict == rule.HOLDS          # 2.0 > 2 × 0.816
    assert rule.compare(a, b, claim="greater").verdict == rule.FAILS
    assert rule.compare(a, b, claim="less").verdict == rule.HOLDS

  def test_difference_within_two_standard_errors_is_inconclusive(self):
    a, b = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]          # 1.0 < 2 × 0.816
    assert rule.compare(b, a, claim="greater").verdict == rule.INCONCLUSIVE
    assert rule.compare(a, b, claim="greater").verdict == rule.INCONCLUSIVE

  def test_threshold_is_strict(self):
    # Equal spreads s: se = s·sqrt(2/n); a difference of exactly 2 se does not count.
    a = np.array([0.0, 1.0, 2.0])
    se = np.sqrt(2 / 3)
    b = a + 2 * se
    assert rule.compare(b, a, claim="greater").verdict == rule.INCONCLUSIVE
    assert rule.compare(b + 1e-9, a, claim="greater").verdict == rule.HOLDS

  def test_bound_and_combination(self):
    assert rule.at_most(1.00, 0.05, 1.10) == rule.HOLDS
    assert rule.at_most(1.20, 0.05, 1.10) == rule.FAILS
    assert rule.at_most(1.08, 0.05, 1.10) == rule.INCONCLUSIVE
    assert rule.combine([rule.HOLDS, rule.INCONCLUSIVE, rule.FAILS]) == rule.FAILS
    assert rule.combine([rule.HOLDS, rule.INCONCLUSIVE]) == rule.INCONCLUSIVE
    assert rule.combine([rule.HOLDS]) == rule.HOLDS

  @pytest.mark.parametrize("a, b, message", [
      ([1.0], [1.0, 2.0], "at least 2"),
      ([1.0, float("nan")], [1.0, 2.0], "not finite"),
  ])
  def test_bad_input(self, a, b, message):
    with pytest.raises(ValueError, match=message):
      rule.compare(a, b, claim="greater")

  def test_bad_claim(self):
    with pytest.raises(ValueError, match="'greater' or 'less'"):
      rule.compare([1.0, 2.0], [1.0, 2.0], claim="bigger")


def _fake_results(arms, seeds, value):
  """Every arm's runs with metrics from value(arm, seed)."""
  results = {}
  for arm in arms:
    runs = []
    for seed in seeds:
      acc, ece, hess, sharp = value(arm.name, seed)
      runs.append({"accuracy": acc, "ece": ece, "nll": 0.5, "adaptive_ece": ece,
                   "hessian": hess, "m_sharpness": sharp, "train_accuracy": 1.0,
                   "gradients_per_step": 2, "forwards_per_step": 0, "epochs": 60,
                   "steps": 100, "hparams": {"rho": 0.1}, "history": {}})
    results[arm.name] = runs
  return results


def test_verdict_rows_read_the_claims_right():
  config = study_config.get_config()
  tuned = {"sam_rho": 0.2, "csam_rho": 0.2, "usam_rho": 1.0, "bsam_rho": 0.1, "saf_lam": 1.0,
           "mesa_decay": 0.99}
  arms = study.study_arms(config, tuned)
  ece = {"sgd": 0.15, "sam": 0.10, "csam": 0.05}
  # SAM beats SGD only for lr ≤ 0.1; StableSAM(SAM) also at 0.2 (a wider window);
  # USAM and StableSAM(USAM) never.
  def value(name, seed):
    noise = 0.001 * seed
    acc = 0.7 + noise
    if name.startswith("lr"):
      lr = float(name[2:].split("-")[0])
      method = name.split("-", 1)[1]
      if (method == "sam" and lr <= 0.1) or (method == "stable-sam" and lr <= 0.2):
        acc += 0.05
    return acc, ece.get(name.removesuffix("-paper"), 0.15) + noise, 1.0, 0.01
  results = _fake_results(arms, config.seeds, value)
  rows = {row.claim: row for row in study_report.verdict_rows(config, results, tuned)}
  calibration = [r for c, r in rows.items() if c.startswith("CSAM and SAM calibrate")]
  assert len(calibration) == 2 and all(r.verdict == rule.HOLDS for r in calibration)
  window_sam = next(r for c, r in rows.items() if c.startswith("SAM beats SGD only"))
  assert window_sam.verdict == rule.HOLDS
  assert "SAM {0.01, 0.03, 0.1}" in window_sam.ours
  assert "StableSAM(SAM) {0.01, 0.03, 0.1, 0.2}" in window_sam.ours
  window_usam = next(r for c, r in rows.items() if c.startswith("USAM beats SGD only"))
  assert window_usam.verdict == rule.FAILS          # an empty window
  flatter = next(r for c, r in rows.items() if c.startswith("SAF is flatter than SGD"))
  assert flatter.verdict == rule.INCONCLUSIVE       # equal λ_max: the difference does not count


def test_arm_table_shows_the_trace_where_runs_have_it_and_a_dash_where_not():
  config = study_config.get_config()
  arms = [study.Arm("sgd", "clean", "sgd"), study.Arm("sam", "clean", "sam", {"rho": 0.1}),
          study.Arm("csam", "clean", "csam")]
  results = _fake_results(arms, (0, 1, 2), lambda name, seed: (0.7, 0.1, 2.0 + seed, 0.01))
  results["csam"][0].update(hessian_trace=50.0, hessian_trace_stderr=0.1)  # one run of three
  for runs in results.values():
    for run in runs:
      run["reliability_diagram"] = {"bin_count": [10], "bin_confidence": [0.8],
                                    "bin_accuracy": [0.7]}
  for seed, run in enumerate(results["sam"]):       # recorded after the trace was added
    run.update(hessian_trace=100.0 + 10 * seed, hessian_trace_stderr=0.5 + seed)
  table = study_report.arm_table(results, arms, {})
  header, _, sgd, sam, csam = table.splitlines()
  columns = [c.strip() for c in header.split("|")]
  trace = columns.index("tr H")
  assert columns[trace - 1] == "λ_max"              # next to λ_max
  assert [c.strip() for c in sgd.split("|")][trace] == study_report.NOT_MEASURED
  assert [c.strip() for c in csam.split("|")][trace] == study_report.NOT_MEASURED
  assert [c.strip() for c in sam.split("|")][trace] == "110.0 ± 10.0"
  assert [c.strip() for c in sam.split("|")][trace - 1] == "3.00 ± 1.00"
  note = study_report.sharpness_note(config, results)
  assert study_report.NOT_MEASURED_NOTE in note and "at most 2.5" in note
  every_run_has_it = {"sam": results["sam"]}
  assert study_report.NOT_MEASURED_NOTE not in study_report.sharpness_note(config,
                                                                           every_run_has_it)


def test_tiny_study_runs_end_to_end(tmp_path):
  config = study_config.get_config("tiny")
  workdir = str(tmp_path / "study")
  summary = study.run_study(config, workdir)
  assert summary is not None
  assert set(summary["tuning"]) == {"sam_rho"}
  assert summary["tuned"]["sam_rho"] in config.grids.sam_rho
  assert summary["tuned"]["csam_rho"] == config.fixed.csam_rho
  assert set(summary["arms"]) == {"sgd", "sam", "csam"}
  for arm in summary["arms"].values():
    assert len(arm["runs"]) == len(config.seeds)
    for run in arm["runs"]:
      assert 0.0 <= run["accuracy"] <= 1.0 and np.isfinite(run["m_sharpness"])
      assert np.isfinite(run["hessian"]) and np.isfinite(run["hessian_trace"])
      assert 0.0 <= run["hessian_trace_stderr"] < np.inf
  claims = [v["claim"] for v in summary["verdicts"]]
  assert any(c.startswith("CSAM and SAM calibrate (clean labels, tuned") for c in claims)
  text = open(os.path.join(workdir, "verdicts.md"), encoding="utf-8").read()
  assert "## Verdicts" in text and f"{len(config.seeds)} seeds" in text
  assert "| λ_max | tr H |" in text and study_report.NOT_MEASURED_NOTE not in text
  for figure in ("cost.png", "seeds.png", "reliability_clean.png"):
    assert os.path.getsize(os.path.join(workdir, figure)) > 0
  # A second call finds every run done and trains nothing.
  before = {p: os.path.getmtime(os.path.join(workdir, "runs", p, "seed0", "summary.json"))
            for p in ("sgd", "sam")}
  again = study.run_study(config, workdir)
  assert json.dumps(again["verdicts"]) == json.dumps(summary["verdicts"])
  for p, mtime in before.items():
    assert os.path.getmtime(os.path.join(workdir, "runs", p, "seed0", "summary.json")) == mtime


def test_readme_shows_the_committed_verdicts():
  """The README's verdict table is the committed study's, row for row."""
  root = os.path.join(os.path.dirname(__file__), os.pardir)
  with open(os.path.join(root, "experiments", "results", "study", "study.json"),
            encoding="utf-8") as stream:
    verdicts = json.load(stream)["verdicts"]
  with open(os.path.join(root, "README.md"), encoding="utf-8") as stream:
    readme = stream.read()
  assert len(verdicts) >= 19
  for row in verdicts:
    assert f"| {row['claim']} | {row['ours']} | **{row['verdict']}** |" in readme, row["claim"]
  assert {row["verdict"] for row in verdicts} <= {rule.HOLDS, rule.FAILS, rule.INCONCLUSIVE}


def test_shards_split_the_runs_and_read_each_others(tmp_path, monkeypatch):
  trained = []

  def fake_run_arm(study_config_, arm, seed, data_seed, folder, pipelines):
    del study_config_, data_seed, pipelines
    done = os.path.join(folder, "summary.json")
    if not os.path.exists(done):
      os.makedirs(folder)
      checkpoints.write_json(done, {"accuracy": seed / 10, "ece": 0.1, "hessian": 1.0,
                                    "m_sharpness": 0.01})  # atomic, as run_arm's
      trained.append((arm.name, seed))
    with open(done, encoding="utf-8") as stream:
      return json.load(stream)

  monkeypatch.setattr(study, "run_arm", fake_run_arm)
  arm = study.Arm("a", "clean", "sgd")
  runs = [study.Run(arm, seed, 42, str(tmp_path / f"seed{seed}")) for seed in range(5)]
  monkeypatch.setattr(study, "POLL_SECONDS", 0.01)
  # Shard 1 trains runs 1 and 3, then waits for shard 0's, which start after it.
  waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
      study.Shards(1, 2).run, None, runs, wait=True)
  while len(trained) < 2:
    time.sleep(0.01)
  assert trained == [("a", 1), ("a", 3)] and waiting.running()
  first = study.Shards(0, 2).run(None, runs, wait=False)
  assert trained[2:] == [("a", 0), ("a", 2), ("a", 4)]
  assert [s is None for s in first] == [False] * 5    # shard 1's were done: read
  assert [s["accuracy"] for s in waiting.result(timeout=10)] == [0.0, 0.1, 0.2, 0.3, 0.4]
  fresh = [study.Run(arm, seed, 42, str(tmp_path / f"other{seed}")) for seed in range(2)]
  assert study.Shards(0, 2).run(None, fresh, wait=False)[1] is None  # not waited for
  assert study.Shards(0, 2).results(None, fresh) is None             # and reported missing
  results = study.Shards(0, 1).results(None, runs)
  assert [s["accuracy"] for s in results["a"]] == [0.0, 0.1, 0.2, 0.3, 0.4]
  assert len(trained) == 6
  with pytest.raises(ValueError, match=r"shard_index must be in \[0, num_shards = 2\), got 2"):
    study.Shards(2, 2)
