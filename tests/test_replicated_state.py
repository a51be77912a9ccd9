"""The state of every stateful method stays replicated under data parallelism.

A method whose state holds more than step counts (an EMA of gradients, a
stored direction, a base optimizer's state, a bank of logits, a PRNG key)
must build it from values that are the same on every device, or the replicas
drift apart while every single-device test passes. For each row of
``STATEFUL`` and each data-parallel option it accepts, a few training steps
(``chain(method, momentum SGD)``, or the method alone where it is the whole
optimizer) run on 8 fake CPU devices (``shard_map``, each device keeping its
own copy of params and state), each fed its own shard of a new batch every
step (not chex's ``with_pmap``, which feeds every device the same), and

* every leaf of the parameters and of the whole optimizer state is the same
  on every device;
* they equal the single-device run on the whole batch with the option of the
  same numbers (``OPTIONS``): ``PerDevice`` is ``Splits(8)``, ``Splits(2,
  axis_name)`` is ``Splits(16)``, ``Synced`` and ``MicroBatches(2,
  axis_name)`` are the plain step on the whole batch.

Per method, one compiled program runs every option on the devices, and one
its single-device runs. Adding a stateful method is one row of ``STATEFUL``
(the options it accepts are found by building it);
``test_every_method_with_state_has_a_row`` fails until it has one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import devices
import sam_optax
from devices import AXIS, DEVICES
from test_common import CLASSES, D, ROWS, logits_fn, loss_fn, per_example_loss

PER_DEVICE, STEPS, RHO, LR = 4, 3, 0.1, 0.1
BATCH = DEVICES * PER_DEVICE


@dataclasses.dataclass(frozen=True)
class Option:
  """A data-parallel option on the devices and the single-device option of
  the same numbers on the whole batch (the devices' shards in order)."""

  on_devices: Any
  one_device: Any


OPTIONS = {
    "PerDevice": Option(sam_optax.PerDevice(AXIS), sam_optax.Splits(DEVICES)),
    "Synced": Option(sam_optax.Synced(AXIS), None),
    "Splits": Option(sam_optax.Splits(2, axis_name=AXIS), sam_optax.Splits(2 * DEVICES)),
    "Splits-sequential": Option(sam_optax.Splits(2, axis_name=AXIS, sequential=True),
                                sam_optax.Splits(2 * DEVICES)),
    "MicroBatches": Option(sam_optax.MicroBatches(2, axis_name=AXIS), None),
}


def _batch_only(params, batch):
  del params
  return {"batch": batch}


@dataclasses.dataclass(frozen=True)
class Stateful:
  """A method with state beyond counts, and how a training step uses it.

  Attributes:
    name: the test id (the constructor's name in ``sam_optax`` for a row of
      the registry, ``test_common.ROWS``).
    constructor: ``constructor(**kwargs, perturbation=option)``.
    kwargs: its other arguments.
    update_args: ``update_args(params, shard) -> dict``, the extra arguments
      of ``update`` on a device's shard.
    whole: whether the method is the whole optimizer (else it is chained
      before momentum SGD, whose state is checked too).
    averages: whether ``update`` averages the gradient over the option's
      axis; if not (SAF, MESA: no perturbation option), the step averages it
      first, as plain data-parallel training does, under the ``Synced`` id.
    options: the ids of ``OPTIONS`` to run (None: every option the
      constructor accepts).
    no_reference: options under which no single-device run has the same
      numbers.
  """

  name: str
  constructor: Callable[..., optax.GradientTransformation]
  kwargs: Mapping[str, Any]
  update_args: Callable[[Any, Any], dict] = _batch_only
  whole: bool = False
  averages: bool = True
  options: tuple[str, ...] | None = None
  no_reference: tuple[str, ...] = ()

  def optimizer(self, perturbation) -> optax.GradientTransformation:
    method = self.constructor(**self.kwargs, perturbation=perturbation)
    return method if self.whole else optax.chain(method, optax.sgd(LR, momentum=0.9))

  def accepted(self) -> list[str]:
    """The options of ``OPTIONS`` that the constructor takes."""
    if self.options is not None:
      return list(self.options)
    taken = []
    for key, option in OPTIONS.items():
      try:
        self.constructor(**self.kwargs, perturbation=option.on_devices)
      except (TypeError, ValueError) as error:
        assert "is not supported" in str(error), error
        continue
      taken.append(key)
    return taken


def _axis(perturbation):
  return None if perturbation is None else perturbation.axis_name


def _saf(perturbation, **kwargs):
  return sam_optax.saf(**kwargs, axis_name=_axis(perturbation))


def _saf_args(params, batch):
  return {"logits": logits_fn(params, batch)[0], "example_index": batch["index"]}


def _mesa(perturbation, **kwargs):
  del perturbation  # the EMA of replicated weights needs no communication
  return sam_optax.mesa(**kwargs)


def _with_probability(perturbation, inner, p, seed, **kwargs):
  return sam_optax.with_probability(inner(**kwargs, perturbation=perturbation), p, seed=seed,
                                    axis_name=_axis(perturbation))


def _momentum_sgd():
  return optax.sgd(LR, momentum=0.9)


STATEFUL = [
    Stateful("fsam", sam_optax.fsam, dict(rho=RHO, sigma=1.0, lmbda=0.9, loss_fn=loss_fn)),
    Stateful("vasso", sam_optax.vasso, dict(rho=RHO, theta=0.4, loss_fn=loss_fn)),
    # k = 2: steps 0 and 2 store g_v, step 1 reuses it.
    Stateful("looksam", sam_optax.looksam, dict(rho=RHO, k=2, alpha=0.7, loss_fn=loss_fn)),
    Stateful("wsam_decoupled", sam_optax.wsam_decoupled,
             dict(base_optimizer=_momentum_sgd(), learning_rate=LR, rho=RHO, gamma=0.7,
                  loss_fn=loss_fn), whole=True),
    Stateful("msam", sam_optax.msam, dict(base_optimizer=_momentum_sgd(), rho=0.3), whole=True),
    # The whole optimizer; its state holds the auxiliary point's gradient and
    # the base's momentum. Both gradients take the current batch here.
    Stateful("sampa", sam_optax.sampa, dict(base_optimizer=_momentum_sgd(), rho=RHO, lam=0.2,
                                            loss_fn=loss_fn), whole=True),
    # Under Synced each device selects among its own examples: no
    # single-device option selects per device with the averaged ascent.
    Stateful("esam", sam_optax.esam, dict(rho=RHO, beta=0.5, gamma=0.5, seed=3,
                                          loss_fn=per_example_loss),
             no_reference=("Synced",)),
    # One epoch per step; every step shows all BATCH examples, reshuffled.
    Stateful("saf", _saf, dict(num_examples=BATCH, num_classes=CLASSES, steps_per_epoch=1,
                               start_epoch=1, past_epochs=1),
             update_args=_saf_args, averages=False, options=("Synced",)),
    Stateful("mesa", _mesa, dict(steps_per_epoch=1, start_epoch=0, decay=0.5),
             update_args=lambda params, batch: {}, averages=False, options=("Synced",)),
    # A wrapper around a stateful method: seed 6 skips step 0 (the inner
    # state's counts advance alone, the plain gradient is averaged), then
    # runs VaSSO twice. What the wrapper adds is the same for every option
    # with an axis; VaSSO's row runs the inner method under each.
    Stateful("with_probability(vasso)", _with_probability,
             dict(inner=sam_optax.vasso, p=0.5, seed=6, rho=RHO, theta=0.4, loss_fn=loss_fn),
             options=("PerDevice",)),
]
BY_NAME = {row.name: row for row in STATEFUL}
CASES = [(row.name, option) for row in STATEFUL for option in row.accepted()]


def _problem():
  """The initial params and ``STEPS`` batches of ``BATCH`` examples with
  their indices (each step a new permutation of ``0 … BATCH − 1``)."""
  rng = np.random.default_rng(0)
  params = {"kernel": jnp.asarray(rng.normal(size=(D, CLASSES)) * 0.5, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(CLASSES,)) * 0.1, jnp.float32)}
  batches = []
  for _ in range(STEPS):
    index = rng.permutation(BATCH)
    batches.append({"x": jnp.asarray(rng.normal(size=(BATCH, D)), jnp.float32),
                    "y": jnp.asarray(index % CLASSES, jnp.int32),
                    "index": jnp.asarray(index, jnp.int32)})
  return params, batches


