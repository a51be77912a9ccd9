"""The training program: every method trains, BatchNorm, cost, resume, configs, the CLI.

Runs the default config's tiny form (``experiments/configs/default.py:tiny``:
400 training sequences, batches of 80, a CNN with 8 channels, one device)
unless a test says otherwise.
Every method is trained once per module (``trained``) and the tests read the
results; identical programs are compiled once (``compilation_cache``).
"""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import (config_checks, input_pipeline, methods, models, placement, train,
                         train_step)
from experiments import main as cli
from experiments.configs import default
from experiments.errors import UsageError
from xla_cache import compilation_cache  # noqa: F401  (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")


def tiny_config(**overrides):
  """``default.py:tiny`` with ``overrides`` (dotted names: ``hparams.sam.rho``)."""
  config = default.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  return config


def run(config, workdir, **kwargs):
  """``train_and_evaluate``; the result with its report's fields (a dict) and state."""
  result = train.train_and_evaluate(config, str(workdir), progress=False, **kwargs)
  assert isinstance(result, train.Result)
  return {**(result.report or {}), "state": result.state, "finished": result.finished,
          "step": result.step, "history": result.history}


EPOCHS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Every method, 3 epochs (SAF's and MESA's loss on from epoch 2 / 1)."""
  results = {}
  for name in methods.METHODS:
    workdir = tmp_path_factory.mktemp(name)
    hessian = 2 if name in ("sam", "mesa") else 0
    results[name] = (run(tiny_config(method=name, num_epochs=EPOCHS, hessian_iters=hessian),
                         workdir), workdir)
  return results


# --------------------------------------------------------------------------
# Every method.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_trains_and_reports(name, trained):
  results, workdir = trained[name]
  assert results["finished"] and results["steps"] == 5 * EPOCHS
  for key in ("accuracy", "nll", "ece", "adaptive_ece"):
    assert np.isfinite(results["test"][key]), key
  assert 0.0 <= results["test"]["accuracy"] <= 1.0
  if name in ("sam", "mesa"):
    assert np.isfinite(results["hessian_top_eigenvalue"])
  assert results["time_per_step_s"] > 0
  assert len(results["history"]["test_accuracy"]) == EPOCHS
  assert results["history"]["train_loss"][-1] < results["history"]["train_loss"][0]
  written = json.loads((workdir / "results.json").read_text())
  assert written["method"] == name and written["test"] == results["test"]
  assert len(written["reliability_diagram"]["bin_count"]) == 15
  assert sum(written["reliability_diagram"]["bin_count"]) == 100
  chex.assert_tree_all_finite(results["state"].params)


def test_cheap_phase_is_static_on_cpu_and_equals_the_conditional(tmp_path, trained):
  """LookSAM's two compiled steps (the trainer's CPU form) = its lax.cond step."""
  static = trained["looksam"][0]
  assert static["phase"] == "static" and trained["sam"][0]["phase"] is None
  cond = run(tiny_config(method="looksam", num_epochs=EPOCHS, phase="cond"), tmp_path)
  assert cond["phase"] == "cond"
  chex.assert_trees_all_close(cond["state"].params, static["state"].params,
                              rtol=1e-5, atol=1e-6)
  assert int(cond["state"].opt_state[0].count) == 5 * EPOCHS
  with pytest.raises(UsageError, match="phase='static' applies to"):
    run(tiny_config(method="sam", phase="static"), tmp_path / "sam")


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_trajectory_methods_with_lambda_zero_equal_sgd(name, tmp_path, trained):
  """λ = 0: SAF / MESA change nothing else in the step (bit-exact SGD)."""
  results = run(tiny_config(method=name, num_epochs=EPOCHS, **{f"hparams.{name}.lam": 0.0}),
                tmp_path)
  sgd = trained["sgd"][0]["state"]
  chex.assert_trees_all_equal(results["state"].params, sgd.params)
  chex.assert_trees_all_equal(results["state"].batch_stats, sgd.batch_stats)


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_trajectory_methods_change_the_step_once_on(name, trained):
  state = trained[name][0]["state"]
  if name == "saf":
    saf_state = next(s for s in state.opt_state if hasattr(s, "bank"))
    assert int(saf_state.invalid_count) == 0
    assert bool(jnp.all(jnp.any(saf_state.bank != 0, axis=-1)))  # every row, both slots
  difference = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params,
                            trained["sgd"][0]["state"].params)
  assert max(jax.tree.leaves(difference)) > 1e-4


def test_mesa_is_evaluated_with_its_ema(trained):
  results = trained["mesa"][0]
  assert results["evaluated"] == "EMA weights"
  assert results["test_trained_weights"] != results["test"]


# --------------------------------------------------------------------------
# The step: BatchNorm and cost.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline():
  return input_pipeline.get_pipeline(tiny_config())


def test_batchnorm_statistics_come_from_the_users_pass(pipeline):
  """SAM's re-evaluation at the perturbed weights does not touch batch_stats."""
  config = tiny_config(method="sam", **{"hparams.sam.rho": 0.5})
  created = train.create_run(config, pipeline)
  batch = next(pipeline.train_epoch(0))
  loss_fn = train_step.make_loss_fns(created.model).loss
  rng = jax.random.fold_in(created.rng, 0)
  _, (expected, _) = jax.jit(loss_fn)(created.state.params, created.state.batch_stats, batch,
                                      rng)
  initial = jax.tree.map(np.asarray, created.state.batch_stats)
  state, _ = created.train_step(created.state, batch, created.rng)
  chex.assert_trees_all_close(state.batch_stats, expected, rtol=1e-5, atol=1e-6)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       state.batch_stats, initial)
  assert max(jax.tree.leaves(moved)) > 0


