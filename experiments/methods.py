"""The method registry: one place that maps a method's name to its training step.

A :class:`Method` says how to build the transform chained before the base
optimizer and what its training step needs:

* every method of the SAM family re-evaluates the user's loss at perturbed
  weights; it gets ``loss_fn(params, batch_stats, batch, rng) -> (loss,
  (new_batch_stats, logits))`` with ``has_aux=True`` -- the library's
  documented BatchNorm pattern: the user's own first pass updates the
  BatchNorm statistics, the re-evaluations (in training mode, batch
  statistics) drop theirs;
* CSAM gets ``logits_fn(...) -> ((logits, labels), aux)`` instead;
* SAF and MESA add a trajectory loss to the user's loss (one forward and one
  backward pass): SAF reads its target from the logit bank in the optimizer
  state by the batch's example indices and stores the step's logits; MESA's
  target is one extra forward pass of its EMA weights in evaluation mode
  (:attr:`Method.target`, :attr:`Method.update_args`). MESA is evaluated
  with its EMA weights, as in the paper (:attr:`Method.eval_weights`).

m-sharpness: the methods that perturb the weights (:attr:`Method.perturbs`)
are built with the context's ``batch_splits`` (a perturbation per group of
``B / batch_splits`` examples of the step's batch; the trainer sets it to the
device count for the SAM paper's per-device perturbation under a sharded
``jax.jit``) and ``axis_name`` (for a ``pmap`` / ``shard_map`` step: average
over that axis). SAF and MESA have no perturbation.

Hyperparameter defaults are the papers' (METHODS.md); a config overrides them
in ``config.hparams.<method>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import optax

import sam_optax


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method's transform may be built from.

  Attributes:
    loss_fn: ``loss_fn(params, batch_stats, batch, rng) -> (loss, (batch_stats,
      logits))``, the training loss (has_aux).
    logits_fn: ``logits_fn(params, batch_stats, batch, rng) -> ((logits,
      labels), batch_stats)`` for CSAM.
    lr_schedule: the learning-rate schedule of the base optimizer.
    lr_max, lr_min: its peak and floor (for ρ schedules that follow it).
    steps_per_epoch, total_steps: the run's length.
    num_epochs: the number of epochs.
    num_examples, num_classes: the training set (SAF's bank).
    model_state: the initial BatchNorm statistics (``{}`` without BatchNorm),
      for MESA's average of them.
    batch_splits: the perturbing methods' ``batch_splits`` (None: one
      perturbation from the step's whole gradient).
    axis_name: the data axis of a ``pmap`` / ``shard_map`` step (None under
      ``jax.jit``, where XLA averages the global batch).
  """

  loss_fn: Callable[..., Any]
  logits_fn: Callable[..., Any]
  lr_schedule: optax.Schedule
  lr_max: float
  lr_min: float
  steps_per_epoch: int
  total_steps: int
  num_epochs: int
  num_examples: int
  num_classes: int
  model_state: Any
  batch_splits: int | None = None
  axis_name: str | None = None

  @property
  def data_parallel(self) -> dict[str, Any]:
    """The m-sharpness arguments of the SAM family's constructors."""
    if self.batch_splits:
      return {"perturbation": sam_optax.Splits(self.batch_splits, axis_name=self.axis_name)}
    return {"perturbation": sam_optax.PerDevice(self.axis_name) if self.axis_name else None}


def _loss_args(loss_args, logits):
  """The SAM family re-evaluates ``loss_fn`` with the step's own arguments."""
  del logits
  return loss_args


