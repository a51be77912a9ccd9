"""SAF: sharpness-aware training for free, with a memory bank of past logits.

SAF and MESA (:func:`sam_optax.mesa`) add a trajectory loss to the task loss
instead of re-evaluating the gradient at a perturbed point, so a step costs
one forward and one backward pass (MESA: plus one forward of the EMA
weights). This module holds what the two share: the epoch window in which the
trajectory loss is on, the search for the method's state inside a chained
optimizer state, and SAF itself.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _checks, _numerics
from sam_optax.losses import TrajectoryTarget

_NO_END = np.iinfo(np.int32).max


# --------------------------------------------------------------------------
# Shared by SAF and MESA: when the trajectory loss is on.
# --------------------------------------------------------------------------


class TrajectorySchedule(NamedTuple):
  """The hyperparameters of the trajectory loss, kept in the optimizer state.

  They live in the state (as arrays) so that :func:`saf_target` and
  :func:`sam_optax.mesa_target` can be plain functions of the state, and so
  that a checkpoint records them.

  Attributes:
    lam: λ, the weight of the trajectory loss.
    tau: τ, the temperature of the softmax.
    steps_per_epoch: optimizer steps per epoch; epoch ``e = count // steps_per_epoch``.
    start_epoch: ``E_start``; the loss is on for ``E_start < e < E_end``.
    end_epoch: ``E_end`` (int32 max when there is none).
  """

  lam: jax.Array
  tau: jax.Array
  steps_per_epoch: jax.Array
  start_epoch: jax.Array
  end_epoch: jax.Array

  def epoch(self, count: jax.Array) -> jax.Array:
    """The 0-indexed epoch of step ``count``."""
    return count // self.steps_per_epoch

  def weight(self, count: jax.Array) -> jax.Array:
    """λ at step ``count`` if ``E_start < e < E_end``, else 0 (float32)."""
    epoch = self.epoch(count)
    active = (epoch > self.start_epoch) & (epoch < self.end_epoch)
    return jnp.where(active, self.lam, jnp.zeros_like(self.lam))


def reject_injected(method: str, **values: Any) -> None:
  """A clear ``TypeError`` for hyperparameters given as JAX arrays.

  SAF and MESA keep their hyperparameters in their state (set at ``init``),
  so ``optax.inject_hyperparams``, which rebuilds the transform with new
  values on each update, could not change them: they must be static there.
  """
  injected = [name for name, value in values.items() if isinstance(value, jax.Array)]
  if injected:
    raise TypeError(
        f"{method}: {injected[0]} must be a Python number, got"
        f" {values[injected[0]]!r}. {method} keeps its hyperparameters in its"
        " state (set at init), so optax.inject_hyperparams could not change"
        " them: change them in the state between steps instead (e.g."
        " opt_state.schedule._replace(lam=...)), and list them all in"
        " static_args: optax.inject_hyperparams(sam_optax."
        f"{method}, static_args={tuple(values)}).")


def make_schedule(
    method: str,
    *,
    lam: float,
    tau: float,
    steps_per_epoch: int,
    start_epoch: int,
    end_epoch: int | None,
    min_start_epoch: int,
    why_min_start: str = "",
) -> TrajectorySchedule:
  """Validates the hyperparameters and returns them as arrays."""
  if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
    raise ValueError(f"{method}: lam (λ) must be finite and >= 0, got lam={lam!r}.")
  _checks.check_positive("tau", tau, method)
  _checks.check_int("steps_per_epoch", steps_per_epoch, 1, method)
  _checks.check_int("start_epoch", start_epoch, 0, method)
  if start_epoch < min_start_epoch:
    raise ValueError(
        f"{method}: start_epoch={start_epoch} must be >= {min_start_epoch}"
        f"{why_min_start}.")
  if end_epoch is not None:
    _checks.check_int("end_epoch", end_epoch, 0, method)
    if end_epoch <= start_epoch + 1:
      raise ValueError(
          f"{method}: the trajectory loss is on for start_epoch < epoch <"
          f" end_epoch, so end_epoch must be > start_epoch + 1, got"
          f" start_epoch={start_epoch}, end_epoch={end_epoch}.")
  return TrajectorySchedule(
      lam=jnp.asarray(lam, jnp.float32),
      tau=jnp.asarray(tau, jnp.float32),
      steps_per_epoch=jnp.asarray(steps_per_epoch, jnp.int32),
      start_epoch=jnp.asarray(start_epoch, jnp.int32),
      end_epoch=jnp.asarray(_NO_END if end_epoch is None else end_epoch, jnp.int32),
  )


def find_state(opt_state: Any, state_type: type, caller: str, constructor: str) -> Any:
  """The one ``state_type`` inside ``opt_state`` (a chain, nested or wrapped).

  Raises:
    ValueError: if there is none, or more than one.
  """
  is_state = lambda x: isinstance(x, state_type)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if not found:
    raise ValueError(
        f"{caller}: no {state_type.__name__} in the optimizer state (a"
        f" {type(opt_state).__name__}). Build the optimizer with"
        f" optax.chain(sam_optax.{constructor}(...), base_optimizer) and pass"
        " the state that its init/update returned.")
  if len(found) > 1:
    raise ValueError(
        f"{caller}: the optimizer state holds {len(found)} {state_type.__name__}s;"
        f" chain sam_optax.{constructor} only once.")
  return found[0]


def example_mask_or_ones(caller: str, example_mask: Any, batch: int) -> jax.Array:
  """``example_mask`` as a ``[batch]`` bool array (all True if None)."""
  if example_mask is None:
    return jnp.ones([batch], bool)
  if jnp.shape(example_mask) != (batch,):
    raise ValueError(
        f"{caller}: example_mask must have shape [batch] = ({batch},), got"
        f" {jnp.shape(example_mask)}.")
  return jnp.asarray(example_mask) != 0


# --------------------------------------------------------------------------
# SAF.
# --------------------------------------------------------------------------


class SAFState(NamedTuple):
  """State of :func:`saf`.

  Attributes:
    count: steps taken.
    bank: ``[Ẽ + 1, num_examples, num_classes]``, the logits of every example
      in the last ``Ẽ + 1`` epochs; epoch ``e`` is written to slot
      ``e mod (Ẽ + 1)``.
    invalid_count: how many (unmasked) example indices outside
      ``[0, num_examples)`` ``update`` has been given; their logits were not
      stored. Stays 0 in a correct input pipeline.
    schedule: λ, τ and the epoch window (:class:`TrajectorySchedule`).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  bank: jax.Array
  invalid_count: jax.Array
  schedule: TrajectorySchedule


