"""The study's diagnostics (experiments/diagnostics.py) and its costs read from the benchmark run."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from experiments import costs, diagnostics, study_report
from experiments import verdict as rule
from experiments.configs import study as study_config
from xla_cache import compilation_cache  # noqa: F401  (autouse)

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
STUDY = os.path.join(ROOT, "experiments", "results", "study")


# --------------------------------------------------------------------------
# Costs from the benchmark's JSON.
# --------------------------------------------------------------------------


def _benchmark(tmp_path, saf_resnet=(1.25, 1.2, 1.3)):
  """A benchmark JSON with the fields benchmarks.run writes (and one extra row)."""
  def row(method, ratio, flops):
    return {"method": method, "group": "sam_optax", "flops_ratio": flops,
            "ratio_median": ratio[0], "ratio_q1": ratio[1], "ratio_q3": ratio[2], "note": ""}
  run = {"date": "2031-01-02 03:04 UTC", "tasks": [
      {"name": "resnet", "rows": [row("sgd", (1, 1, 1), 1.0), row("saf", saf_resnet, 1.0),
                                  row("mesa", (1.3, 1.2, 1.35), 1.33)]},
      {"name": "mnist1d", "rows": [row("saf", (1.05, 1.0, 1.08), 1.004),
                                   row("mesa", (1.5, 1.45, 1.6), 1.37)]}]}
  path = tmp_path / "results-cpu.json"
  path.write_text(json.dumps(run))
  return str(path)


def test_read_benchmark_reads_each_tasks_rows(tmp_path):
  read = costs.read_benchmark(_benchmark(tmp_path), methods=("saf", "mesa"))
  assert read.date == "2031-01-02 03:04 UTC"
  assert read.cost("resnet", "saf") == costs.MethodCost(costs.TimeRatio(1.25, 1.2, 1.3), 1.0)
  assert read.cost("mnist1d", "mesa").flops == 1.37
  assert read.cost("resnet", "mesa").time.spread == pytest.approx(0.1)   # max(0.05, 0.1)
  with pytest.raises(KeyError, match="no row 'sgd'"):
    read.cost("resnet", "sgd")                                          # not asked for
  with pytest.raises(ValueError, match="no row 'looksam'"):
    costs.read_benchmark(_benchmark(tmp_path), methods=("looksam",))


def test_read_benchmark_refuses_a_file_that_is_not_a_run(tmp_path):
  path = tmp_path / "other.json"
  path.write_text(json.dumps({"tasks": []}))
  with pytest.raises(ValueError, match="no 'date'"):
    costs.read_benchmark(str(path))


def test_committed_benchmark_is_what_the_study_cites():
  raw = json.load(open(costs.BENCHMARK_JSON, encoding="utf-8"))
  read = costs.read_benchmark()
  for task in raw["tasks"]:
    for row in task["rows"]:
      cost = read.cost(task["name"], row["method"])
      assert (cost.time.median, cost.time.q1, cost.time.q3, cost.flops) == (
          row["ratio_median"], row["ratio_q1"], row["ratio_q3"], row["flops_ratio"])
  cited = {row["claim"]: row for row in
           json.load(open(os.path.join(STUDY, "study.json"), encoding="utf-8"))["verdicts"]}
  saf = read.cost("resnet", "saf")
  assert (f"{saf.time.median:.2f}× [{saf.time.q1:.2f}–{saf.time.q3:.2f}]"
          in cited["SAF costs ≤ 1.10× SGD per step"]["ours"])
  assert read.date in cited["MESA costs ≤ 1.40× SGD per step"]["ours"]


def test_cost_verdicts_follow_the_benchmark(tmp_path):
  config = study_config.get_config()
  results = {"sgd": [{}]}  # no claim but the costs needs runs
  read = costs.read_benchmark(_benchmark(tmp_path), methods=("saf", "mesa"))
  rows = {r.claim: r for r in study_report.verdict_rows(config, results, {}, costs=read)}
  saf, mesa = rows["SAF costs ≤ 1.10× SGD per step"], rows["MESA costs ≤ 1.40× SGD per step"]
  assert saf.verdict == rule.FAILS            # ResNet 1.25 [1.20–1.30]: its lower end is above 1.10
  assert "tiny MLP, where fixed per-step costs dominate: → holds" in saf.parts  # 1.05 + 0.05
  assert mesa.verdict == rule.INCONCLUSIVE    # 1.3 ± 0.1 straddles 1.40
  assert "1.30× [1.20–1.35]" in mesa.ours and "2031-01-02 03:04 UTC" in mesa.ours


def test_committed_report_is_what_the_report_command_writes(tmp_path):
  """verdicts.md and study.json are `python -m experiments.study_report`'s output, unedited."""
  workdir = tmp_path / "study"
  workdir.mkdir()
  shutil.copy(os.path.join(STUDY, "study.json"), workdir)
  study_report.rewrite(str(workdir))
  for name in ("verdicts.md", "study.json"):
    with open(os.path.join(STUDY, name), encoding="utf-8") as committed:
      assert (workdir / name).read_text(encoding="utf-8") == committed.read()


