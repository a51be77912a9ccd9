"""Data parallelism on the 8 fake CPU devices of the root conftest.

Every device is fed its own shard of the batch (chex's ``with_pmap`` feeds
every device the same arguments, which cannot tell a local gradient from the
average over the devices), and keeps its own copy of the parameters and the
optimizer state, so that replicas that drift apart show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

DEVICES = 8
AXIS = "data"
# The programs here are compiled once to run a few steps of a tiny model:
# LLVM's optimizations would cost a quarter of the test's time and save none.
QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def check_device_count(devices: int = DEVICES) -> None:
  assert jax.device_count() >= devices, "the root conftest sets 8 CPU devices"


def shard(tree: Any, devices: int = DEVICES) -> Any:
  """Each leaf's leading (batch) axis ``B`` split into ``[devices, B / devices]``:
  device ``i`` gets rows ``i·B/devices`` to ``(i+1)·B/devices − 1``."""
  return jax.tree.map(lambda x: np.asarray(x).reshape((devices, -1) + np.shape(x)[1:]), tree)


def replicate(tree: Any, devices: int = DEVICES) -> Any:
  """Every leaf stacked ``devices`` times (the same value on every device)."""
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (devices,) + np.shape(x)), tree)


def unreplicate(tree: Any) -> Any:
  """Device 0's copy of every leaf."""
  return jax.tree.map(lambda x: np.asarray(x)[0], tree)


def assert_replicated(tree: Any, rtol: float = 1e-6, atol: float = 1e-7) -> None:
  """Every device holds the same value of every leaf (leading axis: devices).

  Integer, boolean and key leaves exactly; floating leaves to a few ulps (the
  devices run one program on all-reduced values, so they agree; the
  tolerance only spares the test an assumption about the all-reduce)."""
  def check(path, leaf):
    leaf = np.asarray(leaf)
    where = f"{jax.tree_util.keystr(path)} differs between devices"
    if np.issubdtype(leaf.dtype, np.floating):
      np.testing.assert_allclose(leaf, np.broadcast_to(leaf[0], leaf.shape),
                                 rtol=rtol, atol=atol, err_msg=where)
    else:
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape), err_msg=where)
  jax.tree_util.tree_map_with_path(check, tree)


def train_on_devices(step: Callable[..., tuple[Any, Any]], params: Any, state: Any,
                     batches: Sequence[Any], *, devices: int = DEVICES,
                     axis_name: str = AXIS) -> tuple[list[Any], Any]:
  """``step(params, state, batch) -> (params, state)`` on ``devices`` devices
  over ``axis_name``, one call per batch, each device fed its own shard of it
  (:func:`shard`); params and state start replicated, and each device keeps
  its own copy (nothing forces them to agree).

  One compiled program: ``shard_map`` over a mesh of the devices, the steps a
  ``lax.scan`` (what ``jax.pmap`` runs, without its recompilation when the
  outputs of one call, committed to the devices, are the inputs of the next).

  Returns the per-device params after each step and the final per-device
  state, as NumPy arrays with the devices on the leading axis.
  """
  check_device_count(devices)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), (axis_name,))
  stacked = jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *batches)

  def on_one_device(params, state, batches):  # [1, ...] and [steps, B / devices, ...]
    def one_step(carry, batch):
      carry = step(*carry, batch)
      return carry, carry[0]
    local = jax.tree.map(lambda x: x[0], (params, state))
    (_, state), history = jax.lax.scan(one_step, local, batches)
    return jax.tree.map(lambda x: x[None], (history, state))

  devices_axis = jax.sharding.PartitionSpec(axis_name)
  run = jax.jit(jax.shard_map(
      on_one_device, mesh=mesh, out_specs=devices_axis, check_vma=False,
      in_specs=(devices_axis, devices_axis, jax.sharding.PartitionSpec(None, axis_name))),
      compiler_options=QUICK_COMPILE)
  history, state = jax.device_get(run(replicate(params, devices), replicate(state, devices),
                                      stacked))
  return [jax.tree.map(lambda x, t=t: x[:, t], history) for t in range(len(batches))], state
