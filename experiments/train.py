"""Training of one run: ``train_and_evaluate(config, workdir)``.

One run trains ``config.model`` on ``config.dataset`` with ``config.method``
(:mod:`experiments.methods`) chained before the base optimizer::

  tx = optax.chain(<method transform>, [clip], <weight decay>, <base optimizer>)

The training step is :mod:`experiments.train_step` (the library's canonical
step, with BatchNorm as documented), the phase of LookSAM / interval /
stochastic SAM :mod:`experiments.phases`, the config's checks
:mod:`experiments.config_checks`. Evaluation is :mod:`experiments.evaluate`,
checkpoints and the output folder :mod:`experiments.checkpoints`, devices
:mod:`experiments.placement`; the command line is :mod:`experiments.main`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments import distributed, input_pipeline, methods, models
from experiments.checkpoints import (Checkpoints, LoopState, changed_fields, check_output_dir,
                                     write_json)
from experiments.config_checks import validate_config
from experiments.errors import UsageError
from experiments.evaluate import evaluate_now, evaluated_weights, final_report, record_epoch
from experiments.phases import PhasedStep, phase_form
from experiments.placement import Placement
from experiments.train_step import (LossFns, TrainState, make_loss_fns, make_predict,
                                    make_train_step)


def make_lr_schedule(config, steps_per_epoch: int) -> tuple[optax.Schedule, float, float]:
  """The learning-rate schedule with its peak and floor."""
  total = max(1, config.num_epochs * steps_per_epoch)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  lr = float(config.learning_rate)
  if config.lr_schedule == "constant":
    return optax.constant_schedule(lr), lr, lr
  if warmup > 0:
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1)), lr, 0.0
  return optax.cosine_decay_schedule(lr, total), lr, 0.0


def _kernels(params):
  """Weight decay mask: every parameter with more than one dimension."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(config, method: methods.Method, context: methods.Context):
  """``(optax.chain(method, [clip], weight decay, base), hparams)`` for this run."""
  hparams = methods.hparams_for(method.name, config.hparams.get(method.name, {}))
  transform = None if method.wraps_base else methods.build(method, context, hparams)
  parts = [] if transform is None else [transform]
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if config.weight_decay:
      parts.append(optax.add_decayed_weights(config.weight_decay, mask=_kernels))
    parts.append(optax.sgd(context.lr_schedule, momentum=config.momentum or None,
                           nesterov=config.nesterov))
  else:
    parts.append(optax.adamw(context.lr_schedule, b1=config.b1, b2=config.b2,
                             weight_decay=config.weight_decay, mask=_kernels))
  if method.wraps_base:  # SAMPa: the whole optimizer around the base
    return methods.build(method, context, hparams, base=optax.chain(*parts)), hparams
  return optax.chain(*parts), hparams


@dataclasses.dataclass
class Run:
  """Everything one run is built from (:func:`create_run`).

  Attributes:
    method: the registry row; model: the linen model.
    state: the initial :class:`TrainState` (placed on the devices).
    hparams: the method's hyperparameters.
    train_step: the jitted ``train_step(state, batch, rng) -> (state, metrics)``
      (a :class:`PhasedStep` of two when ``phase`` is ``'static'``).
    phase: how a method with a cheap phase chooses it, ``'static'`` or
      ``'cond'`` (:func:`phase_form`); None for the others.
    predict: the jitted ``predict(params, batch_stats, x) -> logits`` on this
      process's devices (weights from :meth:`Placement.local`).
    placement: where states and batches go.
    rng: the key of the training randomness (dropout), folded with the step.
    steps_per_epoch, total_steps: the run's length.
  """

  method: methods.Method
  model: Any
  state: TrainState
  hparams: dict[str, Any]
  train_step: Any
  predict: Any
  placement: Placement
  rng: jax.Array
  steps_per_epoch: int
  total_steps: int
  phase: str | None = None