def _step_flops(name, pipeline):
  config = tiny_config(method=name)
  created = train.create_run(config, pipeline)
  batch = jax.device_put(next(pipeline.train_epoch(0)))
  analysis = created.train_step.lower(created.state, batch, created.rng).cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


def test_step_cost_in_flops(pipeline):
  """SAF: one forward + backward; MESA: plus one forward; SAM ≈ 2×, BSAM ≈ 3×."""
  sgd = _step_flops("sgd", pipeline)
  assert _step_flops("saf", pipeline) <= 1.10 * sgd
  assert _step_flops("mesa", pipeline) <= 1.60 * sgd
  assert 1.7 * sgd <= _step_flops("sam", pipeline) <= 2.3 * sgd
  assert 2.6 * sgd <= _step_flops("bsam", pipeline) <= 3.4 * sgd


def test_data_parallel_step_equals_single_device(tmp_path, trained):
  """jit over 8 devices, one perturbation for the global batch = the one-device run.

  (The default per-device perturbation is compared with pmap in
  tests/test_experiments_parallel.py.)
  """
  if jax.device_count() < 2:
    pytest.skip("needs several devices (the conftest makes 8 CPU devices)")
  single = trained["sam"][0]
  parallel = run(tiny_config(method="sam", num_epochs=EPOCHS, data_parallel=True,
                             perturbation="global", eval_batch_size=200), tmp_path)
  assert len(parallel["state"].params["Dense_0"]["kernel"].sharding.device_set) == \
      jax.device_count()
  chex.assert_trees_all_close(parallel["state"].params, single["state"].params,
                              rtol=1e-4, atol=1e-5)
  assert abs(parallel["test"]["accuracy"] - single["test"]["accuracy"]) <= 0.02


def _mlp_config(**overrides):
  """The tiny config with the MLP (no BatchNorm, no dropout)."""
  config = tiny_config(**overrides)
  with config.unlocked():
    config.model = "mlp"
    config.model_kwargs = ml_collections.ConfigDict({"features": (16,)})
  return config


def test_grad_accum_steps_equals_the_unaccumulated_run(tmp_path):
  """SAM with the batch in 2 micro-batches (one ascent from the accumulated
  gradient, re-evaluated over the same micro-batches) = SAM on the whole
  batch, on a model without BatchNorm or dropout (with BatchNorm each
  micro-batch is normalized with its own statistics: see make_train_step)."""
  runs = [run(_mlp_config(method="sam", max_steps=3, grad_accum_steps=k), tmp_path / str(k))
          for k in (1, 2)]
  assert runs[1]["step"] == 3  # optimizer steps
  chex.assert_trees_all_close(runs[1]["state"].params, runs[0]["state"].params,
                              rtol=1e-5, atol=1e-6)
  assert int(runs[1]["state"].opt_state[0].count) == 3  # SAM's count: optimizer steps


