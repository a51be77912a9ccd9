"""The trainer on 8 devices: m-sharpness (--perturbation), pod layouts, bad input.

The trainer's step is one ``jax.jit`` over a ``('data',)`` mesh of the 8
fake CPU devices (root conftest). Checked here:

* ``perturbation='device'`` (the default) runs a perturbing method's step in
  ``shard_map`` and equals a ``pmap`` step built from the same registry entry
  with ``axis_name`` (each device perturbs with its own shard's gradient) --
  GSAM, BSAM and CSAM --, BatchNorm's running averages included (the mean of
  the devices'), and the ``Splits`` step under ``jit`` (``'split'``, 8
  groups); it differs from the synchronized step (m-sharpness matters) and
  compiles to 2× SGD's flops (the ``Splits`` step recomputes each group's
  gradient: more);
* ``perturbation='global'`` equals the single-device step on the whole batch;
* ``perturbation='split'`` with ``batch_splits=8`` on one device equals the
  per-device step on 8 devices (what the multi-host test compares with);
* the ImageNet config divides on TPU pod slices (global batch 4096 across the
  hosts and devices, per-host TFDS shares), and bad layouts or flags fail with
  one ``error:`` line before any step.
"""

import itertools
import pathlib
import shlex

import chex
import jax
import numpy as np
import pytest

from experiments import checkpoints, distributed, evaluate, input_pipeline, methods, placement
from experiments import main as cli
from experiments import train, train_step
from experiments.config_checks import validate_config
from experiments.configs import imagenet_resnet50
from experiments.errors import UsageError
from test_experiments_train import tiny_config as _tiny

DEVICES = 8
STEPS = 2


def tiny_config(**overrides):
  """The tiny config on 8 devices (10 examples each), one convolution: quick to compile."""
  return _tiny(**{"data_parallel": True, "model_kwargs.channels": (4,), **overrides})


@pytest.fixture(scope="module")
def pipeline():
  assert jax.device_count() >= DEVICES, "the root conftest sets 8 CPU devices"
  return input_pipeline.get_pipeline(tiny_config())


@pytest.fixture(scope="module")
def batches(pipeline):
  return list(itertools.islice(pipeline.train_epoch(0), STEPS))


def trainer_params(config, pipeline, batches):
  """The trainer's parameters after ``STEPS`` steps, its run and final state."""
  run = train.create_run(config, pipeline)
  state = run.state
  for batch in batches:
    state, _ = run.train_step(state, run.placement.put_batch(batch), run.rng)
  return jax.device_get(state.params), run, state


def pmap_params(config, pipeline, batches):
  """The same run as a pmap step: the registry's transform with ``axis_name``.

  Each device gets its 10 examples and passes its local, un-averaged gradient;
  the transform perturbs with it and averages the surrogate across the axis.
  """
  method = methods.get_method(config.method)
  run = train.create_run(config.copy_and_resolve_references(), pipeline)  # the same init
  loss_fns = train_step.make_loss_fns(run.model)
  context = train.make_context(config, pipeline, loss_fns, run.state.batch_stats,
                               axis_name="data")
  tx, _ = train.make_optimizer(config, method, context)
  state = train_step.TrainState.create(apply_fn=run.model.apply, params=run.state.params,
                                       tx=tx, batch_stats=run.state.batch_stats)
  predict = train_step.make_predict(run.model)
  step = jax.pmap(train_step.make_train_step(loss_fns, method, predict),
                  axis_name="data", in_axes=(0, 0, None))
  state = jax.tree.map(lambda a: np.broadcast_to(a, (DEVICES,) + np.shape(a)), jax.device_get(state))
  for batch in batches:
    shards = jax.tree.map(lambda a: a.reshape((DEVICES, -1) + a.shape[1:]), batch)
    state, _ = step(state, shards, run.rng)
  params = jax.device_get(state.params)
  for leaf in jax.tree.leaves(params):  # every device applied the same update
    np.testing.assert_allclose(leaf, np.broadcast_to(leaf[0], leaf.shape), rtol=1e-6, atol=1e-7)
  # Each device keeps the running averages of its own shards' statistics.
  return jax.tree.map(lambda a: a[0], params), jax.device_get(state.batch_stats)


