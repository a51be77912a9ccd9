"""Plain NumPy (float64) references for the cheap methods, independent of JAX.

Written from the formulas of ``shared/design/METHODS.md``, on the problems
and tree arithmetic of ``reference.py``:

* SAF / MESA: the trajectory KL and its gradient with respect to the logits
  (derived by hand), a ring-buffer memory bank, the EMA of the weights, and
  whole training loops of a classifier with the trajectory loss;
* LookSAM, interval / stochastic SAM and ESAM surrogate gradients, as
  ``surrogate(g, w, problem, batch, step)`` callables for
  :func:`reference.train`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

import reference as ref

Tree = ref.Tree


# --------------------------------------------------------------------------
# SAF and MESA.
# --------------------------------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
  return np.exp(ref.log_softmax(z))


def trajectory_kl(logits: np.ndarray, target: np.ndarray, tau: float,
                  mask: np.ndarray | None = None) -> float:
  """``τ² Σ_i m_i KL(softmax(t_i/τ) ‖ softmax(z_i/τ)) / max(Σ m, 1)``."""
  mask = np.ones(len(logits)) if mask is None else np.asarray(mask, np.float64)
  log_p = ref.log_softmax(target / tau)
  log_q = ref.log_softmax(logits / tau)
  per_example = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  return float(tau ** 2 * np.sum(mask * per_example) / max(mask.sum(), 1.0))


def trajectory_kl_grad(logits: np.ndarray, target: np.ndarray, tau: float,
                       mask: np.ndarray | None = None) -> np.ndarray:
  """``∂/∂z``: ``τ² · m_i (q_i − p_i) / τ / Σm = τ m_i (q_i − p_i) / Σm``.

  From ``KL = Σ_c p_c log p_c − Σ_c p_c log q_c`` and
  ``∂ log q_c / ∂ z_j = (δ_cj − q_j) / τ``, with ``Σ_c p_c = 1``.
  """
  mask = np.ones(len(logits)) if mask is None else np.asarray(mask, np.float64)
  p, q = softmax(target / tau), softmax(logits / tau)
  return tau * mask[:, None] * (q - p) / max(mask.sum(), 1.0)


class Bank:
  """SAF's memory bank: ``Ẽ + 1`` slots of ``N × C``, slot ``e mod (Ẽ + 1)``."""

  def __init__(self, num_examples: int, num_classes: int, past_epochs: int):
    self.past_epochs = past_epochs
    self.slots = np.zeros((past_epochs + 1, num_examples, num_classes))

  def write(self, epoch: int, index: np.ndarray, logits: np.ndarray) -> None:
    self.slots[epoch % (self.past_epochs + 1), index] = logits

  def read(self, epoch: int, index: np.ndarray) -> np.ndarray:
    return self.slots[(epoch - self.past_epochs) % (self.past_epochs + 1), index]


def trajectory_weight(epoch: int, lam: float, start_epoch: int,
                      end_epoch: float = math.inf) -> float:
  """λ for ``E_start < e < E_end``, else 0."""
  return lam if start_epoch < epoch < end_epoch else 0.0


def ema_of(history: Sequence[Tree], decay: float) -> list[Tree]:
  """``ē_0 = w_0``, ``ē_{t+1} = d ē_t + (1−d) w_{t+1}``, for each ``w_t`` given."""
  averages = [history[0]]
  for weights in history[1:]:
    averages.append(ref.add(ref.scale(decay, averages[-1]), 1.0 - decay, weights))
  return averages


class Dataset(ref.LogisticRegression):
  """Softmax regression on a fixed data set ``x [N, d]``, ``y [N]``."""

  name = "dataset"

  def __init__(self, seed: int = 3, num_examples: int = 10, d: int = 4,
               num_classes: int = 3):
    super().__init__(seed=seed, n=num_examples, d=d, num_classes=num_classes, steps=1)
    self.x, self.y = self.batches[0]["x"], self.batches[0]["y"]


def train_with_trajectory_loss(
    problem: ref.Problem,
    optimizer,
    epochs: list[list[tuple[np.ndarray, np.ndarray]]],
    target_fn: Callable[[int, int, Tree, np.ndarray], tuple[np.ndarray, float]],
    after_step: Callable[[int, Tree, Tree], None] = lambda *a: None,
    tau: float = 5.0,
) -> list[Tree]:
  """Trains a classifier on ``CE + weight · trajectory_kl``.

  ``epochs[e]`` lists the batches of epoch ``e`` as ``(index, mask)``: the
  example indices of ``problem``'s data set (``problem.x``, ``problem.y``)
  and a 0/1 mask of the rows that count (padding has 0). At step ``t``
  (epoch ``e``), ``target_fn(t, e, params, index)`` returns the target logits
  and the weight. ``after_step(t, params_before, logits)`` sees each step.
  Returns the params after each step.
  """
  params = ref.as_float64(problem.params)
  state = optimizer.init(params)
  history, t = [], 0
  for epoch, batches in enumerate(epochs):
    for index, mask in batches:
      x, y = problem.x[index], problem.y[index]
      logits = problem.logits(params, x)
      target, weight = target_fn(t, epoch, params, index)
      count = max(mask.sum(), 1.0)
      d_ce = ref.cross_entropy_grad(logits, y) * len(y) * mask[:, None] / count
      d_kl = trajectory_kl_grad(logits, target, tau, mask)
      grads = problem.backprop(params, x, d_ce + weight * d_kl)
      after_step(t, params, logits)
      params, state = optimizer.step(params, grads, state)
      history.append(params)
      t += 1
  return history


