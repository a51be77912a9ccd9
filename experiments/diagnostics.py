"""The study's diagnostics: the open threads of ``FINDINGS.md``, rerunnable.

``python -m experiments.diagnostics --config=experiments/configs/study.py``
reads the finished study (``--workdir``, default ``experiments/results/study``:
its ``study.json`` gives the tuned radii and the arms to compare with), runs
the three checks that the findings cite, and writes ``diagnostics.json``,
``DIAGNOSTICS.md`` and ``stable_sam_ratio.png`` beside the study's report. The
settings are ``config.diagnostics`` of ``experiments/configs/study.py``.

(a) **StableSAM's renormalization along training.** StableSAM(SAM) steps
    along SAM's surrogate ``g̃ = ∇L(w + ρ g/‖g‖)`` rescaled by ``‖g‖/‖g̃‖``
    (``sam_optax.stable_sam``). The study's StableSAM(SAM) arm of the
    learning-rate sweep is trained again at each rate of
    ``ratio_learning_rates`` and, every ``ratio_every`` steps, ``g`` and
    ``g̃`` are evaluated at the step's weights on the step's batch (before
    the step; ``g̃`` by the library's ``sam_optax.sam``, the transform that
    StableSAM wraps). The ratio is reported as quartiles per quarter of the
    run, and drawn.

(b) **BSAM's first-order cancellation.** On a random quadratic
    ``L(w) = ½ wᵀHw + bᵀw`` in float64, SAM's surrogate is ``g + ρHn``
    exactly (``n = g/‖g‖``); BSAM's (``ρ_max = ρ_min = ρ``) is
    ``g + 2ρ(I − nnᵀ)Hn + O(ρ²)``: its part along ``n`` cancels to first
    order. Both surrogates come from the library's transforms; the table
    gives the part of ``surrogate − g`` along ``n`` for each ``ρ`` and the
    order in ``ρ`` fitted to it.

(c) **BSAM with the authors' code's extra step.** ``ajiaaa/BSAM`` never
    restores ``w`` after its min pass (``p.data = old_p`` aliases the saved
    weights, which ``p.sub_`` then moves), so every published step starts
    from ``w − ρ_min,t·n``: the base optimizer's step plus ``−ρ_min,t·n``
    outside the momentum. :func:`with_min_pass_step` adds that move to the
    run's whole optimizer chain (a study-side wrapper, not a library
    option); the study's two BSAM arms are trained with it over
    ``extra_step_seeds`` and compared, under the study's rule, with the
    study's BSAM and SAM arms (``study.json``).

Each training run is kept in ``runs/diagnostics/<name>/seed<k>/summary.json``
(rerunning resumes); ``config.num_shards`` / ``shard_index`` split the runs
over processes as for the study.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from matplotlib.figure import Figure

import sam_optax
from experiments import checkpoints, evaluate, input_pipeline, plots, study_report, train
from experiments import study as study_lib
from experiments import verdict as rule

# --------------------------------------------------------------------------
# (c) The authors' extra step.
# --------------------------------------------------------------------------


class MinPassStepState(NamedTuple):
  """The wrapped optimizer's state and the step count of ``ρ_min,t``."""

  inner: optax.OptState
  count: jax.Array


