"""Checkpoints of a run and its output folder.

A checkpoint (orbax) holds the training state -- parameters, BatchNorm
statistics, optimizer state (SAM counters, SAF's logit bank, MESA's EMA
weights), the step -- and the loop's state (:class:`LoopState`: learning
curves, step times, the current epoch's running sums) with the run's config,
each saved as one unit. The data position follows from the step (see
:mod:`experiments.input_pipeline`), so a resumed run continues bit-exactly.
Arrays sharded over the devices (``config.shard_state``: SAF's bank split
along its example axis) are saved and restored shard by shard, into the
same shardings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from experiments.errors import UsageError


def _new_history() -> dict[str, list]:
  return {"epoch": [], "train_loss": [], "train_accuracy": [], "test_accuracy": [],
          "test_nll": [], "test_ece": []}


def _new_epoch() -> dict[str, Any]:
  return {"losses": [], "correct": 0, "seen": 0}


@dataclasses.dataclass
class LoopState:
  """What the training loop keeps besides the training state, saved with it.

  Attributes:
    history: the learning curves, one entry per evaluated epoch.
    step_times: the mean step time of each epoch (after its first step).
    epoch: this epoch's per-step training losses, correct predictions and
      examples so far, so that a run resumed mid-epoch reports the same
      epoch means as one not interrupted.
  """

  history: dict[str, list] = dataclasses.field(default_factory=_new_history)
  step_times: list[float] = dataclasses.field(default_factory=list)
  epoch: dict[str, Any] = dataclasses.field(default_factory=_new_epoch)

  def new_epoch(self) -> None:
    self.epoch = _new_epoch()


def is_remote(path: str) -> bool:
  """A URL such as ``gs://bucket/run`` (opened with etils.epath), not a local path."""
  return "://" in str(path)


def absolute(path: str) -> str:
  return str(path) if is_remote(path) else os.path.abspath(path)


def _tree(state) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


class Checkpoints:
  """Orbax checkpoints of ``(TrainState, LoopState, config)``."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    self.ocp = ocp
    # Every process of a multi-process run calls save and restore (orbax
    # coordinates them; process 0 writes the metadata): the folder must be
    # shared by every host, e.g. a gs:// bucket on a TPU pod.
    self.manager = ocp.CheckpointManager(
        absolute(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, loop: LoopState, config: Mapping[str, Any]) -> None:
    step = int(state.step)
    if self.manager.latest_step() == step:
      return
    meta = {"loop": dataclasses.asdict(loop), "config": dict(config)}
    self.manager.save(step, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardSave(_tree(state)), meta=self.ocp.args.JsonSave(meta)))

  def restore_config(self) -> dict[str, Any]:
    """The config the latest checkpoint was written with."""
    restored = self.manager.restore(self.manager.latest_step(), args=self.ocp.args.Composite(
        meta=self.ocp.args.JsonRestore()))
    return restored["meta"]["config"]

  def restore(self, state, shardings=None):
    """``(state, loop)`` of the latest checkpoint.

    ``state`` gives the structure, shapes and dtypes, and the shardings each
    array is restored into: those of ``state``'s arrays, or ``shardings`` (a
    tree of its structure, :meth:`experiments.placement.Placement.state_shardings`)
    if given. A sharded leaf (SAF's bank) is read shard by shard, never whole.

    Raises:
      UsageError: naming the first array whose saved shape differs from this
        run's (e.g. SAF's bank, padded for another device count).
    """
    target = jax.tree.map(self.ocp.utils.to_shape_dtype_struct, _tree(state))
    if shardings is not None:
      target = jax.tree.map(
          lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
          if isinstance(x, jax.ShapeDtypeStruct) else x, target, _tree(shardings))
    step = self.manager.latest_step()
    self._check_shapes(step, target)
    restored = self.manager.restore(step, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardRestore(target), meta=self.ocp.args.JsonRestore()))
    tree = restored["state"]
    state = state.replace(step=tree["step"], params=tree["params"],
                          batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])
    return state, LoopState(**restored["meta"]["loop"])

  def _check_shapes(self, step: int, target) -> None:
    """A clear error when the checkpoint's arrays have other shapes than ``target``'s."""
    saved = _shapes(getattr(self.manager.item_metadata(step)["state"], "tree", {}))
    for path, shape in _shapes(target).items():
      if path in saved and saved[path] != shape:
        raise UsageError(
            f"--resume: the checkpoint's {'.'.join(path)} has shape {saved[path]}, this"
            f" run's {shape}. SAF's bank has its example rows padded to a multiple of the"
            " device count (config.shard_state): resume on a device count that gives the"
            " same rows.")

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{path: shape}`` of the arrays of ``tree`` (orbax metadata or abstract arrays);
  a path names dict keys, sequence indices and attributes alike, as orbax saves them."""

  def name(key) -> str:
    for attribute in ("key", "idx", "name"):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)

  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {tuple(name(k) for k in path): tuple(x.shape) for path, x in leaves
          if hasattr(x, "shape")}


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = list(value) if isinstance(value, tuple) else value
  return out


# Fields that may change on resume: they do not change the trajectory.
RESUMABLE = frozenset({"max_steps", "checkpoint_every_steps", "data_dir", "methods", "seeds",
                       "eval_batch_size", "hessian_iters", "hessian_examples"})


def changed_fields(saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
  """``name: saved -> now`` for every field of ``config`` that differs from ``saved``."""
  before, now = _flat(saved), _flat(json.loads(json.dumps(dict(config), default=_to_builtin)))
  return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}"
          for key in sorted(set(before) | set(now))
          if key.split(".")[0] not in RESUMABLE and before.get(key) != now.get(key)]


def write_json(path: str, payload: Any) -> None:
  """Writes ``payload`` atomically (a temporary file renamed into place)."""
  text = json.dumps(payload, indent=2, default=_to_builtin)
  if is_remote(path):
    from etils import epath  # pylint: disable=import-outside-toplevel

    epath.Path(path).write_text(text)
    return
  temporary = f"{path}.{os.getpid()}.tmp"
  with open(temporary, "w", encoding="utf-8") as stream:
    stream.write(text)
  os.replace(temporary, path)


def _to_builtin(value):
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  raise TypeError(f"not serializable: {type(value).__name__}")


def check_output_dir(path: str) -> str:
  """Creates ``path`` if needed and checks that it is a writable folder.

  A URL (``gs://bucket/run``) goes through ``etils.epath``. Every process of
  a multi-process run may check the same shared folder at once: each writes
  its own probe file.
  """
  path = absolute(path)
  probe_name = f".write-test-{socket.gethostname()}-{os.getpid()}"
  try:
    if is_remote(path):
      from etils import epath  # pylint: disable=import-outside-toplevel

      folder = epath.Path(path)
      folder.mkdir(parents=True, exist_ok=True)
      (folder / probe_name).write_text("ok")
      (folder / probe_name).unlink()
    else:
      os.makedirs(path, exist_ok=True)
      probe = os.path.join(path, probe_name)
      with open(probe, "w", encoding="utf-8") as stream:
        stream.write("ok")
      os.remove(probe)
  except OSError as error:
    raise UsageError(f"cannot write to the output folder {path!r}: {error.strerror or error}."
                     " Choose another --workdir.") from None
  return path
