"""The base config: every field a run reads, with the papers' method defaults.

Each experiment is a config file that starts from :func:`get_config` here and
changes only what differs (as the Flax examples' ``configs/`` and big_vision's
``proj/`` configs do)::

  from experiments.configs import base

  def get_config(arg=None):
    \"\"\"<what it reproduces>; --config=experiments/configs/<name>.py[:tiny]\"\"\"
    config = base.get_config()
    config.label_noise = 0.0
    config.hparams.sam.rho = 0.1
    return base.finish(config, arg)

``base.finish`` applies the ``:tiny`` form (:func:`tiny`: a few seconds on a
CPU, for tests and smoke runs) and locks the config, so a mistyped field is an
error. On the command line every field is ``--config.<field>=<value>``
(``ml_collections.config_flags``).

The method hyperparameters ``hparams.<method>.<name>`` are the library
constructors' defaults, read from their signatures (:mod:`experiments.methods`).
"""

import ml_collections

from experiments import methods

ARGS = ("", "tiny")


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The base of every experiment (CIFAR-style SGD, MNIST-1D data so that it runs anywhere)."""
  config = ml_collections.ConfigDict()
  # What runs: config.method for experiments.main, config.methods x config.seeds
  # for experiments.compare (comma-separated names or a tuple).
  config.method = "sgd"
  config.methods = ("sgd", "sam", "csam", "stable_sam", "saf", "mesa", "bsam", "asam", "gsam")
  config.seed = 0
  config.seeds = (0,)

  # Data.
  config.dataset = "mnist1d"
  config.data_dir = ""  # a prepared TFDS folder (nothing is downloaded)
  config.mnist1d = ml_collections.ConfigDict(
      {"num_samples": 5000, "train_split": 0.8, "data_seed": 42})
  config.label_noise = 0.0  # fraction of training labels flipped (symmetric noise)
  config.noise_seed = 0
  config.num_train_examples = 0  # TFDS: 0 = the split's size
  config.image_size = 224        # ImageNet
  config.shuffle_buffer = 16_384
  config.cache = True

  # Model.
  config.model = "cnn1d"
  config.model_kwargs = ml_collections.ConfigDict({"channels": (32, 32, 32)})
  config.half_precision = False

  # Training.
  config.num_epochs = 200
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.eval_every_epochs = 1
  config.optimizer = "sgd"  # or "adamw" (b1, b2)
  config.learning_rate = 0.1
  config.lr_schedule = "cosine"  # or "constant"
  config.warmup_epochs = 0.0
  config.momentum = 0.9
  config.nesterov = False
  config.b1 = 0.9
  config.b2 = 0.999
  config.weight_decay = 5e-4
  config.label_smoothing = 0.0
  config.grad_clip_norm = 0.0
  # Gradient accumulation: each step's batch_size examples in grad_accum_steps
  # micro-batches, one after the other (the memory of one micro-batch). The
  # SAM family takes one ascent from the accumulated gradient and re-evaluates
  # over the same micro-batches (sam_optax.MicroBatches: global-batch SAM);
  # one step is still one optimizer step (schedules count steps).
  config.grad_accum_steps = 1

  # Method hyperparameters, hparams.<method>.<name>: the constructors' defaults.
  config.hparams = hparams_config()
  # LookSAM / interval / stochastic SAM: 'auto' = two compiled steps chosen in
  # Python on CPU for a convolutional model (a lax.cond is slow there for
  # convolutions), lax.cond elsewhere; 'static' or 'cond' force one.
  config.phase = "auto"

  # Devices. data_parallel: jit over a ('data',) mesh of every device. m-sharpness
  # of the SAM family: 'device' = one perturbation per device's shard (the SAM
  # paper), 'global' = one from the global batch's gradient, 'split' =
  # batch_splits groups of the global batch.
  config.data_parallel = True
  config.perturbation = "device"
  config.batch_splits = 0
  # What of the training state is split over the ('data',) mesh instead of
  # replicated (experiments/placement.py): 'auto' = SAF's logit bank along its
  # example axis (padded to a multiple of the device count), when data
  # parallel on > 1 device; 'none' = everything replicated; 'fsdp' = the bank,
  # and the parameters and optimizer state (MESA's EMA too) along their
  # largest divisible axis.
  config.shard_state = "auto"

  # Checkpoints and evaluation.
  config.checkpoint_every_steps = 0  # 0: at the end only
  config.max_steps = 0               # > 0: stop there (no final evaluation)
  config.hessian_iters = 20          # Lanczos iterations for λ_max (0: skip)
  config.hessian_examples = 1000
  return finish(config, arg)


def hparams_config() -> ml_collections.ConfigDict:
  """``hparams.<method>.<name>`` for every registered method.

  A default of None (SAF's and MESA's ``start_epoch``: the papers' 30 % rule;
  ``end_epoch``) is an integer field that may be set from the command line.
  """
  table = {}
  for name, values in methods.default_hparams().items():
    table[name] = {k: ml_collections.FieldReference(None, field_type=int) if v is None else v
                   for k, v in values.items()}
  return ml_collections.ConfigDict(table)


# The tiny form of each model family (the same layers, a few channels).
TINY_MODELS = {
    "cnn1d": ("cnn1d", {"channels": (8, 8)}),
    "mlp": ("mlp", {"features": (16,)}),
    "resnet18": ("resnet18", {"width": 0.125}),
    "resnet50": ("resnet18", {"width": 0.125}),
    "wrn": ("wrn", {"depth": 10, "width": 1}),
    "wrn28_10": ("wrn", {"depth": 10, "width": 1}),
    "vit_small": ("vit_small", {"hidden_size": 16, "depth": 1, "num_heads": 2, "mlp_dim": 16}),
    "vit_s16": ("vit_small", {"hidden_size": 16, "depth": 1, "num_heads": 2, "mlp_dim": 16}),
}


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks ``config`` to seconds on one CPU device, keeping the setting's kind.

  MNIST-1D: 400 training sequences, 5 steps of 80 per epoch; TFDS: 16 examples
  at 32×32 (mock data in the tests); the tiny form of the model; one epoch, one
  device, no Hessian; SAF and MESA switch on at epoch 1 / 0 (so that a 3-epoch
  run exercises them).
  """
  config.mnist1d.num_samples = 500
  if config.dataset == "mnist1d":
    config.batch_size, config.eval_batch_size = 80, 100
  else:
    config.batch_size = config.eval_batch_size = 8
    config.num_train_examples, config.image_size, config.shuffle_buffer = 16, 32, 16
  model, kwargs = TINY_MODELS[config.model]
  config.model, config.model_kwargs = model, ml_collections.ConfigDict(kwargs)
  config.half_precision = False
  config.num_epochs = 1
  config.warmup_epochs = 0.0
  config.eval_every_epochs = 1
  config.data_parallel = False
  config.checkpoint_every_steps = 0
  config.hessian_iters = 0
  config.hessian_examples = 100
  config.hparams.saf.past_epochs = 1
  config.hparams.saf.start_epoch = 1
  config.hparams.mesa.start_epoch = 0
  config.hparams.mesa.decay = 0.9
  return config


def finish(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """``config`` in the form ``arg`` names ('' or 'tiny'), locked (no new fields)."""
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"unknown config argument {arg!r}; choose ':tiny' or nothing.")
  if arg == "tiny":
    config = tiny(config)
  config.lock()
  return config
