"""Training and evaluation of one run: ``train_and_evaluate(config, workdir)`` and the CLI.

One run trains ``config.model`` on ``config.dataset`` with ``config.method``
chained before the base optimizer (SGD with momentum or AdamW)::

  tx = optax.chain(<method transform>, [clip], <weight decay>, <base optimizer>)

and evaluates what the papers report: top-1 accuracy, NLL, ECE (15 bins),
adaptive ECE, the reliability diagram, the top Hessian eigenvalue of the
training loss, and the time per step. Checkpoints (orbax) hold the whole
training state -- parameters, BatchNorm statistics, optimizer state (SAM
counters, SAF's logit bank, MESA's EMA weights), the step -- plus the history;
the data position follows from the step (see :mod:`experiments.input_pipeline`),
so ``--resume`` continues bit-exactly.

With several devices the step is one ``jax.jit`` over a ``('data',)`` mesh
(:class:`Placement`), on one process or several
(:mod:`experiments.distributed`). ``config.perturbation`` says where the SAM
family's perturbation is computed (m-sharpness): ``'device'`` (default, as in
the SAM paper: every device's shard of the batch gets its own perturbation,
``batch_splits`` = the device count), ``'global'`` (one perturbation from the
global batch's gradient: the single-device step on the whole batch) or
``'split'`` (``config.batch_splits`` groups of the global batch).

The training step is the library's canonical one, with BatchNorm as
documented: ``loss_fn(params, batch_stats, batch, rng) -> (loss,
(new_batch_stats, logits))``, ``has_aux=True``; the user's pass updates the
statistics, the method's re-evaluations at perturbed weights do not.

Run ``python -m experiments.train --help`` for the flags.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

import sam_optax
from experiments import distributed, input_pipeline, methods, metrics, models

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")


class UsageError(Exception):
  """A bad command line, config or output folder: reported without a traceback."""


# --------------------------------------------------------------------------
# Training state and steps.
# --------------------------------------------------------------------------


class TrainState(train_state.TrainState):
  """Flax's TrainState with BatchNorm statistics and extra args for ``tx.update``."""

  batch_stats: Any = None

  def apply_gradients(self, *, grads, update_args=None, **kwargs):
    """``tx.update(grads, opt_state, params, **update_args)`` then apply the updates."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        **(update_args or {}))
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_loss_fns(model, label_smoothing: float = 0.0):
  """The training loss and CSAM's logits function, both in training mode.

  Returns:
    ``(loss_fn, logits_fn)``: ``loss_fn(params, batch_stats, batch, rng) ->
    (loss, (new_batch_stats, logits))`` and ``logits_fn(...) -> ((logits,
    labels), new_batch_stats)``.
  """

  def logits_fn(params, batch_stats, batch, rng):
    logits, updated = model.apply(_variables(params, batch_stats), batch["x"], train=True,
                                  mutable=["batch_stats"], rngs={"dropout": rng})
    return (logits, batch["y"]), updated.get("batch_stats", batch_stats)

  def loss_fn(params, batch_stats, batch, rng):
    (logits, labels), new_batch_stats = logits_fn(params, batch_stats, batch, rng)
    loss = cross_entropy(logits, labels, label_smoothing)
    return loss, (new_batch_stats, logits)

  return loss_fn, logits_fn


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Mean cross-entropy with integer labels and optional label smoothing."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) \
      if label_smoothing else jax.nn.one_hot(labels, num_classes)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def make_train_step(loss_fn, method: methods.Method, predict):
  """``train_step(state, batch, rng) -> (state, metrics)`` for ``method``.

  One forward and backward pass of the user's loss, then ``tx.update`` with
  the extra arguments the method needs (the SAM family re-evaluates the loss
  inside the transform). For SAF and MESA the trajectory loss of the target
  read before the pass is added to the loss of that same pass.

  Args:
    loss_fn: ``loss_fn(params, batch_stats, batch, rng) -> (loss,
      (batch_stats, logits))``.
    method: the registry entry.
    predict: ``predict(params, batch_stats, x) -> logits`` in evaluation mode
      (MESA's EMA forward).
  """

  def objective(params, batch_stats, batch, rng, target):
    loss, (new_batch_stats, logits) = loss_fn(params, batch_stats, batch, rng)
    total = loss + sam_optax.losses.trajectory_loss(logits, target)
    return total, (new_batch_stats, logits, loss)

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    loss_args = {"batch_stats": state.batch_stats, "batch": batch, "rng": rng}
    if method.target is None:
      (loss, (new_batch_stats, logits)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params, **loss_args)
    else:
      target = method.target(state.opt_state, state.params, state.batch_stats, batch, predict)
      (_, (new_batch_stats, logits, loss)), grads = jax.value_and_grad(
          objective, has_aux=True)(state.params, target=target, **loss_args)
    state = state.apply_gradients(grads=grads,
                                  update_args=method.update_args(loss_args, logits),
                                  batch_stats=new_batch_stats)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["y"])
    return state, {"loss": loss, "correct": correct}

  return train_step


def make_predict(model):
  """``predict(params, batch_stats, x) -> logits`` in evaluation mode, float32."""

  def predict(params, batch_stats, x):
    return model.apply(_variables(params, batch_stats), x, train=False).astype(jnp.float32)

  return predict


# --------------------------------------------------------------------------
# Optimizer.
# --------------------------------------------------------------------------


def make_lr_schedule(config, steps_per_epoch: int) -> tuple[optax.Schedule, float, float]:
  """The learning-rate schedule with its peak and floor."""
  total = max(1, config.num_epochs * steps_per_epoch)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  lr = float(config.learning_rate)
  if config.lr_schedule == "cosine":
    if warmup > 0:
      schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))
    else:
      schedule = optax.cosine_decay_schedule(lr, total)
    return schedule, lr, 0.0
  if config.lr_schedule == "constant":
    return optax.constant_schedule(lr), lr, lr
  raise UsageError(f"unknown lr_schedule {config.lr_schedule!r}; choose 'cosine' or 'constant'.")


def _kernels(params):
  """Weight decay mask: every parameter with more than one dimension."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(config, method: methods.Method, context: methods.Context):
  """``optax.chain(method, [clip], weight decay, base)`` for this run."""
  hparams = methods.hparams_for(method.name, config.hparams.get(method.name, {}))
  parts = []
  transform = method.build(context, hparams)
  if transform is not None:
    parts.append(transform)
  if config.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if config.weight_decay:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=_kernels))
    parts.append(optax.sgd(context.lr_schedule, momentum=config.momentum or None,
                           nesterov=config.nesterov))
  elif config.optimizer == "adamw":
    parts.append(optax.adamw(context.lr_schedule, b1=config.get("b1", 0.9),
                             b2=config.get("b2", 0.999), weight_decay=config.weight_decay,
                             mask=_kernels))
  else:
    raise UsageError(f"unknown optimizer {config.optimizer!r}; choose 'sgd' or 'adamw'.")
  return optax.chain(*parts), hparams


