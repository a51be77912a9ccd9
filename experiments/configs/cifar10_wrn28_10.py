"""CIFAR-10, WideResNet-28-10, 200 epochs: the CIFAR setting of SAM, ASAM and CSAM.

Foret et al. (ICLR 2021), Kwon et al. (ICML 2021), CSAM (ICLR 2026): SGD with
momentum 0.9, peak lr 0.1 with cosine decay, weight decay 5e-4, batch 128,
4-pixel padded random crop and horizontal flip, label smoothing 0.1 (as in
most reference scripts). ρ: SAM / CSAM 0.05, ASAM 0.5 (METHODS.md; the
library's defaults, so nothing is set here). Reported (top-1 %): WRN-28-10
SGD 95.83 (ECE 2.36 %), SAM 96.91 (0.86 %), CSAM 96.97 (0.50 %).

Needs CIFAR-10 prepared in TFDS (``tfds build cifar10 --data_dir DIR``; this
program never downloads) and an accelerator; e.g.::

  python -m experiments.compare --config=experiments/configs/cifar10_wrn28_10.py \\
      --config.data_dir=DIR --config.methods=sgd,sam,csam
"""

import ml_collections

from experiments.configs import base


def get_config(arg=None):
  config = base.get_config()
  config.dataset = "cifar10"
  config.model = "wrn28_10"
  config.model_kwargs = ml_collections.ConfigDict()
  config.label_smoothing = 0.1
  config.eval_every_epochs = 5
  config.checkpoint_every_steps = 5000
  return base.finish(config, arg)
