"""CIFAR-10, ResNet-18, 200 epochs: the setting of the BSAM reference code (ajiaaa/BSAM).

SGD momentum 0.9, lr 0.05 cosine, weight decay 1e-3, label smoothing 0.1,
batch 128; BSAM's ρ_max = 0.05 and ρ_min,t = 0.05 · lr_t / lr_max (METHODS.md;
the library's defaults). ``--config.model_kwargs.width=0.25`` gives a
narrower network.
"""

import ml_collections

from experiments.configs import base, cifar10_wrn28_10


def get_config(arg=None):
  config = cifar10_wrn28_10.get_config()
  config.model = "resnet18"
  config.model_kwargs = ml_collections.ConfigDict({"width": 1.0})
  config.learning_rate = 0.05
  config.weight_decay = 1e-3
  return base.finish(config, arg)
