"""Evaluation of a run: the test metrics per epoch and the final report.

What the papers report: top-1 accuracy, NLL, ECE (15 bins), adaptive ECE, the
reliability diagram, the top Hessian eigenvalue of the training loss (and, for
the study, its trace), and the time per step. With several processes each
evaluates its own share of the split and the rows are gathered
(:func:`experiments.distributed.gather_rows`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import distributed, metrics


def variables(params, batch_stats):
  """The linen variables (no ``batch_stats`` collection without BatchNorm)."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def per_example_cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Cross-entropy per example with integer labels and optional label smoothing."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def collect_logits(predict, weights, batches, batch_size: int, across_processes: bool = True):
  """Logits and labels over ``batches``; the last batch is padded to one shape.

  With several processes each reads its own part of the split (``batches``);
  with ``across_processes`` the parts of every process are gathered, so every
  process returns the whole split, in the order of the examples' ``index``.

  Args:
    predict: the jitted ``predict(params, batch_stats, x)``.
    weights: ``(params, batch_stats)`` to evaluate, on this process's devices.
    batches: an iterable of batches with ``x``, ``y`` and ``index``.
    batch_size: the shape every batch is padded to (one compilation).
    across_processes: gather the other processes' rows (False: ``batches``
      are the same on every process, e.g. the Hessian's sample).
  """
  all_logits, all_labels, all_index = [], [], []
  for batch in batches:
    x, n = batch["x"], len(batch["y"])
    if n < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    all_logits.append(np.asarray(predict(*weights, x))[:n])
    all_labels.append(np.asarray(batch["y"]))
    all_index.append(np.asarray(batch["index"]))
  rows = {"logits": np.concatenate(all_logits), "labels": np.concatenate(all_labels),
          "index": np.concatenate(all_index)}
  if across_processes:
    rows = distributed.gather_rows(rows)
  order = np.argsort(rows["index"], kind="stable")
  return rows["logits"][order], rows["labels"][order]


def classification_metrics(logits, labels, num_bins: int = 15) -> dict[str, float]:
  """Accuracy, NLL, ECE and adaptive ECE (``num_bins`` bins)."""
  return {
      "accuracy": metrics.accuracy(logits, labels),
      "nll": metrics.nll(logits, labels),
      "ece": metrics.expected_calibration_error(logits, labels, num_bins=num_bins),
      "adaptive_ece": metrics.adaptive_calibration_error(logits, labels, num_bins=num_bins),
  }


def evaluated_weights(method, state):
  """``(params, batch_stats)`` the method is evaluated with (MESA: its EMA)."""
  if method.step.eval_weights is None:
    return state.params, state.batch_stats
  return method.step.eval_weights(state.opt_state, state.params, state.batch_stats)


def sample_loss(model, weights, sample):
  """``(loss_fn, params)``: the mean training loss on ``sample`` as ``loss_fn(params)``.

  The loss is the cross-entropy on the training labels (noisy ones included),
  with the model in evaluation mode (running BatchNorm statistics): the loss
  whose curvature :func:`hessian_eigenvalue` and :func:`hessian_trace` measure.
  """
  x, y = jnp.asarray(sample["x"]), jnp.asarray(sample["y"])
  params, batch_stats = weights

  def loss_fn(params):
    logits = model.apply(variables(params, batch_stats), x, train=False)
    return per_example_cross_entropy(logits, y).mean()

  return loss_fn, params


def hessian_eigenvalue(model, weights, sample, num_iters: int, seed: int) -> float:
  """Top eigenvalue of the Hessian of the mean training loss on ``sample`` (Lanczos)."""
  loss_fn, params = sample_loss(model, weights, sample)
  return metrics.top_hessian_eigenvalue(loss_fn, params, num_iters=num_iters,
                                        key=jax.random.key(seed))


def hessian_trace(model, weights, sample, num_samples: int, seed: int) -> tuple[float, float]:
  """``(trace, standard error)`` of that Hessian, by Hutchinson's estimator."""
  loss_fn, params = sample_loss(model, weights, sample)
  return metrics.hessian_trace(loss_fn, params, num_samples=num_samples,
                               key=jax.random.key(seed))


def evaluate_now(config, epoch: int) -> bool:
  """Whether epoch ``epoch`` (from 0) ends with a test evaluation."""
  every = max(1, int(config.eval_every_epochs or 1))
  return (epoch + 1) % every == 0 or epoch + 1 == config.num_epochs


def record_epoch(loop, epoch: int, predict, weights, pipeline, config) -> None:
  """Appends epoch ``epoch``'s training means and test metrics to ``loop.history``."""
  logits, labels = collect_logits(predict, weights, pipeline.eval_batches(),
                                  config.eval_batch_size)
  history, losses = loop.history, loop.epoch["losses"]
  history["epoch"].append(epoch + 1)
  history["train_loss"].append(math.fsum(losses) / max(1, len(losses)))
  history["train_accuracy"].append(loop.epoch["correct"] / max(1, loop.epoch["seen"]))
  history["test_accuracy"].append(metrics.accuracy(logits, labels))
  history["test_nll"].append(metrics.nll(logits, labels))
  history["test_ece"].append(metrics.expected_calibration_error(logits, labels, num_bins=15))


def final_report(config, run, state, pipeline, loop) -> dict[str, Any]:
  """The results of a finished run, as ``results.json`` holds them."""
  method, predict = run.method, run.predict
  weights = run.placement.local(evaluated_weights(method, state))
  logits, labels = collect_logits(predict, weights, pipeline.eval_batches(),
                                  config.eval_batch_size)
  diagram = metrics.reliability_diagram(logits, labels, num_bins=15)
  sample = pipeline.train_sample(config.hessian_examples)
  eigenvalue = hessian_eigenvalue(run.model, weights, sample, config.hessian_iters,
                                  config.seed) if config.hessian_iters > 0 else None
  train_logits, train_labels = collect_logits(predict, weights, [sample], len(sample["y"]),
                                              across_processes=False)
  # Under jit, batch_splits groups recompute their own gradients (one more
  # pass); the per-device (shard_map) step perturbs with the local gradient.
  splits = (run.placement.batch_splits
            if method.perturbs and not run.placement.per_device(method) else None)
  results = {
      "method": method.name,
      "summary": method.summary,
      "hparams": run.hparams,
      "dataset": config.dataset,
      "model": config.model,
      "label_noise": config.label_noise,
      "epochs": config.num_epochs,
      "steps": int(state.step),
      "finished": True,
      "evaluated": "EMA weights" if method.step.eval_weights else "trained weights",
      "test": classification_metrics(logits, labels),
      "train_sample_accuracy": metrics.accuracy(train_logits, train_labels),
      "hessian_top_eigenvalue": eigenvalue,
      "time_per_step_s": float(np.median(loop.step_times)) if loop.step_times else None,
      # batch_splits recomputes each group's gradient: one more pass.
      "gradients_per_step": method.gradients_per_step(run.hparams) + (1 if splits else 0),
      "forwards_per_step": method.forwards,
      "m_sharpness": run.placement.describe(method),
      "phase": run.phase,  # LookSAM / interval / stochastic SAM: 'static' or 'cond'
      "history": loop.history,
      "reliability_diagram": {k: np.asarray(v) for k, v in diagram.items()},
      "config": config.to_dict(),
  }
  if method.step.eval_weights is not None:
    live, _ = collect_logits(predict, run.placement.local((state.params, state.batch_stats)),
                             pipeline.eval_batches(), config.eval_batch_size)
    results["test_trained_weights"] = classification_metrics(live, labels)
  return results
