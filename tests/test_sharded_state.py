"""The sharded training state on 8 devices (``config.shard_state``).

SAF's logit bank split along its example axis over the ``('data',)`` mesh of
the 8 fake CPU devices (root conftest), everything else replicated
(``'auto'``): the run equals the replicated one (``'none'``) bit for bit,
each device holds 1/8 of the bank's rows, and an interrupted run resumed
from its orbax checkpoint equals the uninterrupted one (the bank restored
into its shards). ``'fsdp'`` splits the parameters and the optimizer state
too (equal up to float rounding). The bank's rows are padded to a multiple
of the device count; a bank that does not divide is a clear error.

The runs: 5 steps of the tiny MNIST-1D config with batches of 200 (400
examples: 2 steps per epoch), SAF with Ẽ = 1 and ``start_epoch`` 1, so step 4
(epoch 2) reads the bank rows written in epoch 1.
"""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

import sam_optax
from experiments import checkpoints, input_pipeline, placement, train, train_step
from experiments.config_checks import validate_config
from experiments.errors import UsageError
from test_experiments_train import tiny_config as _tiny
from xla_cache import compilation_cache  # noqa: F401  (autouse)

# Its module-scoped fixtures are expensive: one xdist worker runs the whole file.
pytestmark = pytest.mark.xdist_group("test_sharded_state")

DEVICES = 8
STEPS = 5
IMAGENET_TRAIN = 1_281_167


def tiny_config(**overrides):
  """SAF on 8 devices, 3 epochs of 2 steps (no evaluation before step 6), stopped at step 5."""
  return _tiny(**{"data_parallel": True, "model_kwargs.channels": (4,), "method": "saf",
                  "batch_size": 200, "num_epochs": 3, "eval_every_epochs": 3, "max_steps": STEPS,
                  **overrides})


def train_run(config, workdir, pipeline, **kwargs):
  return train.train_and_evaluate(config, str(workdir), progress=False, pipeline=pipeline,
                                  **kwargs)


def saf_state(state):
  is_saf = lambda x: isinstance(x, sam_optax.SAFState)
  return next(s for s in jax.tree.leaves(state.opt_state, is_leaf=is_saf) if is_saf(s))


@pytest.fixture(scope="module")
def pipeline():
  assert jax.device_count() >= DEVICES, "the root conftest sets 8 CPU devices"
  return input_pipeline.get_pipeline(tiny_config())


@pytest.fixture(scope="module")
def runs(pipeline, tmp_path_factory):
  """The same SAF run with the bank replicated and sharded."""
  return {label: train_run(tiny_config(shard_state=label), tmp_path_factory.mktemp(label),
                           pipeline)
          for label in ("none", "auto")}


def test_sharded_bank_run_equals_the_replicated_run(runs):
  sharded, replicated = runs["auto"], runs["none"]
  assert sharded.step == replicated.step == STEPS and not sharded.finished
  bank = saf_state(sharded.state)
  # The trajectory loss was on (epoch 2: step 4) and read slot 1, all written.
  assert float(bank.schedule.weight(jnp.asarray(STEPS - 1))) > 0
  assert bool(jnp.all(jnp.any(bank.bank[1] != 0, axis=-1)))
  for field in ("step", "params", "batch_stats", "opt_state"):
    chex.assert_trees_all_equal(getattr(sharded.state, field), getattr(replicated.state, field))


