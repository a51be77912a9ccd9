"""``optax.inject_hyperparams`` around every public constructor.

For each row of ``test_common.ROWS`` with injectable hyperparameters, the
jitted update of ``inject_hyperparams(constructor, static_args=...)`` equals
the plain method's over a few steps, and changing
``opt_state.hyperparams[name]`` between steps gives exactly the step of the
method constructed with the new value (from the same state). Arguments that
are fixed at construction (functions, seeds, shapes, SAF's and MESA's
hyperparameters, which live in their state) fail with an error that names
``static_args``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from test_common import (CLASSES, NAMES, _fixed_problem, _saf_args, logits_fn, loss_fn,
                         per_example_loss)


@dataclasses.dataclass(frozen=True)
class Case:
  """``constructor(**injected, **static)`` under ``inject_hyperparams(static_args=static)``;
  between steps ``change = (name, value)`` is written into ``hyperparams``."""

  constructor: Callable[..., optax.GradientTransformation]
  injected: Mapping[str, Any]
  static: Mapping[str, Any]
  change: tuple[str, Any]


L = {"loss_fn": loss_fn}
CASES = {
    "sam": Case(sam_optax.sam, {"rho": 0.1}, L, ("rho", 0.3)),
    "usam": Case(sam_optax.usam, {"rho": 0.1}, L, ("rho", 0.3)),
    "asam": Case(sam_optax.asam, {"rho": 0.5, "eta": 0.01},
                 {**L, "adaptive_mask": sam_optax.not_a_bias}, ("eta", 0.5)),
    "gsam": Case(sam_optax.gsam, {"rho": 0.1, "alpha": 0.3}, L, ("alpha", 0.9)),
    "bsam": Case(sam_optax.bsam, {"rho_max": 0.1, "rho_min": 0.05}, L, ("rho_min", 0.0)),
    # (γ changes nothing here: every probability of the problem is <= 0.5)
    "csam": Case(sam_optax.csam, {"rho": 0.1, "gamma": 1.0}, {"logits_fn": logits_fn},
                 ("rho", 0.3)),
    "esam": Case(sam_optax.esam, {"rho": 0.1, "beta": 0.5},
                 {"loss_fn": per_example_loss, "gamma": 0.5, "seed": 3}, ("rho", 0.3)),
    "looksam": Case(sam_optax.looksam, {"rho": 0.1, "k": 2, "alpha": 0.7}, L, ("rho", 0.3)),
    "fsam": Case(sam_optax.fsam, {"rho": 0.1, "sigma": 1.0, "lmbda": 0.9}, L, ("sigma", 0.1)),
    "vasso": Case(sam_optax.vasso, {"rho": 0.1, "theta": 0.4}, L, ("theta", 0.9)),
    "wsam": Case(sam_optax.wsam, {"rho": 0.1, "gamma": 0.7}, L, ("gamma", 0.2)),
    "wsam_decoupled": Case(sam_optax.wsam_decoupled,
                           {"learning_rate": -1.0, "rho": 0.1, "gamma": 0.7},
                           {**L, "base_optimizer": optax.identity()}, ("learning_rate", -0.5)),
    "msam": Case(sam_optax.msam, {"rho": 0.1, "momentum": 0.9},
                 {"base_optimizer": optax.identity()}, ("rho", 0.3)),
    "gcsam": Case(sam_optax.gcsam, {"rho": 0.1}, {**L, "output_axis": -1}, ("rho", 0.3)),
    "sampa": Case(sam_optax.sampa, {"rho": 0.1, "lam": 0.2},
                  {**L, "base_optimizer": optax.identity()}, ("lam", 0.5)),
    "interval_sam": Case(sam_optax.interval_sam, {"rho": 0.1, "k": 2}, L, ("k", 3)),
    "stochastic_sam": Case(sam_optax.stochastic_sam, {"rho": 0.1, "p": 0.5},
                           {**L, "seed": 3}, ("p", 0.0)),
    "every_k": Case(sam_optax.every_k, {"k": 2},
                    {"inner": sam_optax.sam(0.1, loss_fn=loss_fn)}, ("k", 3)),
    "with_probability": Case(sam_optax.with_probability, {"p": 0.5},
                             {"inner": sam_optax.sam(0.1, loss_fn=loss_fn), "seed": 3},
                             ("p", 0.0)),
    "stable_sam": Case(sam_optax.stable_sam, {"eps": 1e-12},
                       {"inner": sam_optax.usam(0.1, loss_fn=loss_fn)}, ("eps", 0.5)),
}
# Their hyperparameters live in their state: not injectable (see the errors below).
IN_STATE = ("saf", "mesa")
STEPS = 3  # steps 0-1 with the first value, step 2 with the changed one


def test_every_row_is_covered():
  assert set(CASES) | set(IN_STATE) == set(NAMES)


def _step(tx, params, state, batch):
  """One training step: the gradient, the surrogate, SGD(0.1) on it."""
  grads = jax.grad(loss_fn)(params, batch)
  surrogate, state = tx.update(grads, state, params, batch=batch)
  return jax.tree.map(lambda p, u: p - 0.1 * u, params, surrogate), state, surrogate


def _injected(case):
  return optax.inject_hyperparams(case.constructor, static_args=tuple(case.static))(
      **case.injected, **case.static)


def _plain(case, **overrides):
  return case.constructor(**{**case.injected, **overrides}, **case.static)


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6), a, b)


# The injected transforms of every case step together in one compiled
# program (compiling them together takes half the time of one by one); the
# plain methods run eagerly, their operations compiled once for all cases.


@pytest.fixture(scope="module")
def injected_runs():
  """Per case, under ``jax.jit``: the surrogates of ``STEPS`` steps, the last
  after writing the new value (a traced argument) into ``hyperparams``; the
  last step without the change; the hyperparameters the state showed before
  it."""
  params, batch = _fixed_problem()
  transforms = {name: _injected(case) for name, case in CASES.items()}
  states = {name: tx.init(params) for name, tx in transforms.items()}

  @jax.jit
  def step_all(params, states):  # every case, one step
    return {name: _step(tx, params[name], states[name], batch)
            for name, tx in transforms.items()}

  def split(out):
    return ({k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()},
            {k: v[2] for k, v in out.items()})

  params = {name: params for name in CASES}
  surrogates = []
  for _ in range(STEPS - 1):
    params, states, surrogate = split(step_all(params, states))
    surrogates.append(surrogate)
  changed = {}
  for name, case in CASES.items():
    field, value = case.change
    hyperparams = dict(states[name].hyperparams)
    # full_like keeps the dtype and weak type: the same compiled program.
    hyperparams[field] = jax.lax.full_like(hyperparams[field], value)
    changed[name] = states[name]._replace(hyperparams=hyperparams)
  surrogates.append(split(step_all(params, changed))[2])
  unchanged = split(step_all(params, states))[2]
  return {name: {"surrogates": [s[name] for s in surrogates], "unchanged": unchanged[name],
                 "hyperparams": states[name].hyperparams} for name in CASES}


def plain_run(case):
  """The plain method eagerly: ``STEPS - 1`` steps, then the step of the
  method built with the new value, from the same state."""
  params, batch = _fixed_problem()
  tx, changed = _plain(case), _plain(case, **dict([case.change]))
  state, surrogates = tx.init(params), []
  for _ in range(STEPS - 1):
    params, state, surrogate = _step(tx, params, state, batch)
    surrogates.append(surrogate)
  surrogates.append(_step(changed, params, state, batch)[2])
  return surrogates


@pytest.mark.parametrize("name", list(CASES))
def test_injected_update_equals_the_plain_one_and_follows_a_change(name, injected_runs):
  case = CASES[name]
  field = case.change[0]
  got, want = injected_runs[name], plain_run(case)
  # The value is in the state, and the steps are the plain method's ...
  assert float(got["hyperparams"][field]) == pytest.approx(case.injected[field])
  for got_step, want_step in zip(got["surrogates"][:-1], want[:-1]):
    _close(got_step, want_step)
  # ... and after a new value is written into the state between steps, the
  # step is that of the method constructed with it.
  _close(got["surrogates"][-1], want[-1])
  difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                   zip(jax.tree.leaves(got["surrogates"][-1]),
                       jax.tree.leaves(got["unchanged"])))
  assert difference > 1e-4, difference  # the change matters


def test_concrete_jax_scalars_are_checked_and_accepted():
  params, batch = _fixed_problem()
  grads = jax.grad(loss_fn)(params, batch)
  tx = sam_optax.sam(jnp.float32(0.1), loss_fn=loss_fn, eps=jnp.float32(1e-12))
  want = sam_optax.sam(0.1, loss_fn=loss_fn)
  _close(tx.update(grads, tx.init(params), params, batch=batch)[0],
         want.update(grads, want.init(params), params, batch=batch)[0])
  with pytest.raises(ValueError, match=r"sam: rho must be finite and >= 0, got rho=-0.1"):
    sam_optax.sam(jnp.float32(-0.1))
  with pytest.raises(ValueError, match=r"looksam: k must be an int >= 1, got k=0"):
    sam_optax.looksam(k=jnp.int32(0))
  with pytest.raises(ValueError, match=r"gsam: alpha must be finite and >= 0"):
    sam_optax.gsam(alpha=jnp.float32(-1.0))


@pytest.mark.parametrize("make, match", [
    (lambda: optax.inject_hyperparams(sam_optax.esam, static_args=("loss_fn",))(
        0.1, loss_fn=per_example_loss), r"esam: gamma must be a Python float .*static_args"),
    (lambda: optax.inject_hyperparams(sam_optax.esam, static_args=("loss_fn", "gamma"))(
        0.1, loss_fn=per_example_loss), r"esam: seed must be a Python int .*static_args="
                                         r"\('seed', 'loss_fn'\)"),
    (lambda: optax.inject_hyperparams(sam_optax.stochastic_sam, static_args=("loss_fn",))(
        0.1, loss_fn=loss_fn),
     r"stochastic_sam: seed must be a Python int .*"
     r"inject_hyperparams\(sam_optax.stochastic_sam, static_args=\('seed', 'loss_fn'\)\)"),
    (lambda: optax.inject_hyperparams(sam_optax.asam, static_args=("loss_fn",))(
        0.5, loss_fn=loss_fn),
     r"asam: adaptive_mask must be .*static_args=\('loss_fn', 'adaptive_mask'\)"),
    (lambda: optax.inject_hyperparams(sam_optax.saf)(8, CLASSES, 1),
     r"saf: num_examples must be a Python number.*keeps its hyperparameters in its state"
     r".*static_args="),
    (lambda: optax.inject_hyperparams(sam_optax.mesa)(1),
     r"mesa: steps_per_epoch must be a Python number.*static_args="),
])
def test_fixed_arguments_name_static_args(make, match):
  params, _ = _fixed_problem()
  with pytest.raises(TypeError, match=match):
    make().init(params)


def test_saf_and_mesa_with_every_argument_static_are_unchanged():
  params, batch = _fixed_problem()
  static = ("num_examples", "num_classes", "steps_per_epoch", "lam", "tau", "start_epoch",
            "end_epoch", "past_epochs")
  tx = optax.inject_hyperparams(sam_optax.saf, static_args=static)(
      8, CLASSES, 1, start_epoch=1, past_epochs=1)
  plain = sam_optax.saf(8, CLASSES, 1, start_epoch=1, past_epochs=1)
  grads = jax.grad(loss_fn)(params, batch)
  args = _saf_args(params, batch)
  _close(tx.update(grads, tx.init(params), params, **args)[0],
         plain.update(grads, plain.init(params), params, **args)[0])


README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
SECTION = README[README.index("## Changing hyperparameters"):README.index("## Sharpness-aware")]


def test_readme_snippet_runs_and_its_table_lists_every_method():
  block = re.search(r"```python\n(.*?)```", SECTION, flags=re.DOTALL).group(1)
  params, batch = _fixed_problem()
  namespace = {"optax": optax, "sam_optax": sam_optax, "params": params,
               "loss_fn": lambda p, batch: loss_fn(p, batch)}
  exec(compile(block, "README inject", "exec"), namespace)  # pylint: disable=exec-used
  tx, state = namespace["tx"], namespace["opt_state"]
  grads = jax.grad(loss_fn)(params, batch)
  got = tx.update(grads, state, params, batch=batch)[0]
  want = sam_optax.sam(0.1, loss_fn=loss_fn)
  _close(got, want.update(grads, want.init(params), params, batch=batch)[0])
  table = re.findall(r"^\| (.*?) \|", SECTION, flags=re.MULTILINE)
  listed = set(re.findall(r"`(\w+)`", " ".join(table)))
  assert set(CASES) | set(IN_STATE) <= listed, set(CASES) - listed