def test_grad_accum_steps_and_the_data_layout():
  config = tiny_config(method="sam", grad_accum_steps=4, data_parallel=True, perturbation="global")
  assert placement.check_data_layout(config, num_devices=2) is None  # 40 per device, 4 × 10
  with pytest.raises(UsageError, match=r"grad_accum_steps=4 does not divide the"
                     r" per-device batch 10 \(batch_size=80 over 8 device\(s\)\)"):
    placement.check_data_layout(config, num_devices=8)
  config = tiny_config(method="sam", grad_accum_steps=2, data_parallel=True)
  with pytest.raises(UsageError, match=r"perturbation='device' asks for one per"
                     r" device or per split; set --config.perturbation=global"):
    placement.check_data_layout(config, num_devices=2)


# --------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_resume_is_bit_exact(name, tmp_path, trained):
  """Interrupted mid-epoch and resumed = not interrupted: params, bank/EMA, curves."""
  whole = trained[name][0]
  config = tiny_config(method=name, num_epochs=EPOCHS, checkpoint_every_steps=3)
  stopped = run(tiny_config(method=name, num_epochs=EPOCHS, checkpoint_every_steps=3,
                            max_steps=7), tmp_path)
  assert not stopped["finished"] and stopped["step"] == 7
  resumed = run(config, tmp_path, resume=True)
  assert resumed["finished"]
  for field in ("step", "params", "batch_stats", "opt_state"):
    chex.assert_trees_all_equal(getattr(resumed["state"], field),
                                getattr(whole["state"], field))
  assert resumed["history"] == whole["history"]
  assert resumed["test"] == whole["test"]


def test_checkpoints_need_resume_and_the_same_run(tmp_path):
  run(tiny_config(max_steps=2), tmp_path)
  assert (tmp_path / "checkpoints").is_dir() and not (tmp_path / "results.json").exists()
  with pytest.raises(UsageError, match="--resume"):
    run(tiny_config(), tmp_path)
  with pytest.raises(UsageError, match="seed: 0 -> 3"):
    run(tiny_config(seed=3), tmp_path, resume=True)


# --------------------------------------------------------------------------
# Configs and models.
# --------------------------------------------------------------------------


# Training configs; study.py and frontier.py configure the evidence study and the frontier
# (tests/test_study.py, tests/test_frontier.py).
CONFIG_FILES = sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py")
                      and f not in ("__init__.py", "study.py", "frontier.py"))


def _load_config(path, arg=None):
  spec = os.path.join(CONFIGS, path) + (f":{arg}" if arg else "")
  return cli.load_config(spec)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_is_valid_and_builds_its_model(path):
  config = _load_config(path)
  config_checks.validate_config(config)
  for name in config.methods:
    methods.hparams_for(name, config.hparams.get(name, {}))
  shape = {"mnist1d": (2, 40), "imagenet2012": (2, 224, 224, 3)}.get(config.dataset,
                                                                        (2, 32, 32, 3))
  num_classes = {"cifar100": 100, "imagenet2012": 1000}.get(config.dataset, 10)
  model = models.get_model(config.model, num_classes, **dict(config.model_kwargs))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), variables)
  assert out.shape == (2, num_classes)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_has_a_locked_tiny_form(path):
  full, tiny = _load_config(path), _load_config(path, "tiny")
  config_checks.validate_config(tiny)
  assert (tiny.dataset, tiny.num_epochs, tiny.data_parallel) == (full.dataset, 1, False)
  assert tiny.batch_size <= 80 and tiny.hessian_iters == 0
  assert tiny.to_dict() != full.to_dict()
  with pytest.raises(AttributeError, match="num_epochs"):
    tiny.num_epoch = 3  # locked: a typo is an error naming the field
  with pytest.raises(ValueError, match="unknown config argument 'small'"):
    _load_config(path, "small")