def make_model(config, pipeline):
  """The linen model of ``config`` for ``pipeline``'s classes."""
  model_kwargs = dict(config.model_kwargs)
  if config.half_precision:
    model_kwargs.setdefault("dtype", jnp.bfloat16)
  return models.get_model(config.model, pipeline.num_classes, **model_kwargs)


def make_context(config, pipeline, loss_fns: LossFns, batch_stats, *,
                 batch_splits: int | None = None,
                 axis_name: str | None = None,
                 num_examples: int | None = None) -> methods.Context:
  """What the method's transform is built from (:class:`experiments.methods.Context`).

  ``batch_splits``: the perturbing methods' groups per step (m-sharpness; see
  :func:`experiments.placement.check_data_layout`); ``axis_name``: the data
  axis of a ``pmap`` / ``shard_map`` step (the trainer's ``jax.jit`` has none);
  ``num_examples``: the rows of SAF's bank (default: the training examples;
  :meth:`experiments.placement.Placement.bank_examples` when it is sharded).
  """
  lr_schedule, lr_max, lr_min = make_lr_schedule(config, pipeline.steps_per_epoch)
  return methods.Context(
      loss_fn=loss_fns.loss, logits_fn=loss_fns.logits, per_example_loss_fn=loss_fns.per_example,
      lr_schedule=lr_schedule, lr_max=lr_max, lr_min=lr_min,
      steps_per_epoch=pipeline.steps_per_epoch, num_epochs=config.num_epochs,
      num_examples=num_examples or pipeline.num_train_examples,
      num_classes=pipeline.num_classes,
      model_state=batch_stats, seed=config.seed, batch_splits=batch_splits,
      axis_name=axis_name, grad_accum_steps=config.grad_accum_steps)


@dataclasses.dataclass
class StepParts:
  """The pieces of a run's training step, built without any state (:func:`build_step`).

  Attributes:
    method: the registry row; model: the linen model.
    tx: the optimizer (``optax.chain(method, [clip], weight decay, base)``).
    hparams: the method's hyperparameters.
    train_step: the un-jitted ``train_step(state, batch, rng)`` (of one
      device's shard when ``axis_name`` is set).
    jit_step: ``jit_step(train_step)``, the placement's jitted step (a
      ``shard_map`` per device when ``axis_name`` is set).
    axis_name: the data axis of a per-device step, else None.
  """

  method: methods.Method
  model: Any
  tx: optax.GradientTransformation
  hparams: dict[str, Any]
  train_step: Any
  jit_step: Any
  axis_name: str | None

  def initial_state(self, variables_) -> TrainState:
    """The step-0 :class:`TrainState` from the model's ``init`` variables.

    Pure, so ``jax.eval_shape`` gives the state's shapes without allocating
    it (:mod:`benchmarks.scale` compiles the step on such abstract states).
    """
    state = TrainState.create(apply_fn=self.model.apply, params=variables_["params"],
                              tx=self.tx, batch_stats=variables_.get("batch_stats", {}))
    return state.replace(step=jnp.asarray(0, jnp.int32))


def init_variables(model, input_shape, rng):
  """``model.init`` on one zero example of ``input_shape`` (evaluation mode)."""
  return model.init(rng, jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False)


def build_step(config, pipeline, placement: Placement, model, batch_stats) -> StepParts:
  """The optimizer and the training step of a run, with no state built.

  ``pipeline``: anything with the fields read here (``num_classes`` for the
  model, ``steps_per_epoch``, ``num_train_examples``); ``batch_stats``: the
  model's initial BatchNorm statistics (MESA averages them; any values of the
  right shapes when the state is only traced). :func:`create_run` trains
  with it; :mod:`benchmarks.scale` compiles it on abstract states.
  """
  method = methods.get_method(config.method)
  loss_fns = make_loss_fns(model, config.label_smoothing)
  # Per device (shard_map): each device perturbs with its own gradient, no extra
  # pass; else, under jit, batch_splits groups recompute their own gradients.
  axis_name = placement.axis_name if placement.per_device(method) else None
  context = make_context(config, pipeline, loss_fns, batch_stats,
                         batch_splits=None if axis_name else placement.batch_splits,
                         axis_name=axis_name,
                         num_examples=placement.bank_examples(pipeline.num_train_examples))
  tx, hparams = make_optimizer(config, method, context)
  train_step = make_train_step(loss_fns, method, make_predict(model), axis_name,
                               config.grad_accum_steps)
  jit_step = functools.partial(placement.jit_step, per_device=axis_name is not None)
  return StepParts(method=method, model=model, tx=tx, hparams=hparams,
                   train_step=train_step, jit_step=jit_step, axis_name=axis_name)


