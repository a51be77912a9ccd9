"""JAX-side helpers shared by the tests of the cheap methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sam_cases import JaxProblem, make_step


def run_steps(inner: optax.GradientTransformation, problem: JaxProblem, steps: int,
              lr: float, momentum: float, step_factory=None, loss_fn=None):
  """``steps`` jitted steps of ``chain(inner, sgd(lr, momentum))`` on ``problem``.

  Returns the params after each step and the final optimizer state.
  """
  tx = optax.chain(inner, optax.sgd(lr, momentum=momentum))
  step_factory = make_step if step_factory is None else step_factory
  step = jax.jit(step_factory(tx, problem.loss_fn if loss_fn is None else loss_fn))
  params, state = problem.params, tx.init(problem.params)
  history = []
  for t in range(steps):
    params, state = step(params, state, problem.batch(t))
    history.append(params)
  return history, state


def zero_loss(params, batch):
  """A loss whose gradient is exactly zero everywhere."""
  del batch
  return 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(params))