def test_the_hparams_are_the_constructors_defaults():
  """The base config reads every method's defaults from its library constructor."""
  hparams = _load_config("base.py").hparams
  assert set(hparams) == set(methods.METHODS)
  assert hparams.sam.to_dict() == {"rho": 0.05, "normalize": True}
  assert hparams.asam.to_dict() == {"rho": 0.5, "eta": 0.01}
  assert hparams.bsam.to_dict() == {"rho_max": 0.05, "rho_min": 0.05}
  assert hparams.esam.to_dict() == {"rho": 0.05, "beta": 0.5, "gamma": 0.5}
  assert hparams.stable_sam.normalize is False  # the registry row's: USAM inside
  assert hparams.saf.start_epoch is None and hparams.saf.lam == 0.3
  # SAMPa's base optimizer is the trainer's (plumbing), not a hyperparameter.
  assert hparams.sampa.to_dict() == {"rho": 0.1, "lam": 0.2}
  assert hparams.gcsam.to_dict() == {"rho": 0.05}


def test_a_new_library_method_is_one_registry_row(monkeypatch, tmp_path):
  """A row naming a constructor: its hyperparameters, a run, the benchmarks' table."""
  import sam_optax  # pylint: disable=import-outside-toplevel
  from benchmarks import methods as bench  # pylint: disable=import-outside-toplevel

  def half_sam(rho: float = 0.02, *, gain: float = 0.5, **kwargs):
    return sam_optax.sam(rho * gain, **kwargs)

  row = methods.Method("half_sam", half_sam, "SAM at half the radius")
  monkeypatch.setitem(methods.METHODS, "half_sam", row)
  assert methods.hparams_for("half_sam") == {"rho": 0.02, "gain": 0.5}
  config = tiny_config(method="half_sam")
  results = run(config, tmp_path)
  assert results["finished"] and results["hparams"] == {"rho": 0.02, "gain": 0.5}
  assert "half_sam" in [m.name for m in bench.method_table()]


@pytest.mark.parametrize("name, kwargs, shape, params", [
    ("mlp", {}, (3, 40), 15_210),
    ("cnn1d", {}, (3, 40), 13_802),
    ("resnet18", {}, (3, 32, 32, 3), 11_173_962),       # He et al.: 11.2 M
    ("wrn28_10", {}, (3, 32, 32, 3), 36_479_194),       # Zagoruyko & Komodakis: 36.5 M
    ("resnet50", {}, (3, 224, 224, 3), 23_528_522),     # 25.6 M with 1000 classes
    ("vit_small", {}, (3, 32, 32, 3), 1_806_538),
])
def test_models_have_the_published_sizes(name, kwargs, shape, params):
  model = models.get_model(name, 10, **kwargs)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])) == params
  assert ("batch_stats" in variables) == (name not in ("mlp", "vit_small"))


def test_models_batchnorm_train_flag():
  model = models.get_model("cnn1d", 10, channels=(4, 4))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 40)))
  x = jax.random.normal(jax.random.key(1), (4, 40))
  logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 10)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updated["batch_stats"],
                         variables["batch_stats"])
  assert any(jax.tree.leaves(changed))
  chex.assert_trees_all_equal(model.apply(variables, x), model.apply(variables, x, train=False))


def test_get_model_errors():
  with pytest.raises(ValueError, match="unknown model 'resnet7'.*resnet18"):
    models.get_model("resnet7", 10)
  with pytest.raises(ValueError, match="bad keyword"):
    models.get_model("mlp", 10, colour="red")


# --------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------


def test_every_flag_has_help():
  values = cli.define_flags()
  assert {"config", "workdir", "resume", "progress", "distributed"} <= set(values)
  for name in values:
    assert values[name].help, name


