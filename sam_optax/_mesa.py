"""MESA: SAF's trajectory loss with an exponential moving average as the teacher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _checks, _numerics, _phase
from sam_optax.losses import TrajectoryTarget
from sam_optax._saf import (TrajectorySchedule, example_mask_or_ones, find_state,
                           make_schedule, reject_injected)


class MESAState(NamedTuple):
  """State of :func:`mesa`.

  Attributes:
    count: steps taken.
    ema_params: the EMA of the weights given to ``update`` so far (float32
      or wider), ``ema ← d·ema + (1−d)·w`` once per ``update``, started as a
      copy of the initial weights.
    ema_model_state: the EMA of the model state (e.g. BatchNorm statistics),
      or None if :func:`mesa` was built without ``model_state``.
    rate: ``1 − d``, the weight of the newest weights (computed in float64,
      stored in float32, so that d = 0.9998 loses no precision).
    schedule: λ, τ and the epoch window.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  ema_params: optax.Params
  ema_model_state: Any
  rate: jax.Array
  schedule: TrajectorySchedule


def mesa(
    steps_per_epoch: int,
    *,
    lam: float = 0.8,
    tau: float = 5.0,
    decay: float = 0.9998,
    start_epoch: int = 5,
    end_epoch: int | None = None,
    model_state: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Memory-Efficient SAF, MESA (Du et al., NeurIPS 2022, arXiv:2205.14083).

  SAF's trajectory loss with the logits of an exponential moving average of
  the weights as the target instead of a memory bank of past logits:

  .. math::

    L = \mathrm{CE}(f_w(x), y) + λ τ^2 \operatorname{mean}_{batch}
        \mathrm{KL}\big(\operatorname{softmax}(f_{\bar w}(x)/τ) \,\|\,
        \operatorname{softmax}(f_w(x)/τ)\big),
    \qquad \bar w_{t+1} = d\,\bar w_t + (1 − d)\, w_{t+1},\ \ \bar w_0 = w_0,

  on for the (0-indexed) epochs ``E_start < e < E_end`` (epoch
  ``e = count // steps_per_epoch``); outside them the step is the base
  optimizer's, exactly. Cost: one extra forward pass of the EMA weights (in
  evaluation mode, without gradient), no extra backward; before
  ``E_start`` and after ``E_end`` that forward is skipped (``jax.lax.cond``).

  Which weights are averaged: the EMA is updated once per step, from step
  0, with the weights *after* the step, as in the paper (PyTorch
  ``ema.update(model)`` after ``optimizer.step()``). A transform chained
  before the base optimizer does not see those weights, so the state holds
  the EMA of the weights given to ``update`` so far (``w_0 … w_t``), and the
  newest weights ``w_{t+1}`` (the ``params`` of the next step) are folded in
  by the accessors: :func:`mesa_target` and :func:`mesa_params` return
  ``d·ema + (1−d)·params``, and the next ``update`` stores exactly that. So
  the teacher of step ``t`` is ``w̄_t`` of the formula above (at step 0,
  ``d·w_0 + (1−d)·w_0 = w_0``), and ``mesa_params(opt_state, params)`` after
  training is the EMA including the final weights, the model the paper
  evaluates. The result does not depend on where ``mesa`` sits in the chain.
  The EMA is kept in float32 (or the parameters' dtype if wider) and cast
  to the parameters' dtype when returned.

  The training step (one forward + one backward + one EMA forward)::

    tx = optax.chain(sam_optax.mesa(steps_per_epoch=S), optax.sgd(lr, momentum=0.9))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
      target = sam_optax.mesa_target(
          opt_state, params, lambda ema: model.apply(ema, batch['x'], train=False))
      def loss_fn(params):
        logits = model.apply(params, batch['x'], train=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
        return ce + sam_optax.losses.trajectory_loss(logits, target), logits
      (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

  Model state (BatchNorm statistics): pass the initial state as
  ``model_state=`` here; then ``apply_fn`` of :func:`mesa_target` is called
  as ``apply_fn(ema_params, ema_model_state)``, and ``update``,
  :func:`mesa_target` and :func:`mesa_model_state` take ``model_state=``,
  the statistics *paired with* ``params`` (those the step's forward starts
  from, not the ones it returns). Floating leaves are averaged like the
  weights; other leaves (counters) are taken as they are. Under ``pmap``
  the EMA of per-device statistics is per device unless they are
  synchronized (e.g. ``BatchNorm(axis_name=...)``).

  Data parallelism: the EMA is a function of the (replicated) weights, so
  it needs no communication; under ``jit`` with sharded weights it is
  sharded like them.

  Args:
    steps_per_epoch: optimizer steps per epoch.
    lam: λ ≥ 0 (0.8 in the paper; 0 gives plain training).
    tau: the temperature τ > 0 (5).
    decay: the EMA decay d ∈ [0, 1] per step (0.9998).
    start_epoch: ``E_start`` (5 epochs, or ~30% of training).
    end_epoch: ``E_end``, or None for no end.
    model_state: the initial model state to average too, or None.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` that passes the gradient
    through unchanged; chain it before the base optimizer.

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> x = jax.random.normal(jax.random.key(0), (4, 3))
    >>> y = jnp.array([0, 1, 0, 1])
    >>> params = {'w': jnp.zeros((3, 2))}
    >>> tx = optax.chain(sam_optax.mesa(steps_per_epoch=1, start_epoch=0,
    ...                                 decay=0.9), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> apply = lambda params, x: x @ params['w']
    >>> @jax.jit
    ... def train_step(params, opt_state):
    ...   target = sam_optax.mesa_target(opt_state, params, lambda ema: apply(ema, x))
    ...   def loss_fn(params):
    ...     logits = apply(params, x)
    ...     ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    ...     return ce + sam_optax.losses.trajectory_loss(logits, target)
    ...   grads = jax.grad(loss_fn)(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> for _ in range(3):
    ...   params, opt_state = train_step(params, opt_state)
    >>> ema = sam_optax.mesa_params(opt_state, params)  # the weights to evaluate
    >>> jax.tree.map(jnp.shape, ema)
    {'w': (3, 2)}
  """
  method = "mesa"
  reject_injected(method, steps_per_epoch=steps_per_epoch, lam=lam, tau=tau,
                  decay=decay, start_epoch=start_epoch, end_epoch=end_epoch)
  schedule = make_schedule(
      method, lam=lam, tau=tau, steps_per_epoch=steps_per_epoch,
      start_epoch=start_epoch, end_epoch=end_epoch, min_start_epoch=0)
  _checks.check_in_range("decay", decay, 0.0, 1.0, method)
  initial_model_state = model_state

  def init(params: optax.Params) -> MESAState:
    ema_model_state = None
    if initial_model_state is not None:
      ema_model_state = jax.tree.map(_widen, initial_model_state)
    return MESAState(
        count=jnp.zeros([], jnp.int32),
        ema_params=jax.tree.map(_widen, params),
        ema_model_state=ema_model_state,
        rate=jnp.asarray(1.0 - float(decay), jnp.float32),
        schedule=schedule,
    )

  def update(updates, state, params=None, *, model_state=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "mesa: update() needs params (the weights of this step) to update"
          " the EMA: call tx.update(grads, opt_state, params).")
    ema_params = _fold(state.rate, state.ema_params, params, "params")
    ema_model_state = _fold_model_state("mesa: update", state, model_state)
    return updates, MESAState(
        count=optax.safe_increment(state.count),
        ema_params=ema_params,
        ema_model_state=ema_model_state,
        rate=state.rate,
        schedule=state.schedule,
    )

  return optax.GradientTransformationExtraArgs(init, update)


def mesa_params(opt_state: Any, params: optax.Params) -> optax.Params:
  """The EMA weights ``d·ema + (1−d)·params``, in the dtypes of ``params``.

  ``params`` are the current weights (after the last step): the result is
  the EMA that the paper evaluates, and the teacher of the next step.

  Args:
    opt_state: the state of an optimizer that chains :func:`mesa`.
    params: the current weights.

  Returns:
    The EMA weights, a pytree like ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(sam_optax.mesa(steps_per_epoch=10), optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> sam_optax.mesa_params(state, jnp.ones(2))  # 0.9998·0 + 0.0002·1
    Array([0.0002, 0.0002], dtype=float32)
  """
  state = find_state(opt_state, MESAState, "mesa_params", "mesa")
  return _numerics.cast_like(_fold(state.rate, state.ema_params, params, "params"), params)


def mesa_model_state(opt_state: Any, model_state: Any) -> Any:
  """The EMA of the model state, ``d·ema + (1−d)·model_state`` (see :func:`mesa`).

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> stats = {'mean': jnp.zeros(2)}
    >>> tx = optax.chain(sam_optax.mesa(10, model_state=stats), optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(3))
    >>> sam_optax.mesa_model_state(state, stats)['mean'].shape
    (2,)
  """
  state = find_state(opt_state, MESAState, "mesa_model_state", "mesa")
  return _numerics.cast_like(_fold_model_state("mesa_model_state", state, model_state), model_state)


def mesa_target(
    opt_state: Any,
    params: optax.Params,
    apply_fn: Callable[..., jax.Array],
    *,
    model_state: Any = None,
    example_mask: jax.Array | None = None,
) -> TrajectoryTarget:
  """The trajectory-loss target of this step: the EMA model's logits.

  Runs ``apply_fn`` once on the EMA weights (see :func:`mesa_params`),
  without gradient (``jax.lax.stop_gradient``), inside a ``jax.lax.cond``
  that skips it while the trajectory loss is off. Call it before the
  forward pass of the step, with the optimizer state and the weights that
  this step's ``update`` will receive.

  Args:
    opt_state: the state of an optimizer that chains :func:`mesa`.
    params: the current weights (folded into the EMA, see :func:`mesa`).
    apply_fn: ``apply_fn(ema_params) -> logits [batch, num_classes]`` (with a
      tracked model state: ``apply_fn(ema_params, ema_model_state)``), the
      model in evaluation mode (running statistics, no dropout) on this
      step's batch.
    model_state: the model state paired with ``params``, if :func:`mesa`
      tracks one.
    example_mask: optional ``[batch]`` mask, 0 for padding rows.

  Returns:
    A :class:`sam_optax.losses.TrajectoryTarget` for
    :func:`sam_optax.losses.trajectory_loss`; its logits are zeros while the
    loss is off (its weight is then 0).

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(sam_optax.mesa(steps_per_epoch=1, start_epoch=0),
    ...                  optax.sgd(0.1))
    >>> params = jnp.eye(2)
    >>> state = tx.init(params)
    >>> target = sam_optax.mesa_target(state, params, lambda w: jnp.ones((3, 2)) @ w)
    >>> target.logits.shape, float(target.weight)
    ((3, 2), 0.0)
  """
  state = find_state(opt_state, MESAState, "mesa_target", "mesa")
  _checks.check_callable("apply_fn", apply_fn, "mesa_target", required=True)
  ema_params = _numerics.cast_like(_fold(state.rate, state.ema_params, params, "params"), params)
  if state.ema_model_state is None:
    if model_state is not None:
      raise ValueError(_untracked_model_state("mesa_target"))
    teacher = lambda: apply_fn(ema_params)
  else:
    ema_model_state = _numerics.cast_like(
        _fold_model_state("mesa_target", state, model_state), model_state)
    teacher = lambda: apply_fn(ema_params, ema_model_state)

  shape = jax.eval_shape(teacher)
  if not hasattr(shape, "shape") or len(shape.shape) != 2:
    raise ValueError(
        "mesa_target: apply_fn must return logits of shape [batch,"
        f" num_classes], got {getattr(shape, 'shape', type(shape).__name__)}.")
  weight = state.schedule.weight(state.count)
  run = lambda: jax.lax.stop_gradient(jnp.asarray(teacher(), jnp.float32))
  skip = lambda: jnp.zeros(shape.shape, jnp.float32)
  logits = _phase.cond(weight > 0, run, skip)
  mask = example_mask_or_ones("mesa_target", example_mask, shape.shape[0])
  return TrajectoryTarget(
      logits=logits, mask=mask.astype(jnp.float32), weight=weight,
      tau=state.schedule.tau)


def _widen(x: Any) -> jax.Array:
  """A copy of ``x``: floating leaves in float32 or wider, others as they are.

  Always a new buffer, so that a step that donates the optimizer state never
  donates the parameters' buffer a second time.
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.array(x, dtype=jnp.promote_types(x.dtype, jnp.float32), copy=True)
  return jnp.array(x, copy=True)


def _fold(rate: jax.Array, ema: Any, current: Any, what: str) -> Any:
  """``ema + (1−d)·(current − ema)`` on floating leaves; ``current`` on the others.

  Equal to ``d·ema + (1−d)·current``; this form keeps ``ema`` exactly when
  ``current == ema``.
  """
  try:
    jax.tree.map(lambda a, b: None, ema, current)
  except ValueError as error:
    raise ValueError(
        f"mesa: the {what} must have the structure of the {what} the EMA was"
        f" started from: {error}") from None

  def fold(average, value):
    value = jnp.asarray(value)
    if not jnp.issubdtype(average.dtype, jnp.floating):
      return value.astype(average.dtype)
    if value.shape != average.shape:
      raise ValueError(
          f"mesa: a leaf of the {what} has shape {value.shape}, but the EMA's"
          f" has shape {average.shape}.")
    return average + rate.astype(average.dtype) * (value.astype(average.dtype) - average)

  return jax.tree.map(fold, ema, current)


def _fold_model_state(caller: str, state: MESAState, model_state: Any) -> Any:
  if state.ema_model_state is None:
    if model_state is not None:
      raise ValueError(_untracked_model_state(caller))
    return None
  if model_state is None:
    raise ValueError(
        f"{caller}: mesa was built with model_state=..., so pass the current"
        " model state (the one paired with params) as model_state=... too.")
  return _fold(state.rate, state.ema_model_state, model_state, "model state")


def _untracked_model_state(caller: str) -> str:
  return (
      f"{caller}: got model_state, but mesa was built without one; pass the"
      " initial model state to sam_optax.mesa(..., model_state=...) to"
      " average it.")