def assert_close(got, want, rtol=1e-4, atol=1e-5):
  chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


def max_difference(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --------------------------------------------------------------------------
# m-sharpness in the trainer.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gsam", "bsam", "csam"])
def test_per_device_perturbation_equals_pmap(name, pipeline, batches):
  config = tiny_config(method=name)  # perturbation='device' is the default
  got, run, state = trainer_params(config, pipeline, batches)
  assert run.placement.batch_splits == DEVICES and run.placement.per_device(run.method)
  assert len(state.params["Dense_0"]["kernel"].sharding.device_set) == DEVICES
  params, batch_stats = pmap_params(config, pipeline, batches)
  assert_close(got, params)
  # BatchNorm: the shard's statistics on each device, their running averages
  # averaged over the devices (an EMA is linear: the mean of the devices' EMAs).
  assert_close(jax.device_get(state.batch_stats),
               jax.tree.map(lambda a: a.mean(axis=0), batch_stats))


def test_per_device_step_is_two_gradient_evaluations(pipeline, batches):
  """shard_map: SAM's step is 2.0× SGD's flops; Splits(8) under jit recomputes g_i."""

  def flops(**overrides):
    run = train.create_run(tiny_config(**overrides), pipeline)
    batch = run.placement.put_batch(batches[0])
    cost = run.train_step.lower(run.state, batch, run.rng).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  sgd = flops(method="sgd")
  assert flops(method="sam") / sgd == pytest.approx(2.0, rel=0.05)
  assert flops(method="sam", perturbation="split", batch_splits=DEVICES) / sgd > 2.5


@pytest.fixture(scope="module")
def sam_runs(pipeline, batches):
  """SAM's parameters after two steps in every perturbation mode."""
  runs = {}
  for label, overrides in {
      "device": {},
      "global": {"perturbation": "global"},
      "one_device": {"data_parallel": False},
      "split_one_device": {"data_parallel": False, "perturbation": "split", "batch_splits": 8},
  }.items():
    runs[label] = trainer_params(tiny_config(method="sam", **overrides), pipeline, batches)
  return runs


def test_global_perturbation_equals_the_single_device_step(sam_runs):
  assert sam_runs["global"][1].placement.batch_splits is None
  assert sam_runs["one_device"][1].placement.batch_splits is None
  assert_close(sam_runs["global"][0], sam_runs["one_device"][0])


def test_split_on_one_device_equals_per_device_on_eight(sam_runs):
  assert sam_runs["split_one_device"][1].placement.batch_splits == 8
  assert_close(sam_runs["device"][0], sam_runs["split_one_device"][0])


def test_m_sharpness_changes_the_step(sam_runs):
  assert max_difference(sam_runs["device"][0], sam_runs["global"][0]) > 1e-3


def test_results_report_the_perturbation(sam_runs):
  device_run = sam_runs["device"][1]
  assert device_run.placement.describe(device_run.method) == {
      "perturbation": "device", "batch_splits": 8, "step": "shard_map",
      "examples_per_perturbation": 10, "devices": 8, "processes": 1}
  assert device_run.placement.describe(methods.get_method("sgd")) is None


def test_evaluation_on_eight_devices_equals_one(sam_runs, pipeline):
  """The per-process evaluation: local weights, batches sharded over the local devices."""
  (_, parallel, parallel_state), (_, single, single_state) = (sam_runs["global"],
                                                              sam_runs["one_device"])
  weights = parallel.placement.local((parallel_state.params, parallel_state.batch_stats))
  got = evaluate.collect_logits(parallel.predict, weights, pipeline.eval_batches(), 30)
  want = evaluate.collect_logits(single.predict, (single_state.params, single_state.batch_stats),
                              pipeline.eval_batches(), 30)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[1], want[1])
  assert len(got[1]) == pipeline.num_eval_examples