def with_min_pass_step(inner: optax.GradientTransformation,
                       rho_min: float | optax.Schedule, *,
                       eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
  r"""``inner``'s update plus ``−ρ_min,t · g / (‖g‖ + ε)``: BSAM as the authors' code steps.

  .. math::

    w_{t+1} = w_t + u_t − ρ_{min,t} \frac{g_t}{‖g_t‖ + ε},

  with ``u_t`` the update of ``inner`` (the run's whole chain: BSAM, weight
  decay, SGD with momentum) and ``g_t`` the incoming gradient at ``w_t``. The
  move is outside the momentum, as in ``ajiaaa/BSAM``, whose base optimizer
  steps from the min pass's point ``w_t − ρ_min,t n`` (there the weight decay
  also reads that point; here it reads ``w_t``, a difference of
  ``wd · ρ_min,t``). ``ε = 1e-12`` as in that code.

  Args:
    inner: the run's optimizer chain.
    rho_min: ``ρ_min``, a float or a schedule of the step count (the one that
      BSAM's min pass uses, evaluated at the same count).
    eps: ε of the normalization.
  """
  if not callable(rho_min) and not rho_min >= 0:
    raise ValueError(f"with_min_pass_step: rho_min must be >= 0 or a schedule, got {rho_min!r}.")

  def init(params):
    return MinPassStepState(inner.init(params), jnp.zeros([], jnp.int32))

  def update(grads, state, params=None, **extra_args):
    updates, inner_state = inner.update(grads, state.inner, params, **extra_args)
    radius = rho_min(state.count) if callable(rho_min) else rho_min
    scale = radius / (optax.global_norm(grads) + eps)
    updates = jax.tree.map(lambda u, g: u - (scale * g).astype(u.dtype), updates, grads)
    return updates, MinPassStepState(inner_state, optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init, update)


def rho_min_schedule(config, steps_per_epoch: int, rho_min: float) -> float | optax.Schedule:
  """``ρ_min,t = ρ_min · lr_t / lr_max``: the radius the trainer gives BSAM's min pass."""
  lr_schedule, lr_max, lr_min = train.make_lr_schedule(config, steps_per_epoch)
  if lr_max <= lr_min:  # constant learning rate: constant radius
    return rho_min
  return sam_optax.rho_schedule_from_lr(lr_schedule, rho_max=rho_min, rho_min=0.0,
                                        lr_max=lr_max, lr_min=lr_min)


# --------------------------------------------------------------------------
# (a) StableSAM's ratio.
# --------------------------------------------------------------------------


def make_ratio_probe(loss_fn: Callable[..., Any], rho: float) -> Callable[..., Any]:
  """``probe(params, **loss_args) -> (‖g‖, ‖g̃‖)``, jitted.

  ``g = ∇loss_fn(params)``; ``g̃`` is ``sam_optax.sam(rho)``'s surrogate, the
  gradient at ``params + ρ g/‖g‖`` that StableSAM(SAM) rescales by
  ``‖g‖/‖g̃‖``. ``loss_fn(params, **loss_args) -> (loss, aux)``.
  """
  surrogate_tx = sam_optax.sam(rho, loss_fn=loss_fn, has_aux=True)

  @jax.jit
  def probe(params, **loss_args):
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, **loss_args)
    surrogate, _ = surrogate_tx.update(grads, surrogate_tx.init(params), params, **loss_args)
    return optax.global_norm(grads), optax.global_norm(surrogate)

  return probe


def quarter_quartiles(steps: Sequence[int], ratios: Sequence[float],
                      total_steps: int) -> list[list[float]]:
  """``[q1, median, q3]`` of ``ratios`` in each quarter of ``total_steps``."""
  steps, ratios = np.asarray(steps), np.asarray(ratios, np.float64)
  quarters = []
  for quarter in range(4):
    inside = (steps >= quarter * total_steps / 4) & (steps < (quarter + 1) * total_steps / 4)
    if not inside.any():
      raise ValueError(f"no probe in quarter {quarter + 1} of {total_steps} steps; probe more"
                       " often (config.diagnostics.ratio_every).")
    quarters.append(np.percentile(ratios[inside], [25, 50, 75]).tolist())
  return quarters


# --------------------------------------------------------------------------
# Training (both (a) and (c)): the trainer's run and step, no checkpoints.
# --------------------------------------------------------------------------