# --------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------


def _checkpointable(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


class Checkpoints:
  """Orbax checkpoints of the training state and the run's history."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    self.ocp = ocp
    # Every process of a multi-process run calls save and restore (orbax
    # coordinates them; process 0 writes the metadata): the folder must be
    # shared by every host, e.g. a gs:// bucket on a TPU pod.
    self.manager = ocp.CheckpointManager(
        _absolute(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, meta: Mapping[str, Any]) -> None:
    step = int(state.step)
    if self.manager.latest_step() == step:
      return
    self.manager.save(step, args=self.ocp.args.Composite(
        state=self.ocp.args.StandardSave(_checkpointable(state)),
        meta=self.ocp.args.JsonSave(dict(meta))))

  def restore(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    target = jax.tree.map(self.ocp.utils.to_shape_dtype_struct, _checkpointable(state))
    restored = self.manager.restore(self.manager.latest_step(), args=self.ocp.args.Composite(
        state=self.ocp.args.StandardRestore(target), meta=self.ocp.args.JsonRestore()))
    tree = restored["state"]
    state = state.replace(step=tree["step"], params=tree["params"],
                          batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])
    return state, restored["meta"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# --------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------


def collect_logits(predict, weights, batches, batch_size: int, across_processes: bool = True):
  """Logits and labels over ``batches``; the last batch is padded to one shape.

  With several processes each reads its own part of the split (``batches``);
  with ``across_processes`` the parts of every process are gathered
  (:func:`experiments.distributed.gather_rows`), so every process returns the
  whole split. The rows are in the order of the examples' ``index`` (the
  split's order).

  Args:
    predict: the jitted ``predict(params, batch_stats, x)``.
    weights: ``(params, batch_stats)`` to evaluate, on this process's devices.
    batches: an iterable of batches with ``x``, ``y`` and ``index``.
    batch_size: the shape every batch is padded to (one compilation).
    across_processes: gather the other processes' rows (False: ``batches``
      are the same on every process, e.g. the Hessian's sample).
  """
  all_logits, all_labels, all_index = [], [], []
  for batch in batches:
    x, n = batch["x"], len(batch["y"])
    if n < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    logits = predict(*weights, x)
    all_logits.append(np.asarray(logits)[:n])
    all_labels.append(np.asarray(batch["y"]))
    all_index.append(np.asarray(batch["index"]))
  rows = {"logits": np.concatenate(all_logits), "labels": np.concatenate(all_labels),
          "index": np.concatenate(all_index)}
  if across_processes:
    rows = distributed.gather_rows(rows)
  order = np.argsort(rows["index"], kind="stable")
  return rows["logits"][order], rows["labels"][order]


def classification_metrics(logits, labels, num_bins: int = 15) -> dict[str, float]:
  """Accuracy, NLL, ECE and adaptive ECE (``num_bins`` bins)."""
  return {
      "accuracy": metrics.accuracy(logits, labels),
      "nll": metrics.nll(logits, labels),
      "ece": metrics.expected_calibration_error(logits, labels, num_bins=num_bins),
      "adaptive_ece": metrics.adaptive_calibration_error(logits, labels, num_bins=num_bins),
  }


def evaluated_weights(method: methods.Method, state: TrainState):
  """``(params, batch_stats)`` the method is evaluated with (MESA: its EMA)."""
  if method.eval_weights is None:
    return state.params, state.batch_stats
  return method.eval_weights(state.opt_state, state.params, state.batch_stats)


def hessian_eigenvalue(model, weights, sample, num_iters: int, seed: int) -> float:
  """Top eigenvalue of the Hessian of the mean training loss on ``sample``.

  The loss is the cross-entropy on the training labels (noisy ones included),
  with the model in evaluation mode (running BatchNorm statistics).
  """
  x, y = jnp.asarray(sample["x"]), jnp.asarray(sample["y"])
  params, batch_stats = weights

  def loss_fn(params):
    logits = model.apply(_variables(params, batch_stats), x, train=False)
    return cross_entropy(logits, y)

  return metrics.top_hessian_eigenvalue(loss_fn, params, num_iters=num_iters,
                                        key=jax.random.key(seed))


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


def _progress(total: int, initial: int, description: str, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, initial=initial, desc=description, unit="step",
              disable=not enabled, leave=False, dynamic_ncols=True)


def _is_remote(path: str) -> bool:
  """A URL such as ``gs://bucket/run`` (opened with etils.epath), not a local path."""
  return "://" in str(path)


def _absolute(path: str) -> str:
  return str(path) if _is_remote(path) else os.path.abspath(path)


def _write_json(path: str, payload: Any) -> None:
  """Writes ``payload`` atomically (a temporary file renamed into place)."""
  text = json.dumps(payload, indent=2, default=_to_builtin)
  if _is_remote(path):
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
  path = _absolute(path)
  probe_name = f".write-test-{socket.gethostname()}-{os.getpid()}"
  try:
    if _is_remote(path):
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
                     " Choose another --output-dir.") from None
  return path


