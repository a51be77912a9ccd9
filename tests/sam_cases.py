"""The JAX side of the reference problems and the table of methods under test.

Shared by the numerics, property and variant tests: each :class:`Case` pairs
a ``sam_optax`` constructor with its NumPy reference from ``reference.py``,
and each problem of ``reference.py`` gets a JAX loss with the same params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import reference as ref
import sam_optax


# --------------------------------------------------------------------------
# JAX losses of the reference problems: loss_fn(params, batch) and, for
# classification, logits_fn(params, batch) -> (logits, labels).
# --------------------------------------------------------------------------


def linear_loss(params, batch):
  r = batch["x"] @ params["kernel"] + params["bias"] - batch["y"]
  return jnp.mean(r ** 2)


def logistic_logits(params, batch):
  return batch["x"] @ params["kernel"] + params["bias"], batch["y"]


def mlp_logits(params, batch):
  h = jnp.tanh(batch["x"] @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"], batch["y"]


def cross_entropy_of(logits_fn):
  def loss_fn(params, batch):
    logits, labels = logits_fn(params, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss_fn


@dataclasses.dataclass(frozen=True)
class JaxProblem:
  """A reference problem with its JAX loss (and logits for classification)."""

  numpy: ref.Problem
  loss_fn: Callable[..., jax.Array]
  logits_fn: Callable[..., Any] | None

  @property
  def name(self) -> str:
    return self.numpy.name

  @property
  def params(self):
    return to_jax(self.numpy.params)

  def batch(self, t: int):
    return to_jax(self.numpy.batches[t % len(self.numpy.batches)])


def to_jax(tree):
  """float64 NumPy leaves → float32 jnp arrays; integer leaves keep int32."""
  return jax.tree.map(
      lambda x: jnp.asarray(x, jnp.int32 if np.issubdtype(np.asarray(x).dtype, np.integer)
                            else jnp.float32), tree)


def to_numpy(tree):
  """jnp leaves → float64 NumPy (nested dicts, as reference.py expects)."""
  return ref.tree_map(lambda x: np.asarray(x, np.float64), jax.tree.map(np.asarray, tree))


def jax_problems() -> list[JaxProblem]:
  linear, logistic, mlp = ref.problems()
  return [
      JaxProblem(linear, linear_loss, None),
      JaxProblem(logistic, cross_entropy_of(logistic_logits), logistic_logits),
      JaxProblem(mlp, cross_entropy_of(mlp_logits), mlp_logits),
  ]


# --------------------------------------------------------------------------
# The methods: the constructors of test_common.ROWS + their NumPy references.
# --------------------------------------------------------------------------

# The hyperparameters of the rows of test_common.py.
from test_common import ALPHA, ASAM_RHO, ETA, GAMMA, RHO, RHO_MAX, RHO_MIN, ROWS_BY_NAME  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
  """A method under test.

  ``make(problem, axis_name)`` builds the transform; ``reference(g, w,
  problem, batch, t)`` is its NumPy surrogate gradient; ``make_zero(problem)``
  builds it with every radius 0 (it then returns the incoming gradient).
  """

  name: str
  make: Callable[..., optax.GradientTransformationExtraArgs]
  reference: ref.Surrogate
  make_zero: Callable[..., optax.GradientTransformationExtraArgs]
  classification_only: bool = False

  def applies_to(self, problem: JaxProblem) -> bool:
    return problem.logits_fn is not None or not self.classification_only


def per_device(axis_name):
  """The per-device option on ``axis_name`` (None: one device)."""
  return None if axis_name is None else sam_optax.PerDevice(axis_name)


def _grad_at(problem, batch):
  return lambda w: problem.grad(w, batch)


# The single-step surrogate of each method with a reference in reference.py,
# ``reference(g, w, problem, batch, t)``, at the hyperparameters of its row.
REFERENCES = {
    "sam": lambda g, w, p, b, t: ref.sam(g, w, _grad_at(p, b), RHO),
    "usam": lambda g, w, p, b, t: ref.usam(g, w, _grad_at(p, b), RHO),
    "asam": lambda g, w, p, b, t: ref.asam(g, w, _grad_at(p, b), ASAM_RHO, eta=ETA),
    "gsam": lambda g, w, p, b, t: ref.gsam(g, w, _grad_at(p, b), RHO, alpha=ALPHA),
    "bsam": lambda g, w, p, b, t: ref.bsam(g, w, _grad_at(p, b), RHO_MAX, rho_min=RHO_MIN),
    "csam": lambda g, w, p, b, t: ref.csam(
        g, w, lambda v: p.calibrated_grad(v, b, GAMMA), RHO),
}
CLASSIFICATION_ONLY = {"csam"}  # its descent loss is the calibrated cross-entropy


def _case(name: str) -> Case:
  row = ROWS_BY_NAME[name]
  return Case(
      name,
      lambda p, axis_name=None: row.build(p, perturbation=per_device(axis_name)),
      REFERENCES[name],
      # With ρ = 0 CSAM returns the calibrated gradient at w, which is the
      # incoming cross-entropy gradient only for γ = 0 (the row's ρ = 0 build).
      row.build_zero,
      classification_only=name in CLASSIFICATION_ONLY,
  )


def _base_cases() -> list[Case]:
  return [_case(name) for name in REFERENCES]


def _stable(inner: Case) -> Case:
  return Case(
      f"stable_{inner.name}",
      lambda p, axis_name=None: sam_optax.stable_sam(
          inner.make(p, axis_name), axis_name=axis_name),
      lambda g, w, p, b, t: ref.stable(g, inner.reference(g, w, p, b, t)),
      lambda p: sam_optax.stable_sam(inner.make_zero(p)),
      inner.classification_only,
  )


BASE_CASES = _base_cases()
CASES = BASE_CASES + [_stable(case) for case in BASE_CASES]
CASES_BY_NAME = {case.name: case for case in CASES}


def case_problem_pairs(cases=None, problems=None):
  """Every (case, problem) pair where the method applies, with pytest ids."""
  cases = CASES if cases is None else cases
  problems = jax_problems() if problems is None else problems
  return [(c, p) for c in cases for p in problems if c.applies_to(p)]


def pair_id(pair) -> str:
  case, problem = pair
  return f"{case.name}-{problem.name}"


# --------------------------------------------------------------------------
# One training step: the user's gradient, the transform, the base optimizer.
# --------------------------------------------------------------------------


def make_step(tx: optax.GradientTransformation, loss_fn):
  """``(params, state, batch) -> (params, state)``, the canonical use."""

  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch=batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  return step
