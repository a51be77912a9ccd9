"""The efficiency frontier: its arms, its costs, its budget table, and a tiny run end to end."""

import json
import os
import shutil

import pytest

from experiments import costs as costs_lib
from experiments import frontier, frontier_report, study
from experiments import verdict as rule
from experiments.configs import frontier as frontier_config
from xla_cache import compilation_cache  # noqa: F401  (autouse: the seeds' runs compile once)


def _config(**changes):
  config = frontier_config.get_config()
  with config.unlocked():
    for key, value in changes.items():
      config[key] = value
  return config


class TestArms:

  def test_every_registry_method_but_sgd_by_default(self):
    names = frontier.frontier_methods(frontier_config.get_config())
    assert "sgd" not in names and {"sam", "looksam", "saf", "mesa", "sampa", "bsam"} <= set(names)
    assert len(names) == len(frontier.registry.METHODS) - 1

  def test_radius_grid_scales_every_radius_and_keeps_cost_settings(self):
    config = frontier_config.get_config()
    sam = frontier.candidates(config, "sam")
    assert [h["rho"] for _, h in sam] == [0.05, 0.15, 0.5, 1.5, 5.0]
    gsam = frontier.candidates(config, "gsam")
    assert all(h["rho"] == h["rho_min"] for _, h in gsam)     # both scaled (paper: equal)
    bsam = dict(frontier.candidates(config, "bsam"))
    assert bsam["×10"] == {"rho_max": 0.5, "rho_min": 0.5}
    stochastic = frontier.candidates(config, "stochastic_sam")
    assert all(h["p"] == 0.2 for _, h in stochastic)          # the benchmark's p, every point
    assert [h["lam"] for _, h in frontier.candidates(config, "saf")] == [0.3, 1.0, 3.0]
    assert [h["decay"] for _, h in frontier.candidates(config, "mesa")] == [0.9998, 0.998, 0.99]

  def test_paper_equal_to_tuned_is_one_arm_and_budget_arms_have_whole_epochs(self):
    config = _config(methods=("sam", "saf"))
    chosen = {(r, m): frontier.paper_hparams(config, m) for r in config.regimes
              for m in ("sam", "saf")}
    chosen[("noisy", "sam")] = {"rho": 0.5}
    entries = frontier.frontier_entries(config, chosen)
    roles = {(e.regime, e.method, e.role) for e in entries if e.role != frontier.BUDGET}
    assert ("clean", "sam", frontier.BOTH) in roles
    assert {("noisy", "sam", frontier.PAPER), ("noisy", "sam", frontier.TUNED)} <= roles
    names = [e.arm.name for e in entries]
    assert len(names) == len(set(names))
    epochs = {e.arm.name: e.arm.changes.get("num_epochs", 60) for e in entries}
    assert epochs["clean-sgd-epochs90"] == 90 and epochs["noisy-sam-rho0.5-epochs30"] == 30
    noisy_sam_budget = [e for e in entries if e.regime == "noisy" and e.method == "sam"
                        and e.role == frontier.BUDGET]
    assert all(e.arm.hparams == {"rho": 0.5} for e in noisy_sam_budget)  # the tuned radius

  def test_config_is_locked_and_knows_its_forms(self):
    for arg in (None, "tiny"):
      config = frontier_config.get_config(arg)
      assert config.kind == "frontier" and config.is_locked
      with pytest.raises(AttributeError):
        config.radius_factor = (1.0,)          # a mistyped field is an error
    with pytest.raises(ValueError, match="unknown config argument 'huge'"):
      frontier_config.get_config("huge")

  def test_bad_config_is_refused(self):
    with pytest.raises(ValueError, match="unknown method 'sma'"):
      frontier.frontier_methods(_config(methods=("sma",)))
    with pytest.raises(ValueError, match="'sgd' is not a method to compare"):
      frontier.frontier_methods(_config(methods=("sgd",)))
    with pytest.raises(ValueError, match="0.33 × clean's 60 epochs is not a whole number"):
      frontier.sgd_entries(_config(sgd_epochs=(0.33,)), "clean")
    config = _config()
    with config.unlocked():
      config.settings.looksam = {"kk": 5}
    with pytest.raises(ValueError, match="has no hyperparameter 'kk'"):
      frontier.paper_hparams(config, "looksam")


def _benchmark(rows, settings=None):
  costs = {frontier_report.TASK: {name: costs_lib.MethodCost(
      costs_lib.TimeRatio(t, 0.9 * t, 1.1 * t), f) for name, (f, t) in rows.items()}}
  return costs_lib.BenchmarkCosts(costs, "today", "bench.json",
                                  settings or {"cycle": 5, "probability": 0.2, "esam_gamma": 0.5})