PARAMS, BATCHES = _problem()


def _step(row: Stateful, tx, axis_name: str | None):
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)  # on a device: the local gradient
    if not row.averages and axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    updates, state = tx.update(grads, state, params, **row.update_args(params, batch))
    return optax.apply_updates(params, updates), state
  return step


@functools.cache
def device_runs(name: str) -> tuple[list[Any], Any]:
  """Every option of the row on the devices (a dict by option id), stepped
  together in one compiled program: the per-device params after each step
  and the final per-device states."""
  row = BY_NAME[name]
  txs = {key: row.optimizer(OPTIONS[key].on_devices) for key in row.accepted()}

  def step(params, states, batch):
    runs = {key: _step(row, tx, AXIS)(params[key], states[key], batch) for key, tx in txs.items()}
    return {key: run[0] for key, run in runs.items()}, {key: run[1] for key, run in runs.items()}

  return devices.train_on_devices(step, {key: PARAMS for key in txs},
                                  {key: tx.init(PARAMS) for key, tx in txs.items()}, BATCHES)


@functools.cache
def one_device_runs(name: str) -> dict[str, tuple[Any, Any]]:
  """The params and state after ``STEPS`` steps on the whole batches, for
  every single-device option the row's cases compare with (by ``repr``),
  stepped together in one compiled program."""
  row = BY_NAME[name]
  options = {repr(OPTIONS[key].one_device): OPTIONS[key].one_device
             for key in row.accepted() if key not in row.no_reference}
  txs = {key: row.optimizer(option) for key, option in options.items()}

  @functools.partial(jax.jit, compiler_options=devices.QUICK_COMPILE)
  def train(batches):
    def one_step(runs, batch):
      return {key: _step(row, tx, None)(*runs[key], batch) for key, tx in txs.items()}, None
    return jax.lax.scan(one_step, {key: (PARAMS, tx.init(PARAMS)) for key, tx in txs.items()},
                        batches)[0]

  return jax.device_get(train(jax.tree.map(lambda *x: jnp.stack(x), *BATCHES)))


def _assert_trees_close(got, want):
  def check(path, a, b):
    a, b = np.asarray(a), np.asarray(b)
    if np.issubdtype(a.dtype, np.floating):
      # per-device shards against groups of one batch: other summation orders
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, got, want)


@pytest.mark.parametrize("name, option", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_state_stays_replicated_and_equals_one_device(name, option):
  row = BY_NAME[name]
  history, states = device_runs(name)
  params, state = history[-1][option], states[option]
  devices.assert_replicated((params, state))
  if option in row.no_reference:
    return
  want_params, want_state = one_device_runs(name)[repr(OPTIONS[option].one_device)]
  _assert_trees_close(devices.unreplicate(params), want_params)
  _assert_trees_close(devices.unreplicate(state), want_state)


def test_every_method_with_state_has_a_row():
  """Every constructor of the registry whose state has a floating leaf (not
  only counts, flags and keys) is a row of ``STATEFUL``."""
  with_state = set()
  for row in ROWS:
    state = row.build().init(PARAMS)
    if any(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in jax.tree.leaves(state)):
      with_state.add(row.name)
  assert with_state <= set(BY_NAME), sorted(with_state - set(BY_NAME))