def train_probed(config, pipeline, *, wrap_optimizer=None, ratio_rho: float | None = None,
                 every: int = 0) -> tuple[Any, Any, dict[str, Any], list[tuple[int, float, float]]]:
  """Trains one run as the trainer does; returns ``(run, state, report, probes)``.

  The steps, batches and evaluation are the trainer's (:func:`experiments.train.create_run`,
  :func:`experiments.evaluate.final_report`); without ``wrap_optimizer`` the final
  state is that of :func:`experiments.train.train_and_evaluate`. With ``ratio_rho``,
  every ``every`` steps, before the step, :func:`make_ratio_probe` of the run's
  training loss runs on the step's weights, batch and key; ``probes`` holds
  ``(step, ‖g‖, ‖g̃‖)``.
  """
  run = train.create_run(config, pipeline, wrap_optimizer=wrap_optimizer)
  state, probes, step = run.state, [], 0
  probe = None if ratio_rho is None else make_ratio_probe(
      train.make_loss_fns(run.model, config.label_smoothing).loss, ratio_rho)
  for epoch in range(config.num_epochs):
    for batch in map(run.placement.put_batch, pipeline.train_epoch(epoch)):
      if probe is not None and step % every == 0:
        rng = jax.random.fold_in(run.rng, state.step)  # the step's own key
        values = probe(state.params, batch_stats=state.batch_stats, batch=batch, rng=rng)
        probes.append((step, *(float(v) for v in values)))
      state, _ = run.train_step(state, batch, run.rng)
      step += 1
  jax.block_until_ready(state.params)
  report = evaluate.final_report(config, run, state, pipeline, checkpoints.LoopState())
  return run, state, report, probes


def _pipeline(config, cache: dict[str, Any]):
  key = json.dumps({k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
                    for k in ("dataset", "mnist1d", "label_noise", "noise_seed", "seed",
                              "batch_size", "eval_batch_size")}, sort_keys=True, default=str)
  if key not in cache:
    cache[key] = input_pipeline.get_pipeline(config, 0, 1)
  return cache[key]


def _train_or_read(study, config, folder: str, cache, **kwargs) -> dict[str, Any]:
  """One run's summary: read from ``folder`` if finished, else trained and written there."""
  done = os.path.join(folder, "summary.json")
  os.makedirs(folder, exist_ok=True)
  if os.path.exists(done):
    with open(done, encoding="utf-8") as stream:
      return json.load(stream)
  pipeline = _pipeline(config, cache)
  start = time.perf_counter()
  run, state, report, probes = train_probed(config, pipeline, **kwargs)
  test = report["test"]
  summary = {
      "accuracy": test["accuracy"], "ece": test["ece"], "nll": test["nll"],
      "hessian": report["hessian_top_eigenvalue"],
      "m_sharpness": study_lib.sharpness(config, state, pipeline, rho=study.m_sharpness_rho,
                                         m=study.m_sharpness_m),
      "train_accuracy": report["train_sample_accuracy"], "hparams": report["hparams"],
      "epochs": report["epochs"], "steps": report["steps"], "seed": config.seed,
      "probes": probes, "wall_s": time.perf_counter() - start,
  }
  del run
  checkpoints.write_json(done, summary)
  return summary


# --------------------------------------------------------------------------
# (b) BSAM's cancellation on a quadratic.
# --------------------------------------------------------------------------


def fitted_order(rhos: Sequence[float], values: Sequence[float]) -> float:
  """The slope of ``log |value|`` against ``log ρ`` (least squares): ``value = O(ρ^slope)``."""
  return float(np.polyfit(np.log(np.asarray(rhos)), np.log(np.abs(np.asarray(values))), 1)[0])


