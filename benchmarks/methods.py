"""The method table: every method to benchmark, as a training step on a :class:`Task`.

A :class:`Method` builds a :class:`Program` for a task: ``init()`` gives the
training state (parameters, BatchNorm statistics, optimizer state) and
``step(state, batch) -> (state, loss)`` is one call of the user's jitted
training step. Every step is the canonical one of the library::

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ...)
  updates, opt_state = tx.update(grads, opt_state, params, batch=..., batch_stats=...)
  params = optax.apply_updates(params, updates)

with the same base optimizer (SGD, momentum 0.9) after every method, so the
only difference between two rows of the table is the method. How the step
feeds a method (ESAM's per-example losses, SAF's and MESA's trajectory loss)
is the registry's :class:`experiments.methods.Step`, as in the trainer.

With ``axis_name`` (the device-scaling study) the step runs inside
``shard_map`` over a mesh axis of that name, the batch split across devices:
SGD averages its gradient across the axis, the SAM methods perturb with the
local gradient and average their surrogate gradient once (m-sharpness).

The rows of sam_optax's methods come from the one registry,
:mod:`experiments.methods` (constructor, hyperparameter defaults, cost), so a
method added there is benchmarked too; this module adds only what a
measurement needs (:data:`SETTINGS`: a hyperparameter fixed for the
benchmark, phases of a conditional step, a note).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import sam_optax
from benchmarks.tasks import Batch, Task
from experiments import methods as registry

LEARNING_RATE = 0.01
MOMENTUM = 0.9
RHO = 0.05
CYCLE = 5           # k of LookSAM and interval SAM
PROBABILITY = 0.2   # p of stochastic SAM: the same expected cost as k = 5
ESAM_GAMMA = 0.5    # γ of ESAM: the fraction of the batch in the second gradient

State = Any
StepFn = Callable[[State, Batch], tuple[State, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Program:
  """A training step ready to compile.

  Attributes:
    init: ``init() -> state``, the training state before the first step.
    step: ``step(state, batch) -> (state, loss)``, one call.
    calls_per_step: calls that make one full step of the method (2 for the
      transparent mode of ``optax.contrib.sam``, which takes its ascent and
      its descent in two separate calls).
    phase_step: ``phase_step(ascent_step) -> StepFn``, the step traced with
      its phase fixed (``tx.update(..., ascent_step=...)``), for a method
      with a cheap phase benchmarked in its static form.
  """

  init: Callable[[], State]
  step: StepFn
  calls_per_step: int = 1
  phase_step: Callable[[bool], StepFn] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """A row of the benchmark.

  Attributes:
    name: the row's name.
    group: ``baseline``, ``sam_optax`` or ``alternative``.
    build: ``build(task, axis_name) -> Program``.
    gradients: theoretical gradient evaluations per step (SGD = 1).
    forwards: theoretical extra forward passes (without gradient) per step;
      a forward costs ``fwd/grad`` of a gradient evaluation, measured.
    phases: for a method whose step is a ``lax.cond`` on its step count,
      ``((weight, steps_taken), ...)``: the flops are the weighted mean of the
      flops of the step taken after ``steps_taken`` steps (the count folded
      into the program, so XLA keeps only the branch that runs; ``None``:
      the costliest branch, XLA's count of the program as it is). A method
      with one ``lax.cond`` whose costly branch is the one timed (MESA's
      teacher forward, on from the second step) needs no phases.
    branches_like: ``(other, p)`` for a method that takes the same two
      ``lax.cond`` branches as ``other`` (whose ``phases`` measure them: the
      full step first, the cheap one second) with probability ``p`` drawn at
      random, which XLA cannot fold: its flops are ``p · full + (1 − p) ·
      cheap`` plus its own extra flops (its costliest-branch count minus
      ``other``'s).
    sharded: whether the method is part of the scaling studies (width and
      device count; SGD and SAM by default).
    static_phase: for the static form of a method with a cheap phase (two
      compiled steps, chosen per call by ``sam_optax.takes_ascent_step``):
      the expected fraction of ascent steps (1/k, p), the weight of the full
      step's flops. None: one compiled step.
    note: what to know when reading the row.
  """

  name: str
  group: str
  build: Callable[[Task, str | None], Program]
  gradients: float
  forwards: float = 0.0
  phases: tuple[tuple[float, int | None], ...] = ()
  branches_like: tuple[str, float] | None = None
  sharded: bool = False
  static_phase: float | None = None
  note: str = ""

  def theory(self, forward_fraction: float) -> float:
    """Theoretical cost in gradient evaluations, a forward = ``forward_fraction``."""
    return self.gradients + self.forwards * forward_fraction


def base_optimizer() -> optax.GradientTransformation:
  """The base optimizer after every method: SGD with momentum."""
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


def _initial_state(task: Task, tx: optax.GradientTransformation) -> Callable[[], State]:
  return lambda: (task.params, task.batch_stats, tx.init(task.params))


def _mean_over(tree: Any, axis_name: str | None) -> Any:
  """``jax.lax.pmean`` of ``tree`` over ``axis_name`` (``tree`` itself without one)."""
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _finish(params, updates, new_stats, opt_state, loss, axis_name):
  """The end of every step: apply the updates, sync the statistics and loss."""
  params = optax.apply_updates(params, updates)
  new_stats = _mean_over(new_stats, axis_name)
  return (params, new_stats, opt_state), _mean_over(loss, axis_name)


def training_program(
    task: Task,
    tx: optax.GradientTransformation,
    axis_name: str | None,
    *,
    mean_gradient: bool,
    feed: registry.Step = registry.STANDARD,
) -> Program:
  """The canonical training step with transformation ``tx``.

  ``feed``: how the step feeds the method, the registry's
  :class:`~experiments.methods.Step` (the trainer's too): the extra arguments
  of ``tx.update`` -- the loss's own arguments for the SAM family, ESAM's
  per-example losses, SAF's logits and example indices, MESA's BatchNorm
  statistics -- and, for SAF and MESA, the trajectory target read before the
  pass (the bank's logits; MESA's EMA weights' forward in evaluation mode),
  whose loss joins the task loss in the one forward and backward pass.
  ``mean_gradient``: average the gradient across ``axis_name`` before ``tx``
  (SGD, SAF, MESA); the SAM methods take the local gradient and average their
  output.
  """
  tx = optax.with_extra_args_support(tx)

  def objective(params, batch, batch_stats, target):
    losses, (new_stats, logits) = task.per_example_loss_fn(params, batch, batch_stats)
    loss = losses.mean()
    if target is not None:
      loss = loss + sam_optax.losses.trajectory_loss(logits, target)
    return loss, (new_stats, logits, losses)

  def predict(params, batch_stats, x):  # MESA's teacher: the model in evaluation mode
    return task.forward(params, batch_stats, x, train=False)[0]

  def step(state, batch, ascent_step=None):
    params, batch_stats, opt_state = state
    loss_args = {"batch": batch, "batch_stats": batch_stats}
    target = None if feed.target is None else feed.target(
        opt_state, params, batch_stats, batch, predict)
    if feed is registry.SAMPA:  # it takes no gradient at w: a forward pass only
      loss, (new_stats, logits, losses) = objective(params, target=target, **loss_args)
      grads = params
    else:
      (loss, (new_stats, logits, losses)), grads = jax.value_and_grad(
          objective, has_aux=True)(params, target=target, **loss_args)
    if mean_gradient:
      grads = _mean_over(grads, axis_name)
    phase = {} if ascent_step is None else {"ascent_step": ascent_step}
    updates, opt_state = tx.update(
        grads, opt_state, params, **feed.update_args(loss_args, logits, losses), **phase)
    return _finish(params, updates, new_stats, opt_state, loss, axis_name)

  return Program(_initial_state(task, tx), step,
                 phase_step=lambda phase: functools.partial(step, ascent_step=phase))


def chained(
    make: Callable[[Task, str | None], optax.GradientTransformation],
) -> Callable[[Task, str | None], Program]:
  """``optax.chain(make(task, axis_name), base_optimizer())`` as a program."""

  def build(task: Task, axis_name: str | None = None) -> Program:
    tx = optax.chain(make(task, axis_name), base_optimizer())
    return training_program(task, tx, axis_name, mean_gradient=False)

  return build


def sgd(task: Task, axis_name: str | None = None) -> Program:
  """Plain SGD with momentum: the unit of every ratio."""
  return training_program(task, base_optimizer(), axis_name, mean_gradient=True)


# --------------------------------------------------------------------------
# The alternatives a user would otherwise pick.
# --------------------------------------------------------------------------


def fused_sam(task: Task, axis_name: str | None = None) -> Program:
  """SAM written by hand in plain JAX: both passes in one jitted function.

  The reference a library cannot beat: ``g = ∇L(w)``,
  ``ŵ = w + ρ g / (‖g‖ + δ)``, ``g̃ = ∇L(ŵ)``, SGD on ``g̃``, with no
  optimizer machinery around the ascent.
  """
  base = base_optimizer()
  grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)

  def step(state, batch):
    params, batch_stats, opt_state = state
    (loss, (new_stats, _)), grads = grad_fn(params, batch, batch_stats)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    scale = RHO / (norm + 1e-12)
    perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
    _, sam_grads = grad_fn(perturbed, batch, batch_stats)
    sam_grads = _mean_over(sam_grads, axis_name)
    updates, opt_state = base.update(sam_grads, opt_state, params)
    return _finish(params, updates, new_stats, opt_state, loss, axis_name)

  return Program(_initial_state(task, base), step)


def _contrib_sam(opaque: bool, axis_name: str | None) -> optax.GradientTransformation:
  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
  return optax.contrib.sam(base_optimizer(), adversary, sync_period=2,
                           opaque_mode=opaque, batch_axis_name=axis_name)


def contrib_sam_opaque(task: Task, axis_name: str | None = None) -> Program:
  """``optax.contrib.sam(..., opaque_mode=True)``: one call per SAM step.

  The update re-evaluates the gradient through the ``grad_fn`` it is given.
  """
  tx = _contrib_sam(True, axis_name)

  def step(state, batch):
    params, batch_stats, opt_state = state
    (loss, (new_stats, _)), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
        params, batch, batch_stats)
    grad_fn = lambda point, _: jax.grad(  # noqa: E731
        lambda p: task.loss_fn(p, batch, batch_stats)[0])(point)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return _finish(params, updates, new_stats, opt_state, loss, axis_name)

  return Program(_initial_state(task, tx), step)


def contrib_sam_transparent(task: Task, axis_name: str | None = None) -> Program:
  """``optax.contrib.sam`` in its default, transparent mode.

  Each call is an ordinary training step (one gradient, one update); the
  ascent and the descent alternate between calls, so one SAM step takes two
  calls (and two batches). Timed and counted per full SAM step: two calls.
  """
  if axis_name is not None:
    raise ValueError("contrib_sam_transparent is benchmarked on one device only.")
  tx = _contrib_sam(False, None)

  def step(state, batch):
    params, batch_stats, opt_state = state
    (loss, (new_stats, _)), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
        params, batch, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return _finish(params, updates, new_stats, opt_state, loss, None)

  return Program(_initial_state(task, tx), step, calls_per_step=2)


ALTERNATIVES: tuple[Method, ...] = (
    Method("hand-written fused SAM", "alternative", fused_sam, 2,
           note="plain JAX, both passes in one jitted function"),
    Method("optax.contrib.sam (opaque)", "alternative", contrib_sam_opaque, 2,
           note="opaque_mode=True, grad_fn"),
    Method("optax.contrib.sam (transparent)", "alternative", contrib_sam_transparent, 2,
           note="2 update calls (and 2 batches) per SAM step; counted per SAM step"),
)


# Phases of a method that takes its SAM step when ``count % k == 0``: the SAM
# step (weight 1/k), XLA's count of the costliest branch, and the step after
# 1 step (a cheap one, the k − 1 others are alike), its count folded.
EVERY_K_PHASES = ((1 / CYCLE, None), (1 - 1 / CYCLE, 1))

STATIC = " (static phase)"  # the label suffix of a static-phase row


def _static_row(name: str, fixed: dict[str, Any], weight: float, note: str):
  """The row of ``name``'s static form: no ``lax.cond``, a compiled step per phase."""
  return (name + STATIC, fixed, {"static_phase": weight, "phases": (), "branches_like": None,
                                 "note": note + "; two compiled steps, no lax.cond"})


# What a measurement needs beyond the registry row, by registry name: rows
# (label, hyperparameters fixed for the benchmark[, fields of this row only]),
# other fields of :class:`Method`, and the run's length as the method sees it.
# Every other registry method is one row at its defaults.
SETTINGS: dict[str, dict[str, Any]] = {
    "sam": {"sharded": True},
    "looksam": {"phases": EVERY_K_PHASES,
                "rows": (("looksam", {"k": CYCLE}),
                         _static_row("looksam", {"k": CYCLE}, 1 / CYCLE,
                                     f"k = {CYCLE}, α = 0.7")),
                "note": f"k = {CYCLE}, α = 0.7"},
    "interval_sam": {"phases": EVERY_K_PHASES,
                     "rows": (("interval_sam", {"k": CYCLE}),
                              _static_row("interval_sam", {"k": CYCLE}, 1 / CYCLE,
                                          f"k = {CYCLE}")),
                     "note": f"k = {CYCLE}"},
    "stochastic_sam": {"branches_like": ("interval_sam", PROBABILITY),
                       "rows": (("stochastic_sam", {"p": PROBABILITY}),
                                _static_row("stochastic_sam", {"p": PROBABILITY},
                                            PROBABILITY, f"p = {PROBABILITY}")),
                       "note": f"p = {PROBABILITY}"},
    "csam": {"note": "descent gradient of the calibrated loss"},
    "stable_sam": {"rows": (("stable_sam(sam)", {"normalize": True}),
                            ("stable_sam(usam)", {"normalize": False}))},
    "esam": {"rows": (("esam", {"gamma": ESAM_GAMMA}),),
             "note": f"β = 0.5, γ = {ESAM_GAMMA}: a forward at w + ε, a gradient on γB"
                     " examples"},
    "saf": {"rows": (("saf", {"start_epoch": 5}),),
            "note": "KL to the logit bank joins the single backward pass"},
    # MESA's loss is on from the second step, so every timed step pays the EMA
    # forward that ``mesa_target`` skips while it is off.
    "mesa": {"rows": (("mesa", {"start_epoch": 0}),), "steps_per_epoch": 1,
             "note": "plus one forward of the EMA weights (evaluation mode)"},
}


def _steps_per_epoch(task: Task) -> int:
  """Batches of the task's batch size in its (notional) training set."""
  return -(-task.num_examples // task.batch["y"].shape[0])


def _context(task: Task, axis_name: str | None, steps_per_epoch: int | None):
  """The registry's :class:`~experiments.methods.Context` for a benchmark task."""
  return registry.Context(
      loss_fn=task.loss_fn,
      logits_fn=lambda *args, **kwargs: (task.logits_fn(*args, **kwargs), None),  # no aux
      per_example_loss_fn=task.per_example_loss_fn,
      lr_schedule=LEARNING_RATE, lr_max=LEARNING_RATE, lr_min=LEARNING_RATE,
      steps_per_epoch=steps_per_epoch or _steps_per_epoch(task), num_epochs=1,
      num_examples=task.num_examples, num_classes=task.num_classes,
      model_state=task.batch_stats if task.has_batch_stats else None, axis_name=axis_name)


def registry_program(method: registry.Method, hparams: dict[str, Any],
                     steps_per_epoch: int | None = None) -> Callable[..., Program]:
  """``build(task, axis_name) -> Program``: the registry's transform, then SGD."""

  def build(task: Task, axis_name: str | None = None) -> Program:
    context = _context(task, axis_name, steps_per_epoch)
    if method.wraps_base:  # SAMPa: the whole optimizer around the base
      tx = registry.build(method, context, hparams, base=base_optimizer())
    else:
      tx = optax.chain(registry.build(method, context, hparams), base_optimizer())
    # SAF and MESA (a trajectory target) perturb nothing: their gradient is averaged as SGD's.
    return training_program(task, tx, axis_name, mean_gradient=method.step.target is not None,
                            feed=method.step)

  return build


def library_methods() -> tuple[Method, ...]:
  """A row per method of the registry (and per setting of :data:`SETTINGS`)."""
  rows = []
  for method in registry.METHODS.values():
    if method.transform is None:  # SGD: the baseline row
      continue
    settings = dict(SETTINGS.get(method.name, {}))
    variants = settings.pop("rows", ((method.name, {}),))
    steps_per_epoch = settings.pop("steps_per_epoch", None)
    for label, fixed, *own in variants:
      hparams = registry.hparams_for(method.name, fixed)
      rows.append(Method(label, "sam_optax",
                         registry_program(method, hparams, steps_per_epoch),
                         method.gradients_per_step(hparams), forwards=method.forwards,
                         **{**settings, **(own[0] if own else {})}))
  return tuple(rows)


def method_table(names: list[str] | None = None) -> tuple[Method, ...]:
  """Every row, in table order; ``names`` selects some (``sgd`` is always in)."""
  table = (Method("sgd", "baseline", sgd, 1, sharded=True),) + ALTERNATIVES + library_methods()
  if names is None:
    return table
  known = {m.name: m for m in table}
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(known)}.")
  return tuple(m for m in table if m.name == "sgd" or m.name in names)
