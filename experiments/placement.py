"""Device placement: one device, or data parallel over every device of every process.

With ``config.data_parallel`` and more than one device, the step runs over a
1-D mesh ``('data',)`` of every device of every process
(:func:`experiments.distributed.data_mesh`): the state is replicated (but for
what ``config.shard_state`` splits, below: SAF's logit bank by default), each
global batch is split along its first axis (each process gives its own rows,
``jax.make_array_from_process_local_data``).

``config.perturbation`` says where the SAM family's perturbation is computed
(m-sharpness; :func:`check_data_layout`):

* ``'device'`` (default, as in the SAM paper): every device's shard of the
  batch gets its own perturbation. The step of a perturbing method is then a
  ``shard_map`` (:meth:`Placement.per_device`): each device computes the
  gradient of its shard, perturbs with it (``sam_optax.PerDevice('data')``)
  and the surrogate is averaged once -- two gradient evaluations for SAM, as
  with ``pmap``. BatchNorm normalizes with each shard's statistics (as under
  ``pmap``) and the running averages are averaged over the devices.
* ``'global'``: one perturbation from the global batch's gradient, a
  ``jax.jit`` step in which XLA inserts the all-reduces (BatchNorm over the
  global batch).
* ``'split'``: ``config.batch_splits`` groups of the global batch, each
  recomputing its own gradient inside the transform (``sam_optax.Splits``,
  one more gradient evaluation); with ``batch_splits`` = the device count it
  gives the same parameters as ``'device'`` (BatchNorm statistics of the
  training pass over the global batch).

Methods that do not perturb (SGD, SAF, MESA, ESAM's own step) always run the
``jax.jit`` step. Equalities are tested in ``tests/test_experiments_parallel.py``
and, for the sharded state, ``tests/test_sharded_state.py``.

``config.shard_state`` says which parts of the training state are split
across the ``'data'`` axis instead of replicated (:meth:`Placement.state_shardings`):

* ``'auto'`` (default): SAF's logit bank (``[Ẽ + 1, examples, classes]``)
  along its example axis, ``PartitionSpec(None, 'data')``, everything else
  replicated. Each device holds ``1 / n`` of the bank (ImageNet, Ẽ = 2: 15 GB
  in float32 over ``n`` devices); the step's gather of the batch's rows and
  the scatter of its logits are exact, so the run equals the replicated one.
  The bank's example axis is padded to a multiple of the device count
  (:meth:`Placement.bank_examples`: at most ``n - 1`` rows that no example
  index reaches; ImageNet's 1,281,167 examples on 8 devices: 1,281,168 rows).
* ``'none'``: every leaf replicated (the bank too).
* ``'fsdp'``: as ``'auto'``, and every other leaf of the parameters and the
  optimizer state (momentum, MESA's EMA weights, ...) split along its largest
  axis that the device count divides (leaves without one, scalars and PRNG
  keys replicated). XLA gathers what a step needs, so the state's memory is
  ``1 / n`` between steps; a ``shard_map`` step (``perturbation='device'``)
  gathers the whole state at its start. Sums may be reduced in another order
  than the replicated run's: equal to it up to float rounding.

The step's outputs keep these shardings (``out_shardings``), the initial
state is created in them (no device ever holds the whole bank) and a
checkpoint restores into them (:class:`experiments.checkpoints.Checkpoints`).
With one device, or without ``data_parallel``, nothing is sharded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import sam_optax
from experiments import distributed
from experiments.errors import UsageError

PERTURBATIONS = ("device", "global", "split")
SHARD_STATES = ("auto", "none", "fsdp")


def check_shard_state(config) -> None:
  """Checks ``config.shard_state`` (see the module docstring)."""
  if config.shard_state not in SHARD_STATES:
    raise UsageError(f"unknown shard_state {config.shard_state!r}; choose one of"
                     f" {', '.join(SHARD_STATES)} (auto: SAF's bank split over the devices;"
                     " none: everything replicated; fsdp: the bank, the parameters and the"
                     " optimizer state split).")


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def fsdp_axis(shape: tuple[int, ...], devices: int) -> int | None:
  """The largest axis of ``shape`` that ``devices`` divides (the first of equal ones), or None."""
  divisible = [(-size, axis) for axis, size in enumerate(shape)
               if size >= devices and size % devices == 0]
  return min(divisible)[1] if divisible else None


def check_perturbation(config) -> None:
  """Checks ``perturbation`` and ``batch_splits`` against each other."""
  perturbation, splits = config.perturbation, config.batch_splits
  if perturbation not in PERTURBATIONS:
    raise UsageError(f"unknown perturbation {perturbation!r}; choose one of"
                     f" {', '.join(PERTURBATIONS)} (device: one per device, as in the SAM"
                     " paper; global: one for the global batch; split: batch_splits groups).")
  if isinstance(splits, bool) or not isinstance(splits, int) or splits < 0:
    raise UsageError(f"batch_splits must be a positive integer, got {splits!r}.")
  if perturbation == "split":
    if splits < 1:
      raise UsageError("perturbation='split' needs batch_splits=M (the number of groups of"
                       " the global batch, each perturbed with its own gradient).")
    if config.batch_size % splits:
      raise UsageError(f"batch_size={config.batch_size} is not divisible by"
                       f" batch_splits={splits}: the {splits} groups must have equal sizes.")
  elif splits:
    raise UsageError(f"batch_splits={splits} applies to perturbation='split' only (this run"
                     f" has perturbation={perturbation!r}); set --config.perturbation=split.")


def check_processes(config, num_processes: int | None) -> None:
  """Checks that the global batch divides among the processes (each reads its share)."""
  if num_processes and num_processes > 1 and config.batch_size % num_processes:
    raise UsageError(f"batch_size={config.batch_size} (the global batch) is not divisible by"
                     f" the {num_processes} processes: each process reads batch_size /"
                     " processes examples per step.")


def check_data_layout(config, num_devices: int, num_processes: int = 1) -> int | None:
  """Checks that the global batch divides as the run needs; returns its ``batch_splits``.

  The global batch ``B`` is split across ``num_processes`` (each reads ``B /
  P`` examples) and, data parallel, across ``num_devices`` (``B / n`` per
  device). ``config.perturbation`` then gives the SAM family's
  ``batch_splits`` (``m = B / batch_splits`` examples per perturbation):
  ``'device'``: ``n`` (None on one device); ``'global'``: None; ``'split'``:
  ``config.batch_splits`` (None for 1). ``config`` has passed
  :func:`experiments.config_checks.validate_config` (:func:`check_perturbation`
  among its checks).

  Raises:
    UsageError: naming the numbers, when one does not divide the other.
  """
  check_processes(config, num_processes)
  batch = config.batch_size
  if num_processes > 1 and not config.data_parallel:
    raise UsageError(f"data_parallel=False trains on one device, but this run has"
                     f" {num_processes} processes; set --config.data_parallel=True.")
  devices = num_devices if config.data_parallel else 1
  if devices > 1 and batch % devices:
    raise UsageError(f"batch_size={batch} is not divisible by the {devices} devices"
                     f"{f' of the {num_processes} processes' if num_processes > 1 else ''};"
                     " change it" + (" or set --config.data_parallel=False."
                                     if num_processes == 1 else "."))
  accum = config.grad_accum_steps
  if accum > 1 and (batch // devices) % accum:
    raise UsageError(f"grad_accum_steps={accum} does not divide the per-device batch"
                     f" {batch // devices} (batch_size={batch} over {devices} device(s)):"
                     " the micro-batches must have equal sizes.")
  if accum > 1 and config.perturbation != "global" and (
      config.perturbation == "split" or devices > 1):
    raise UsageError(f"grad_accum_steps={accum} takes one ascent for the whole batch"
                     f" (global-batch SAM), but perturbation={config.perturbation!r} asks for"
                     " one per device or per split; set --config.perturbation=global.")
  if config.perturbation == "device":
    return devices if devices > 1 else None
  if config.perturbation == "split":
    return config.batch_splits if config.batch_splits > 1 else None
  return None


class Placement:
  """Where the state and the batches live (see the module docstring).

  Built from a config that has passed
  :func:`experiments.config_checks.validate_config`; the layout's numbers
  against the devices are checked here (:func:`check_data_layout`).

  Evaluation runs per process: a local copy of the weights (:meth:`local`)
  on this process's devices, the process's share of the split sharded across
  them, the rows of every process gathered afterwards.
  """

  def __init__(self, config, pipeline):
    self.batch_size = pipeline.batch_size
    self.batch_splits = check_data_layout(config, jax.device_count(), jax.process_count())
    self.perturbation = config.perturbation
    self.shard_state = config.shard_state
    self.mesh = None
    if config.data_parallel and jax.device_count() > 1:
      self.mesh = distributed.data_mesh()
      self.replicated = distributed.replicated(self.mesh)
      self.sharded = distributed.batch_sharded(self.mesh)
      local_mesh = distributed.data_mesh(jax.local_devices())
      self.local_replicated = distributed.replicated(local_mesh)
      self.local_sharded = distributed.batch_sharded(local_mesh)

  @property
  def devices(self) -> int:
    """The devices the state and the batch are spread over (1 without a mesh)."""
    return 1 if self.mesh is None else self.mesh.size

  @property
  def shards_bank(self) -> bool:
    """Whether SAF's bank is split along its example axis."""
    return self.mesh is not None and self.shard_state != "none"

  def bank_examples(self, num_examples: int) -> int:
    """The rows of SAF's bank for ``num_examples`` training examples.

    ``num_examples`` rounded up to a multiple of the device count when the
    bank is sharded (every device holds as many rows), else ``num_examples``.
    The extra rows are never read nor written by the input pipeline, whose
    indices are ``< num_examples``.
    """
    if not self.shards_bank:
      return num_examples
    return -(-num_examples // self.devices) * self.devices

  def state_shardings(self, state):
    """A ``NamedSharding`` for every leaf of ``state``, in its structure (None without a mesh).

    ``state`` may be concrete or abstract (``jax.ShapeDtypeStruct`` leaves,
    e.g. from ``jax.eval_shape``); any pytree (a ``TrainState``, a key).
    ``config.shard_state`` decides (module docstring): replicated leaves,
    SAF banks (the ``bank`` of every ``sam_optax.SAFState``) split along
    their example axis, and with ``'fsdp'`` the other leaves along their
    largest divisible axis.

    Raises:
      UsageError: a SAF bank whose example count the device count does not
        divide (build SAF with :meth:`bank_examples` rows, as the trainer does).
    """
    if self.mesh is None:
      return None
    devices, fsdp = self.devices, self.shard_state == "fsdp"

    def leaf(x):
      axis = None if not fsdp or _is_key(x) else fsdp_axis(tuple(np.shape(x)), devices)
      if axis is None:
        return self.replicated
      return NamedSharding(self.mesh, PartitionSpec(*[None] * axis, self.axis_name))

    def bank(x):
      rows = x.shape[1]
      if rows % devices:
        raise UsageError(f"shard_state={self.shard_state!r}: SAF's bank has {rows} example rows"
                         f" (num_train_examples), not divisible by the {devices} devices; build"
                         " it with Placement.bank_examples(num_examples) rows (as the trainer"
                         " does) or set --config.shard_state=none.")
      return NamedSharding(self.mesh, PartitionSpec(None, self.axis_name))

    def node(x):
      if isinstance(x, sam_optax.SAFState):
        return jax.tree.map(leaf, x)._replace(bank=bank(x.bank))
      return leaf(x)

    is_bank_state = (lambda x: isinstance(x, sam_optax.SAFState)) if self.shards_bank else None
    return jax.tree.map(node, state, is_leaf=is_bank_state)

  def put_state(self, state):
    """``state`` on the devices in :meth:`state_shardings` (unchanged on one device)."""
    if self.mesh is None:
      return state
    return distributed.place(state, self.state_shardings(state))

  def init_state(self, init, *args):
    """``init(*args)`` (e.g. ``TrainState.create``) computed in :meth:`state_shardings`.

    Under ``jax.jit`` with those output shardings, so that a sharded leaf (SAF's
    bank) is never whole on one device; every leaf a fresh buffer (an init may
    alias its arguments, e.g. an EMA started as the parameters, and the step
    donates the state). Without a mesh: ``init(*args)`` eagerly, copied.
    """
    if self.mesh is None:
      return jax.tree.map(jnp.copy, init(*args))
    args = distributed.replicate(args, self.replicated)
    shardings = self.state_shardings(jax.eval_shape(init, *args))
    return jax.tree.map(jnp.copy, jax.jit(init, out_shardings=shardings)(*args))

  def put_batch(self, batch):
    """This process's rows of a global batch, as one global array per key."""
    if self.mesh is None:
      return jax.device_put(batch)
    return {k: jax.make_array_from_process_local_data(
        self.sharded, v, (self.batch_size,) + np.shape(v)[1:]) for k, v in batch.items()}

  axis_name = distributed.DATA_AXIS

  def per_device(self, method) -> bool:
    """Whether ``method``'s step runs per device (``shard_map``): data parallel,
    ``perturbation='device'`` and a method that perturbs."""
    return self.mesh is not None and self.perturbation == "device" and method.perturbs

  def jit_step(self, train_step, per_device: bool = False, state_shardings=None):
    """The jitted step (it donates the state); data parallel, the state it returns
    is in ``state_shardings`` (:meth:`state_shardings`; default: replicated), its
    metrics replicated.

    ``per_device``: ``train_step`` is the step of one device's shard, run in
    ``shard_map`` over the data axis (state and key replicated, the batch split).
    """
    if self.mesh is None:
      return jax.jit(train_step, donate_argnums=0)
    if per_device:
      replicated, split = PartitionSpec(), PartitionSpec(self.axis_name)
      # check_vma=False: the gradient of the replicated parameters stays the
      # device's own (with the check, JAX's autodiff would sum it over the axis).
      train_step = jax.shard_map(train_step, mesh=self.mesh,
                                 in_specs=(replicated, split, replicated),
                                 out_specs=(replicated, replicated), check_vma=False)
    out_shardings = (self.replicated if state_shardings is None else state_shardings,
                     self.replicated)
    return jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings)

  def local(self, tree):
    """This process's copy of the weights, on its own devices (for evaluation).

    Sharded leaves (``shard_state='fsdp'``) are gathered first.
    """
    if self.mesh is None:
      return tree
    if any(isinstance(x, jax.Array) and not x.sharding.is_fully_replicated
           for x in jax.tree.leaves(tree)):
      tree = jax.jit(lambda t: t, out_shardings=self.replicated)(tree)
    return distributed.local_copy(tree, self.local_replicated)

  def wrap_predict(self, predict):
    """``predict`` with ``x`` padded and sharded across this process's devices."""
    if self.mesh is None:
      return predict
    devices = jax.local_device_count()

    def sharded_predict(params, batch_stats, x):
      n = len(x)
      padding = -n % devices
      if padding:
        x = np.concatenate([x, np.zeros((padding,) + x.shape[1:], x.dtype)])
      return predict(params, batch_stats, jax.device_put(x, self.local_sharded))[:n]

    return sharded_predict

  def describe(self, method) -> dict[str, Any] | None:
    """The m-sharpness of this run, for ``results.json`` (None without a perturbation)."""
    if not method.perturbs:
      return None
    groups = self.batch_splits or 1
    return {"perturbation": self.perturbation, "batch_splits": groups,
            "step": "shard_map" if self.per_device(method) else "jit",
            "examples_per_perturbation": self.batch_size // groups,
            "devices": jax.device_count() if self.mesh is not None else 1,
            "processes": jax.process_count()}