def bsam_cancellation(dim: int, seed: int, rhos: Sequence[float]) -> dict[str, Any]:
  """SAM's and BSAM's ``surrogate − g`` along ``n = g/‖g‖`` on a random quadratic, float64.

  ``H = AAᵀ/dim + I/10`` (``A`` standard normal), ``b``, ``w`` standard normal;
  BSAM with ``ρ_max = ρ_min = ρ``. Also the part orthogonal to ``n`` of BSAM's
  ``surrogate − g`` against its first-order value ``2ρ(I − nnᵀ)Hn``.
  """
  draw = np.random.default_rng(seed)
  a = draw.standard_normal((dim, dim))
  hessian = a @ a.T / dim + 0.1 * np.eye(dim)
  b, w = draw.standard_normal(dim), draw.standard_normal(dim)
  rows = []
  with jax.enable_x64(True):
    h, b64, w64 = (jnp.asarray(x, jnp.float64) for x in (hessian, b, w))
    loss_fn = lambda p: 0.5 * p @ h @ p + b64 @ p  # noqa: E731
    grads = jax.grad(loss_fn)(w64)
    n = grads / jnp.linalg.norm(grads)
    hn = h @ n
    first_order_orthogonal = hn - (n @ hn) * n
    for rho in rhos:
      row = {"rho": float(rho)}
      for name, tx in (("sam", sam_optax.sam(rho, loss_fn=loss_fn)),
                       ("bsam", sam_optax.bsam(rho, rho, loss_fn=loss_fn))):
        surrogate, _ = tx.update(grads, tx.init(w64), w64)
        if surrogate.dtype != jnp.float64:
          raise AssertionError(f"{name} returned {surrogate.dtype}, not float64.")
        difference = surrogate - grads
        row[f"{name}_along_n"] = float(n @ difference)
        if name == "bsam":
          orthogonal = difference - (n @ difference) * n
          row["bsam_orthogonal_residual"] = float(
              jnp.linalg.norm(orthogonal - 2 * rho * first_order_orthogonal))
          row["bsam_orthogonal_first_order"] = float(
              jnp.linalg.norm(2 * rho * first_order_orthogonal))
      rows.append(row)
    curvature = float(n @ hn)
  orders = {key: fitted_order(rhos, [r[key] for r in rows])
            for key in ("sam_along_n", "bsam_along_n", "bsam_orthogonal_residual")}
  return {"dim": dim, "seed": seed, "grad_norm": float(np.linalg.norm(hessian @ w + b)),
          "curvature_along_n": curvature, "rows": rows, "orders": orders}


# --------------------------------------------------------------------------
# Running and the report.
# --------------------------------------------------------------------------


