"""CIFAR-100, WideResNet-28-10, 200 epochs: :mod:`cifar10_wrn28_10` with CIFAR-100's radii.

ρ: SAM 0.1, CSAM 0.2, ASAM 1.0 (METHODS.md); everything else as on CIFAR-10.
"""

from experiments.configs import base, cifar10_wrn28_10


def get_config(arg=None):
  config = cifar10_wrn28_10.get_config()
  config.dataset = "cifar100"
  h = config.hparams
  h.sam.rho = h.stable_sam.rho = h.gsam.rho = h.gsam.rho_min = 0.1
  h.csam.rho = 0.2
  h.asam.rho = 1.0
  return base.finish(config, arg)