def create_run(config, pipeline, placement: Placement | None = None, *,
               wrap_optimizer: Any = None) -> Run:
  """Builds the model, the optimizer, the initial state and the jitted steps.

  ``wrap_optimizer``: ``wrap_optimizer(tx) -> tx`` replaces the run's whole
  optimizer chain by a wrapper of it (a study diagnostic's change of the
  step, :mod:`experiments.diagnostics`); None: the chain as built.
  """
  placement = placement or Placement(config, pipeline)
  model = make_model(config, pipeline)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  initial = jax.jit(functools.partial(init_variables, model, pipeline.input_shape))(init_rng)
  parts = build_step(config, pipeline, placement, model, initial.get("batch_stats", {}))
  if wrap_optimizer is not None:
    parts = dataclasses.replace(parts, tx=wrap_optimizer(parts.tx))
  # Created in its shardings (config.shard_state), a fresh buffer for every
  # leaf: a transform's init may alias the params (e.g. an EMA started as a
  # copy of them), and the step donates the state.
  state = placement.init_state(parts.initial_state, initial)
  train_step = parts.train_step
  jit_step = functools.partial(parts.jit_step, state_shardings=placement.state_shardings(state))
  phase = phase_form(config, state.opt_state)
  return Run(
      method=parts.method, model=model, state=state, hparams=parts.hparams,
      train_step=(PhasedStep(train_step, jit_step) if phase == "static"
                  else jit_step(train_step)), phase=phase,
      predict=placement.wrap_predict(jax.jit(make_predict(model))),
      placement=placement, rng=placement.put_state(train_rng),
      steps_per_epoch=pipeline.steps_per_epoch,
      total_steps=config.num_epochs * pipeline.steps_per_epoch)


@dataclasses.dataclass
class Result:
  """What :func:`train_and_evaluate` returns.

  Attributes:
    workdir: the run's folder (absolute).
    state: the final :class:`TrainState`.
    step: the steps taken.
    finished: False when ``config.max_steps`` stopped the run early.
    history: the learning curves (per evaluated epoch).
    report: what ``results.json`` holds (None when not finished): test
      metrics, reliability diagram, Hessian eigenvalue, time per step, ...
  """

  workdir: str
  state: TrainState
  step: int
  finished: bool
  history: dict[str, list]
  report: dict[str, Any] | None