PERTURBATIONS = ("device", "global", "split")


def validate_config(config, num_processes: int | None = None) -> None:
  """Checks the names and numbers of ``config`` before anything is built or written.

  Args:
    config: the run's configuration.
    num_processes: the number of processes, if known (the global batch must
      divide among them).
  """
  methods.get_method(config.method)
  if config.dataset not in input_pipeline.DATASETS:
    raise UsageError(f"unknown dataset {config.dataset!r}; choose one of"
                     f" {', '.join(input_pipeline.DATASETS)}.")
  if config.model not in models.MODEL_NAMES:
    raise UsageError(f"unknown model {config.model!r}; choose one of"
                     f" {', '.join(models.MODEL_NAMES)}.")
  for name in ("num_epochs", "batch_size"):
    if not isinstance(config[name], int) or config[name] < 1:
      raise UsageError(f"{name} must be a positive integer, got {config[name]!r}.")
  if not 0.0 <= config.label_noise <= 1.0:
    raise UsageError(f"label_noise must be in [0, 1], got {config.label_noise!r}.")
  if not (isinstance(config.learning_rate, (int, float)) and config.learning_rate > 0):
    raise UsageError(f"learning_rate must be > 0, got {config.learning_rate!r}.")
  methods.hparams_for(config.method, config.hparams.get(config.method, {}))
  perturbation = config.get("perturbation", "device")
  splits = config.get("batch_splits", 0)
  if perturbation not in PERTURBATIONS:
    raise UsageError(f"unknown perturbation {perturbation!r}; choose one of"
                     f" {', '.join(PERTURBATIONS)} (device: one per device, as in the SAM"
                     " paper; global: one for the global batch; split: --batch-splits M groups).")
  if isinstance(splits, bool) or not isinstance(splits, int) or splits < 0:
    raise UsageError(f"batch_splits must be a positive integer, got {splits!r}.")
  if perturbation == "split":
    if splits < 1:
      raise UsageError("--perturbation split needs --batch-splits M (the number of groups of"
                       " the global batch, each perturbed with its own gradient).")
    if config.batch_size % splits:
      raise UsageError(f"batch_size={config.batch_size} is not divisible by"
                       f" batch_splits={splits}: the {splits} groups must have equal sizes.")
  elif splits:
    raise UsageError(f"batch_splits={splits} applies to --perturbation split only (this run"
                     f" has perturbation={perturbation!r}); add --perturbation split.")
  if num_processes is not None and config.batch_size % num_processes:
    raise UsageError(f"batch_size={config.batch_size} (the global batch) is not divisible by"
                     f" the {num_processes} processes: each process reads batch_size /"
                     " processes examples per step.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       resume: bool = False, progress: bool = True,
                       pipeline: Any = None) -> dict[str, Any]:
  """Trains and evaluates one run; writes ``workdir/results.json`` and checkpoints.

  With several processes (:mod:`experiments.distributed`; initialized
  before), every process calls this with the same arguments: each reads its
  own share of the data, all of them save the checkpoints (``workdir`` must be
  a folder every host sees, e.g. ``gs://...``), and process 0 writes
  ``results.json`` and shows the progress bar.

  Args:
    config: the run's configuration (see ``experiments/configs/default.py``).
    workdir: the run's folder: ``checkpoints/`` and ``results.json``.
    resume: continue from the latest checkpoint in ``workdir`` (if there is
      none, start from scratch). Without it, a ``workdir`` that already holds
      checkpoints is refused.
    progress: show a tqdm progress bar (on process 0).
    pipeline: the input pipeline, if already built from an equal data config
      (:func:`experiments.input_pipeline.get_pipeline`); built here if None.

  Returns:
    The results: final test metrics, reliability diagram, Hessian eigenvalue,
    time per step, and the per-epoch history (learning curves) -- what
    ``results.json`` holds -- plus the final :class:`TrainState` under
    ``'state'`` and its folder under ``'workdir'``. A run stopped by
    ``config.max_steps`` returns ``finished: False`` with its step, state and
    history, and writes no results.
  """
  validate_config(config, jax.process_count())
  method = methods.get_method(config.method)
  if pipeline is None:
    pipeline = input_pipeline.get_pipeline(config, jax.process_index(), jax.process_count())
  workdir = check_output_dir(workdir)
  placement = Placement(config, pipeline)  # checks the data layout before any step
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  checkpoints = Checkpoints(checkpoint_dir)
  try:
    results = _train(config, workdir, method, pipeline, placement, checkpoints, resume,
                     progress and distributed.is_main_process())
  finally:
    checkpoints.close()
  results["workdir"] = workdir
  return results