def test_the_bank_is_split_along_its_example_axis(runs):
  bank = saf_state(runs["auto"].state).bank
  assert bank.shape == (2, 400, 10)
  assert len(bank.sharding.device_set) == DEVICES
  assert bank.sharding.spec == PartitionSpec(None, "data")
  assert {shard.data.shape for shard in bank.addressable_shards} == {(2, 400 // DEVICES, 10)}
  # Everything else, and the whole bank with shard_state='none', replicated.
  rest = saf_state(runs["auto"].state)._replace(bank=None)
  for leaf in jax.tree.leaves((runs["auto"].state.params, rest)):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == DEVICES
  assert saf_state(runs["none"].state).bank.sharding.is_fully_replicated


def test_sharded_resume_is_bit_exact(runs, pipeline, tmp_path):
  """Stopped mid-epoch 1 (step 3), resumed from the orbax checkpoint to step 5."""
  stopped = train_run(tiny_config(max_steps=3, checkpoint_every_steps=2), tmp_path, pipeline)
  assert stopped.step == 3
  # The checkpoint restores into the sharded layout.
  run = train.create_run(tiny_config(), pipeline)
  store = checkpoints.Checkpoints(str(tmp_path / "checkpoints"))
  try:
    restored, _ = store.restore(run.state, run.placement.state_shardings(run.state))
  finally:
    store.close()
  bank = saf_state(restored).bank
  assert bank.sharding.spec == PartitionSpec(None, "data")
  assert {shard.data.shape for shard in bank.addressable_shards} == {(2, 400 // DEVICES, 10)}
  chex.assert_trees_all_equal(restored.opt_state, stopped.state.opt_state)

  resumed = train_run(tiny_config(checkpoint_every_steps=2), tmp_path, pipeline, resume=True)
  assert resumed.step == STEPS
  whole = runs["auto"]
  for field in ("step", "params", "batch_stats", "opt_state"):
    chex.assert_trees_all_equal(getattr(resumed.state, field), getattr(whole.state, field))
  assert resumed.history == whole.history
  assert saf_state(resumed.state).bank.sharding.spec == PartitionSpec(None, "data")


def test_fsdp_splits_the_parameters_and_the_optimizer_state(runs, pipeline, tmp_path):
  fsdp = train_run(tiny_config(shard_state="fsdp"), tmp_path, pipeline).state
  replicated = runs["none"].state
  for field in ("params", "batch_stats", "opt_state"):
    chex.assert_trees_all_close(getattr(fsdp, field), getattr(replicated, field),
                                rtol=1e-5, atol=1e-6)
  kernel = fsdp.params["Dense_0"]["kernel"]  # [160, 10]: split along the 160 features
  assert kernel.sharding.spec == PartitionSpec("data")
  assert {shard.data.shape for shard in kernel.addressable_shards} == {(160 // DEVICES, 10)}
  momentum = fsdp.opt_state[-1][0].trace["Dense_0"]["kernel"]
  assert momentum.sharding.spec == PartitionSpec("data")
  assert saf_state(fsdp).bank.sharding.spec == PartitionSpec(None, "data")
  assert fsdp.params["Dense_0"]["bias"].sharding.is_fully_replicated  # 10: no divisible axis


def _placement(**overrides):
  return placement.Placement(tiny_config(**overrides), types.SimpleNamespace(batch_size=200))


def test_bank_rows_are_padded_to_the_device_count_and_must_divide():
  sharded, replicated = _placement(), _placement(shard_state="none")
  assert sharded.devices == DEVICES
  assert [sharded.bank_examples(n) for n in (400, 401, IMAGENET_TRAIN)] == \
      [400, 408, IMAGENET_TRAIN + 1]
  assert replicated.bank_examples(401) == 401
  assert _placement(data_parallel=False).bank_examples(401) == 401

  def abstract_state(num_examples):  # ImageNet's bank, Ẽ = 2: never allocated
    tx = optax.chain(sam_optax.saf(num_examples, 1000, steps_per_epoch=312, past_epochs=2,
                                   start_epoch=2), optax.sgd(0.1, momentum=0.9))
    return jax.eval_shape(tx.init, {"w": jnp.zeros((2048, 1000))})

  rows = sharded.bank_examples(IMAGENET_TRAIN)
  shardings = sharded.state_shardings(abstract_state(rows))
  assert shardings[0].bank.shard_shape((3, rows, 1000)) == (3, rows // DEVICES, 1000)
  assert shardings[1][0].trace["w"].is_fully_replicated
  assert replicated.state_shardings(abstract_state(rows))[0].bank.is_fully_replicated
  assert _placement(data_parallel=False).state_shardings(abstract_state(rows)) is None
  with pytest.raises(UsageError,
                     match=r"SAF's bank has 1281167 example rows \(num_train_examples\), not"
                     r" divisible by the 8 devices.*--config.shard_state=none"):
    sharded.state_shardings(abstract_state(IMAGENET_TRAIN))
  fsdp = _placement(shard_state="fsdp").state_shardings(abstract_state(rows))
  assert fsdp[1][0].trace["w"].shard_shape((2048, 1000)) == (256, 1000)
  assert placement.fsdp_axis((3, 16, 16), 8) == 1
  assert placement.fsdp_axis((3, 5), 8) is None


def test_an_unknown_shard_state_is_a_clear_error():
  with pytest.raises(UsageError, match=r"unknown shard_state 'all'; choose one of"
                     r" auto, none, fsdp"):
    validate_config(tiny_config(shard_state="all"))


def test_evaluation_weights_are_gathered_from_their_shards():
  """With 'fsdp' the EMA or parameters are split; evaluation takes a whole local copy."""
  fsdp = _placement(shard_state="fsdp")
  tree = {"w": np.arange(32.0).reshape(16, 2), "b": np.ones(3)}
  placed = fsdp.put_state(tree)
  assert placed["w"].sharding.spec == PartitionSpec("data")
  local = fsdp.local(placed)
  assert local["w"].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(local["w"]), tree["w"])
  np.testing.assert_array_equal(np.asarray(local["b"]), tree["b"])


def test_a_checkpoint_of_other_shapes_is_a_clear_error(tmp_path):
  """E.g. a padded bank resumed on a device count that pads it to other rows."""

  def state(rows):
    return train_step.TrainState.create(apply_fn=None, params={"bank": jnp.zeros((2, rows))},
                                   tx=optax.sgd(0.1), batch_stats={}).replace(
                                       step=jnp.asarray(1, jnp.int32))

  store = checkpoints.Checkpoints(str(tmp_path))
  try:
    store.save(state(408), checkpoints.LoopState(), {"seed": 0})
    store.manager.wait_until_finished()
    with pytest.raises(UsageError, match=r"--resume: the checkpoint's params.bank has"
                       r" shape \(2, 408\), this run's \(2, 416\).*the same rows"):
      store.restore(state(416))
  finally:
    store.close()
