"""Several processes (hosts): start-up, the data mesh, and moving arrays between views.

A run on ``P`` processes is the same program on every process (multi-controller
JAX). Every process

1. calls :func:`initialize` (``jax.distributed.initialize``) before anything
   else touches a JAX device: with a coordinator address, the number of
   processes and its own id (:func:`process_spec`, from the flags
   ``--coordinator_address / --num_processes / --process_id`` or the
   environment variables ``JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
   JAX_PROCESS_ID``), or with no argument on a TPU pod, SLURM or another
   cluster that JAX detects (``--distributed``);
2. reads only its own ``batch_size / P`` examples of each global batch and
   assembles the global batch with ``jax.make_array_from_process_local_data``
   over a 1-D ``('data',)`` mesh of every device (:func:`data_mesh`, devices
   ordered by process, so process ``p`` holds rows ``[p·B/P, (p+1)·B/P)``);
3. keeps the training state on that mesh, replicated (:func:`replicate`) but
   for what ``config.shard_state`` splits across the devices (SAF's logit
   bank; :func:`place`, :mod:`experiments.placement`), so every process ends
   every step with the same parameters;
4. evaluates its own share of the test split on its local devices with a
   local copy of the weights (:func:`local_copy`) and gathers the results of
   every process (:func:`gather_rows`), so every process computes the same
   metrics.

On CPU the cross-process collectives use gloo
(``jax_cpu_collectives_implementation``); a CI test starts two CPU processes
on ``127.0.0.1`` (``tests/test_multihost.py``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """How to start ``jax.distributed`` for this process.

  Attributes:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: the number of processes ``P``.
    process_id: this process's id in ``[0, P)``.
    auto: leave what is None to JAX's cluster detection (TPU pods, SLURM,
      Open MPI, Kubernetes): ``jax.distributed.initialize()`` with the given
      values only.
  """

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"the environment variable {name}={value!r} must be an integer.") from None


def process_spec(coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, auto: bool = False,
                 environ: Mapping[str, str] | None = None) -> ProcessSpec | None:
  """The checked multi-process settings, or None for a single process.

  A value not given falls back to its environment variable
  (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
  Without ``auto``, the three must be given together (or none of them, or
  only ``num_processes=1``).

  Raises:
    ValueError: for a process count below 1, an id outside ``[0, P)``, an
      address without a port, or an incomplete set of values -- before any
      device is touched.
  """
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
  if count is not None and count < 1:
    raise ValueError(f"--num_processes must be >= 1, got {count}.")
  if index is not None and count is not None and not 0 <= index < count:
    raise ValueError(f"--process_id {index} is out of range for --num_processes {count}:"
                     f" the ids are 0 ... {count - 1}.")
  if index is not None and index < 0:
    raise ValueError(f"--process_id must be >= 0, got {index}.")
  if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
    raise ValueError(f"--coordinator_address must be HOST:PORT (process 0's host), got"
                     f" {address!r}.")
  if auto:
    return ProcessSpec(address, count, index, auto=True)
  if address is None and index is None and count in (None, 1):
    return None  # one process: nothing to start
  missing = [flag for flag, value in (("--coordinator_address", address),
                                      ("--num_processes", count), ("--process_id", index))
             if value is None]
  if missing:
    raise ValueError(
        f"several processes need --coordinator_address, --num_processes and --process_id"
        f" together (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing"
        f" {', '.join(missing)}. On a TPU pod or a SLURM cluster pass --distributed instead.")
  return ProcessSpec(address, count, index)


def initialize(spec: ProcessSpec | None, timeout_s: int = 300) -> None:
  """Starts ``jax.distributed`` for ``spec`` (nothing for None).

  Must run before anything touches a JAX device. CPU collectives use gloo
  unless another implementation was configured.

  Raises:
    ValueError: if JAX then sees another number of processes or another
      process id than ``spec`` asked for.
  """
  if spec is None or jax.distributed.is_initialized():
    return
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id,
                             initialization_timeout=timeout_s)
  if spec.num_processes is not None and jax.process_count() != spec.num_processes:
    raise ValueError(f"--num_processes {spec.num_processes}, but JAX started"
                     f" {jax.process_count()} processes.")
  if spec.process_id is not None and jax.process_index() != spec.process_id:
    raise ValueError(f"--process_id {spec.process_id}, but JAX gave this process the id"
                     f" {jax.process_index()}.")


def is_main_process() -> bool:
  """True on process 0, the one that writes results and shows progress."""
  return jax.process_index() == 0


# --------------------------------------------------------------------------
# Meshes and arrays.
# --------------------------------------------------------------------------


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh ``('data',)`` of ``devices`` (default: all), ordered by process.

  Process ``p``'s devices are consecutive, so its local rows of a batch
  sharded along ``'data'`` are one contiguous block of the global batch.
  """
  devices = jax.devices() if devices is None else devices
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(ordered), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device of ``mesh`` holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split across ``mesh``'s ``'data'`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _put(x: Any, sharding: NamedSharding) -> Any:
  if _is_key(x):
    data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return jax.device_put(x, sharding)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """``tree`` placed on every device of ``sharding`` (every process gives the same values).

  Typed PRNG keys go through their raw data, which ``jax.device_put`` can
  place on devices of other processes.
  """
  return jax.tree.map(lambda x: _put(x, sharding), tree)


def place(tree: Any, shardings: Any) -> Any:
  """``tree`` placed leaf by leaf in ``shardings`` (a tree of ``NamedSharding`` of
  its structure, e.g. from :meth:`experiments.placement.Placement.state_shardings`);
  every process gives the same values, as for :func:`replicate`."""
  return jax.tree.map(_put, tree, shardings)


def local_copy(tree: Any, sharding: NamedSharding | None = None) -> Any:
  """This process's copy of a replicated ``tree``, on its own devices only.

  A replicated global array spans the devices of every process; computing on
  it is a collective program every process must run. Evaluation runs
  per process instead: on the local copy, placed with ``sharding`` (a
  sharding of local devices; default: the first local device).
  """

  def take(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x if sharding is None else jax.device_put(x, sharding)
    local = x.addressable_data(0)
    return local if sharding is None else jax.device_put(local, sharding)

  return jax.tree.map(take, tree)


def gather_rows(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows, concatenated in process order, on every process.

  The arrays of one process share their first dimension, which may differ
  between processes (an evaluation split rarely divides evenly): each is
  padded to the largest count for ``process_allgather`` and trimmed after.
  The identity with one process.
  """
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  if jax.process_count() == 1:
    return arrays
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  counts = {len(v) for v in arrays.values()}
  if len(counts) != 1:
    raise ValueError(f"gather_rows: the arrays have different lengths {sorted(counts)}.")
  count = counts.pop()
  counts = np.asarray(multihost_utils.process_allgather(np.asarray(count, np.int64)))
  longest = int(counts.max())
  gathered = {}
  for key, value in arrays.items():
    padded = np.zeros((longest,) + value.shape[1:], value.dtype)
    padded[:count] = value
    stacked = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
    gathered[key] = np.concatenate([stacked[p, :int(n)] for p, n in enumerate(counts)])
  return gathered


def broadcast_from_main(value: int) -> int:
  """Process 0's integer ``value`` on every process (e.g. a run folder's time stamp)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))