@dataclasses.dataclass
class Run:
  """Everything one run is built from (see :func:`create_run`).

  Attributes:
    method: the registry entry.
    model: the linen model.
    state: the initial :class:`TrainState` (placed on the devices).
    hparams: the method's hyperparameters.
    train_step: the jitted ``train_step(state, batch, rng) -> (state, metrics)``
      (it donates ``state``).
    predict: ``predict(params, batch_stats, x) -> logits``, jitted, on this
      process's devices (weights from :meth:`Placement.local`).
    placement: where states and batches go (:class:`Placement`).
    rng: the key of the training randomness (dropout), folded with the step.
    steps_per_epoch, total_steps: the run's length.
  """

  method: methods.Method
  model: Any
  state: TrainState
  hparams: dict[str, Any]
  train_step: Any
  predict: Any
  placement: Any
  rng: jax.Array
  steps_per_epoch: int
  total_steps: int


def make_model(config, pipeline):
  """The linen model of ``config`` for ``pipeline``'s classes."""
  model_kwargs = dict(config.get("model_kwargs", {}) or {})
  if config.get("half_precision"):
    model_kwargs.setdefault("dtype", jnp.bfloat16)
  return models.get_model(config.model, pipeline.num_classes, **model_kwargs)


def make_context(config, pipeline, model, batch_stats, *, batch_splits: int | None = None,
                 axis_name: str | None = None) -> methods.Context:
  """What the method's transform is built from (:class:`experiments.methods.Context`).

  Args:
    config, pipeline, model: the run's.
    batch_stats: the initial BatchNorm statistics.
    batch_splits: the perturbing methods' groups per step (m-sharpness; see
      :meth:`Placement.batch_splits`).
    axis_name: the data axis of a ``pmap`` / ``shard_map`` step (the trainer's
      ``jax.jit`` step has none).
  """
  steps_per_epoch = pipeline.steps_per_epoch
  lr_schedule, lr_max, lr_min = make_lr_schedule(config, steps_per_epoch)
  loss_fn, logits_fn = make_loss_fns(model, config.label_smoothing)
  return methods.Context(
      loss_fn=loss_fn, logits_fn=logits_fn, lr_schedule=lr_schedule, lr_max=lr_max,
      lr_min=lr_min, steps_per_epoch=steps_per_epoch,
      total_steps=config.num_epochs * steps_per_epoch, num_epochs=config.num_epochs,
      num_examples=pipeline.num_train_examples, num_classes=pipeline.num_classes,
      model_state=batch_stats, batch_splits=batch_splits, axis_name=axis_name)


def create_run(config, pipeline, placement: Placement | None = None) -> Run:
  """Builds the model, the optimizer, the initial state and the jitted steps."""
  method = methods.get_method(config.method)
  placement = placement or Placement(config, pipeline)
  model = make_model(config, pipeline)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  variables = jax.jit(functools.partial(model.init, train=False))(
      init_rng, jnp.zeros((1,) + tuple(pipeline.input_shape), jnp.float32))
  batch_stats = variables.get("batch_stats", {})
  context = make_context(config, pipeline, model, batch_stats,
                         batch_splits=placement.batch_splits)
  tx, hparams = make_optimizer(config, method, context)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=batch_stats)
  # A fresh buffer for every leaf: a transform's init may alias the params
  # (e.g. an EMA started as a copy of them), and the step donates the state.
  state = jax.tree.map(jnp.copy, state.replace(step=jnp.asarray(0, jnp.int32)))
  return Run(
      method=method, model=model, state=placement.put_state(state), hparams=hparams,
      train_step=placement.jit_step(make_train_step(context.loss_fn, method,
                                                    make_predict(model))),
      predict=placement.wrap_predict(jax.jit(make_predict(model))),
      placement=placement, rng=placement.put_state(train_rng),
      steps_per_epoch=context.steps_per_epoch, total_steps=context.total_steps)