class TestCosts:

  def test_committed_benchmark_has_every_method_of_the_frontier(self):
    config = frontier_config.get_config()
    benchmark = costs_lib.read_benchmark()
    frontier_report.check_settings(config, benchmark)
    chosen = {(r, m): frontier.paper_hparams(config, m) for r in config.regimes
              for m in frontier.frontier_methods(config)}
    for entry in frontier.frontier_entries(config, chosen):
      cost = frontier_report.compute(entry, benchmark)
      assert 0.9 <= cost.flops / entry.epochs_factor <= 3.1, entry.arm.name

  def test_epochs_scale_the_cost_and_the_cheaper_compiled_form_is_used(self):
    bench = _benchmark({"looksam": (1.2, 1.6), "looksam (static phase)": (1.2, 3.1),
                        "sam": (2.0, 1.6), "stable_sam(usam)": (2.0, 1.7)})
    look = frontier.Entry(study.Arm("a", "clean", "looksam", {"rho": 0.05, "k": 5}), "tuned")
    cost = frontier_report.compute(look, bench)
    assert cost.row == "looksam" and cost.time.median == pytest.approx(1.6)
    half = frontier.Entry(study.Arm("b", "clean", "sam", {"rho": 0.5}), "budget", 0.5)
    cost = frontier_report.compute(half, bench)
    assert cost.flops == pytest.approx(1.0) and cost.time.median == pytest.approx(0.8)
    stable = frontier.Entry(study.Arm("c", "clean", "stable_sam", {"rho": 0.05}), "tuned")
    assert frontier_report.compute(stable, bench).row == "stable_sam(usam)"  # registry default

  def test_cost_settings_must_match_the_benchmark(self):
    config = frontier_config.get_config()
    with pytest.raises(ValueError, match=r"stochastic_sam's p is 0.2 in the frontier but the"
                                         r" benchmark run bench.json measured probability = 0.5"):
      frontier_report.check_settings(config, _benchmark({}, {"cycle": 5, "probability": 0.5,
                                                             "esam_gamma": 0.5}))


class TestReport:

  def test_pareto_front(self):
    points = [(1.0, 0.70), (2.0, 0.75), (1.5, 0.69), (3.0, 0.74), (1.0, 0.60), (2.5, 0.80)]
    assert frontier_report.pareto(points, higher_is_better=True) == [0, 1, 5]
    assert frontier_report.pareto(points, higher_is_better=False) == [4]

  def _setup(self, accuracy, tuning_accuracy):
    """Two regimes' SGD, SAM and LookSAM arms with the given accuracies."""
    config = _config(methods=("sam", "looksam"), sgd_epochs=(1.0, 1.5, 2.0), sam_epochs=(0.5,))
    chosen = {(r, m): frontier.paper_hparams(config, m) for r in config.regimes
              for m in ("sam", "looksam")}
    entries = frontier.frontier_entries(config, chosen)
    bench = _benchmark({"sgd": (1.0, 1.0), "sam": (2.006, 1.6), "looksam": (1.2, 1.5),
                        "looksam (static phase)": (1.2, 3.0)})
    computes = {e.arm.name: frontier_report.compute(e, bench) for e in entries}
    results = {e.arm.name: [{"accuracy": accuracy(e) + 0.001 * s} for s in range(3)]
               for e in entries}
    tuning = {e.arm.name: tuning_accuracy(e) for e in entries}
    return config, entries, computes, results, tuning

  def test_budget_choice_is_made_on_the_tuning_draw_and_judged_on_the_reported_one(self):
    # On the reported draw LookSAM is the best arm; on the tuning draw SAM at ½ epochs wins
    # the 1× budget, LookSAM the 1.5× and SAM the 2×. The choice follows the tuning draw.
    def accuracy(e):
      return {"looksam": 0.80, "sam": 0.75}.get(e.method, 0.70)

    def tuning_accuracy(e):
      if e.method == "sam" and e.role == frontier.BUDGET:
        return 0.74
      return {"sam": 0.77, "looksam": 0.76}.get(e.method, 0.70)

    config, entries, computes, results, tuning = self._setup(accuracy, tuning_accuracy)
    rows = frontier_report.budget_rows(config, entries, computes, results, tuning)
    by_budget = {(r.regime, r.budget): r for r in rows}
    one = by_budget[("clean", 1.0)]
    assert one.chosen == "clean-sam-rho0.05-epochs30"   # SAM's ½ epochs = 1.003×, within 5 %
    assert one.sgd == "clean-sgd-epochs60"
    assert one.versus_sgd.verdict == rule.HOLDS
    assert by_budget[("clean", 1.5)].chosen == "clean-looksam-rho0.05-k5"  # SAM 1× is 2×
    assert by_budget[("clean", 1.5)].sgd == "clean-sgd-epochs90"          # SGD given the budget
    two = by_budget[("noisy", 2.0)]
    assert two.chosen == "noisy-sam-rho0.05" and two.versus_sgd.verdict == rule.HOLDS
    assert two.sgd == "noisy-sgd-epochs120"
    assert two.versus_sgd.text.startswith("+5.00 ± ")

  def test_a_method_that_loses_to_sgd_at_equal_compute_is_listed(self):
    def accuracy(e):
      if e.method == "sgd":
        return 0.70 + 0.02 * (e.epochs_factor - 1)     # SGD gains with epochs
      return {"looksam": 0.705}.get(e.method, 0.74)

    config, entries, computes, results, tuning = self._setup(accuracy, lambda e: 0.5)
    lines = frontier_report.not_worth_it(config, entries, computes, results)
    text = "\n".join(lines)
    # LookSAM (1.2×) is judged against SGD at 1.5× epochs (0.71), not at 1× (0.70).
    assert "clean: **looksam** (1.20× compute) against clean-sgd-epochs90" in text
    assert "does not hold" in text and "**sam**" not in text
    mine = [e for e in entries if e.regime == "clean"]
    sam = frontier_report.equal_compute(mine, computes, 2.006, "sgd")
    assert sam.arm.name == "clean-sgd-epochs120"           # 2.006 counts as 2×

  def test_written_report(self, tmp_path):
    config, entries, computes, results, tuning = self._setup(
        lambda e: {"looksam": 0.80, "sam": 0.75}.get(e.method, 0.70), lambda e: 0.5)
    for runs in results.values():
      for run in runs:
        run.update(ece=0.05, hessian=2.0, hessian_trace=30.0, epochs=60)
    chosen = {(r, m): frontier.paper_hparams(config, m) for r in config.regimes
              for m in ("sam", "looksam")}
    tuning.update({frontier.arm_of(config, r, m, h).name: 0.5 for r in config.regimes
                   for m in ("sam", "looksam") for _, h in frontier.candidates(config, m)})
    bench = _benchmark({"sgd": (1.0, 1.0), "sam": (2.006, 1.6), "looksam": (1.2, 1.5),
                        "looksam (static phase)": (1.2, 3.0)})
    summary = frontier_report.write(config, str(tmp_path), entries, results, tuning, chosen,
                                    bench)
    text = (tmp_path / "FRONTIER.md").read_text(encoding="utf-8")
    assert "## Budget → best method" in text and "3 seeds" in text
    assert "| clean | 1.5× | clean-sgd-epochs60 |" in text   # a tie goes to the cheaper arm
    assert os.path.getsize(tmp_path / "frontier.png") > 0
    assert os.path.getsize(tmp_path / "frontier_time.png") > 0
    recorded = json.loads((tmp_path / "frontier.json").read_text(encoding="utf-8"))
    assert recorded["arms"]["clean-sam-rho0.05"]["compute"]["flops"] == pytest.approx(2.006)
    assert summary["budgets"][frontier_report.FLOPS][0]["budget"] == 1.0


