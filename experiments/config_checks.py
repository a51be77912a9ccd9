"""The checks of a run's config, once per run, before anything is built or written."""

from __future__ import annotations

from experiments import input_pipeline, methods, models
from experiments.errors import UsageError
from experiments.phases import PHASES
from experiments.placement import check_perturbation, check_shard_state


def _choice(config, field: str, choices) -> None:
  if config[field] not in choices:
    raise UsageError(f"unknown {field} {config[field]!r}; choose one of {', '.join(choices)}.")


def validate_config(config) -> None:
  """Checks the names and numbers of ``config`` before anything is built or written."""
  try:
    methods.get_method(config.method)
    methods.hparams_for(config.method, config.hparams.get(config.method, {}))
  except ValueError as error:
    raise UsageError(str(error)) from None
  _choice(config, "dataset", input_pipeline.DATASETS)
  _choice(config, "model", models.MODEL_NAMES)
  _choice(config, "optimizer", ("sgd", "adamw"))
  _choice(config, "lr_schedule", ("cosine", "constant"))
  _choice(config, "phase", PHASES)
  for name in ("num_epochs", "batch_size", "grad_accum_steps"):
    if isinstance(config[name], bool) or not isinstance(config[name], int) or config[name] < 1:
      raise UsageError(f"{name} must be a positive integer, got {config[name]!r}.")
  accum = config.grad_accum_steps
  if accum > 1:
    if config.batch_size % accum:
      raise UsageError(f"grad_accum_steps={accum} does not divide batch_size="
                       f"{config.batch_size}: the micro-batches must have equal sizes.")
    step = methods.get_method(config.method).step
    if step is not methods.STANDARD:
      raise UsageError(f"grad_accum_steps={accum} is supported for sgd and the SAM family,"
                       f" not for {config.method} (its {step.name} step reads the whole"
                       " batch's logits or losses); set --config.grad_accum_steps=1.")
  if not 0.0 <= config.label_noise <= 1.0:
    raise UsageError(f"label_noise must be in [0, 1], got {config.label_noise!r}.")
  if not config.learning_rate > 0:
    raise UsageError(f"learning_rate must be > 0, got {config.learning_rate!r}.")
  check_perturbation(config)
  check_shard_state(config)
