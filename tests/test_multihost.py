"""Training on several processes: two CPU processes on localhost, gloo collectives.

``experiments.main`` runs in two subprocesses (coordinator on 127.0.0.1, a
free port, 2 CPU devices each: 4 devices in all), each reading its own half
of every MNIST-1D batch, evaluating its own half of the test split and
saving the orbax checkpoints together. They must end with identical
parameters, equal to a single-process run on the same global batches with
the same perturbation groups (one device, ``batch_splits = 4``: the four
devices' shards), with the whole test split evaluated (gathered across the
processes), and a checkpoint that restores on one process.

The multi-process flags are also checked on their own (``process_spec``).
"""

import json
import os
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from experiments import checkpoints as checkpoints_lib
from experiments import distributed, train
from experiments import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, LOCAL_DEVICES = 2, 2
DEADLINE_S = 240  # generous for a loaded machine; the run itself takes ~30 s

WORKER = r"""
import json, sys
import numpy as np
import jax
from experiments import main as cli

argv, dump = json.loads(sys.argv[1]), sys.argv[2]
result = cli.run(*cli.parse(["main"] + argv))
params = {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(result.state.params)}
np.savez(dump, **params)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "local_devices": jax.local_device_count()}))
"""

# The tiny run: 400 training sequences, 5 steps of 80, a CNN with one 4-channel convolution.
RUN_FLAGS = ["--config=experiments/configs/default.py:tiny", "--config.method=sam",
             "--config.data_parallel=True", "--config.checkpoint_every_steps=2",
             "--config.model_kwargs.channels=(4,)", "--config.eval_batch_size=30",
             "--config.hessian_iters=2", "--config.hessian_examples=50", "--noprogress"]


def gloo_available() -> bool:
  from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel

  return hasattr(_jax, "make_gloo_tcp_collectives")


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def worker_env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                      distributed.ENV_PROCESS_ID)}
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def start_processes(tmp_path, output_dir):
  """Runs the workers to the end; kills every one of them on a failure or timeout."""
  port = free_port()
  procs = []
  try:
    for index in range(PROCESSES):
      argv = RUN_FLAGS + [f"--workdir={output_dir}",
                          f"--coordinator_address=127.0.0.1:{port}",
                          f"--num_processes={PROCESSES}", f"--process_id={index}"]
      log = open(tmp_path / f"process{index}.log", "w+", encoding="utf-8")  # pylint: disable=consider-using-with
      procs.append((subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, "-c", WORKER, json.dumps(argv), str(tmp_path / f"params{index}.npz")],
          cwd=ROOT, env=worker_env(), stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + DEADLINE_S
    codes = []
    for proc, _ in procs:
      codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
      if codes[-1] != 0:
        break
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  logs = []
  for index, (_, log) in enumerate(procs):
    log.seek(0)
    logs.append(f"--- process {index} ---\n" + log.read()[-4000:])
    log.close()
  assert codes is not None, f"the processes did not finish in {DEADLINE_S} s:\n" + "\n".join(logs)
  assert codes == [0] * PROCESSES, f"exit codes {codes}:\n" + "\n".join(logs)
  return logs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  if not gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)")
  tmp_path = tmp_path_factory.mktemp("multihost")
  output_dir = tmp_path / "run"
  logs = start_processes(tmp_path, output_dir)
  params = [dict(np.load(tmp_path / f"params{i}.npz")) for i in range(PROCESSES)]
  return params, output_dir, logs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process, one device, the four devices' shards as four perturbation groups."""
  config, _ = cli.parse(["main"] + RUN_FLAGS + [
      "--config.perturbation=split", f"--config.batch_splits={PROCESSES * LOCAL_DEVICES}",
      "--config.data_parallel=False"])
  result = train.train_and_evaluate(config, str(tmp_path_factory.mktemp("single")),
                                    progress=False)
  return {**result.report, "state": result.state}


def _flat(params):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def test_processes_end_with_identical_parameters(two_processes):
  params, _, logs = two_processes
  layout = [json.loads(log.strip().splitlines()[-1]) for log in logs]
  assert [entry["process"] for entry in layout] == [0, 1]
  assert all(entry["devices"] == 4 and entry["local_devices"] == 2 for entry in layout)
  assert params[0].keys() == params[1].keys() and params[0]
  for key in params[0]:
    np.testing.assert_array_equal(params[0][key], params[1][key], err_msg=key)


