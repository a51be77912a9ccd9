"""Experiments for sam_optax: Flax models, data pipelines, training and the comparison.

Layout (after the Flax examples):

* :mod:`experiments.models` -- the networks (MLP/CNN for MNIST-1D, ResNet-18,
  WideResNet, ResNet-50, a small ViT) and :func:`~experiments.models.get_model`;
* :mod:`experiments.input_pipeline` -- MNIST-1D in memory, TFDS CIFAR/ImageNet;
* :mod:`experiments.methods` -- the method registry (one row per library method);
* :mod:`experiments.main` -- the command line (flags only);
* :mod:`experiments.train` -- ``train_and_evaluate(config, workdir)``;
  :mod:`experiments.train_step` -- the training step; :mod:`experiments.phases`
  -- the phase of LookSAM / interval / stochastic SAM;
* :mod:`experiments.config_checks`, :mod:`experiments.errors` -- the config's
  checks and their ``UsageError``;
* :mod:`experiments.evaluate`, :mod:`experiments.checkpoints`,
  :mod:`experiments.placement` -- evaluation, checkpoints, devices;
* :mod:`experiments.compare` -- the main job: every method, one table, plots;
* :mod:`experiments.metrics`, :mod:`experiments.plots` -- evaluation and figures;
* ``experiments/configs/*.py`` -- ``base.py`` and one ``get_config(arg)`` per
  experiment overriding it (``FILE:tiny``: its seconds-long form).

This package is not part of the installed library: run it from the
repository root (``python -m experiments.compare``).
"""
