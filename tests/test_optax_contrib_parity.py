"""optax's own test of ``optax.contrib.sam`` (``optax/contrib/_sam_test.py``), ported.

optax tests ``contrib.sam(sgd(1e-3), chain(normalize(), adv_opt),
sync_period=2, opaque_mode=...)`` on a parabola: 25000 · sync_period calls
from ``[-1, 10, 1]`` reach ``[1, -1, 1]`` within 3e-2, for ``adv_opt`` SGD(1e-5)
and Adam(1e-4), opaque and transparent. Here each case that has a counterpart
runs ``chain(sam_optax.sam(ρ), sgd(1e-3))`` on the same problem and checks
both optax's criterion and the same numbers as contrib, step for step:

* SGD(ρ) after ``normalize()`` as the adversarial optimizer, opaque mode:
  one adversarial step ``ŵ = w + ρ g/‖g‖`` then the outer step on ``∇L(ŵ)``
  at ``w``, which is ``sam(ρ)`` (the step test_numerics checks on other
  problems);
* the same in transparent mode: contrib spends ``sync_period = 2`` calls per
  SAM step (the first moves the parameters to ``ŵ``, the second back to ``w``
  plus the outer update), so its call ``2t`` equals our step ``t``;
* Adam as the adversarial optimizer is skipped: its ascent is Adam's step of
  the normalized gradient (elementwise rescaled, with moments carried across
  steps when ``reset_state=False``), not SAM's ``ρ g/‖g‖``; no method of
  sam_optax takes that ascent.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

SYNC_PERIOD = 2
CALLS = 25000 * SYNC_PERIOD  # optax's number of update calls
INITIAL = jnp.array([-1.0, 10.0, 1.0], jnp.float32)
FINAL = jnp.array([1.0, -1.0, 1.0], jnp.float32)


def loss_fn(params):
  return jnp.sum(jnp.abs(params - FINAL) ** 2)  # optax's numerics.abs_sq


def run(tx, steps, update_kwargs=lambda: {}):
  """``steps`` jitted updates from ``INITIAL``: the params every ``SYNC_PERIOD``
  steps (a ``lax.fori_loop``, so 50000 steps take well under a second)."""

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(loss_fn)(params), state, params, **update_kwargs())
    return (optax.apply_updates(params, updates), state), params

  state = tx.init(INITIAL)
  state = optax.tree.map_params(tx, lambda v: v, state)  # optax's no-op map
  (params, _), history = jax.jit(
      lambda carry: jax.lax.scan(step, carry, None, length=steps))((INITIAL, state))
  return params, history


def contrib(adv_rho, opaque_mode):
  return optax.contrib.sam(
      optax.sgd(1e-3), optax.chain(optax.contrib.normalize(), optax.sgd(adv_rho)),
      sync_period=SYNC_PERIOD, opaque_mode=opaque_mode)


def ours(rho):
  return optax.chain(sam_optax.sam(rho, loss_fn=loss_fn), optax.sgd(1e-3))


OPAQUE_KWARGS = lambda: {"grad_fn": lambda p, _: jax.grad(loss_fn)(p)}


def test_optimization_sgd_adversary_opaque():
  """optax's ``test_optimization`` (adv SGD(1e-5), opaque): same criterion, same numbers."""
  rho = 1e-5
  params, history = run(ours(rho), CALLS)
  np.testing.assert_allclose(params, FINAL, rtol=3e-2, atol=3e-2)  # optax's criterion
  want_params, want_history = run(contrib(rho, opaque_mode=True), CALLS, OPAQUE_KWARGS)
  np.testing.assert_allclose(history, want_history, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params, want_params, rtol=1e-5, atol=1e-6)


def test_optimization_sgd_adversary_transparent():
  """optax's ``test_optimization`` (adv SGD(1e-5), transparent): contrib's call
  ``2t`` is our step ``t``; ours takes half the calls to the same point."""
  rho = 1e-5
  want_params, want_history = run(contrib(rho, opaque_mode=False), CALLS)
  np.testing.assert_allclose(want_params, FINAL, rtol=3e-2, atol=3e-2)
  params, history = run(ours(rho), CALLS // SYNC_PERIOD)
  np.testing.assert_allclose(history, want_history[::SYNC_PERIOD], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params, want_params, rtol=1e-5, atol=1e-6)


def test_a_large_radius_shows_the_parity_is_not_trivial():
  """With ρ = 0.5 the SAM step differs visibly from plain SGD, and still
  equals contrib's opaque step for step (a few hundred steps)."""
  params, history = run(ours(0.5), 200)
  _, want_history = run(contrib(0.5, opaque_mode=True), 200, OPAQUE_KWARGS)
  np.testing.assert_allclose(history, want_history, rtol=1e-5, atol=1e-6)
  plain, _ = run(optax.sgd(1e-3), 200)
  assert float(jnp.max(jnp.abs(plain - params))) > 1e-3


@pytest.mark.skip(reason="adv_opt=Adam(1e-4): contrib's ascent is Adam's step of the"
                  " normalized gradient, not SAM's ρ g/‖g‖; sam_optax has no method"
                  " with that ascent, so there is nothing to compare.")
def test_optimization_adam_adversary():
  """optax's ``test_optimization`` with the Adam adversary (not ported)."""
