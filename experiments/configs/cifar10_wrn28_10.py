"""CIFAR-10, WideResNet-28-10, 200 epochs: the CIFAR setting of SAM, ASAM and CSAM.

Foret et al. (ICLR 2021), Kwon et al. (ICML 2021), CSAM (ICLR 2026): SGD with
momentum 0.9, peak lr 0.1 with cosine decay, weight decay 5e-4, batch 128,
4-pixel padded random crop and horizontal flip, label smoothing 0.1 (as in
most reference scripts). ρ: SAM / CSAM 0.05, ASAM 0.5 (METHODS.md). Reported
(top-1 %): WRN-28-10 SGD 95.83 (ECE 2.36 %), SAM 96.91 (0.86 %), CSAM 96.97
(0.50 %).

Needs CIFAR-10 prepared in TFDS (``tfds build cifar10 --data_dir DIR``; this
program never downloads) and an accelerator; e.g.::

  python -m experiments.compare --config experiments/configs/cifar10_wrn28_10.py \\
      --set data_dir=DIR --methods sgd,sam,csam
"""

import ml_collections

from experiments import methods
from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.methods = ("sgd", "sam", "csam", "stable_sam", "saf", "mesa", "bsam", "asam", "gsam")
  config.dataset = "cifar10"
  config.label_noise = 0.0
  config.cache = True
  config.model = "wrn28_10"
  config.model_kwargs = ml_collections.ConfigDict()
  config.half_precision = False

  config.num_epochs = 200
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.eval_every_epochs = 5

  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.lr_schedule = "cosine"
  config.warmup_epochs = 0.0
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.label_smoothing = 0.1

  # The papers' values (the registry defaults), not the MNIST-1D ones.
  config.hparams = ml_collections.ConfigDict(methods.default_hparams())
  config.hparams.sam.rho = 0.05
  config.hparams.csam.rho = 0.05
  config.hparams.stable_sam.rho = 0.05
  config.hparams.asam.rho = 0.5
  config.hparams.gsam.rho = 0.05
  config.hparams.bsam.rho = 0.05
  config.hparams.mesa.decay = 0.9998  # the paper's; ~13 epochs of 390 steps

  config.checkpoint_every_steps = 5000
  config.hessian_iters = 20
  config.hessian_examples = 1000
  return config