# --------------------------------------------------------------------------
# The diagnostics' pieces.
# --------------------------------------------------------------------------


def _quadratic():
  h = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 2.0]])
  b = np.array([0.2, -1.0, 0.5])
  return h, b


def test_min_pass_step_reproduces_the_authors_bsam_loop():
  """Three steps of BSAM + momentum SGD against a NumPy port of ajiaaa/BSAM's aliased loop."""
  h, b = _quadratic()
  rho_max, lr, momentum = 0.1, 0.05, 0.9
  rho_min = lambda count: 0.08 * (1.0 - count / 10.0)  # noqa: E731  (a decaying ρ_min,t)
  loss_fn = lambda w: 0.5 * w @ jnp.asarray(h, jnp.float32) @ w + jnp.asarray(b, jnp.float32) @ w  # noqa: E731
  tx = diagnostics.with_min_pass_step(
      optax.chain(sam_optax.bsam(rho_max, rho_min, loss_fn=loss_fn), optax.sgd(lr, momentum)),
      rho_min)
  params = jnp.array([1.0, -2.0, 0.5], jnp.float32)
  state = tx.init(params)
  w, buf = np.asarray(params, np.float64), np.zeros(3)
  grad = lambda v: h @ v + b  # noqa: E731
  for count in range(3):
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
    params = optax.apply_updates(params, updates)
    # The authors' step: old_p = w; w + ρ_max n for g_max; p.data = old_p (aliased) and
    # p.sub_(ρ_min n) moves old_p itself; the base optimizer then steps from there.
    g0 = grad(w)
    n = g0 / np.linalg.norm(g0)
    g_max, g_min = grad(w + rho_max * n), grad(w - rho_min(count) * n)
    direction = g_max + g0 - np.linalg.norm(g_max) / np.linalg.norm(g_min) * g_min
    buf = momentum * buf + direction
    w = (w - rho_min(count) * n) - lr * buf
    np.testing.assert_allclose(params, w, rtol=1e-5, atol=1e-6)
  assert int(state.count) == 3


def test_min_pass_step_with_zero_radius_is_the_wrapped_update():
  h, b = _quadratic()
  loss_fn = lambda w: 0.5 * w @ jnp.asarray(h, jnp.float32) @ w + jnp.asarray(b, jnp.float32) @ w  # noqa: E731
  inner = optax.chain(sam_optax.bsam(0.1, 0.1, loss_fn=loss_fn), optax.sgd(0.05, 0.9))
  params = jnp.zeros(3, jnp.float32)  # g = b at 0: a gradient with no NaN to normalize
  grads = jax.grad(loss_fn)(params)
  wrapped, _ = diagnostics.with_min_pass_step(inner, 0.0).update(
      grads, diagnostics.with_min_pass_step(inner, 0.0).init(params), params)
  plain, _ = inner.update(grads, inner.init(params), params)
  np.testing.assert_allclose(wrapped, plain, rtol=1e-6)
  with pytest.raises(ValueError, match="rho_min must be >= 0"):
    diagnostics.with_min_pass_step(inner, -0.1)


def test_ratio_probe_is_stable_sams_scale():
  """‖g‖/‖g̃‖ of the probe is the factor by which StableSAM(SAM) rescales SAM's g̃."""
  h, b = _quadratic()
  def loss_fn(w, x):
    return jnp.sum(jnp.cos(w * x)) + 0.5 * w @ jnp.asarray(h, jnp.float32) @ w, ()
  params, x = jnp.array([0.3, -1.0, 2.0]), jnp.array([1.0, 2.0, 0.5])
  grad_norm, surrogate_norm = diagnostics.make_ratio_probe(loss_fn, 0.5)(params, x=x)
  grads, _ = jax.grad(loss_fn, has_aux=True)(params, x)
  sam = sam_optax.sam(0.5, loss_fn=loss_fn, has_aux=True)
  surrogate, _ = sam.update(grads, sam.init(params), params, x=x)
  stable = sam_optax.stable_sam(sam_optax.sam(0.5, loss_fn=loss_fn, has_aux=True))
  rescaled, _ = stable.update(grads, stable.init(params), params, x=x)
  np.testing.assert_allclose(grad_norm, jnp.linalg.norm(grads), rtol=1e-6)
  np.testing.assert_allclose(rescaled, grad_norm / surrogate_norm * surrogate, rtol=1e-5)
  assert abs(float(grad_norm / surrogate_norm) - 1.0) > 0.01  # a case where the scale acts


