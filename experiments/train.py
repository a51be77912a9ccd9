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
from experiments import input_pipeline, methods, metrics, models

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
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
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


def collect_logits(predict, weights, batches, batch_size: int):
  """Logits and labels over ``batches``; the last batch is padded to one shape.

  Args:
    predict: the jitted ``predict(params, batch_stats, x)``.
    weights: ``(params, batch_stats)`` to evaluate.
    batches: an iterable of batches with ``x`` and ``y``.
    batch_size: the shape every batch is padded to (one compilation).
  """
  all_logits, all_labels = [], []
  for batch in batches:
    x, n = batch["x"], len(batch["y"])
    if n < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    logits = predict(*weights, x)
    all_logits.append(np.asarray(logits)[:n])
    all_labels.append(np.asarray(batch["y"]))
  return np.concatenate(all_logits), np.concatenate(all_labels)


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


def _write_json(path: str, payload: Any) -> None:
  """Writes ``payload`` atomically (a temporary file renamed into place)."""
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as stream:
    json.dump(payload, stream, indent=2, default=_to_builtin)
  os.replace(temporary, path)


def _to_builtin(value):
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  raise TypeError(f"not serializable: {type(value).__name__}")


def check_output_dir(path: str) -> str:
  """Creates ``path`` if needed and checks that it is a writable folder."""
  path = os.path.abspath(path)
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, ".write-test")
    with open(probe, "w", encoding="utf-8") as stream:
      stream.write("ok")
    os.remove(probe)
  except OSError as error:
    raise UsageError(f"cannot write to the output folder {path!r}: {error.strerror or error}."
                     " Choose another --output-dir.") from None
  return path


def validate_config(config) -> None:
  """Checks the names and numbers of ``config`` before anything is built or written."""
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       resume: bool = False, progress: bool = True,
                       pipeline: Any = None) -> dict[str, Any]:
  """Trains and evaluates one run; writes ``workdir/results.json`` and checkpoints.

  Args:
    config: the run's configuration (see ``experiments/configs/default.py``).
    workdir: the run's folder: ``checkpoints/`` and ``results.json``.
    resume: continue from the latest checkpoint in ``workdir`` (if there is
      none, start from scratch). Without it, a ``workdir`` that already holds
      checkpoints is refused.
    progress: show a tqdm progress bar.
    pipeline: the input pipeline, if already built from an equal data config
      (:func:`experiments.input_pipeline.get_pipeline`); built here if None.

  Returns:
    The results: final test metrics, reliability diagram, Hessian eigenvalue,
    time per step, and the per-epoch history (learning curves) -- what
    ``results.json`` holds -- plus the final :class:`TrainState` under
    ``'state'``. A run stopped by ``config.max_steps`` returns ``finished:
    False`` with its step, state and history, and writes no results.
  """
  validate_config(config)
  method = methods.get_method(config.method)
  if pipeline is None:
    pipeline = input_pipeline.get_pipeline(config, jax.process_index(), jax.process_count())
  workdir = check_output_dir(workdir)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  checkpoints = Checkpoints(checkpoint_dir)
  try:
    return _train(config, workdir, method, pipeline, checkpoints, resume, progress)
  finally:
    checkpoints.close()


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
    predict: the jitted ``predict(params, batch_stats, x) -> logits``.
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


def create_run(config, pipeline) -> Run:
  """Builds the model, the optimizer, the initial state and the jitted steps."""
  method = methods.get_method(config.method)
  model_kwargs = dict(config.get("model_kwargs", {}) or {})
  if config.get("half_precision"):
    model_kwargs.setdefault("dtype", jnp.bfloat16)
  model = models.get_model(config.model, pipeline.num_classes, **model_kwargs)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  variables = jax.jit(functools.partial(model.init, train=False))(
      init_rng, jnp.zeros((1,) + tuple(pipeline.input_shape), jnp.float32))
  batch_stats = variables.get("batch_stats", {})

  steps_per_epoch = pipeline.steps_per_epoch
  total_steps = config.num_epochs * steps_per_epoch
  lr_schedule, lr_max, lr_min = make_lr_schedule(config, steps_per_epoch)
  loss_fn, logits_fn = make_loss_fns(model, config.label_smoothing)
  context = methods.Context(
      loss_fn=loss_fn, logits_fn=logits_fn, lr_schedule=lr_schedule, lr_max=lr_max,
      lr_min=lr_min, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      num_epochs=config.num_epochs, num_examples=pipeline.num_train_examples,
      num_classes=pipeline.num_classes, model_state=batch_stats)
  tx, hparams = make_optimizer(config, method, context)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                            batch_stats=batch_stats)
  # A fresh buffer for every leaf: a transform's init may alias the params
  # (e.g. an EMA started as a copy of them), and the step donates the state.
  state = jax.tree.map(jnp.copy, state.replace(step=jnp.asarray(0, jnp.int32)))
  placement = Placement(config, pipeline)
  return Run(
      method=method, model=model, state=placement.put_state(state), hparams=hparams,
      train_step=jax.jit(make_train_step(loss_fn, method, make_predict(model)),
                         donate_argnums=0),
      predict=placement.wrap_predict(jax.jit(make_predict(model))),
      placement=placement, rng=train_rng, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps)


def _train(config, workdir, method, pipeline, checkpoints, resume, progress):
  if checkpoints.latest_step() is not None and not resume:
    raise UsageError(f"{workdir} already holds checkpoints (step {checkpoints.latest_step()});"
                     " pass --resume to continue that run, or choose another --output-dir.")
  run = create_run(config, pipeline)
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
          _record_epoch(history, epoch, epoch_stats, run.predict,
                        evaluated_weights(method, state), pipeline, config)
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
  return _final_results(config, workdir, method, run.hparams, run.model, state, pipeline,
                        history, step_times, run.predict)