def _train(config, workdir, method, pipeline, placement, checkpoints, resume, progress):
  if checkpoints.latest_step() is not None and not resume:
    raise UsageError(f"{workdir} already holds checkpoints (step {checkpoints.latest_step()});"
                     " pass --resume to continue that run, or choose another --output-dir.")
  run = create_run(config, pipeline, placement)
  state, steps_per_epoch, total_steps = run.state, run.steps_per_epoch, run.total_steps
  history: dict[str, list] = {"epoch": [], "train_loss": [], "train_accuracy": [],
                              "test_accuracy": [], "test_nll": [], "test_ece": []}
  step_times: list[float] = []
  # This epoch's per-step training losses, correct predictions and examples,
  # on the host: a checkpoint saved mid-epoch keeps them, so a resumed run
  # reports the same epoch means as one not interrupted.
  epoch_stats = {"losses": [], "correct": 0, "seen": 0}
  if resume and checkpoints.latest_step() is not None:
    state, saved = checkpoints.restore(state)
    state = run.placement.put_state(state)
    _check_same_run(saved.get("config", {}), config)
    history, step_times = saved["history"], saved["step_times"]
    epoch_stats = saved["epoch_stats"]

  pending: list[dict[str, jax.Array]] = []

  def flush():
    for out in jax.device_get(pending):
      epoch_stats["losses"].append(float(out["loss"]))
      epoch_stats["correct"] += int(out["correct"])
    pending.clear()

  def meta():
    flush()
    return {"history": history, "step_times": step_times, "epoch_stats": epoch_stats,
            "config": config.to_dict(), "method": method.name}

  step = int(state.step)
  checkpoint_every = int(config.get("checkpoint_every_steps", 0) or 0)
  max_steps = config.get("max_steps") or None
  bar = _progress(total_steps, step, f"{method.name:>10}", progress)
  try:
    while step < total_steps and (max_steps is None or step < max_steps):
      epoch, start = divmod(step, steps_per_epoch)
      timed_from, timed_steps = None, 0
      for batch in input_pipeline.prefetch(
          map(run.placement.put_batch, pipeline.train_epoch(epoch, start)), size=2):
        state, out = run.train_step(state, batch, run.rng)
        pending.append(out)
        epoch_stats["seen"] += len(batch["y"])
        step += 1
        if timed_from is None:  # time the steps after the first (it may compile)
          jax.block_until_ready(out["loss"])
          timed_from = time.perf_counter()
        else:
          timed_steps += 1
        bar.update(1)
        if checkpoint_every and step % checkpoint_every == 0:
          checkpoints.save(state, meta())
        if max_steps is not None and step >= max_steps:
          break
      jax.block_until_ready(state.params)
      if timed_steps:
        step_times.append((time.perf_counter() - timed_from) / timed_steps)
      if step % steps_per_epoch == 0:
        flush()
        if _evaluate_now(config, epoch):
          _record_epoch(history, epoch, epoch_stats, run,
                        run.placement.local(evaluated_weights(method, state)), pipeline, config)
          bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}",
                          test_acc=f"{history['test_accuracy'][-1]:.3f}")
        epoch_stats = {"losses": [], "correct": 0, "seen": 0}
  except KeyboardInterrupt:
    checkpoints.save(state, meta())
    checkpoints.manager.wait_until_finished()
    raise UsageError(f"interrupted at step {step}; the checkpoint is in {workdir}: rerun with"
                     " --resume to continue.") from None
  finally:
    bar.close()
  checkpoints.save(state, meta())
  if step < total_steps:  # stopped at max_steps: no final evaluation
    return {"method": method.name, "step": step, "finished": False, "state": state,
            "history": history}
  return _final_results(config, workdir, run, state, pipeline, history, step_times)


def check_data_layout(config, num_devices: int, num_processes: int = 1) -> int | None:
  """Checks that the global batch divides as the run needs; returns its ``batch_splits``.

  The global batch ``B`` is split across ``num_processes`` (each reads ``B /
  P`` examples) and, data parallel, across ``num_devices`` (``B / n`` per
  device). ``config.perturbation`` then gives the SAM family's
  ``batch_splits`` (m-sharpness, ``m = B / batch_splits`` examples per
  perturbation):

  * ``'device'``: ``n`` (one perturbation per device, as pmap with the local
    gradient), None on one device;
  * ``'global'``: None (one perturbation from the global gradient);
  * ``'split'``: ``config.batch_splits`` (None for 1).

  Args:
    config: the run's configuration (``batch_size``, ``data_parallel``,
      ``perturbation``, ``batch_splits``).
    num_devices: the devices of the run (all processes together).
    num_processes: the processes.

  Raises:
    UsageError: naming the numbers, when one does not divide the other.
  """
  validate_config(config, num_processes)
  batch = config.batch_size
  data_parallel = config.get("data_parallel", True)
  if num_processes > 1 and not data_parallel:
    raise UsageError(f"data_parallel=False trains on one device, but this run has"
                     f" {num_processes} processes; remove --set data_parallel=False.")
  devices = num_devices if data_parallel else 1
  if devices > 1 and batch % devices:
    raise UsageError(f"batch_size={batch} is not divisible by the {devices} devices"
                     f"{f' of the {num_processes} processes' if num_processes > 1 else ''};"
                     " change it" + (" or --set data_parallel=False." if num_processes == 1
                                     else "."))
  perturbation = config.get("perturbation", "device")
  if perturbation == "device":
    return devices if devices > 1 else None
  if perturbation == "split":
    splits = config.get("batch_splits", 0)
    return splits if splits > 1 else None
  return None