def test_tiny_frontier_runs_end_to_end_through_the_study_command(tmp_path):
  config = frontier_config.get_config("tiny")
  workdir = str(tmp_path / "frontier")
  summary = frontier.run_frontier(config, workdir)
  assert summary is not None
  arms = summary["arms"]
  assert {a["method"] for a in arms.values()} == {"sgd", "sam", "saf"}
  for arm in arms.values():
    assert len(arm["runs"]) == len(config.seeds)
    assert all(0.0 <= run["accuracy"] <= 1.0 for run in arm["runs"])
  assert set(summary["chosen"]) == {f"{r}/{m}" for r in config.regimes for m in ("sam", "saf")}
  text = open(os.path.join(workdir, "FRONTIER.md"), encoding="utf-8").read()
  assert "## Budget → best method" in text and "### noisy" in text
  # A second call finds every run done and trains nothing.
  mtime = os.path.getmtime(os.path.join(workdir, "runs", "clean-sgd-epochs2", "seed0",
                                        "summary.json"))
  again = frontier.run_frontier(config, workdir)
  assert json.dumps(again["budgets"]) == json.dumps(summary["budgets"])
  assert os.path.getmtime(os.path.join(workdir, "runs", "clean-sgd-epochs2", "seed0",
                                       "summary.json")) == mtime


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
COMMITTED = os.path.join(ROOT, "experiments", "results", "frontier")


def test_committed_report_is_what_the_report_command_writes(tmp_path):
  """FRONTIER.md and frontier.json are `python -m experiments.frontier_report`'s output."""
  shutil.copy(os.path.join(COMMITTED, "frontier.json"), tmp_path)
  frontier_report.rewrite(str(tmp_path))
  for name in ("FRONTIER.md", "frontier.json"):
    with open(os.path.join(COMMITTED, name), encoding="utf-8") as committed:
      assert (tmp_path / name).read_text(encoding="utf-8") == committed.read(), name


def test_readme_and_guide_show_the_committed_budget_table():
  with open(os.path.join(COMMITTED, "FRONTIER.md"), encoding="utf-8") as stream:
    report = stream.read()
  section = report.split(f"## Budget → best method (compute in {frontier_report.FLOPS})")[1]
  section = section.split("\n## ")[0]
  table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
  recorded = json.loads(open(os.path.join(COMMITTED, "frontier.json"), encoding="utf-8").read())
  assert table.count("\n") == 1 + len(recorded["budgets"][frontier_report.FLOPS])
  assert all(len(arm["runs"]) == 3 for arm in recorded["arms"].values())  # 3 seeds each
  for page in ("README.md", os.path.join("docs", "guides", "budget.md")):
    with open(os.path.join(ROOT, page), encoding="utf-8") as stream:
      assert table in stream.read(), page
