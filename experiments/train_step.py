"""The training step of one run: ``train_step(state, batch, rng) -> (state, metrics)``.

The step is the library's canonical one, with BatchNorm as documented:
``loss_fn(params, batch_stats, batch, rng) -> (loss, (new_batch_stats,
logits))``, ``has_aux=True``; the user's pass updates the statistics, the
method's re-evaluations at perturbed weights do not. How the step feeds each
method (its extra ``update`` arguments, SAF's and MESA's trajectory target)
is the method's :class:`experiments.methods.Step`. :mod:`experiments.train`
builds a run around it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import sam_optax
from experiments import methods
from experiments.evaluate import per_example_cross_entropy, variables


class TrainState(train_state.TrainState):
  """Flax's TrainState with BatchNorm statistics and extra args for ``tx.update``."""

  batch_stats: Any = None

  def apply_gradients(self, *, grads, update_args=None, **kwargs):
    """``tx.update(grads, opt_state, params, **update_args)`` then apply the updates."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        **(update_args or {}))
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)


class LossFns(NamedTuple):
  """The training loss in its three forms, all ``f(params, batch_stats, batch, rng)``.

  Attributes:
    loss: ``-> (mean loss, (new_batch_stats, logits))``.
    logits: CSAM's ``-> ((logits, labels), new_batch_stats)``.
    per_example: ESAM's ``-> (losses [B], (new_batch_stats, logits))``.
  """

  loss: Any
  logits: Any
  per_example: Any


def make_loss_fns(model, label_smoothing: float = 0.0) -> LossFns:
  """The training loss (cross-entropy, training mode) of ``model``."""

  def logits_fn(params, batch_stats, batch, rng):
    logits, updated = model.apply(variables(params, batch_stats), batch["x"], train=True,
                                  mutable=["batch_stats"], rngs={"dropout": rng})
    return (logits, batch["y"]), updated.get("batch_stats", batch_stats)

  def per_example_fn(params, batch_stats, batch, rng):
    (logits, labels), new_batch_stats = logits_fn(params, batch_stats, batch, rng)
    return per_example_cross_entropy(logits, labels, label_smoothing), (new_batch_stats, logits)

  def loss_fn(params, batch_stats, batch, rng):
    losses, aux = per_example_fn(params, batch_stats, batch, rng)
    return losses.mean(), aux

  return LossFns(loss_fn, logits_fn, per_example_fn)


def make_train_step(loss_fns: LossFns, method: methods.Method, predict,
                    axis_name: str | None = None, grad_accum_steps: int = 1):
  """``train_step(state, batch, rng) -> (state, metrics)`` for ``method``.

  One forward and backward pass of the user's loss, then ``tx.update`` with
  the extra arguments the method's :class:`~experiments.methods.Step` names
  (and ``ascent_step``, the phase of LookSAM / interval / stochastic SAM,
  when it is chosen at trace time: see :class:`experiments.phases.PhasedStep`).
  For SAF and MESA the trajectory loss of the target read before the pass is
  added to the loss of that same pass.

  With ``grad_accum_steps = k > 1`` the pass runs over ``k`` micro-batches
  of the batch, one after the other (``sam_optax.accumulated_grad``): the
  gradient is their mean (the whole batch's, for this mean loss), the logits
  and per-example losses are concatenated, and the BatchNorm statistics are
  the mean of the ``k`` micro-batches' updates of the same statistics (so the
  running mean moves as with the whole batch; the running variance is the
  micro-batches' within-variance). BatchNorm normalizes each micro-batch with
  its own statistics, so with BatchNorm the step is that of a batch of
  ``batch_size / k`` normalization groups ("ghost" BatchNorm), not exactly
  the unaccumulated step; without BatchNorm (and dropout, whose key is the
  step's for every micro-batch) it equals it. The method was built with
  ``sam_optax.MicroBatches(k)`` (:meth:`experiments.methods.Context.data_parallel`).

  Args:
    loss_fns: :func:`make_loss_fns`.
    method: the registry row.
    predict: ``predict(params, batch_stats, x) -> logits`` in evaluation mode
      (MESA's EMA forward).
    axis_name: the data axis when the step runs per device (``shard_map``,
      :meth:`~experiments.placement.Placement.per_device`): the batch is the
      device's shard, the method averages its surrogate over the axis
      (``sam_optax.PerDevice``), BatchNorm normalizes with the shard's
      statistics and its running averages are averaged over the axis, the
      metrics are summed over it, and dropout draws per device.
    grad_accum_steps: micro-batches per step (SAF, MESA and ESAM: 1 only,
      checked by :func:`experiments.config_checks.validate_config`).
  """

  def objective(params, batch_stats, batch, rng, target):
    losses, (new_batch_stats, logits) = loss_fns.per_example(params, batch_stats, batch, rng)
    loss = losses.mean()
    total = loss if target is None else loss + sam_optax.losses.trajectory_loss(logits, target)
    return total, (new_batch_stats, logits, loss, losses)

  def train_step(state, batch, rng, ascent_step=None):
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    loss_args = {"batch_stats": state.batch_stats, "batch": batch, "rng": rng}
    phase = {} if ascent_step is None else {"ascent_step": ascent_step}
    step = method.step
    target = None if step.target is None else step.target(
        state.opt_state, state.params, state.batch_stats, batch, predict)
    if grad_accum_steps > 1:
      grads, (stacked_stats, logits, loss, losses) = sam_optax.accumulated_grad(
          lambda params, **args: objective(params, target=target, **args), grad_accum_steps,
          batch_argnames=("batch",), has_aux=True)(state.params, **loss_args)
      new_batch_stats = jax.tree.map(lambda x: x.mean(0), stacked_stats)
      logits, losses = (x.reshape((-1,) + x.shape[2:]) for x in (logits, losses))
      loss = loss.mean()
    elif step is methods.SAMPA:  # it takes no gradient at w: a forward pass only
      _, (new_batch_stats, logits, loss, losses) = objective(
          state.params, target=target, **loss_args)
      grads = state.params
    else:
      (_, (new_batch_stats, logits, loss, losses)), grads = jax.value_and_grad(
          objective, has_aux=True)(state.params, target=target, **loss_args)
    state = state.apply_gradients(
        grads=grads, update_args={**step.update_args(loss_args, logits, losses), **phase},
        batch_stats=new_batch_stats)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["y"])
    if axis_name is not None:
      state = state.replace(batch_stats=jax.lax.pmean(state.batch_stats, axis_name))
      loss, correct = jax.lax.pmean(loss, axis_name), jax.lax.psum(correct, axis_name)
    return state, {"loss": loss, "correct": correct}

  return train_step


def make_predict(model):
  """``predict(params, batch_stats, x) -> logits`` in evaluation mode, float32."""

  def predict(params, batch_stats, x):
    return model.apply(variables(params, batch_stats), x, train=False).astype(jnp.float32)

  return predict
