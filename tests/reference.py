"""Plain NumPy (float64) reference implementations, independent of JAX.

Everything the tests compare the library against is written here from the
formulas of ``shared/design/METHODS.md``, with no JAX or optax import:

* three small problems with hand-derived gradients: linear regression (MSE),
  logistic regression (softmax cross-entropy, integer labels) and a
  1-hidden-layer tanh MLP (manual backprop);
* CSAM's calibrated cross-entropy and its gradient with respect to the logits,
  derived analytically (and checked against float64 central finite
  differences in ``test_schedules_losses.py``);
* the surrogate gradient of every method (SAM, USAM, ASAM, GSAM, BSAM, CSAM)
  and the StableSAM renormalization;
* SGD with momentum and AdamW with the semantics of ``optax.sgd(lr,
  momentum=...)`` and ``optax.adamw(lr, ...)``.

Parameters are nested dicts of float64 arrays (the layout of the JAX
problems in the tests). ``DELTA`` is METHODS.md's δ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

DELTA = 1e-12

Tree = Any  # a nested dict of np.ndarray


# --------------------------------------------------------------------------
# Tree arithmetic on nested dicts.
# --------------------------------------------------------------------------


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
  """Applies ``fn`` leafwise to nested dicts of the same keys."""
  if isinstance(tree, dict):
    return {k: tree_map(fn, tree[k], *(r[k] for r in rest)) for k in tree}
  return fn(tree, *rest)


def tree_map_with_name(fn: Callable[[str, Any], Any], tree: Tree, name: str = "") -> Tree:
  """Like :func:`tree_map`, passing the key of each leaf (its last name)."""
  if isinstance(tree, dict):
    return {k: tree_map_with_name(fn, v, k) for k, v in tree.items()}
  return fn(name, tree)


def leaves(tree: Tree) -> list[np.ndarray]:
  """The leaves in sorted-key order (the order of ``jax.tree.leaves``)."""
  if isinstance(tree, dict):
    return [leaf for k in sorted(tree) for leaf in leaves(tree[k])]
  return [np.asarray(tree, np.float64)]


def norm(tree: Tree) -> float:
  return math.sqrt(sum(float(np.sum(leaf * leaf)) for leaf in leaves(tree)))


def vdot(a: Tree, b: Tree) -> float:
  return sum(float(np.sum(x * y)) for x, y in zip(leaves(a), leaves(b)))


def add(a: Tree, scale: float, b: Tree) -> Tree:
  """``a + scale · b``."""
  return tree_map(lambda x, y: x + scale * y, a, b)


def scale(s: float, a: Tree) -> Tree:
  return tree_map(lambda x: s * x, a)


def as_float64(tree: Tree) -> Tree:
  return tree_map(lambda x: np.asarray(x, np.float64), tree)


# --------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes)[labels]


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean softmax cross-entropy with integer labels."""
  log_p = np.take_along_axis(log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  return float(-log_p.mean())


def cross_entropy_grad(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """``∂ mean CE / ∂ logits = (softmax − onehot) / N``."""
  p = np.exp(log_softmax(logits))
  return (p - one_hot(labels, logits.shape[-1])) / logits.shape[0]


def calibrated_cross_entropy(logits: np.ndarray, labels: np.ndarray, gamma: float) -> float:
  """CSAM's loss, mean over the batch.

  ``ℓ̃ = −log p_y`` if ``p_y ≤ ½`` else ``−(1 + p_y)^(−γ) log p_y``.
  """
  log_p = np.take_along_axis(log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  p = np.exp(log_p)
  modulation = np.where(p <= 0.5, 1.0, (1.0 + p) ** (-gamma))
  return float(np.mean(-modulation * log_p))


def calibrated_cross_entropy_grad(
    logits: np.ndarray, labels: np.ndarray, gamma: float
) -> np.ndarray:
  """``∂ mean ℓ̃ / ∂ logits``, derived by hand.

  With ``p = p_y`` and ``∂p/∂z = p (e_y − softmax(z))``:
  ``∂ℓ̃/∂p = −1/p`` for ``p ≤ ½`` and
  ``γ (1 + p)^(−γ−1) log p − (1 + p)^(−γ) / p`` for ``p > ½`` (the modulating
  factor is differentiated). For ``p ≤ ½`` this is the cross-entropy
  gradient ``softmax − e_y``.
  """
  n, num_classes = logits.shape
  softmax = np.exp(log_softmax(logits))
  p = softmax[np.arange(n), labels]
  log_p = np.log(p)
  d_dp = np.where(
      p <= 0.5,
      -1.0 / p,
      gamma * (1.0 + p) ** (-gamma - 1.0) * log_p - (1.0 + p) ** (-gamma) / p,
  )
  dp_dz = p[:, None] * (one_hot(labels, num_classes) - softmax)
  return d_dp[:, None] * dp_dz / n


def finite_difference_grad(fn: Callable[[np.ndarray], float], x: np.ndarray,
                           step: float = 1e-6) -> np.ndarray:
  """Central finite differences of a scalar function of one array, float64."""
  grad = np.zeros_like(x, dtype=np.float64)
  for index in np.ndindex(*x.shape):
    up, down = x.astype(np.float64).copy(), x.astype(np.float64).copy()
    up[index] += step
    down[index] -= step
    grad[index] = (fn(up) - fn(down)) / (2 * step)
  return grad


# --------------------------------------------------------------------------
# Problems: params, batches, loss and hand-derived gradients.
# --------------------------------------------------------------------------


class Problem:
  """A tiny problem: params and batches (float32-representable values).

  Subclasses define ``loss(params, batch)`` and ``grad(params, batch)``;
  classification problems also ``logits`` and ``backprop`` (the gradient of
  a loss with respect to the params from its gradient with respect to the
  logits), from which both the cross-entropy and CSAM's calibrated gradient
  follow.
  """

  name: str
  classification: bool = False

  def __init__(self, params: Tree, batches: list[dict[str, np.ndarray]]):
    self.params = params
    self.batches = batches

  def loss(self, params: Tree, batch: dict[str, np.ndarray]) -> float:
    raise NotImplementedError

  def grad(self, params: Tree, batch: dict[str, np.ndarray]) -> Tree:
    raise NotImplementedError


def _f32(x: np.ndarray) -> np.ndarray:
  """Rounds to float32 then widens, so JAX and NumPy see the same numbers."""
  return np.asarray(x, np.float32).astype(np.float64)


class LinearRegression(Problem):
  """``L = mean((x·k + b − y)²)``; ``∇k = 2/N xᵀr``, ``∇b = 2/N Σ r``."""

  name = "linear"

  def __init__(self, seed: int = 0, n: int = 8, d: int = 3, steps: int = 5):
    rng = np.random.default_rng(seed)
    params = {"kernel": _f32(rng.normal(size=d)), "bias": _f32(np.array(0.3))}
    true_k = rng.normal(size=d)
    batches = []
    for _ in range(steps):
      x = _f32(rng.normal(size=(n, d)))
      batches.append({"x": x, "y": _f32(x @ true_k + 0.5 * rng.normal(size=n))})
    super().__init__(params, batches)

  def loss(self, params, batch):
    r = batch["x"] @ params["kernel"] + params["bias"] - batch["y"]
    return float(np.mean(r ** 2))

  def grad(self, params, batch):
    x = batch["x"]
    r = x @ params["kernel"] + params["bias"] - batch["y"]
    n = x.shape[0]
    return {"kernel": 2.0 / n * x.T @ r, "bias": np.asarray(2.0 / n * r.sum())}


class _Classifier(Problem):
  classification = True

  def logits(self, params, x):
    raise NotImplementedError

  def backprop(self, params, x, d_logits):
    raise NotImplementedError

  def loss(self, params, batch):
    return cross_entropy(self.logits(params, batch["x"]), batch["y"])

  def grad(self, params, batch):
    d = cross_entropy_grad(self.logits(params, batch["x"]), batch["y"])
    return self.backprop(params, batch["x"], d)

  def calibrated_loss(self, params, batch, gamma):
    return calibrated_cross_entropy(self.logits(params, batch["x"]), batch["y"], gamma)

  def calibrated_grad(self, params, batch, gamma):
    d = calibrated_cross_entropy_grad(self.logits(params, batch["x"]), batch["y"], gamma)
    return self.backprop(params, batch["x"], d)


def _classification_batches(rng, steps, n, d, num_classes, scale_x=1.0):
  batches = []
  for _ in range(steps):
    batches.append({
        "x": _f32(scale_x * rng.normal(size=(n, d))),
        "y": rng.integers(0, num_classes, size=n).astype(np.int32),
    })
  return batches


class LogisticRegression(_Classifier):
  """Softmax regression ``z = xW + b``: ``∇W = xᵀ ∂z``, ``∇b = Σ ∂z``."""

  name = "logistic"

  def __init__(self, seed: int = 1, n: int = 8, d: int = 4, num_classes: int = 3,
               steps: int = 5):
    rng = np.random.default_rng(seed)
    params = {
        "kernel": _f32(1.5 * rng.normal(size=(d, num_classes))),
        "bias": _f32(0.1 * rng.normal(size=num_classes)),
    }
    super().__init__(params, _classification_batches(rng, steps, n, d, num_classes))

  def logits(self, params, x):
    return x @ params["kernel"] + params["bias"]

  def backprop(self, params, x, d_logits):
    return {"kernel": x.T @ d_logits, "bias": d_logits.sum(axis=0)}


class TinyMLP(_Classifier):
  """``h = tanh(xW₁ + b₁)``, ``z = hW₂ + b₂``, backprop by hand."""

  name = "mlp"

  def __init__(self, seed: int = 2, n: int = 8, d: int = 3, hidden: int = 5,
               num_classes: int = 3, steps: int = 5):
    rng = np.random.default_rng(seed)
    params = {
        "hidden": {"kernel": _f32(rng.normal(size=(d, hidden))),
                   "bias": _f32(0.1 * rng.normal(size=hidden))},
        "out": {"kernel": _f32(1.5 * rng.normal(size=(hidden, num_classes))),
                "bias": _f32(0.1 * rng.normal(size=num_classes))},
    }
    super().__init__(params, _classification_batches(rng, steps, n, d, num_classes))

  def logits(self, params, x):
    h = np.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]

  def backprop(self, params, x, d_logits):
    h = np.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    d_h = d_logits @ params["out"]["kernel"].T
    d_pre = d_h * (1.0 - h ** 2)
    return {
        "hidden": {"kernel": x.T @ d_pre, "bias": d_pre.sum(axis=0)},
        "out": {"kernel": h.T @ d_logits, "bias": d_logits.sum(axis=0)},
    }


def problems() -> list[Problem]:
  return [LinearRegression(), LogisticRegression(), TinyMLP()]


# --------------------------------------------------------------------------
# The methods' surrogate gradients (METHODS.md, one function each).
# ``grad_at(w)`` is ∇L at w for the current batch; ``g`` the gradient at w.
# --------------------------------------------------------------------------

GradAt = Callable[[Tree], Tree]


def restrict(tree: Tree, mask: Tree | None) -> Tree:
  """``m ⊙ tree``: zero on the leaves whose mask is False (None: every leaf).

  ``mask`` is a nested dict of bools with the keys of ``tree``, or a prefix
  of it (a bool for a whole sub-dict).
  """
  if mask is None or mask is True:
    return tree
  if mask is False:
    return tree_map(np.zeros_like, tree)
  return {k: restrict(tree[k], mask[k]) for k in tree}


def sam(g: Tree, w: Tree, grad_at: GradAt, rho: float, eps: float = DELTA,
        mask: Tree | None = None) -> Tree:
  """``∇L(w + ρ m⊙g / (‖m⊙g‖ + δ))`` (``m`` the perturbation mask, default all)."""
  g = restrict(g, mask)
  return grad_at(add(w, rho / (norm(g) + eps), g))


def usam(g: Tree, w: Tree, grad_at: GradAt, rho: float, mask: Tree | None = None) -> Tree:
  """``∇L(w + ρ m⊙g)``."""
  return grad_at(add(w, rho, restrict(g, mask)))


def asam(g: Tree, w: Tree, grad_at: GradAt, rho: float, eta: float = 0.01,
         eps: float = DELTA, mask: Tree | None = None) -> Tree:
  """``ε = ρ T (m⊙T g) / (‖m⊙T g‖ + δ)``, ``T = |w| + η`` except ``T = 1`` on biases."""
  t = tree_map_with_name(
      lambda name, x: np.ones_like(x) if "bias" in name else np.abs(x) + eta, w)
  t_g = restrict(tree_map(lambda ti, gi: ti * gi, t, g), mask)
  epsilon = tree_map(lambda ti, tgi: rho * ti * tgi / (norm(t_g) + eps), t, t_g)
  return grad_at(add(w, 1.0, epsilon))


def gsam(g: Tree, w: Tree, grad_at: GradAt, rho: float, alpha: float,
         eps: float = DELTA, mask: Tree | None = None) -> Tree:
  """``g_p − α g⊥`` with ``g⊥ = g − (⟨g, g_p⟩ / (‖g_p‖² + δ)) g_p``; the mask
  restricts the ascent of ``g_p`` only."""
  g_p = sam(g, w, grad_at, rho, eps, mask)
  g_perp = add(g, -vdot(g, g_p) / (norm(g_p) ** 2 + eps), g_p)
  return add(g_p, -alpha, g_perp)


def bsam(g: Tree, w: Tree, grad_at: GradAt, rho_max: float, rho_min: float,
         eps: float = DELTA, mask: Tree | None = None) -> Tree:
  """``g_max + (g − ‖g_max‖ / (‖g_min‖ + δ) · g_min)``; the mask restricts
  both ascents: ``n = m⊙g / (‖m⊙g‖ + δ)``."""
  g_masked = restrict(g, mask)
  n = scale(1.0 / (norm(g_masked) + eps), g_masked)
  g_max = grad_at(add(w, rho_max, n))
  g_min = grad_at(add(w, -rho_min, n))
  return add(g_max, 1.0, add(g, -norm(g_max) / (norm(g_min) + eps), g_min))


def csam(g: Tree, w: Tree, calibrated_grad_at: GradAt, rho: float,
         eps: float = DELTA, mask: Tree | None = None) -> Tree:
  """SAM's ascent along ``g`` (the CE gradient), calibrated loss's gradient there."""
  return sam(g, w, calibrated_grad_at, rho, eps, mask)


def stable(g: Tree, surrogate: Tree, eps: float = DELTA) -> Tree:
  """StableSAM: ``(‖g‖ / (‖g̃‖ + δ)) g̃``."""
  return scale(norm(g) / (norm(surrogate) + eps), surrogate)


# --------------------------------------------------------------------------
# Base optimizers with optax semantics.
# --------------------------------------------------------------------------


def _value(lr: float | Callable[[int], float], count: int) -> float:
  return float(lr(count)) if callable(lr) else float(lr)


class SGD:
  """``optax.sgd(lr, momentum)``: ``t ← g + μ t``, ``w ← w − lr_k t``."""

  def __init__(self, lr, momentum: float = 0.9):
    self.lr, self.momentum = lr, momentum

  def init(self, params: Tree) -> dict[str, Any]:
    return {"count": 0, "trace": tree_map(np.zeros_like, params)}

  def step(self, params: Tree, grads: Tree, state: dict[str, Any]):
    trace = add(grads, self.momentum, state["trace"])
    lr = _value(self.lr, state["count"])
    return add(params, -lr, trace), {"count": state["count"] + 1, "trace": trace}


class AdamW:
  """``optax.adamw``: bias-corrected Adam, plus ``wd·w``, times ``−lr``."""

  def __init__(self, lr, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4):
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay

  def init(self, params: Tree) -> dict[str, Any]:
    zeros = tree_map(np.zeros_like, params)
    return {"count": 0, "mu": zeros, "nu": zeros}

  def step(self, params: Tree, grads: Tree, state: dict[str, Any]):
    b1, b2 = self.b1, self.b2
    mu = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["mu"], grads)
    nu = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["nu"], grads)
    k = state["count"] + 1
    direction = tree_map(
        lambda m, v, w: (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + self.eps)
        + self.wd * w,
        mu, nu, params)
    lr = _value(self.lr, state["count"])
    return add(params, -lr, direction), {"count": k, "mu": mu, "nu": nu}


# --------------------------------------------------------------------------
# Training loop.
# --------------------------------------------------------------------------

Surrogate = Callable[[Tree, Tree, Problem, dict[str, np.ndarray], int], Tree]
"""``surrogate(g, w, problem, batch, step) -> g̃`` for one method."""


def train(problem: Problem, surrogate: Surrogate, optimizer, steps: int) -> list[Tree]:
  """Runs ``steps`` steps; returns the params after each step.

  At step ``t`` the batch is ``problem.batches[t]``, ``g = ∇L(w)`` on it, and
  the base optimizer is applied to the surrogate gradient at ``w``.
  """
  params = as_float64(problem.params)
  state = optimizer.init(params)
  history = []
  for t in range(steps):
    batch = problem.batches[t % len(problem.batches)]
    g = problem.grad(params, batch)
    params, state = optimizer.step(params, surrogate(g, params, problem, batch, t), state)
    history.append(params)
  return history