def test_two_processes_equal_one_process_on_the_same_global_batches(two_processes, reference):
  params, output_dir, _ = two_processes
  expected = _flat(reference["state"].params)
  assert expected.keys() == params[0].keys()
  for key, value in expected.items():
    np.testing.assert_allclose(params[0][key], value, rtol=1e-4, atol=2e-5, err_msg=key)
  results = json.loads((output_dir / "results.json").read_text())
  assert results["steps"] == 5 and results["finished"]
  assert results["m_sharpness"] == {"perturbation": "device", "batch_splits": 4,
                                    "step": "shard_map", "examples_per_perturbation": 20,
                                    "devices": 4, "processes": 2}
  assert reference["m_sharpness"]["batch_splits"] == 4


def test_evaluation_gathers_every_process(two_processes, reference):
  """Each process evaluated half of the 100 test sequences; the metrics cover all 100."""
  _, output_dir, _ = two_processes
  results = json.loads((output_dir / "results.json").read_text())
  assert sum(results["reliability_diagram"]["bin_count"]) == 100
  assert abs(results["test"]["accuracy"] - reference["test"]["accuracy"]) <= 0.011
  np.testing.assert_allclose(results["test"]["nll"], reference["test"]["nll"], rtol=1e-3)
  # The per-device step's training loss is the mean of the devices' losses, each
  # with its shard's BatchNorm statistics; the reference's pass normalizes over
  # the whole batch (the gradients it perturbs with are the groups' own, equal).
  np.testing.assert_allclose(results["history"]["train_loss"],
                             reference["history"]["train_loss"], rtol=1e-3)
  # (The same for the training accuracy: at most one example of the 400 differs.)
  np.testing.assert_allclose(results["history"]["train_accuracy"],
                             reference["history"]["train_accuracy"], atol=1 / 400 + 1e-9)
  # λ_max is taken with the running BatchNorm statistics: their variance is the
  # mean of the shards' variances here, the whole batch's in the reference.
  np.testing.assert_allclose(results["hessian_top_eigenvalue"],
                             reference["hessian_top_eigenvalue"], rtol=5e-3)


def test_checkpoint_of_two_processes_restores_on_one(two_processes, reference):
  params, output_dir, _ = two_processes
  checkpoints = checkpoints_lib.Checkpoints(str(output_dir / "checkpoints"))
  try:
    assert checkpoints.latest_step() == 5
    state, loop = checkpoints.restore(reference["state"])
    assert checkpoints.restore_config()["method"] == "sam"
  finally:
    checkpoints.close()
  assert int(state.step) == 5 and loop.history["epoch"] == [1]
  for key, value in _flat(state.params).items():
    np.testing.assert_array_equal(value, params[0][key], err_msg=key)
  chex.assert_trees_all_equal_structs(state.opt_state, reference["state"].opt_state)


# --------------------------------------------------------------------------
# The multi-process flags, checked before any device is touched.
# --------------------------------------------------------------------------


def test_process_spec_from_flags_and_environment():
  assert distributed.process_spec(environ={}) is None
  assert distributed.process_spec(num_processes=1, environ={}) is None
  spec = distributed.process_spec("10.0.0.1:1234", 4, 3, environ={})
  assert spec == distributed.ProcessSpec("10.0.0.1:1234", 4, 3)
  env = {"JAX_COORDINATOR_ADDRESS": "host:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.process_spec(environ=env) == distributed.ProcessSpec("host:99", 2, 1)
  assert distributed.process_spec(process_id=0, environ=env).process_id == 0  # flag wins
  assert distributed.process_spec(auto=True, environ={}) == distributed.ProcessSpec(auto=True)


@pytest.mark.parametrize("kwargs, environ, message", [
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {},
     "--process_id 2 is out of range for --num_processes 2"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, {},
     "--num_processes must be >= 1"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": -1}, {},
     "out of range"),
    ({"num_processes": 2, "process_id": 0}, {}, "missing --coordinator_address"),
    ({"coordinator_address": "h:1"}, {}, "missing --num_processes, --process_id"),
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, {},
     "must be HOST:PORT"),
    ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5", "JAX_COORDINATOR_ADDRESS": "h:1"},
     "--process_id 5 is out of range"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
])
def test_bad_process_settings(kwargs, environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.process_spec(environ=environ, **kwargs)


def test_gather_rows_is_the_identity_on_one_process():
  rows = {"a": np.arange(3), "b": np.ones((3, 2))}
  gathered = distributed.gather_rows(rows)
  chex.assert_trees_all_equal(gathered, rows)