class Placement:
  """Where the state and the batches live: one device, or data parallel.

  With ``config.data_parallel`` and more than one device, the step is a
  ``jax.jit`` over a 1-D mesh ``('data',)`` of every device of every process
  (:func:`experiments.distributed.data_mesh`): the state is replicated, each
  global batch is split along its first axis (each process gives its own
  rows, ``jax.make_array_from_process_local_data``), and XLA inserts the
  all-reduce. The SAM family's perturbation follows ``config.perturbation``
  (:func:`check_data_layout`): with the default ``'device'`` the transform
  gets ``batch_splits`` = the device count, which under this sharding is the
  perturbation of ``pmap`` with each device's local gradient (tested against
  a ``pmap`` step in ``tests/test_experiments_parallel.py``).

  Evaluation runs per process: a local copy of the weights (:meth:`local`)
  on this process's devices, the process's share of the split sharded across
  them, the rows of every process gathered afterwards.
  """

  def __init__(self, config, pipeline):
    self.batch_size = pipeline.batch_size
    self.batch_splits = check_data_layout(config, jax.device_count(), jax.process_count())
    self.perturbation = config.get("perturbation", "device")
    self.mesh = None
    if config.get("data_parallel", True) and jax.device_count() > 1:
      self.mesh = distributed.data_mesh()
      self.replicated = distributed.replicated(self.mesh)
      self.sharded = distributed.batch_sharded(self.mesh)
      local_mesh = distributed.data_mesh(jax.local_devices())
      self.local_replicated = distributed.replicated(local_mesh)
      self.local_sharded = distributed.batch_sharded(local_mesh)

  def put_state(self, state):
    """``state`` replicated on every device (unchanged on one device)."""
    return state if self.mesh is None else distributed.replicate(state, self.replicated)

  def put_batch(self, batch):
    """This process's rows of a global batch, as one global array per key."""
    if self.mesh is None:
      return jax.device_put(batch)
    return {k: jax.make_array_from_process_local_data(
        self.sharded, v, (self.batch_size,) + np.shape(v)[1:]) for k, v in batch.items()}

  def jit_step(self, train_step):
    """The jitted step; data parallel, its outputs stay replicated."""
    if self.mesh is None:
      return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0, out_shardings=self.replicated)

  def local(self, tree):
    """This process's copy of replicated weights, on its own devices (for evaluation)."""
    return tree if self.mesh is None else distributed.local_copy(tree, self.local_replicated)

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

  def describe(self, method: methods.Method) -> dict[str, Any] | None:
    """The m-sharpness of this run, for ``results.json`` (None without a perturbation)."""
    if not method.perturbs:
      return None
    groups = self.batch_splits or 1
    return {"perturbation": self.perturbation, "batch_splits": groups,
            "examples_per_perturbation": self.batch_size // groups,
            "devices": jax.device_count() if self.mesh is not None else 1,
            "processes": jax.process_count()}


def _evaluate_now(config, epoch: int) -> bool:
  every = max(1, int(config.get("eval_every_epochs", 1) or 1))
  return (epoch + 1) % every == 0 or epoch + 1 == config.num_epochs


def _record_epoch(history, epoch, epoch_stats, run, weights, pipeline, config):
  logits, labels = collect_logits(run.predict, weights, pipeline.eval_batches(),
                                  config.eval_batch_size)
  losses = epoch_stats["losses"]
  history["epoch"].append(epoch + 1)
  history["train_loss"].append(math.fsum(losses) / max(1, len(losses)))
  history["train_accuracy"].append(epoch_stats["correct"] / max(1, epoch_stats["seen"]))
  history["test_accuracy"].append(metrics.accuracy(logits, labels))
  history["test_nll"].append(metrics.nll(logits, labels))
  history["test_ece"].append(metrics.expected_calibration_error(logits, labels, num_bins=15))


def _check_same_run(saved: Mapping[str, Any], config) -> None:
  for key in ("method", "dataset", "model", "seed", "batch_size", "num_epochs",
              "learning_rate", "label_noise", "perturbation", "batch_splits"):
    if key in saved and key in config and saved[key] != config[key]:
      raise UsageError(f"--resume: the checkpoint was written with {key}={saved[key]!r}, but"
                       f" this run has {key}={config[key]!r}; use the same settings or"
                       " another --output-dir.")


def _final_results(config, workdir, run, state, pipeline, history, step_times):
  method, predict = run.method, run.predict
  weights = run.placement.local(evaluated_weights(method, state))
  logits, labels = collect_logits(predict, weights, pipeline.eval_batches(),
                                  config.eval_batch_size)
  test = classification_metrics(logits, labels)
  diagram = metrics.reliability_diagram(logits, labels, num_bins=15)
  sample = pipeline.train_sample(config.get("hessian_examples", 1000))
  iterations = config.get("hessian_iters", 20)
  eigenvalue = hessian_eigenvalue(run.model, weights, sample, iterations, config.seed) \
      if iterations > 0 else None
  train_logits, train_labels = collect_logits(predict, weights, [sample], len(sample["y"]),
                                              across_processes=False)
  splits = run.placement.batch_splits if method.perturbs else None
  results = {
      "method": method.name,
      "summary": method.summary,
      "hparams": run.hparams,
      "dataset": config.dataset,
      "model": config.model,
      "label_noise": config.label_noise,
      "epochs": config.num_epochs,
      "steps": int(state.step),
      "finished": True,
      "evaluated": "EMA weights" if method.eval_weights is not None else "trained weights",
      "test": test,
      "train_sample_accuracy": metrics.accuracy(train_logits, train_labels),
      "hessian_top_eigenvalue": eigenvalue,
      "time_per_step_s": float(np.median(step_times)) if step_times else None,
      # batch_splits recomputes each group's gradient: one more pass.
      "gradients_per_step": method.gradients_per_step(run.hparams) + (1 if splits else 0),
      "forwards_per_step": method.forwards,
      "m_sharpness": run.placement.describe(method),
      "history": history,
      "reliability_diagram": {k: np.asarray(v) for k, v in diagram.items()},
      "config": config.to_dict(),
  }
  if method.eval_weights is not None:
    live, _ = collect_logits(predict, run.placement.local((state.params, state.batch_stats)),
                             pipeline.eval_batches(), config.eval_batch_size)
    results["test_trained_weights"] = classification_metrics(live, labels)
  if distributed.is_main_process():
    _write_json(os.path.join(workdir, "results.json"), results)
  results["state"] = state
  return results