class Placement:
  """Where the state and the batches live: one device, or data parallel.

  With ``config.data_parallel`` and more than one device, the step is a
  ``jax.jit`` over a 1-D mesh ``('data',)`` of every device: the state is
  replicated, each batch is split along its first axis (each process gives
  its own examples, ``jax.make_array_from_process_local_data``), and XLA
  inserts the all-reduce. The SAM family then perturbs with the gradient of
  the whole global batch (synchronized perturbation, m = the global batch);
  per-device perturbation (m-sharpness) needs the ``pmap`` / ``shard_map``
  step with ``axis_name`` described in the library's documentation.

  Limitation: with several processes the training step is global, but the
  evaluation (which gathers logits on the host) is not yet multi-process.
  """

  def __init__(self, config, pipeline):
    self.mesh = None
    if config.get("data_parallel", True) and jax.device_count() > 1:
      devices = jax.device_count()
      if pipeline.batch_size % devices:
        raise UsageError(f"batch_size={pipeline.batch_size} is not divisible by the"
                         f" {devices} devices; change it or --set data_parallel=False.")
      if jax.process_count() == 1 and config.eval_batch_size % devices:
        raise UsageError(f"eval_batch_size={config.eval_batch_size} is not divisible by the"
                         f" {devices} devices.")
      self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
      self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self.sharded = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))

  def put_state(self, state):
    return state if self.mesh is None else jax.device_put(state, self.replicated)

  def put_batch(self, batch):
    if self.mesh is None:
      return jax.device_put(batch)
    return {k: jax.make_array_from_process_local_data(self.sharded, v)
            for k, v in batch.items()}

  def wrap_predict(self, predict):
    if self.mesh is None or jax.process_count() > 1:
      return predict
    devices = jax.device_count()

    def sharded_predict(params, batch_stats, x):
      n = len(x)
      padding = -n % devices
      if padding:
        x = np.concatenate([x, np.zeros((padding,) + x.shape[1:], x.dtype)])
      return predict(params, batch_stats, jax.device_put(x, self.sharded))[:n]

    return sharded_predict


def _evaluate_now(config, epoch: int) -> bool:
  every = max(1, int(config.get("eval_every_epochs", 1) or 1))
  return (epoch + 1) % every == 0 or epoch + 1 == config.num_epochs


def _record_epoch(history, epoch, epoch_stats, predict, weights, pipeline, config):
  logits, labels = collect_logits(predict, weights, pipeline.eval_batches(),
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
              "learning_rate", "label_noise"):
    if key in saved and saved[key] != config[key]:
      raise UsageError(f"--resume: the checkpoint was written with {key}={saved[key]!r}, but"
                       f" this run has {key}={config[key]!r}; use the same settings or"
                       " another --output-dir.")


def _final_results(config, workdir, method, hparams, model, state, pipeline, history,
                   step_times, predict):
  weights = evaluated_weights(method, state)
  logits, labels = collect_logits(predict, weights, pipeline.eval_batches(),
                                  config.eval_batch_size)
  test = classification_metrics(logits, labels)
  diagram = metrics.reliability_diagram(logits, labels, num_bins=15)
  sample = pipeline.train_sample(config.get("hessian_examples", 1000))
  iterations = config.get("hessian_iters", 20)
  eigenvalue = hessian_eigenvalue(model, weights, sample, iterations, config.seed) \
      if iterations > 0 else None
  train_logits, train_labels = collect_logits(predict, weights, [sample], len(sample["y"]))
  results = {
      "method": method.name,
      "summary": method.summary,
      "hparams": hparams,
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
      "gradients_per_step": method.gradients,
      "forwards_per_step": method.forwards,
      "history": history,
      "reliability_diagram": {k: np.asarray(v) for k, v in diagram.items()},
      "config": config.to_dict(),
  }
  if method.eval_weights is not None:
    live, _ = collect_logits(predict, (state.params, state.batch_stats),
                             pipeline.eval_batches(), config.eval_batch_size)
    results["test_trained_weights"] = classification_metrics(live, labels)
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
]

# Method hyperparameters: (flag, name, type, help); applied to the chosen method.
_METHOD_FLAGS = [
    ("--rho", "rho", float, "neighbourhood radius ρ (SAM family; GSAM's ρ_max)"),
    ("--rho-min", "rho_min", float, "GSAM's ρ_min / BSAM's ρ_min (follows the lr schedule)"),
    ("--alpha", "alpha", float, "GSAM's α"),
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


def main(argv: Sequence[str] | None = None) -> int:
  """The CLI: one run, results in ``--output-dir``."""
  parser = build_parser()
  args = parser.parse_args(argv)

  def body():
    config = config_from_args(args)
    validate_config(config)
    workdir = args.output_dir or os.path.join(
        "runs", f"{config.method}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    results = train_and_evaluate(config, workdir, resume=args.resume,
                                 progress=not args.no_progress)
    if not results.get("finished"):
      print(f"stopped at step {results['step']}; checkpoint in {os.path.abspath(workdir)}")
      return
    test = results["test"]
    print(f"{results['method']}: test accuracy {test['accuracy']:.4f}, NLL {test['nll']:.4f},"
          f" ECE {test['ece']:.4f}, λ_max {results['hessian_top_eigenvalue']}, "
          f"{1e3 * (results['time_per_step_s'] or math.nan):.2f} ms/step")
    print(f"results: {os.path.join(os.path.abspath(workdir), 'results.json')}")

  return run_cli(argv, body)


if __name__ == "__main__":
  sys.exit(main())