def test_bsam_cancels_sams_first_order_term_on_a_quadratic():
  result = diagnostics.bsam_cancellation(dim=6, seed=0, rhos=(0.2, 0.1, 0.05))
  orders = result["orders"]
  assert orders["sam_along_n"] == pytest.approx(1.0, abs=1e-6)       # ρ nᵀHn, exactly
  # Cancelled to first order; on a quadratic to second order too (the log of the norm
  # ratio ‖g + ρHn‖/‖g − ρHn‖ is odd in ρ).
  assert orders["bsam_along_n"] == pytest.approx(3.0, abs=0.1)
  assert orders["bsam_orthogonal_residual"] == pytest.approx(2.0, abs=0.1)
  for row in result["rows"]:
    assert row["sam_along_n"] == pytest.approx(row["rho"] * result["curvature_along_n"],
                                               rel=1e-10)  # float64 throughout
    assert abs(row["bsam_along_n"]) < 0.01 * row["sam_along_n"]


def test_quarter_quartiles():
  steps = np.arange(0, 100, 2)
  quartiles = diagnostics.quarter_quartiles(steps, steps.astype(float), 100)
  assert len(quartiles) == 4
  for quarter, (q1, median, q3) in enumerate(quartiles):
    assert 25 * quarter <= q1 <= median <= q3 < 25 * (quarter + 1)
  with pytest.raises(ValueError, match="no probe in quarter 4"):
    diagnostics.quarter_quartiles([0, 10, 20, 30, 50, 60], [1.0] * 6, 100)


# --------------------------------------------------------------------------
# The command on the tiny study.
# --------------------------------------------------------------------------


def _fake_study(config, workdir):
  """A finished study's study.json: the tuned radii and the arms (c) compares with."""
  tuned = {"sam_rho": 0.1, "csam_rho": 0.05, "usam_rho": 0.1, "bsam_rho": 0.1,
           "saf_lam": 0.3, "mesa_decay": 0.99}
  arms = {}
  for name, (acc, hessian) in {"bsam-paper": (0.5, 3.0), "bsam": (0.52, 2.5),
                               "sam-paper": (0.51, 2.8), "sam": (0.55, 1.0)}.items():
    arms[name] = {"runs": [{"accuracy": acc + 0.01 * s, "hessian": hessian + 0.1 * s}
                           for s in config.seeds]}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "study.json"), "w", encoding="utf-8") as stream:
    json.dump({"tuned": tuned, "arms": arms}, stream)


def test_tiny_diagnostics_run_end_to_end(tmp_path):
  config = study_config.get_config("tiny")
  settings = config.diagnostics
  workdir = str(tmp_path / "study")
  _fake_study(config, workdir)
  summary = diagnostics.run_diagnostics(config, workdir)
  assert summary is not None
  ratio = summary["stable_sam_ratio"]["0.1"]
  assert ratio["arm"] == "lr0.1-stable-sam" and ratio["rho"] == 0.1
  steps = ratio["steps"]
  for seed_entry in ratio["per_seed"]:
    probed = [p[0] for p in seed_entry["probes"]]
    assert probed == list(range(0, steps, settings.ratio_every))
    assert all(g > 0 and s > 0 for _, g, s in seed_entry["probes"])
  assert len(ratio["quartiles_per_quarter"]) == 4
  assert all(q1 <= m <= q3 for q1, m, q3 in ratio["quartiles_per_quarter"])
  extra = summary["bsam_extra_step"]
  assert set(extra) == {"bsam-extra-step"}
  assert extra["bsam-extra-step"]["hparams"] == {"rho_max": 0.1, "rho_min": 0.1}  # tuned
  for entry in extra.values():
    assert [r["seed"] for r in entry["runs"]] == list(settings.extra_step_seeds)
    assert all(0 <= r["accuracy"] <= 1 and np.isfinite(r["hessian"]) for r in entry["runs"])
    assert {entry["verdict_vs_bsam"], entry["verdict_claim"]} <= {
        rule.HOLDS, rule.FAILS, rule.INCONCLUSIVE}
    assert entry["parts"]["flatter than SAM"]["seeds"] == [2, 2]
  text = open(os.path.join(workdir, "DIAGNOSTICS.md"), encoding="utf-8").read()
  for heading in ("## (a)", "## (b)", "## (c)"):
    assert heading in text
  assert os.path.getsize(os.path.join(workdir, "stable_sam_ratio.png")) > 0
  # A second call reads every run back and trains nothing.
  done = os.path.join(workdir, "runs", "diagnostics", "bsam-extra-step", "seed0", "summary.json")
  before = os.path.getmtime(done)
  again = diagnostics.run_diagnostics(config, workdir)
  assert again["bsam_extra_step"] == json.loads(json.dumps(extra))
  assert os.path.getmtime(done) == before