def saf(
    num_examples: int,
    num_classes: int,
    steps_per_epoch: int,
    *,
    lam: float = 0.3,
    tau: float = 5.0,
    start_epoch: int = 5,
    end_epoch: int | None = None,
    past_epochs: int = 3,
    bank_dtype: Any = jnp.float32,
    axis_name: str | None = None,
    check_indices: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-Aware Training for Free (Du et al., NeurIPS 2022, arXiv:2205.14083).

  SAF replaces SAM's sharpness term by a trajectory loss on the logits
  ``z_past`` that the model produced for the same examples ``Ẽ`` epochs ago:

  .. math::

    L = \mathrm{CE}(f_w(x), y) + λ τ^2 \operatorname{mean}_{batch}
        \mathrm{KL}\big(\operatorname{softmax}(z_{past}/τ) \,\|\,
        \operatorname{softmax}(f_w(x)/τ)\big),

  on for the (0-indexed) epochs ``E_start < e < E_end``; outside them the
  step is the base optimizer's, exactly. Cost: no extra forward or backward
  pass. The trajectory loss joins the user's single forward and backward
  pass; this transform does no gradient computation at all. It passes the
  gradient through unchanged and stores the batch's logits in a memory bank
  in the optimizer state (jit-compatible, saved with the checkpoint):

  * ``update(grads, state, params, logits=..., example_index=...)`` writes
    ``stop_gradient(logits)`` of the examples ``example_index`` into slot
    ``e mod (Ẽ + 1)`` of the bank, every step (also before ``E_start``);
  * :func:`saf_target` reads slot ``(e − Ẽ) mod (Ẽ + 1)``, the logits written
    ``Ẽ`` epochs earlier for the same examples, and returns them with
    λ (or 0 outside the epoch window) as a
    :class:`~sam_optax.losses.TrajectoryTarget` for
    :func:`sam_optax.losses.trajectory_loss`.

  The training step (one forward + one backward)::

    tx = optax.chain(
        sam_optax.saf(num_examples=N, num_classes=C, steps_per_epoch=S),
        optax.sgd(lr, momentum=0.9))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
      target = sam_optax.saf_target(opt_state, batch['index'])
      def loss_fn(params):
        logits = model.apply(params, batch['x'])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
        return ce + sam_optax.losses.trajectory_loss(logits, target), logits
      (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params, logits=logits,
                                     example_index=batch['index'])
      return optax.apply_updates(params, updates), opt_state

    for epoch in range(num_epochs):
      for batch in batches(epoch):          # yields 'x', 'y' and 'index'
        params, opt_state = train_step(params, opt_state, batch)
      sam_optax.saf_check(opt_state)        # raises if an index was out of range

  The input pipeline yields each example's index in ``[0, num_examples)``,
  every example once per epoch, in any (per-epoch shuffled) order. An epoch
  is ``steps_per_epoch`` calls of ``update``. The last, partial batch of an
  epoch may be either smaller (a second compilation of the step) or padded
  to the full batch size with ``example_mask`` (1 for real examples, 0 for
  padding) given to both :func:`saf_target` and ``update``: padded rows are
  not stored and do not count in the KL mean (mask the task loss yourself).

  Data parallelism: the bank is one global bank indexed by example id.

  * Under ``jax.jit`` with a sharded batch (GSPMD) nothing is needed: the
    logits and indices are global arrays. The bank may be sharded along its
    example axis (``PartitionSpec(None, 'data', None)``) to split its memory
    (the experiments' trainer does: ``config.shard_state``,
    ``experiments/placement.py``); that axis must then be divisible by the
    device count (pad ``num_examples`` up: the extra rows are never indexed).
  * Under ``jax.pmap`` / ``shard_map`` pass ``axis_name``: ``update``
    all-gathers ``(example_index, logits, example_mask)`` of every device and
    writes them all, so every device holds the same, complete bank, and
    :func:`saf_target` reads each device's own examples from it. (The
    reference PyTorch code keeps one bank per process, which breaks with
    per-epoch reshuffling.)

  Example indices out of range: jax's scatter drops such writes silently,
  so ``update`` detects them. The bad rows are not stored and are counted
  in ``SAFState.invalid_count`` (no host synchronization);
  :func:`saf_check` raises a ``ValueError`` if that count is not 0: call it
  on the host, e.g. once per epoch. :func:`saf_target` gives such rows mask
  0. Eagerly (no ``jit``) ``update`` raises the ``ValueError`` at once. With
  ``check_indices=True`` it raises it at once under ``jit`` / ``pmap`` too,
  from a host callback that runs only when an index is bad (surfacing as a
  ``jax.errors.JaxRuntimeError`` whose message contains it); the callback
  makes every step slower (about 1.4× SGD on a small CPU model, where the
  default is about 1.03×), so use it to debug an input pipeline.

  Memory: ``(Ẽ + 1) · num_examples · num_classes`` entries of
  ``bank_dtype`` (CIFAR-10, Ẽ = 3: 8 MB in float32; ImageNet with Ẽ = 2:
  15 GB, so shard it or use ``bank_dtype=jnp.bfloat16``).

  Args:
    num_examples: N, the number of training examples (indices ``0..N−1``).
    num_classes: C, the number of logits per example.
    steps_per_epoch: optimizer steps per epoch (``ceil(N / batch)`` with a
      last partial batch).
    lam: λ ≥ 0 (0.3 in the paper; 0 gives plain training).
    tau: the temperature τ > 0 (5).
    start_epoch: ``E_start`` (5 epochs, or ~30% of training); must be ≥
      ``past_epochs`` so that the slot read has been written.
    end_epoch: ``E_end``, or None for no end.
    past_epochs: Ẽ ≥ 1 (3; 2 for ImageNet ResNet-50); the bank has
      ``Ẽ + 1`` slots.
    bank_dtype: the dtype of the stored logits.
    axis_name: the ``pmap`` / ``shard_map`` axis to all-gather the batch over.
    check_indices: raise at once (via a host callback) when an example index
      is out of range under ``jit``; slower, for debugging.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keywords ``logits`` (``[batch, num_classes]``), ``example_index``
    (``[batch]`` ints) and optionally ``example_mask`` (``[batch]``); chain it
    before the base optimizer.

  References:
    Du et al., `Sharpness-Aware Training for Free
    <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> x = jax.random.normal(jax.random.key(0), (6, 3))
    >>> y, index = jnp.array([0, 1, 0, 1, 0, 1]), jnp.arange(6)
    >>> params = jnp.zeros((3, 2))
    >>> tx = optax.chain(
    ...     sam_optax.saf(num_examples=6, num_classes=2, steps_per_epoch=2,
    ...                   start_epoch=1, past_epochs=1),
    ...     optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> @jax.jit
    ... def train_step(params, opt_state, x, y, index):
    ...   target = sam_optax.saf_target(opt_state, index)
    ...   def loss_fn(params):
    ...     logits = x @ params
    ...     ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    ...     return ce + sam_optax.losses.trajectory_loss(logits, target), logits
    ...   (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params, logits=logits,
    ...                                  example_index=index)
    ...   return optax.apply_updates(params, updates), opt_state
    >>> for step in range(6):  # 3 epochs of 2 batches of 3
    ...   batch = slice(3 * (step % 2), 3 * (step % 2) + 3)
    ...   params, opt_state = train_step(params, opt_state, x[batch], y[batch],
    ...                                  index[batch])
    >>> opt_state[0].bank.shape
    (2, 6, 2)
  """
  method = "saf"
  reject_injected(method, num_examples=num_examples, num_classes=num_classes,
                  steps_per_epoch=steps_per_epoch, lam=lam, tau=tau,
                  start_epoch=start_epoch, end_epoch=end_epoch, past_epochs=past_epochs)
  _checks.check_int("num_examples", num_examples, 1, method)
  _checks.check_int("num_classes", num_classes, 1, method)
  _checks.check_int("past_epochs", past_epochs, 1, method)
  schedule = make_schedule(
      method, lam=lam, tau=tau, steps_per_epoch=steps_per_epoch,
      start_epoch=start_epoch, end_epoch=end_epoch, min_start_epoch=past_epochs,
      why_min_start=(
          f" = past_epochs (the bank slot read at epoch e was written at epoch"
          f" e − past_epochs, which must exist; an unwritten slot would give a"
          f" uniform target)"))
  try:
    bank_dtype = jnp.dtype(bank_dtype)
  except TypeError:
    raise TypeError(f"saf: bank_dtype must be a dtype, got {bank_dtype!r}.") from None
  if not jnp.issubdtype(bank_dtype, jnp.floating):
    raise ValueError(f"saf: bank_dtype must be a floating dtype, got {bank_dtype}.")
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"saf: axis_name must be a string or None, got {axis_name!r}.")

  def init(params: optax.Params) -> SAFState:
    del params
    return SAFState(
        count=jnp.zeros([], jnp.int32),
        bank=jnp.zeros([past_epochs + 1, num_examples, num_classes], bank_dtype),
        invalid_count=jnp.zeros([], jnp.int32),
        schedule=schedule,
    )

  def update(updates, state, params=None, *, logits=None, example_index=None,
             example_mask=None, **extra_args):
    del params, extra_args
    _checks.check_not_wrapped("saf", apply_if_finite=False, multi_steps=(
        "which keeps the state of the call of the last micro-step only: the logit bank"
        " would record the logits of the last micro-batch of each step, not the others."
        " Drop MultiSteps and call update once per optimizer step with the gradient"
        " accumulated over the micro-batches (sam_optax.accumulated_grad(loss_fn, k,"
        " has_aux=True), the logits in aux) and the logits and example_index of the"
        " whole batch."))
    if logits is None or example_index is None:
      raise ValueError(
          "saf: update() needs the logits of this step's forward pass and the"
          " indices of its examples: tx.update(grads, opt_state, params,"
          " logits=logits, example_index=index). Got"
          f" logits={'None' if logits is None else jnp.shape(logits)},"
          f" example_index={'None' if example_index is None else jnp.shape(example_index)}.")
    index = check_example_index("saf: update", example_index)
    batch = index.shape[0]
    if jnp.shape(logits) != (batch, num_classes):
      raise ValueError(
          "saf: logits must have shape [batch, num_classes] ="
          f" ({batch}, {num_classes}) (batch from example_index), got"
          f" {jnp.shape(logits)}.")
    if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
      raise ValueError(f"saf: logits must be floating point, got {jnp.result_type(logits)}.")
    valid = example_mask_or_ones("saf: update", example_mask, batch)
    # Written after the gradient (which read the bank through saf_target), so
    # XLA updates the bank in place instead of copying it.
    logits = _numerics.sequenced(jax.lax.stop_gradient(logits), updates)
    if axis_name is not None:
      index, logits, valid = _all_gather((index, logits, valid), axis_name)

    in_range = (index >= 0) & (index < num_examples)
    bad = valid & ~in_range
    num_bad = jnp.sum(bad, dtype=jnp.int32)
    if not isinstance(num_bad, jax.core.Tracer):  # eager: check right here
      if int(num_bad):
        raise ValueError(_bad_index_message(np.asarray(index)[np.asarray(bad)], num_examples))
    elif check_indices:
      _raise_if(num_bad > 0, index, bad, num_examples)

    slot = (state.schedule.epoch(state.count) % (past_epochs + 1)).astype(jnp.int32)
    rows = jnp.where(valid & in_range, index, num_examples)  # num_examples: dropped
    bank = state.bank.at[slot, rows].set(logits.astype(bank_dtype), mode="drop")
    return updates, SAFState(
        count=optax.safe_increment(state.count),
        bank=bank,
        invalid_count=state.invalid_count + num_bad,
        schedule=state.schedule,
    )

  return optax.GradientTransformationExtraArgs(init, update)


def saf_target(
    opt_state: Any,
    example_index: jax.Array,
    example_mask: jax.Array | None = None,
) -> TrajectoryTarget:
  """The trajectory-loss target of this step's examples, from SAF's bank.

  Call it before the forward pass of the step, with the optimizer state that
  this step's ``update`` will receive. With ``e`` the epoch of this step it
  returns the logits stored for ``example_index`` in epoch ``e − Ẽ``, and
  the weight λ if ``E_start < e < E_end`` (else 0). An index outside
  ``[0, num_examples)`` or a row with ``example_mask`` 0 gets mask 0 (no
  KL); ``update`` reports the bad index.

  Args:
    opt_state: the state of an optimizer that chains :func:`saf` (it is
      found anywhere inside the state).
    example_index: ``[batch]`` integer indices of this step's examples (under
      ``pmap``: this device's examples).
    example_mask: optional ``[batch]`` mask, 0 for padding rows.

  Returns:
    A :class:`sam_optax.losses.TrajectoryTarget` for
    :func:`sam_optax.losses.trajectory_loss`.

  Example:
    >>> import jax.numpy as jnp, optax, sam_optax
    >>> tx = optax.chain(sam_optax.saf(4, 2, steps_per_epoch=1), optax.sgd(0.1))
    >>> target = sam_optax.saf_target(tx.init(jnp.zeros(2)), jnp.array([3, 1]))
    >>> target.logits.shape, float(target.weight)
    ((2, 2), 0.0)
  """
  state = find_state(opt_state, SAFState, "saf_target", "saf")
  index = check_example_index("saf_target", example_index)
  mask = example_mask_or_ones("saf_target", example_mask, index.shape[0])
  slots, num_examples, _ = state.bank.shape
  past_epochs = slots - 1
  slot = ((state.schedule.epoch(state.count) - past_epochs) % slots).astype(jnp.int32)
  logits = state.bank.at[slot, index].get(mode="fill", fill_value=0)
  in_range = (index >= 0) & (index < num_examples)
  return TrajectoryTarget(
      logits=logits.astype(jnp.float32),
      mask=(mask & in_range).astype(jnp.float32),
      weight=state.schedule.weight(state.count),
      tau=state.schedule.tau,
  )


def saf_check(opt_state: Any) -> None:
  """Raises ``ValueError`` if SAF's ``update`` was given example indices out of range.

  Reads ``SAFState.invalid_count`` (one scalar transfer from the device),
  so call it on the host outside ``jit``, e.g. at the end of every epoch.

  Args:
    opt_state: the state of an optimizer that chains :func:`saf`.

  Raises:
    ValueError: naming how many indices were out of range.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sam_optax
    >>> tx = sam_optax.saf(num_examples=4, num_classes=2, steps_per_epoch=1)
    >>> update = jax.jit(lambda s, i: tx.update(
    ...     {}, s, {}, logits=jnp.zeros((2, 2)), example_index=i)[1])
    >>> state = update(tx.init({}), jnp.array([1, 7]))  # 7 is out of range
    >>> sam_optax.saf_check(state)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: saf: 1 example index(es) out of range [0, 4) were given to update() ...
  """
  state = find_state(opt_state, SAFState, "saf_check", "saf")
  count = np.asarray(jax.device_get(state.invalid_count))
  num_examples = state.bank.shape[-2]
  if count.any():
    raise ValueError(
        f"saf: {int(count.max())} example index(es) out of range [0,"
        f" {num_examples}) were given to update() since the optimizer state"
        " was created; their logits were not stored. Check the input"
        " pipeline's example indices and num_examples (padding rows should"
        " have example_mask 0); sam_optax.saf(..., check_indices=True) raises"
        " at the first bad step.")


def check_example_index(caller: str, example_index: Any) -> jax.Array:
  """``example_index`` as a ``[batch]`` int32 array, checked at trace time."""
  index = jnp.asarray(example_index)
  if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(
        f"{caller}: example_index must be a 1-D integer array [batch], got"
        f" shape {index.shape} and dtype {index.dtype}.")
  return index.astype(jnp.int32)


def _all_gather(tree: Any, axis_name: str) -> Any:
  try:
    return jax.lax.all_gather(tree, axis_name, tiled=True)
  except NameError as error:
    raise ValueError(
        f"saf: axis_name={axis_name!r} is not bound: call the update inside"
        f" jax.pmap(..., axis_name={axis_name!r}) or shard_map over a mesh axis"
        f" of that name, or pass axis_name=None (e.g. under jax.jit). ({error})"
    ) from None


def _bad_index_message(bad_indices: np.ndarray, num_examples: int) -> str:
  shown = ", ".join(str(int(i)) for i in bad_indices[:8])
  more = ", ..." if len(bad_indices) > 8 else ""
  return (
      f"saf: {len(bad_indices)} example index(es) out of range [0,"
      f" {num_examples}): {shown}{more}. The bank has one row per training"
      " example; check the input pipeline's example indices and num_examples"
      " (padding rows should have example_mask 0).")


def _raise_if(condition: jax.Array, index: jax.Array, bad: jax.Array,
              num_examples: int) -> None:
  """Raises the out-of-range error from the host, only when ``condition``."""

  def fail(index, bad):
    raise ValueError(_bad_index_message(np.asarray(index)[np.asarray(bad)], num_examples))

  jax.lax.cond(condition, lambda: jax.debug.callback(fail, index, bad), lambda: None)