def _log(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def read_study(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, "study.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: the diagnostics compare with the finished"
                            " study; run `python -m experiments.study` first.")
  with open(path, encoding="utf-8") as stream:
    return json.load(stream)


def _compare(new: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
             metric: str, claim: str) -> dict[str, Any]:
  """``new`` against ``reference`` on ``metric`` under the study's rule (accuracy in %)."""
  results = {"new": new, "reference": reference}
  a, b = (study_report.values(results, k, metric) for k in ("new", "reference"))
  comparison = rule.compare(a, b, claim=claim)
  return {"metric": metric, "claim": claim, "new": [float(np.mean(a)), float(np.std(a, ddof=1))],
          "reference": [float(np.mean(b)), float(np.std(b, ddof=1))], "seeds": [len(a), len(b)],
          "difference": comparison.difference, "standard_error": comparison.standard_error,
          "verdict": comparison.verdict}


def _at_least(new, reference, metric: str) -> dict[str, Any]:
  """``new ≥ reference`` (no loss): holds unless ``new < reference`` counts."""
  part = _compare(new, reference, metric, "greater")
  part["claim"] = "at least"
  part["verdict"] = rule.FAILS if part["verdict"] == rule.FAILS else rule.HOLDS
  return part


ACC_BSAM, ACC_SAM = "accuracy ≥ BSAM's", "accuracy ≥ SAM's"


def run_diagnostics(study: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Runs (this shard of) the diagnostics; with every run done, writes the report."""
  settings = study.diagnostics
  recorded = read_study(workdir)
  arms = {arm.name: arm for arm in study_lib.study_arms(study, recorded["tuned"])}
  cache: dict[str, Any] = {}
  counter = iter(range(10**9))
  missing = 0
  started = time.perf_counter()
  walls: list[float] = []  # each run's training and evaluation time

  def run(name: str, arm: study_lib.Arm, seed: int, **kwargs) -> dict[str, Any] | None:
    nonlocal missing
    folder = os.path.join(workdir, "runs", "diagnostics", name, f"seed{seed}")
    mine = next(counter) % study.num_shards == study.shard_index
    if not (mine or os.path.exists(os.path.join(folder, "summary.json"))):
      missing += 1
      return None
    config = study_lib.training_config(study, arm, seed=seed, data_seed=study.data_seed)
    wrap = kwargs.pop("wrap", None)
    summary = _train_or_read(study, config, folder, cache,
                             wrap_optimizer=wrap and wrap(config), **kwargs)
    walls.append(summary["wall_s"])
    _log(f"{name} seed {seed}: acc {summary['accuracy']:.4f} λ_max {summary['hessian']:.3f}"
         f" ({summary['wall_s']:.0f} s)")
    return summary

  # (a) StableSAM's ratio along its own training.
  ratio: dict[str, Any] = {}
  for lr in settings.ratio_learning_rates:
    name = f"lr{lr:g}-stable-sam"
    if name not in arms:
      raise ValueError(f"ratio_learning_rates: {lr:g} is not a rate of the study's sweep"
                       f" {tuple(study.learning_rates)}.")
    arm = arms[name]
    rho = arm.hparams["rho"]
    runs = [run(f"ratio-{name}", arm, seed, ratio_rho=rho, every=settings.ratio_every)
            for seed in settings.ratio_seeds]
    runs = [r for r in runs if r is not None]
    if len(runs) == len(settings.ratio_seeds):
      total = runs[0]["steps"]
      pooled_steps = [p[0] for r in runs for p in r["probes"]]
      pooled = [p[1] / p[2] for r in runs for p in r["probes"]]
      ratio[f"{lr:g}"] = {
          "arm": name, "rho": rho, "seeds": list(settings.ratio_seeds), "steps": total,
          "every": settings.ratio_every,
          "quartiles_per_quarter": quarter_quartiles(pooled_steps, pooled, total),
          "per_seed": [{"seed": r["seed"], "accuracy": r["accuracy"], "wall_s": r["wall_s"],
                        "train_accuracy": r["train_accuracy"],
                        "quartiles_per_quarter": quarter_quartiles(
                            [p[0] for p in r["probes"]], [p[1] / p[2] for p in r["probes"]],
                            total),
                        "probes": r["probes"]} for r in runs],
          "study_arm_accuracy": [run_["accuracy"] for run_ in
                                 recorded["arms"].get(name, {}).get("runs", [])],
      }

  # (b) The quadratic.
  quadratic = bsam_cancellation(settings.quadratic_dim, settings.quadratic_seed,
                                settings.quadratic_rhos)

  # (c) BSAM with the authors' extra step, at the study's two BSAM radii.
  extra: dict[str, Any] = {}
  for base in settings.extra_step_arms:
    if base not in ("bsam-paper", "bsam"):
      raise ValueError(f"extra_step_arms: {base!r} is not one of the study's BSAM arms"
                       " ('bsam-paper', 'bsam').")
    arm, sam_arm = arms[base], base.replace("bsam", "sam")
    rho_min = arm.hparams["rho_min"]
    name = base.replace("bsam", "bsam-extra-step")

    def wrap(config, _rho_min=rho_min):
      pipeline = _pipeline(config, cache)
      schedule = rho_min_schedule(config, pipeline.steps_per_epoch, _rho_min)
      return lambda tx: with_min_pass_step(tx, schedule)

    runs = [run(name, arm, seed, wrap=wrap) for seed in settings.extra_step_seeds]
    # The control: the same BSAM arm and seeds trained by this loop without the extra step
    # (today's library; the study's runs were recorded with the library of its day).
    controls = [run(f"{base}-control", arm, seed) for seed in settings.extra_step_seeds]
    runs, controls = ([r for r in x if r is not None] for x in (runs, controls))
    if len(runs) + len(controls) < 2 * len(settings.extra_step_seeds):
      continue
    reference = {a: recorded["arms"][a]["runs"] for a in (base, sam_arm)}
    seed_index = [list(study.seeds).index(seed) for seed in settings.extra_step_seeds]
    extra[name] = {
        "base_arm": base, "sam_arm": sam_arm, "hparams": dict(arm.hparams),
        "seeds": list(settings.extra_step_seeds),
        "runs": [{k: v for k, v in r.items() if k != "probes"} for r in runs],
        "controls": [{"seed": c["seed"], **{f"{k}_here": c[k] for k in ("accuracy", "hessian")},
                      **{f"{k}_study": reference[base][i][k] for k in ("accuracy", "hessian")}}
                     for c, i in zip(controls, seed_index)],
        "parts": {
            "flatter than BSAM": _compare(runs, reference[base], "hessian", "less"),
            ACC_BSAM: _at_least(runs, reference[base], "accuracy"),
            "flatter than BSAM retrained": _compare(runs, controls, "hessian", "less"),
            "accuracy ≥ BSAM retrained": _at_least(runs, controls, "accuracy"),
            "flatter than SAM": _compare(runs, reference[sam_arm], "hessian", "less"),
            ACC_SAM: _at_least(runs, reference[sam_arm], "accuracy"),
        },
    }
    parts = extra[name]["parts"]
    extra[name]["verdict_vs_bsam"] = rule.combine(
        [parts["flatter than BSAM"]["verdict"], parts["flatter than BSAM retrained"]["verdict"]])
    extra[name]["verdict_claim"] = rule.combine(
        [parts["flatter than SAM"]["verdict"], parts[ACC_SAM]["verdict"]])

  if missing:
    _log(f"shard {study.shard_index}/{study.num_shards}: {missing} runs belong to other shards;"
         " rerun with num_shards=1 once they are done to write the report.")
    return None
  summary = {
      "command": "python -m experiments.diagnostics --config=experiments/configs/study.py",
      "settings": settings.to_dict(), "data_seed": study.data_seed,
      "stable_sam_ratio": ratio, "bsam_quadratic": quadratic, "bsam_extra_step": extra,

      "wall_s_this_call": time.perf_counter() - started,
      "wall_s_runs": sum(walls), "runs": len(walls),
  }
  figure = plot_ratios(ratio, os.path.join(workdir, "stable_sam_ratio.png")) if ratio else None
  summary["figure"] = figure and os.path.basename(figure)
  checkpoints.write_json(os.path.join(workdir, "diagnostics.json"), summary)
  with open(os.path.join(workdir, "DIAGNOSTICS.md"), "w", encoding="utf-8") as stream:
    stream.write(describe(summary))
  return summary


def plot_ratios(ratio: Mapping[str, Any], path: str) -> str:
  """‖g‖/‖g̃‖ against the step, one panel per learning rate, one line per seed."""
  figure = Figure(figsize=(5.5 * len(ratio), 3.8))
  for index, (lr, entry) in enumerate(ratio.items()):
    ax = figure.add_subplot(1, len(ratio), index + 1)
    for i, seed_entry in enumerate(entry["per_seed"]):
      probes = np.asarray(seed_entry["probes"])
      ax.plot(probes[:, 0], probes[:, 1] / probes[:, 2], lw=0.8, alpha=0.8, color=f"C{i}",
              label=f"seed {seed_entry['seed']}")
    for quarter in range(1, 4):
      ax.axvline(quarter * entry["steps"] / 4, color="gray", lw=0.5, ls=":")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("‖g‖ / ‖g̃‖ (StableSAM's scale)")
    ax.set_title(f"StableSAM(SAM), ρ = {entry['rho']:g}, lr {lr}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  figure.suptitle("StableSAM's renormalization along training (clean MNIST-1D, MLP)")
  return plots.save_figure(figure, path, tight=True)


def _quartiles(q: Sequence[float]) -> str:
  return f"{q[1]:.2f} [{q[0]:.2f}–{q[2]:.2f}]"


def _mean_std(pair: Sequence[float], digits: int) -> str:
  return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def describe(summary: Mapping[str, Any]) -> str:
  """The markdown report of :func:`run_diagnostics`."""
  lines = [
      "# The study's diagnostics: the open threads of FINDINGS.md", "",
      f"`{summary['command']}` (settings: `config.diagnostics`; the study's arms and tuned"
      " radii from `study.json`). Every number says how many seeds stand behind it.", ""]
  ratio = summary["stable_sam_ratio"]
  if ratio:
    lines += [
        "## (a) StableSAM's scale ‖g‖/‖g̃‖ along training", "",
        "StableSAM(SAM) of the learning-rate sweep (clean regime), trained again; every"
        " few steps `g` (at the step's weights) and SAM's `g̃ = ∇L(w + ρg/‖g‖)` (by"
        " `sam_optax.sam`) on the step's batch. Median [quartiles] of the ratio over the"
        " probes of each quarter of the run, pooled over the seeds:", "",
        "| lr | ρ | seeds | probes every | 1st quarter | 2nd | 3rd | 4th | final test acc. (%) |",
        "|---:|---:|---:|---:|---|---|---|---|---|"]
    for lr, entry in ratio.items():
      accuracies = [100 * s["accuracy"] for s in entry["per_seed"]]
      acc = f"{np.mean(accuracies):.1f}" + (f" ± {np.std(accuracies, ddof=1):.1f}"
                                            if len(accuracies) > 1 else "")
      lines.append(f"| {lr} | {entry['rho']:g} | {len(entry['seeds'])} | {entry['every']} steps"
                   f" | " + " | ".join(_quartiles(q) for q in entry["quartiles_per_quarter"])
                   + f" | {acc} |")
    lines += ["", "![stable_sam_ratio](stable_sam_ratio.png)", ""]
  quadratic = summary["bsam_quadratic"]
  orders = quadratic["orders"]
  lines += [
      "## (b) BSAM's first-order cancellation on a quadratic", "",
      f"`L(w) = ½ wᵀHw + bᵀw`, dimension {quadratic['dim']} (seed {quadratic['seed']}), float64;"
      f" ‖g‖ = {quadratic['grad_norm']:.3g}, nᵀHn = {quadratic['curvature_along_n']:.3g}."
      " `surrogate − g` along `n = g/‖g‖` for the library's `sam(ρ)` and `bsam(ρ, ρ)`, and"
      " the part of BSAM's orthogonal to `n` against its first-order value `2ρ(I − nnᵀ)Hn`:", "",
      "| ρ | SAM: nᵀ(g̃ − g) | BSAM: nᵀ(g̃ − g) | BSAM: ‖orthogonal − 2ρ(I − nnᵀ)Hn‖ |"
      " ‖2ρ(I − nnᵀ)Hn‖ |",
      "|---:|---:|---:|---:|---:|"]
  for row in quadratic["rows"]:
    lines.append(f"| {row['rho']:g} | {row['sam_along_n']:.3e} | {row['bsam_along_n']:.3e} |"
                 f" {row['bsam_orthogonal_residual']:.3e} |"
                 f" {row['bsam_orthogonal_first_order']:.3e} |")
  lines += [
      "", f"Fitted order in ρ: SAM's part along n O(ρ^{orders['sam_along_n']:.2f}), BSAM's"
      f" O(ρ^{orders['bsam_along_n']:.2f}); the orthogonal residual"
      f" O(ρ^{orders['bsam_orthogonal_residual']:.2f}). On a quadratic BSAM's part along n is"
      " O(ρ³), not only o(ρ): the gradients are exactly `g ± ρHn`, and the log of the norm"
      " ratio ‖g + ρHn‖/‖g − ρHn‖ is odd in ρ, so the ρ² terms cancel too (a loss with a third"
      " derivative leaves an O(ρ²) term).", ""]
  extra = summary["bsam_extra_step"]
  if extra:
    lines += [
        "## (c) BSAM with the authors' code's extra step", "",
        "The study's BSAM arms trained again with `−ρ_min,t · g/‖g‖` added to every step"
        " outside the momentum (`with_min_pass_step`: `ajiaaa/BSAM`'s base optimizer steps"
        " from the min pass's point), against the study's BSAM and SAM arms (`study.json`)"
        " and against the same BSAM arms retrained by the same loop without the extra step"
        " (the control: today's library; the study's runs were recorded with the library of"
        " its day). Mean ± std over seeds:", "",
        "| arm | seeds | λ_max | test acc. (%) |", "|---|---:|---:|---:|"]
    for name, entry in extra.items():
      parts = entry["parts"]
      hp = ", ".join(f"{k}={v:g}" for k, v in entry["hparams"].items())
      flat_b, flat_c, flat_s = (parts[k] for k in (
          "flatter than BSAM", "flatter than BSAM retrained", "flatter than SAM"))
      acc_b, acc_c, acc_s = (parts[k] for k in (
          ACC_BSAM, "accuracy ≥ BSAM retrained", ACC_SAM))
      for label, flat, acc, key, index in (
          (f"**{name}** ({hp}, extra step)", flat_b, acc_b, "new", 0),
          (f"{entry['base_arm']} (the study's runs)", flat_b, acc_b, "reference", 1),
          (f"{entry['base_arm']} retrained (control)", flat_c, acc_c, "reference", 1),
          (f"{entry['sam_arm']} (the study's runs)", flat_s, acc_s, "reference", 1)):
        lines.append(f"| {label} | {flat['seeds'][index]} | {_mean_std(flat[key], 2)} |"
                     f" {_mean_std(acc[key], 1)} |")
    lines += ["", "Under the study's rule:", ""]
    for name, entry in extra.items():
      said = {key: f"{part['difference']:+.2f} ± {part['standard_error']:.2f} (se) →"
                   f" {part['verdict']}" for key, part in entry["parts"].items()}
      lines.append(
          f"- `{name}`: λ_max − the study's BSAM's {said['flatter than BSAM']}; − the"
          f" retrained BSAM's {said['flatter than BSAM retrained']} (flatter than BSAM:"
          f" **{entry['verdict_vs_bsam']}**); accuracy − the study's BSAM's"
          f" {said[ACC_BSAM]} (no loss). BSAM's claim with the extra step, flatter than SAM"
          f" with accuracy ≥ SAM's: λ_max − SAM's {said['flatter than SAM']}; accuracy −"
          f" SAM's {said[ACC_SAM]} → **{entry['verdict_claim']}**.")
    lines += ["", "The control, seed by seed (the study's run → retrained):", ""]
    for name, entry in extra.items():
      lines.append(f"- `{entry['base_arm']}`: " + "; ".join(
          f"seed {c['seed']}: acc {100 * c['accuracy_study']:.2f} → {100 * c['accuracy_here']:.2f}"
          f" %, λ_max {c['hessian_study']:.3f} → {c['hessian_here']:.3f}"
          for c in entry["controls"]))
    lines.append("")
  lines += [f"Rule: {rule.RULE}", ""]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  run_diagnostics(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file(
      "config", "experiments/configs/study.py", "The study's config file.", lock_config=True)
  flags.DEFINE_string("workdir", "experiments/results/study",
                      "The finished study's folder; the diagnostics are written there.")
  app.run(main)