def epoch_orders(num_examples: int, batch: int, epochs: int, seed: int,
                 pad: bool) -> list[list[tuple[np.ndarray, np.ndarray]]]:
  """Per-epoch shuffled batches; the last is partial (smaller, or padded).

  With ``pad`` every batch has ``batch`` rows: the last is padded with
  index 0 and mask 0. Without, the last batch is smaller.
  """
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(epochs):
    order = rng.permutation(num_examples)
    batches = []
    for start in range(0, num_examples, batch):
      index = order[start:start + batch]
      mask = np.ones(len(index))
      if pad and len(index) < batch:
        mask = np.concatenate([mask, np.zeros(batch - len(index))])
        index = np.concatenate([index, np.zeros(batch - len(index), index.dtype)])
      batches.append((index, mask))
    out.append(batches)
  return out


# --------------------------------------------------------------------------
# LookSAM, interval / stochastic SAM.
# --------------------------------------------------------------------------


class LookSAM:
  """LookSAM's surrogate, stateful: SAM and ``g_v`` on steps ``t mod k = 0``.

  ``g_v = g̃ − ⟨g̃, g⟩ / (‖g‖² + δ) · g``; otherwise ``g + α ‖g‖ / (‖g_v‖ + δ) g_v``.
  """

  def __init__(self, rho: float | Callable[[int], float], k: int, alpha: float,
               eps: float = ref.DELTA, mask=None):
    self.rho, self.k, self.alpha, self.eps, self.mask = rho, k, alpha, eps, mask
    self.g_v = None
    self.sam_steps = []

  def __call__(self, g, w, problem, batch, step):
    rho = self.rho(step) if callable(self.rho) else self.rho
    if step % self.k == 0:
      g_s = ref.sam(g, w, lambda p: problem.grad(p, batch), rho, self.eps, self.mask)
      self.g_v = ref.add(g_s, -ref.vdot(g_s, g) / (ref.norm(g) ** 2 + self.eps), g)
      self.sam_steps.append(step)
      return g_s
    scale = self.alpha * ref.norm(g) / (ref.norm(self.g_v) + self.eps)
    return ref.add(g, scale, self.g_v)


def sam_on(chosen: Callable[[int], bool], rho: float | Callable[[int], float]):
  """Surrogate of interval / stochastic SAM: SAM on the chosen steps, else ``g``."""

  def surrogate(g, w, problem, batch, step):
    if not chosen(step):
      return g
    value = rho(step) if callable(rho) else rho
    return ref.sam(g, w, lambda p: problem.grad(p, batch), value)

  return surrogate


# --------------------------------------------------------------------------
# ESAM.
# --------------------------------------------------------------------------


def per_example_cross_entropy(problem: ref.Problem, params: Tree, x, y) -> np.ndarray:
  log_p = ref.log_softmax(problem.logits(params, x))
  return -log_p[np.arange(len(y)), y]


def esam(g: Tree, w: Tree, problem: ref.Problem, batch, rho: float, beta: float,
         gamma: float, kept: Tree, eps: float = ref.DELTA) -> Tree:
  """ESAM's surrogate for a classifier, with the tensor mask ``kept`` given.

  ``ε = (ρ/β)(m⊙g)/(‖m⊙g‖ + δ)``; the top ``⌈γB⌉`` examples by
  ``ℓ_i(w+ε) − ℓ_i(w)``; the mean cross-entropy gradient on them at ``w+ε``.
  """
  masked = ref.tree_map(lambda gi, m: gi * float(m), g, kept)
  point = ref.add(w, rho / beta / (ref.norm(masked) + eps), masked)
  x, y = batch["x"], batch["y"]
  score = (per_example_cross_entropy(problem, point, x, y)
           - per_example_cross_entropy(problem, w, x, y))
  count = min(len(y), math.ceil(round(gamma * len(y), 9)))
  top = np.argsort(-score, kind="stable")[:count]
  return problem.grad(point, {"x": x[top], "y": y[top]})