@dataclasses.dataclass(frozen=True)
class Method:
  """A method of the comparison.

  Attributes:
    name: the registry key (``--method``).
    summary: one line for ``--help`` and the results table.
    gradients: gradient evaluations per step (SGD = 1), or a function of the
      hyperparameters (LookSAM, interval SAM: ``1 + 1/k``).
    forwards: extra forward passes without gradient per step (MESA's EMA).
    defaults: hyperparameters and their defaults (the papers' values).
    build: ``build(context, hparams) -> transform or None`` (None: the plain
      base optimizer).
    target: for SAF and MESA, ``target(opt_state, params, batch_stats, batch,
      predict) -> TrajectoryTarget`` read before the step's forward pass
      (``predict(params, batch_stats, x)`` is the model in evaluation mode);
      its trajectory loss is added to the user's loss, in the same single
      backward pass. None for the other methods.
    update_args: ``update_args(loss_args, logits) -> dict``, the extra
      arguments of ``tx.update`` (``loss_args`` is ``{'batch_stats',
      'batch', 'rng'}``, the arguments of ``loss_fn``).
    eval_weights: ``eval_weights(opt_state, params, batch_stats) -> (params,
      batch_stats)``, the weights the paper evaluates (MESA: the EMA), or
      None for the trained weights.
    perturbs: whether the method perturbs the weights (so that
      ``--perturbation`` / ``batch_splits`` applies to it).
  """

  name: str
  summary: str
  gradients: float | Callable[[Mapping[str, Any]], float]
  forwards: int
  defaults: Mapping[str, Any]
  build: Callable[[Context, Mapping[str, Any]], optax.GradientTransformation | None]
  target: Callable[..., Any] | None = None
  update_args: Callable[[Mapping[str, Any], Any], Mapping[str, Any]] = _loss_args
  eval_weights: Callable[..., Any] | None = None
  perturbs: bool = False


  def gradients_per_step(self, hparams: Mapping[str, Any]) -> float:
    """Gradient evaluations per step with these hyperparameters."""
    return self.gradients(hparams) if callable(self.gradients) else self.gradients


def _sam(ctx, h):
  return sam_optax.sam(h["rho"], loss_fn=ctx.loss_fn, has_aux=True, **ctx.data_parallel)


def _usam(ctx, h):
  return sam_optax.usam(h["rho"], loss_fn=ctx.loss_fn, has_aux=True, **ctx.data_parallel)


def _looksam(ctx, h):
  return sam_optax.looksam(h["rho"], k=h["k"], alpha=h["alpha"], loss_fn=ctx.loss_fn,
                           has_aux=True, **ctx.data_parallel)


def _interval_sam(ctx, h):
  return sam_optax.interval_sam(h["rho"], k=h["k"], loss_fn=ctx.loss_fn, has_aux=True,
                                **ctx.data_parallel)


def _one_in_k(h):
  return 1 + 1 / h["k"]


def _csam(ctx, h):
  return sam_optax.csam(h["rho"], gamma=h["gamma"], logits_fn=ctx.logits_fn, has_aux=True,
                        **ctx.data_parallel)


def _stable_sam(ctx, h):
  inner = sam_optax.sam(h["rho"], loss_fn=ctx.loss_fn, has_aux=True,
                        normalize=h["normalize"], **ctx.data_parallel)
  return sam_optax.stable_sam(inner, axis_name=ctx.axis_name)


def _asam(ctx, h):
  return sam_optax.asam(h["rho"], eta=h["eta"], loss_fn=ctx.loss_fn, has_aux=True,
                        **ctx.data_parallel)


def _lr_following(ctx, rho_max, rho_min):
  if ctx.lr_max <= ctx.lr_min:  # constant learning rate: constant radius
    return rho_max
  return sam_optax.rho_schedule_from_lr(ctx.lr_schedule, rho_max=rho_max, rho_min=rho_min,
                                        lr_max=ctx.lr_max, lr_min=ctx.lr_min)


def _gsam(ctx, h):
  rho = _lr_following(ctx, h["rho"], h["rho_min"])
  return sam_optax.gsam(rho, alpha=h["alpha"], loss_fn=ctx.loss_fn, has_aux=True,
                        **ctx.data_parallel)


def _bsam(ctx, h):
  rho_min = _lr_following(ctx, h["rho_min"], 0.0)
  return sam_optax.bsam(h["rho"], rho_min, loss_fn=ctx.loss_fn, has_aux=True,
                        **ctx.data_parallel)


def _start_epoch(ctx, h, minimum):
  """``E_start``: the configured epoch, or ~30 % of training (the paper's rule)."""
  if h["start_epoch"] is not None:
    return int(h["start_epoch"])
  return max(minimum, int(round(0.3 * ctx.num_epochs)))


def _saf(ctx, h):
  return sam_optax.saf(
      ctx.num_examples, ctx.num_classes, ctx.steps_per_epoch, lam=h["lam"], tau=h["tau"],
      start_epoch=_start_epoch(ctx, h, h["past_epochs"]), past_epochs=h["past_epochs"],
      axis_name=ctx.axis_name)