def test_help_lists_the_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["main", "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for name in ("--config", "--workdir", "--resume", "--distributed"):
    assert name in text


TINY = "--config=experiments/configs/default.py:tiny"


def _fails(argv, capsys, *fragments):
  assert cli.main(["main"] + argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
  for fragment in fragments:
    assert fragment in err, err
  return err


@pytest.mark.parametrize("argv, fragments", [
    (["--config.num_epoch=3"], ["--config.num_epoch", "did you mean num_epochs?"]),
    (["--config.hparams.sam.rhoo=0.1"], ["did you mean hparams.sam.rho?"]),
    (["--config.num_epochs=three"], ["--config.num_epochs=three", "invalid literal for int()"]),
    (["--config.label_noise=lots"], ["could not convert string to float: 'lots'"]),
    (["--config.method=adam_sam"], ["unknown method 'adam_sam'", "sam, usam"]),
    (["--config.dataset=mnist2d"], ["unknown dataset 'mnist2d'", "cifar10"]),
    (["--config.model=resnet7"], ["unknown model 'resnet7'"]),
    (["--config.label_noise=1.5"], ["label_noise must be in [0, 1]"]),
    (["--config.phase=dynamic"], ["unknown phase 'dynamic'", "auto, static, cond"]),
    (["--config=/nonexistent/config.py"], ["No such file or directory"]),
    (["--config=experiments/configs/default.py:small"], ["unknown config argument 'small'"]),
    (["--nonsense=1"], ["Unknown command line flag 'nonsense'"]),
    (["--config.grad_accum_steps=0"], ["grad_accum_steps must be a positive integer, got 0"]),
    (["--config.grad_accum_steps=3"], ["grad_accum_steps=3 does not divide batch_size=80"]),
    (["--config.method=saf", "--config.grad_accum_steps=2"],
     ["grad_accum_steps=2 is supported for sgd and the SAM family, not for saf"]),
])
def test_bad_input_is_one_clear_line(argv, fragments, capsys, tmp_path):
  out = tmp_path / "out"
  _fails([TINY] + argv + [f"--workdir={out}"], capsys, *fragments)
  assert not out.exists()  # nothing written


def test_missing_tfds_data_set(capsys, tmp_path):
  pytest.importorskip("tensorflow_datasets", reason="the 'tfds' extra is not installed")
  out = tmp_path / "out"
  _fails(["--config=experiments/configs/cifar10_resnet18.py:tiny",
          f"--config.data_dir={tmp_path / 'tfds'}", f"--workdir={out}"], capsys,
         "'cifar10'", "not prepared", "never downloads")
  assert not out.exists()


def test_unwritable_output_folder(capsys, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  _fails([TINY, f"--workdir={blocker / 'run'}"], capsys, "cannot write to the output folder")


def test_cli_run_writes_results(tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"
  checks = []  # the config is checked once per run (before jax.distributed would start)
  for module in (config_checks, placement):
    monkeypatch.setattr(module, "check_perturbation",
                        lambda config, check=placement.check_perturbation: checks.append(
                            check(config)))
  code = cli.main(["main", TINY, "--config.method=sam", "--config.hparams.sam.rho=0.2",
                   "--config.hessian_iters=1", f"--workdir={out}", "--noprogress"])
  assert code == 0, capsys.readouterr().err
  assert len(checks) == 1
  results = json.loads((out / "results.json").read_text())
  assert results["hparams"]["rho"] == 0.2 and results["steps"] == 5
  assert "results:" in capsys.readouterr().out


@pytest.mark.parametrize("changed, fragment", [
    ("--config.hparams.saf.lam=0.5", "hparams.saf.lam: 1.0 -> 0.5"),
    ("--config.hparams.saf.tau=2.0", "hparams.saf.tau: 5.0 -> 2.0"),
    ("--config.learning_rate=0.1", "learning_rate: 0.05 -> 0.1"),
])
def test_resume_with_a_changed_hyperparameter_is_refused(changed, fragment, tmp_path, capsys):
  """SAF keeps λ and τ in its state: a changed value would apply only in part."""
  out = tmp_path / "run"
  args = ["main", TINY, "--config.method=saf", "--config.num_epochs=2", f"--workdir={out}",
          "--noprogress"]
  assert cli.main(args + ["--config.max_steps=3"]) == 0, capsys.readouterr().err
  before = sorted(p.name for p in (out / "checkpoints").iterdir())
  capsys.readouterr()
  _fails(args[1:] + ["--resume", changed], capsys, fragment, "--resume")
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
  assert not (out / "results.json").exists()
  assert cli.main(args + ["--resume"]) == 0  # the same config resumes
  assert json.loads((out / "results.json").read_text())["steps"] == 10


def test_subprocess_exit_code_and_no_traceback(tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "experiments.main", TINY, "--config.num_epoch=3",
       f"--workdir={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert completed.returncode == 2
  assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr
  assert "did you mean num_epochs?" in completed.stderr
  assert not (tmp_path / "x").exists()
