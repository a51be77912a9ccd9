"""The method registry of the trainer, the comparison and the benchmarks.

A method is one row: its name, the library constructor, a summary and its
cost; the hyperparameters and their defaults are read from the constructor's
signature (:func:`default_hparams`), so a method added to ``sam_optax`` is one
:class:`Method` row here and is trained (``config.method``), compared
(``config.methods``) and benchmarked (``benchmarks/``) with no other change.

:func:`build` calls the constructor with the hyperparameters and the pieces
of the training step it names (``loss_fn``, ``logits_fn``, the training set's
size for SAF, the BatchNorm statistics for MESA, the run's seed) and with the
data-parallel arguments of :class:`Context` -- the one place in
``experiments/`` and ``benchmarks/`` that passes them to the library.

How the training step feeds a method is its :class:`Step`:

* :data:`STANDARD` (the SAM family): the method re-evaluates the user's loss
  at perturbed weights with the step's own arguments, ``loss_fn(params,
  batch_stats, batch, rng) -> (loss, (new_batch_stats, logits))``,
  ``has_aux=True`` -- the library's documented BatchNorm pattern: the user's
  pass updates the statistics, the re-evaluations drop theirs. CSAM's
  constructor names ``logits_fn`` and gets ``logits_fn(...) -> ((logits,
  labels), aux)`` instead.
* :data:`ESAM`: ``loss_fn`` returns the per-example losses, and the step
  passes the ones it computed (``per_example_losses``).
* :data:`SAF` and :data:`MESA`: a trajectory loss joins the user's loss (one
  forward and one backward pass); SAF reads its target from the logit bank by
  the batch's example indices, MESA from one forward pass of its EMA weights
  in evaluation mode; MESA is evaluated with its EMA weights, as in the paper.

This module imports jax, optax and sam_optax only (no Flax).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optax

import sam_optax

# Constructor arguments that are plumbing, not hyperparameters: built from
# the run (:class:`Context`) or left at the library's default.
PLUMBING = frozenset({
    "inner", "base_optimizer", "loss_fn", "logits_fn", "has_aux", "axis_name", "perturbation", "mask",
    "batch_argnames", "eps", "adaptive_mask", "num_examples", "num_classes",
    "steps_per_epoch", "bank_dtype", "check_indices", "model_state", "seed", "output_axis"})


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method's transform is built from.

  Attributes:
    loss_fn: the mean training loss, ``loss_fn(params, **loss_args) -> (loss,
      (batch_stats, logits))``.
    logits_fn: CSAM's ``logits_fn(params, **loss_args) -> ((logits, labels),
      batch_stats)``.
    per_example_loss_fn: ESAM's ``(losses [B], (batch_stats, logits))``.
    lr_schedule, lr_max, lr_min: the base optimizer's learning rate, its
      peak and floor (for radii that follow it).
    steps_per_epoch, num_epochs: the run's length.
    num_examples, num_classes: the training set (SAF's bank).
    model_state: the initial BatchNorm statistics (``{}`` without BatchNorm).
    seed: the run's seed (stochastic SAM's draws, ESAM's masks).
    batch_splits: the perturbing methods' groups per step (m-sharpness; None:
      one perturbation from the step's whole gradient).
    axis_name: the data axis of a ``pmap`` / ``shard_map`` step (None under
      ``jax.jit``).
    grad_accum_steps: micro-batches per step (> 1: the SAM family gets
      ``sam_optax.MicroBatches``, one ascent for the whole batch).
  """

  loss_fn: Callable[..., Any]
  logits_fn: Callable[..., Any] | None
  per_example_loss_fn: Callable[..., Any] | None
  lr_schedule: optax.ScalarOrSchedule
  lr_max: float
  lr_min: float
  steps_per_epoch: int
  num_epochs: int
  num_examples: int
  num_classes: int
  model_state: Any = None
  seed: int = 0
  batch_splits: int | None = None
  axis_name: str | None = None
  grad_accum_steps: int = 1

  def data_parallel(self, splits: bool = True) -> dict[str, Any]:
    """The library's data-parallel keywords (the only place that names them).

    The SAM family takes ``perturbation`` (``Splits(n)`` for ``n`` groups,
    ``PerDevice(axis)`` under ``pmap`` / ``shard_map``, ``MicroBatches(k)``
    with gradient accumulation); SAF and StableSAM
    take ``axis_name``. ``splits=False``: no ``Splits`` (ESAM: m-sharpness
    groups are not applied to it).
    """
    if self.grad_accum_steps > 1:
      perturbation = sam_optax.MicroBatches(self.grad_accum_steps, batch_argnames=("batch",),
                                            axis_name=self.axis_name)
    elif self.batch_splits and splits:
      perturbation = sam_optax.Splits(self.batch_splits, axis_name=self.axis_name)
    else:
      perturbation = sam_optax.PerDevice(self.axis_name) if self.axis_name else None
    return {"perturbation": perturbation, "axis_name": self.axis_name}