# --------------------------------------------------------------------------
# Configs and the command line.
# --------------------------------------------------------------------------


def load_config(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the Python file ``path``."""
  if not os.path.isfile(path):
    raise UsageError(f"config file {path!r} does not exist.")
  spec = importlib.util.spec_from_file_location("_experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as error:  # pylint: disable=broad-except
    raise UsageError(f"config file {path!r} failed to load: {error!r}") from None
  if not hasattr(module, "get_config"):
    raise UsageError(f"config file {path!r} has no get_config() function.")
  return module.get_config()


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """``config.a.b = value`` for ``key='a.b'``; a value string is parsed as a literal."""
  if isinstance(value, str):
    with contextlib.suppress(ValueError, SyntaxError):
      value = ast.literal_eval(value)
  *parents, last = key.split(".")
  node = config
  for part in parents:
    if part not in node:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  try:
    node[last] = value
  except (TypeError, KeyError, AttributeError) as error:
    raise UsageError(f"cannot set {key}={value!r}: {error}") from None


# (flag, config key, type, help): top-level run settings.
_RUN_FLAGS = [
    ("--method", "method", str, "method: " + ", ".join(methods.METHODS)),
    ("--dataset", "dataset", str, "data set: " + ", ".join(input_pipeline.DATASETS)),
    ("--data-dir", "data_dir", str, "TFDS data directory (prepared; nothing is downloaded)"),
    ("--model", "model", str, "model: " + ", ".join(models.MODEL_NAMES)),
    ("--epochs", "num_epochs", int, "training epochs"),
    ("--batch-size", "batch_size", int, "global training batch size"),
    ("--lr", "learning_rate", float, "peak learning rate of the base optimizer"),
    ("--lr-schedule", "lr_schedule", str, "cosine or constant"),
    ("--warmup-epochs", "warmup_epochs", float, "linear warm-up epochs"),
    ("--optimizer", "optimizer", str, "base optimizer: sgd (momentum) or adamw"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--weight-decay", "weight_decay", float, "weight decay on kernels, in the base optimizer"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing of the training loss"),
    ("--label-noise", "label_noise", float, "fraction of training labels flipped"),
    ("--seed", "seed", int, "seed of initialization, shuffling and augmentation"),
    ("--checkpoint-every", "checkpoint_every_steps", int,
     "save a checkpoint every N steps (0: only at the end)"),
    ("--perturbation", "perturbation", str,
     "where the SAM family perturbs (m-sharpness): device (default: one perturbation per"
     " device's shard, as in the SAM paper), global (one from the global batch's gradient)"
     " or split (--batch-splits M groups of the global batch)"),
    ("--batch-splits", "batch_splits", int,
     "with --perturbation split: M groups per step, each perturbed with its own gradient"
     " (m = batch_size / M)"),
]

# Method hyperparameters: (flag, name, type, help); applied to the chosen method.
_METHOD_FLAGS = [
    ("--rho", "rho", float, "neighbourhood radius ρ (SAM family; GSAM's ρ_max)"),
    ("--rho-min", "rho_min", float, "GSAM's ρ_min / BSAM's ρ_min (follows the lr schedule)"),
    ("--alpha", "alpha", float, "GSAM's α / LookSAM's α"),
    ("--k", "k", int, "LookSAM / interval SAM: the full SAM step every k steps"),
    ("--gamma", "gamma", float, "CSAM's γ"),
    ("--eta", "eta", float, "ASAM's η"),
    ("--normalize", "normalize", lambda s: s.lower() in ("1", "true", "yes"),
     "StableSAM: normalized inner ascent (true) or USAM (false)"),
    ("--lam", "lam", float, "SAF/MESA's λ, the weight of the trajectory loss"),
    ("--tau", "tau", float, "SAF/MESA's temperature τ"),
    ("--start-epoch", "start_epoch", int,
     "SAF/MESA's E_start (default: 30%% of the epochs)"),
    ("--past-epochs", "past_epochs", int, "SAF's Ẽ (the target: logits of Ẽ epochs ago)"),
    ("--ema-decay", "decay", float, "MESA's EMA decay per step"),
]


_EPILOG = """examples:
  python -m experiments.train                                  # SGD on noisy MNIST-1D
  python -m experiments.train --method sam --rho 0.5 --output-dir runs/sam
  python -m experiments.train --output-dir runs/sam --resume   # continue it
  python -m experiments.train --config experiments/configs/cifar10_wrn28_10.py \\
      --method csam --data-dir ~/tensorflow_datasets
  # two processes (run both; the first is the coordinator):
  python -m experiments.train --method sam --coordinator-address 10.0.0.1:1234 \\
      --num-processes 2 --process-id 0 --output-dir /shared/runs/sam
  # every host of a TPU pod slice (see experiments/README.md):
  python -m experiments.train --config experiments/configs/imagenet_resnet50.py \\
      --method sam --distributed --data-dir gs://BUCKET/tfds --output-dir gs://BUCKET/runs/sam
"""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.train",
      description="Train and evaluate one run (one method on one data set): test accuracy,"
                  " NLL, ECE, reliability diagram, top Hessian eigenvalue, time per step."
                  " Values not given on the command line come from the config file;"
                  " method hyperparameters default to the config's (the papers' values).",
      epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                      help="Python config file with get_config() (default:"
                           " experiments/configs/default.py)")
  parser.add_argument("--output-dir", default=None, metavar="DIR",
                      help="the run's folder: results.json and checkpoints/ (default:"
                           " runs/<method>-<dataset>-<date>-<time>)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in --output-dir")
  for flag, key, kind, text in _RUN_FLAGS:
    metavar = "DIR" if key == "data_dir" else {int: "N", float: "X"}.get(kind, "NAME")
    parser.add_argument(flag, dest=key, type=kind, default=None, metavar=metavar, help=text)
  group = parser.add_argument_group("method hyperparameters (for --method; default: the config's)")
  for flag, key, kind, text in _METHOD_FLAGS:
    group.add_argument(flag, dest="hp_" + key, type=kind, default=None,
                       metavar={int: "N", float: "X"}.get(kind, "BOOL"), help=text)
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE",
                      help="any other config value (repeatable), e.g. --set"
                           " model_kwargs.width=0.5 --set hparams.gsam.alpha=0.2")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  hosts = parser.add_argument_group(
      "several processes (multi-host; every process runs the same command with its own id)")
  hosts.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                     help="process 0's host and a free port (default: $"
                          f"{distributed.ENV_COORDINATOR})")
  hosts.add_argument("--num-processes", type=int, default=None, metavar="N",
                     help=f"the number of processes (default: ${distributed.ENV_NUM_PROCESSES})")
  hosts.add_argument("--process-id", type=int, default=None, metavar="I",
                     help="this process's id, 0 ... N-1 (default:"
                          f" ${distributed.ENV_PROCESS_ID})")
  hosts.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() and let JAX detect the cluster"
                          " (TPU pod slices, SLURM, Open MPI); flags given above are passed on")
  return parser


def config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The config file's ``get_config()`` with the flags applied."""
  config = load_config(args.config)
  for _, key, _, _ in _RUN_FLAGS:
    value = getattr(args, key)
    if value is not None:
      set_dotted(config, key, value)
  for item in args.overrides:
    if "=" not in item:
      raise UsageError(f"--set expects KEY=VALUE, got {item!r}.")
    key, value = item.split("=", 1)
    set_dotted(config, key.strip(), value.strip())
  methods.get_method(config.method)
  for flag, name, _, _ in _METHOD_FLAGS:
    value = getattr(args, "hp_" + name)
    if value is not None:
      if name not in methods.get_method(config.method).defaults:
        raise UsageError(f"method {config.method!r} has no hyperparameter {name!r} (flag"
                         f" {flag}); it has"
                         f" {sorted(methods.get_method(config.method).defaults) or 'none'}.")
      set_dotted(config, f"hparams.{config.method}.{name}", value)
  return config


def run_cli(argv: Sequence[str] | None, body) -> int:
  """Runs ``body()``; known errors become one line on stderr and exit code 2."""
  try:
    body()
  except (UsageError, ValueError, ImportError, input_pipeline.DataNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
  """The run that the parsed command line asks for; its results (see :func:`train_and_evaluate`).

  Checks the flags and the config, then starts ``jax.distributed`` when
  several processes are asked for (:mod:`experiments.distributed`) -- before
  anything touches a device -- and trains.
  """
  spec = distributed.process_spec(args.coordinator_address, args.num_processes,
                                   args.process_id, auto=args.distributed)
  config = config_from_args(args)
  validate_config(config, spec.num_processes if spec is not None else None)
  distributed.initialize(spec)
  workdir = args.output_dir
  if workdir is None:  # one time stamp for every process: process 0's
    stamp = time.localtime(distributed.broadcast_from_main(int(time.time())))
    workdir = os.path.join(
        "runs", f"{config.method}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S', stamp)}")
  return train_and_evaluate(config, workdir, resume=args.resume, progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
  """The CLI: one run, results in ``--output-dir``."""
  parser = build_parser()
  args = parser.parse_args(argv)

  def body():
    results = run_from_args(args)
    if not distributed.is_main_process():
      return
    workdir = results["workdir"]
    if not results.get("finished"):
      print(f"stopped at step {results['step']}; checkpoint in {workdir}")
      return
    test = results["test"]
    print(f"{results['method']}: test accuracy {test['accuracy']:.4f}, NLL {test['nll']:.4f},"
          f" ECE {test['ece']:.4f}, λ_max {results['hessian_top_eigenvalue']}, "
          f"{1e3 * (results['time_per_step_s'] or math.nan):.2f} ms/step")
    print(f"results: {os.path.join(workdir, 'results.json')}")

  return run_cli(argv, body)


if __name__ == "__main__":
  sys.exit(main())