def test_an_unbound_axis_name_is_a_clear_error(pipeline, batches):
  """A registry transform built for pmap (axis_name) inside the trainer's plain jit."""
  config = tiny_config(method="gsam", data_parallel=False)
  method = methods.get_method("gsam")
  run = train.create_run(config, pipeline)
  loss_fns = train_step.make_loss_fns(run.model)
  context = train.make_context(config, pipeline, loss_fns, run.state.batch_stats,
                               axis_name="data")
  tx, _ = train.make_optimizer(config, method, context)
  state = run.state.replace(tx=tx, opt_state=tx.init(run.state.params))
  step = jax.jit(train_step.make_train_step(loss_fns, method, train_step.make_predict(run.model)))
  with pytest.raises(ValueError, match=r"axis_name='data' is not bound.*jax.pmap"):
    step(state, batches[0], run.rng)


# --------------------------------------------------------------------------
# Pod layouts (no hardware needed: the arithmetic every process does).
# --------------------------------------------------------------------------

IMAGENET_TRAIN = 1_281_167
IMAGENET_EVAL = 50_000

# (slice, processes = hosts, JAX devices): TPU VM slices.
POD_SLICES = [
    ("v3-8", 1, 8),
    ("v3-32", 4, 32),
    ("v3-128", 16, 128),
    ("v4-32", 4, 16),
    ("v4-64", 8, 32),
    ("v5litepod-64", 16, 64),
]