def _loss_args(loss_args, logits, losses):
  """The SAM family re-evaluates ``loss_fn`` with the step's own arguments."""
  del logits, losses
  return loss_args


def _esam_args(loss_args, logits, losses):
  del logits
  return {**loss_args, "per_example_losses": losses}


def _saf_target(opt_state, params, batch_stats, batch, predict):
  del params, batch_stats, predict
  return sam_optax.saf_target(opt_state, batch["index"])


def _saf_args(loss_args, logits, losses):
  del losses
  return {"logits": logits, "example_index": loss_args["batch"]["index"]}


def _mesa_target(opt_state, params, batch_stats, batch, predict):
  if batch_stats:
    return sam_optax.mesa_target(
        opt_state, params, lambda ema, ema_stats: predict(ema, ema_stats, batch["x"]),
        model_state=batch_stats)
  return sam_optax.mesa_target(opt_state, params, lambda ema: predict(ema, {}, batch["x"]))


def _mesa_args(loss_args, logits, losses):
  del logits, losses
  batch_stats = loss_args["batch_stats"]  # the statistics paired with params
  return {"model_state": batch_stats} if batch_stats else {}


def _mesa_eval_weights(opt_state, params, batch_stats):
  ema_stats = sam_optax.mesa_model_state(opt_state, batch_stats) if batch_stats else {}
  return sam_optax.mesa_params(opt_state, params), ema_stats


@dataclasses.dataclass(frozen=True)
class Step:
  """How the training step feeds a method.

  Attributes:
    name: ``standard``, ``esam``, ``saf`` or ``mesa``.
    update_args: ``update_args(loss_args, logits, per_example_losses) ->
      dict``, the extra arguments of ``tx.update`` (``loss_args``: the
      keyword arguments of ``loss_fn``).
    target: for SAF and MESA, ``target(opt_state, params, batch_stats, batch,
      predict) -> TrajectoryTarget``, read before the step's forward pass
      (``predict(params, batch_stats, x)``: the model in evaluation mode).
    eval_weights: ``eval_weights(opt_state, params, batch_stats) -> (params,
      batch_stats)``, the weights the paper evaluates (None: the trained ones).
  """

  name: str
  update_args: Callable[..., Mapping[str, Any]] = _loss_args
  target: Callable[..., Any] | None = None
  eval_weights: Callable[..., Any] | None = None