def check_resume(checkpoints: Checkpoints, config, workdir: str, resume: bool) -> bool:
  """Whether to restore; refuses a run whose config differs from the checkpoint's."""
  if checkpoints.latest_step() is None:
    return False
  if not resume:
    raise UsageError(f"{workdir} already holds checkpoints (step {checkpoints.latest_step()});"
                     " pass --resume to continue that run, or choose another --workdir.")
  changed = changed_fields(checkpoints.restore_config(), config.to_dict())
  if changed:
    raise UsageError(f"--resume: the checkpoint in {workdir} was written with another config"
                     f" ({'; '.join(changed)}); resume with the same config or choose"
                     " another --workdir.")
  return True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       resume: bool = False, progress: bool = True,
                       pipeline: Any = None, validated: bool = False) -> Result:
  """Trains and evaluates one run; writes ``workdir/results.json`` and checkpoints.

  With several processes (:mod:`experiments.distributed`, initialized
  before), every process calls this with the same arguments: each reads its
  own share of the data, all save the checkpoints (``workdir`` must be a
  folder every host sees, e.g. ``gs://...``), process 0 writes
  ``results.json`` and shows the progress bar.

  Args:
    config: the run's configuration (see ``experiments/configs/base.py``).
    workdir: the run's folder: ``checkpoints/`` and ``results.json``.
    resume: continue from the latest checkpoint in ``workdir`` if there is one
      and it was written with the same config (any changed field is refused,
      naming it). Without it, a ``workdir`` holding checkpoints is refused.
    progress: show a tqdm progress bar (on process 0).
    pipeline: the input pipeline, if already built from an equal data config.
    validated: the caller has checked ``config`` with
      :func:`experiments.config_checks.validate_config` (the command lines do,
      before anything starts); else it is checked here, once.
  """
  if not validated:
    validate_config(config)
  if pipeline is None:
    pipeline = input_pipeline.get_pipeline(config, jax.process_index(), jax.process_count())
  placement = Placement(config, pipeline)  # checks the data layout before any write
  workdir = check_output_dir(workdir)
  checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
  try:
    restore = check_resume(checkpoints, config, workdir, resume)
    run = create_run(config, pipeline, placement)
    return _train(config, workdir, run, pipeline, checkpoints, restore,
                  progress and distributed.is_main_process())
  finally:
    checkpoints.close()


def _progress(total: int, initial: int, description: str, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, initial=initial, desc=description, unit="step",
              disable=not enabled, leave=False, dynamic_ncols=True)


def _train(config, workdir, run, pipeline, checkpoints, restore, progress) -> Result:
  state, loop = run.state, LoopState()
  if restore:
    state, loop = checkpoints.restore(state, run.placement.state_shardings(state))
  pending: list[dict[str, jax.Array]] = []

  def flush():  # the steps' outputs, fetched in bulk
    for out in jax.device_get(pending):
      loop.epoch["losses"].append(float(out["loss"]))
      loop.epoch["correct"] += int(out["correct"])
    pending.clear()

  def save():
    flush()
    checkpoints.save(state, loop, config.to_dict())

  step, steps_per_epoch = int(state.step), run.steps_per_epoch
  end = min(run.total_steps, config.max_steps or run.total_steps)
  bar = _progress(run.total_steps, step, f"{run.method.name:>10}", progress)
  try:
    while step < end:
      epoch, start = divmod(step, steps_per_epoch)
      timed_from, timed_steps = None, 0
      for batch in input_pipeline.prefetch(
          map(run.placement.put_batch, pipeline.train_epoch(epoch, start)), size=2):
        state, out = run.train_step(state, batch, run.rng)
        pending.append(out)
        loop.epoch["seen"] += len(batch["y"])
        step += 1
        if timed_from is None:  # time the steps after the first (it may compile)
          jax.block_until_ready(out["loss"])
          timed_from = time.perf_counter()
        else:
          timed_steps += 1
        bar.update(1)
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          save()
        if step >= end:
          break
      jax.block_until_ready(state.params)
      if timed_steps:
        loop.step_times.append((time.perf_counter() - timed_from) / timed_steps)
      if step % steps_per_epoch == 0:
        flush()
        if evaluate_now(config, epoch):
          record_epoch(loop, epoch, run.predict,
                       run.placement.local(evaluated_weights(run.method, state)), pipeline,
                       config)
          bar.set_postfix(loss=f"{loop.history['train_loss'][-1]:.3f}",
                          test_acc=f"{loop.history['test_accuracy'][-1]:.3f}")
        loop.new_epoch()
  except KeyboardInterrupt:
    save()
    raise UsageError(f"interrupted at step {step}; the checkpoint is in {workdir}: rerun with"
                     " --resume to continue.") from None
  finally:
    bar.close()
  save()
  if step < run.total_steps:  # stopped at max_steps: no final evaluation
    return Result(workdir, state, step, False, loop.history, None)
  report = final_report(config, run, state, pipeline, loop)
  if distributed.is_main_process():
    write_json(os.path.join(workdir, "results.json"), report)
  return Result(workdir, state, step, True, loop.history, report)