def _saf_target(opt_state, params, batch_stats, batch, predict):
  del params, batch_stats, predict
  return sam_optax.saf_target(opt_state, batch["index"])


def _saf_update_args(loss_args, logits):
  return {"logits": logits, "example_index": loss_args["batch"]["index"]}


def _mesa(ctx, h):
  return sam_optax.mesa(
      ctx.steps_per_epoch, lam=h["lam"], tau=h["tau"], decay=h["decay"],
      start_epoch=_start_epoch(ctx, h, 0), model_state=ctx.model_state or None)


def _mesa_target(opt_state, params, batch_stats, batch, predict):
  if batch_stats:
    return sam_optax.mesa_target(
        opt_state, params, lambda ema, ema_stats: predict(ema, ema_stats, batch["x"]),
        model_state=batch_stats)
  return sam_optax.mesa_target(opt_state, params, lambda ema: predict(ema, {}, batch["x"]))


def _mesa_update_args(loss_args, logits):
  del logits
  batch_stats = loss_args["batch_stats"]  # the statistics paired with params
  return {"model_state": batch_stats} if batch_stats else {}


def _mesa_eval_weights(opt_state, params, batch_stats):
  ema_stats = sam_optax.mesa_model_state(opt_state, batch_stats) if batch_stats else {}
  return sam_optax.mesa_params(opt_state, params), ema_stats


METHODS: dict[str, Method] = {
    m.name: m for m in [
        Method("sgd", "the base optimizer alone", 1, 0, {}, lambda ctx, h: None),
        Method("sam", "SAM, Foret et al. 2021", 2, 0, {"rho": 0.05}, _sam, perturbs=True),
        Method("usam", "unnormalized SAM, Andriushchenko & Flammarion 2022", 2, 0,
               {"rho": 0.05}, _usam, perturbs=True),
        Method("looksam", "LookSAM, Liu et al. 2022", _one_in_k, 0,
               {"rho": 0.05, "k": 5, "alpha": 0.7}, _looksam, perturbs=True),
        Method("interval_sam", "SAM every k steps (interval SAM)", _one_in_k, 0,
               {"rho": 0.05, "k": 5}, _interval_sam, perturbs=True),
        Method("csam", "calibrated SAM, ICLR 2026", 2, 0, {"rho": 0.05, "gamma": 1.0}, _csam,
               perturbs=True),
        Method("stable_sam", "StableSAM (renormalized USAM), Tan et al.", 2, 0,
               {"rho": 0.05, "normalize": False}, _stable_sam, perturbs=True),
        Method("asam", "adaptive SAM, Kwon et al. 2021", 2, 0, {"rho": 0.5, "eta": 0.01},
               _asam, perturbs=True),
        Method("gsam", "surrogate-gap SAM, Zhuang et al. 2022", 2, 0,
               {"rho": 0.05, "rho_min": 0.05, "alpha": 0.1}, _gsam, perturbs=True),
        Method("bsam", "bilateral SAM, Deng et al. 2024", 3, 0,
               {"rho": 0.05, "rho_min": 0.05}, _bsam, perturbs=True),
        Method("saf", "SAF (trajectory loss, logit bank), Du et al. 2022", 1, 0,
               {"lam": 0.3, "tau": 5.0, "start_epoch": None, "past_epochs": 3}, _saf,
               target=_saf_target, update_args=_saf_update_args),
        Method("mesa", "MESA (trajectory loss, EMA teacher), Du et al. 2022", 1, 1,
               {"lam": 0.8, "tau": 5.0, "start_epoch": None, "decay": 0.9998}, _mesa,
               target=_mesa_target, update_args=_mesa_update_args,
               eval_weights=_mesa_eval_weights),
    ]
}
"""The methods, by name."""


def get_method(name: str) -> Method:
  """The registered method ``name``; ValueError naming the choices otherwise."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")
  return METHODS[name]


def hparams_for(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The method's defaults updated with ``overrides``; unknown names are errors."""
  method = get_method(name)
  values = dict(method.defaults)
  for key, value in (overrides or {}).items():
    if key not in values:
      raise ValueError(
          f"method {name!r} has no hyperparameter {key!r}; it has"
          f" {sorted(values) or 'none'}.")
    values[key] = value
  return values


def default_hparams() -> dict[str, dict[str, Any]]:
  """Every registered method's hyperparameter defaults, by method name."""
  return {name: dict(method.defaults) for name, method in METHODS.items()}