STANDARD = Step("standard")
# SAMPa computes both of its gradients itself and never ∇L(w): the step runs
# the user's loss forward only (metrics, BatchNorm statistics) and passes the
# params in place of a gradient. Without previous_args both gradients take
# the step's batch (the trainer does not keep the previous batch).
SAMPA = Step("sampa")
ESAM = Step("esam", update_args=_esam_args)
SAF = Step("saf", update_args=_saf_args, target=_saf_target)
MESA = Step("mesa", update_args=_mesa_args, target=_mesa_target,
            eval_weights=_mesa_eval_weights)


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the registry.

  Attributes:
    name: the registry key (``config.method``).
    transform: the library constructor (None: the base optimizer alone).
    summary: one line for the results table.
    gradients: gradient evaluations per step (SGD = 1), or a function of the
      hyperparameters (LookSAM, interval SAM: ``1 + 1/k``).
    forwards: extra forward passes without gradient per step.
    step: how the training step feeds it (:class:`Step`).
    defaults: defaults that differ from the constructor's, and hyperparameters
      the trainer adds (``rho_min`` of an lr-following radius).
    inner: for a wrapper (StableSAM), the constructor of the wrapped method,
      whose hyperparameters it takes.
    follow_lr: ``{radius: floor}``: the radius follows the learning-rate
      schedule from its value at the peak down to the hyperparameter
      ``floor`` (None: to 0) at the floor (``sam_optax.rho_schedule_from_lr``).
    wraps_base: the constructor takes the base optimizer
      (``base_optimizer=``) and is the whole optimizer (SAMPa: its auxiliary
      point is the base's look-ahead); :func:`build` then needs ``base``.
  """

  name: str
  transform: Callable[..., optax.GradientTransformation] | None
  summary: str
  gradients: float | Callable[[Mapping[str, Any]], float] = 2
  forwards: int = 0
  step: Step = STANDARD
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  inner: Callable[..., optax.GradientTransformation] | None = None
  follow_lr: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
  wraps_base: bool = False

  def gradients_per_step(self, hparams: Mapping[str, Any]) -> float:
    """Gradient evaluations per step with these hyperparameters."""
    return self.gradients(hparams) if callable(self.gradients) else self.gradients

  @property
  def perturbs(self) -> bool:
    """Whether ``perturbation`` (m-sharpness: ``Splits``) applies to it."""
    return "perturbation" in _accepted(self.inner or self.transform) and self.step is STANDARD


def _one_in_k(h):
  return 1 + 1 / h["k"]


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("sgd", None, "the base optimizer alone", gradients=1),
    Method("sam", sam_optax.sam, "SAM, Foret et al. 2021"),
    Method("usam", sam_optax.usam, "unnormalized SAM, Andriushchenko & Flammarion 2022"),
    Method("looksam", sam_optax.looksam, "LookSAM, Liu et al. 2022", gradients=_one_in_k),
    Method("interval_sam", sam_optax.interval_sam, "SAM every k steps (interval SAM)",
           gradients=_one_in_k),
    Method("stochastic_sam", sam_optax.stochastic_sam, "SAM with probability p per step",
           gradients=lambda h: 1 + h["p"]),
    Method("csam", sam_optax.csam, "calibrated SAM, ICLR 2026"),
    Method("stable_sam", sam_optax.stable_sam, "StableSAM (renormalized USAM), Tan et al.",
           inner=sam_optax.sam, defaults={"normalize": False}),
    Method("asam", sam_optax.asam, "adaptive SAM, Kwon et al. 2021"),
    Method("gsam", sam_optax.gsam, "surrogate-gap SAM, Zhuang et al. 2022",
           defaults={"rho_min": 0.05}, follow_lr={"rho": "rho_min"}),
    Method("bsam", sam_optax.bsam, "bilateral SAM, Deng et al. 2024", gradients=3,
           follow_lr={"rho_min": None}),
    Method("gcsam", sam_optax.gcsam, "gradient-centralized SAM, Hassan et al. 2025"),
    Method("sampa", sam_optax.sampa, "SAMPa (parallel SAM), Xie et al. 2024", forwards=1,
           step=SAMPA, wraps_base=True),
    Method("fsam", sam_optax.fsam, "FriendlySAM, Li et al. 2024"),
    Method("vasso", sam_optax.vasso, "variance-suppressed SAM, Li & Giannakis 2023"),
    Method("wsam", sam_optax.wsam, "weighted SAM (coupled form), Yue et al. 2023"),
    Method("esam", sam_optax.esam, "efficient SAM (SWP + SDS), Du et al. 2022",
           gradients=lambda h: 1 + h["gamma"], forwards=1, step=ESAM),
    Method("saf", sam_optax.saf, "SAF (trajectory loss, logit bank), Du et al. 2022",
           gradients=1, step=SAF, defaults={"start_epoch": None}),
    Method("mesa", sam_optax.mesa, "MESA (trajectory loss, EMA teacher), Du et al. 2022",
           gradients=1, forwards=1, step=MESA, defaults={"start_epoch": None}),
]}
"""The methods, by name. ``start_epoch=None`` (SAF, MESA): 30 % of the epochs, the
paper's rule. SAMPa wraps the trainer's base optimizer (``wraps_base``): its
two gradients, and a forward pass of the step for the metrics and BatchNorm
statistics. ``wsam_decoupled`` and ``msam`` are not rows: each wraps the base
optimizer itself (and MSAM changes which weights the gradient is taken at), so
they do not fit a transform chained before the trainer's base optimizer."""


def _accepted(fn) -> set[str]:
  """The keywords ``fn`` takes; through ``**kwargs`` it takes :func:`sam_optax.sam`'s."""
  if fn is None:
    return set()
  parameters = inspect.signature(fn).parameters.values()
  names = {p.name for p in parameters if p.kind is not p.VAR_KEYWORD}
  if any(p.kind is p.VAR_KEYWORD for p in parameters):
    names |= _accepted(sam_optax.sam)
  return names


def _signature_defaults(fn) -> dict[str, Any]:
  """The named arguments of ``fn`` with a default, less the plumbing."""
  return {p.name: p.default for p in inspect.signature(fn).parameters.values()
          if p.name not in PLUMBING and p.default is not p.empty}


def hparam_defaults(method: Method) -> dict[str, Any]:
  """The method's hyperparameters: its constructor's defaults, then the row's."""
  fn = method.inner or method.transform
  return {**(_signature_defaults(fn) if fn else {}), **method.defaults}


def get_method(name: str) -> Method:
  """The registered method ``name``; ValueError naming the choices otherwise."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
  return METHODS[name]


def hparams_for(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The method's defaults updated with ``overrides``; unknown names are errors."""
  values = hparam_defaults(get_method(name))
  for key, value in (overrides or {}).items():
    if key not in values:
      raise ValueError(f"method {name!r} has no hyperparameter {key!r}; it has"
                       f" {sorted(values) or 'none'}.")
    values[key] = value
  return values


def default_hparams() -> dict[str, dict[str, Any]]:
  """Every method's hyperparameter defaults, by method name."""
  return {name: hparam_defaults(method) for name, method in METHODS.items()}


def _radius(ctx: Context, rho_max, rho_min):
  """``rho_max`` at the peak learning rate down to ``rho_min`` at its floor."""
  if ctx.lr_max <= ctx.lr_min:  # constant learning rate: constant radius
    return rho_max
  return sam_optax.rho_schedule_from_lr(ctx.lr_schedule, rho_max=rho_max, rho_min=rho_min,
                                        lr_max=ctx.lr_max, lr_min=ctx.lr_min)


def _call(fn, arguments: Mapping[str, Any]):
  accepted = _accepted(fn)
  return fn(**{k: v for k, v in arguments.items() if k in accepted})


def build(method: Method, ctx: Context, hparams: Mapping[str, Any],
          base: optax.GradientTransformation | None = None
          ) -> optax.GradientTransformation | None:
  """The method's transform for a run (None for SGD).

  Args:
    method: the registry row.
    ctx: the run (:class:`Context`).
    hparams: its hyperparameters (:func:`hparams_for`).
    base: the base optimizer, for a method that wraps it (``wraps_base``:
      the result is then the whole optimizer).
  """
  if method.transform is None:
    return None
  if method.wraps_base and base is None:
    raise ValueError(f"method {method.name!r} wraps the base optimizer: pass base=.")
  values = dict(hparams)
  for radius, floor in method.follow_lr.items():
    values[radius] = _radius(ctx, values[radius], values.pop(floor) if floor else 0.0)
  if values.get("start_epoch", 0) is None:  # the SAF / MESA papers' rule
    minimum = values.get("past_epochs", 0)
    values["start_epoch"] = max(minimum, int(round(0.3 * ctx.num_epochs)))
  loss_fn = ctx.per_example_loss_fn if method.step is ESAM else ctx.loss_fn
  arguments = {
      "loss_fn": loss_fn, "logits_fn": ctx.logits_fn, "has_aux": True, "seed": ctx.seed,
      "num_examples": ctx.num_examples, "num_classes": ctx.num_classes,
      "steps_per_epoch": ctx.steps_per_epoch, "model_state": ctx.model_state or None,
      **ctx.data_parallel(splits=method.perturbs), **values}
  if method.step is SAMPA and ctx.axis_name and ctx.grad_accum_steps == 1:
    # No per-device ascent (one stored direction): both gradients averaged.
    arguments["perturbation"] = sam_optax.Synced(ctx.axis_name)
  if method.wraps_base:
    arguments["base_optimizer"] = base
  if method.inner is not None:
    arguments["inner"] = _call(method.inner, arguments)
  return _call(method.transform, arguments)