@pytest.mark.parametrize("slice_name, processes, devices", POD_SLICES)
def test_imagenet_config_divides_on_pod_slices(slice_name, processes, devices):
  del slice_name
  config = imagenet_resnet50.get_config()
  config.method = "sam"
  assert config.batch_size == 4096 and config.data_parallel
  assert config.perturbation == "device" and not config.batch_splits
  splits = placement.check_data_layout(config, devices, processes)
  assert splits == devices  # one perturbation per device: m = 4096 / devices
  shares = [input_pipeline.host_share(IMAGENET_TRAIN, config.batch_size, p, processes)
            for p in range(processes)]
  assert {s.local_batch_size for s in shares} == {config.batch_size // processes}
  assert {s.steps_per_epoch for s in shares} == {IMAGENET_TRAIN // config.batch_size}
  assert all(s.local_batch_size % (devices // processes) == 0 for s in shares)
  for first, second in zip(shares, shares[1:]):  # contiguous, disjoint slices
    assert first.start + first.size == second.start
  assert shares[-1].start + shares[-1].size <= IMAGENET_TRAIN
  parts = [input_pipeline.eval_share(IMAGENET_EVAL, p, processes) for p in range(processes)]
  assert parts[0][0] == 0 and parts[-1][1] == IMAGENET_EVAL
  assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def test_mnist1d_processes_evaluate_disjoint_parts(pipeline):
  shares = []
  for p in range(3):
    part = input_pipeline.MNIST1D(batch_size=81, num_samples=500, eval_batch_size=7,
                                  process_index=p, process_count=3)
    shares.append(np.concatenate([b["index"] for b in part.eval_batches()]))
    np.testing.assert_array_equal(part.train_sample(20)["x"], pipeline.train_sample(20)["x"])
  np.testing.assert_array_equal(np.concatenate(shares), np.arange(pipeline.num_eval_examples))


@pytest.mark.parametrize("overrides, devices, processes, message", [
    ({"batch_size": 100}, 8, 1, "batch_size=100 is not divisible by the 8 devices"),
    ({"batch_size": 4104}, 48, 6, "not divisible by the 48 devices of the 6 processes"),
    ({"batch_size": 4096}, 24, 3, "not divisible by the 3 processes"),
    ({"data_parallel": False}, 8, 2, "data_parallel=False trains on one device"),
])
def test_bad_layouts(overrides, devices, processes, message):
  config = tiny_config(**overrides)
  with pytest.raises(UsageError, match=message):
    placement.check_data_layout(config, devices, processes)


@pytest.mark.parametrize("overrides, message", [
    ({"perturbation": "split", "batch_splits": 7}, "not divisible by batch_splits=7"),
    ({"perturbation": "split"}, "needs batch_splits"),
    ({"batch_splits": 4}, "set --config.perturbation=split"),
    ({"perturbation": "somewhere"}, "unknown perturbation 'somewhere'"),
])
def test_bad_perturbations(overrides, message):
  """Checked with the config, once per run, before any device is counted."""
  with pytest.raises(UsageError, match=message):
    validate_config(tiny_config(**overrides))


def test_split_groups_and_one_device_layouts():
  assert placement.check_data_layout(tiny_config(perturbation="split", batch_splits=16), 8) == 16
  assert placement.check_data_layout(tiny_config(perturbation="split", batch_splits=1), 8) is None
  assert placement.check_data_layout(tiny_config(), 1) is None
  assert placement.check_data_layout(tiny_config(data_parallel=False), 8) is None


# --------------------------------------------------------------------------
# The command line: one error line, before any step (and before
# jax.distributed would start).
# --------------------------------------------------------------------------

SMALL = ["--config=experiments/configs/default.py:tiny", "--noprogress"]


@pytest.mark.parametrize("argv, fragment", [
    (["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1"],
     "--process_id 2 is out of range for --num_processes 2"),
    (["--num_processes=2", "--process_id=0"], "missing --coordinator_address"),
    (["--num_processes=3", "--process_id=0", "--coordinator_address=127.0.0.1:1",
      "--config.data_parallel=True"], "batch_size=80 (the global batch) is not divisible by the 3"),
    (["--config.perturbation=everywhere"], "unknown perturbation 'everywhere'"),
    (["--config.perturbation=split"], "perturbation='split' needs batch_splits"),
    (["--config.perturbation=split", "--config.batch_splits=7"],
     "not divisible by batch_splits=7"),
    (["--config.batch_splits=4"], "set --config.perturbation=split"),
])
def test_bad_flags_are_one_error_line(argv, fragment, capsys, tmp_path, monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  out = tmp_path / "out"
  assert cli.main(["main"] + SMALL + argv + [f"--workdir={out}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
  assert fragment in err, err
  assert not out.exists()


def test_process_id_from_the_environment(capsys, tmp_path, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "7")
  assert cli.main(["main"] + SMALL + [f"--workdir={tmp_path / 'out'}"]) == 2
  assert "--process_id 7 is out of range" in capsys.readouterr().err


def test_batch_not_divisible_by_the_devices(capsys, tmp_path):
  assert cli.main(["main"] + SMALL + ["--config.data_parallel=True", "--config.batch_size=84",
                                     f"--workdir={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: batch_size=84 is not divisible by the 8 devices"), err
  assert not (tmp_path / "out").exists()


def test_the_documented_tpu_pod_command_parses_and_divides():
  """The launch command of experiments/README.md, as written, on a v4-64 slice."""
  readme = (pathlib.Path(__file__).parent.parent / "experiments" / "README.md").read_text()
  launches = [line.split('--command="', 1)[1].rstrip('"').split(" && ")[-1]
              for line in readme.splitlines() if "experiments/configs/imagenet_resnet50.py" in line
              and "--command=" in line]
  assert len(launches) == 1, launches
  words = shlex.split(launches[0])
  assert words[:3] == ["python3", "-m", "experiments.main"]
  config, options = cli.parse(["main"] + words[3:])
  assert options.distributed and options.workdir.startswith("gs://")
  assert distributed.process_spec(auto=options.distributed, environ={}) == \
      distributed.ProcessSpec(auto=True)
  assert (config.dataset, config.model, config.method) == ("imagenet2012", "resnet50", "sam")
  assert config.data_dir.startswith("gs://")
  assert placement.check_data_layout(config, num_devices=32, num_processes=8) == 32


def test_remote_output_paths_go_through_epath(tmp_path, monkeypatch):
  """gs:// folders: written with etils.epath (run here on a local folder)."""
  monkeypatch.setattr(checkpoints, "is_remote", lambda path: True)
  folder = checkpoints.check_output_dir(str(tmp_path / "bucket" / "run"))
  assert folder == str(tmp_path / "bucket" / "run") and (tmp_path / "bucket" / "run").is_dir()
  assert list((tmp_path / "bucket" / "run").iterdir()) == []  # the probe is gone
  checkpoints.write_json(f"{folder}/results.json", {"a": np.float32(1.5)})
  assert (tmp_path / "bucket" / "run" / "results.json").read_text().replace(" ", "").replace(
      "\n", "") == '{"a":1.5}'
