"""CIFAR-100, WideResNet-28-10, 200 epochs: :mod:`cifar10_wrn28_10` with CIFAR-100's radii.

ρ: SAM 0.1, CSAM 0.2, ASAM 1.0 (METHODS.md); everything else as on CIFAR-10.
"""

import ml_collections

from experiments.configs import cifar10_wrn28_10


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_wrn28_10.get_config()
  config.dataset = "cifar100"
  config.hparams.sam.rho = 0.1
  config.hparams.csam.rho = 0.2
  config.hparams.stable_sam.rho = 0.1
  config.hparams.asam.rho = 1.0
  config.hparams.gsam.rho = 0.1
  config.hparams.gsam.rho_min = 0.1
  return config
