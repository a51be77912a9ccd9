"""ImageNet, ResNet-50, 90 epochs at batch 4096: the TPU-pod setting of SAM and GSAM.

Foret et al. (2021) and Zhuang et al. (2022, big_vision): global batch 4096,
SGD momentum 0.9 (Nesterov), peak lr 0.1 · 4096 / 256 = 1.6 after 5 warm-up
epochs, cosine decay, weight decay 1e-4, label smoothing 0.1, Inception crop
to 224 and flip, bfloat16 activations. ρ: SAM / CSAM 0.05, ASAM 1.0; SAF
Ẽ = 2 (METHODS.md). Reported top-1 (%): SGD 76.97 / SAM 77.32 / CSAM 77.95
(CSAM paper); SGD 76.0 / SAM 76.9 / SAF 77.8 / MESA 77.5 (SAF paper, batch 1024).

The same file runs unchanged on one host or a pod slice (the launch command is
in ``experiments/README.md``, "ImageNet ResNet-50 on a TPU pod slice"): with
``--distributed`` every host starts ``jax.distributed``, reads its own
``1/P`` slice of the training split (``4096 / P`` examples per step), the
batch is split across all devices (``data_parallel``), SAM perturbs once per
device (``perturbation = 'device'``: m = 4096 / devices, as in the paper's TPU
runs), every host evaluates its share of the validation split (gathered), and
checkpoints go to ``--workdir`` (a path every host sees, e.g. ``gs://...``).
Needs ``imagenet2012`` prepared in TFDS (manual download; ``--config.data_dir``).

SAF's logit bank is ``(Ẽ + 1) × 1,281,167 × 1000`` entries (15 GB in float32,
7.7 GB in bfloat16); the trainer splits it along its example axis over the
devices (``shard_state = 'auto'``, the default: padded to 1,281,168 rows on 8
or 16 devices, 15 GB / devices each; ``experiments/placement.py``), so SAF runs
at this scale on a pod slice. ``--config.shard_state=fsdp`` splits the
parameters and the optimizer state (MESA's EMA) too.
"""

import ml_collections

from experiments.configs import base


def get_config(arg=None):
  config = base.get_config()
  config.methods = ("sgd", "sam", "csam", "gsam", "asam", "mesa")
  config.dataset = "imagenet2012"
  config.model = "resnet50"
  config.model_kwargs = ml_collections.ConfigDict()
  config.half_precision = True

  config.num_epochs = 90
  config.batch_size = 4096
  config.eval_batch_size = 1024
  config.eval_every_epochs = 5
  config.learning_rate = 1.6
  config.warmup_epochs = 5.0
  config.nesterov = True
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1

  config.hparams.asam.rho = 1.0
  config.hparams.saf.past_epochs = 2

  config.checkpoint_every_steps = 2000
  config.hessian_iters = 10
  config.hessian_examples = 256
  return base.finish(config, arg)
