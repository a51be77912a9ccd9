r"""Evaluation the SAM papers report: accuracy, NLL, calibration and sharpness.

Classification metrics take ``logits`` of shape ``(N, C)`` and integer
``labels`` of shape ``(N,)`` (a whole evaluation set, gathered on the host)
and return Python floats:

* :func:`accuracy` -- top-1 accuracy;
* :func:`nll` -- mean negative log-likelihood of the labels;
* :func:`expected_calibration_error` -- ECE over equal-width confidence bins
  (Guo et al., 2017);
* :func:`adaptive_calibration_error` -- ECE over equal-mass bins (Nixon et
  al., 2019);
* :func:`reliability_diagram` -- the per-bin numbers behind the ECE, for
  :func:`experiments.plots.plot_reliability_diagrams`.

Per-example quantities (``softmax``, ``log_softmax``, the argmax) are computed with JAX in
float32; sums over the set are accumulated in float64 with NumPy.

Sharpness metrics take a loss and the parameters (any pytree of float
arrays):

* :func:`top_hessian_eigenvalue` -- the dominant eigenvalue of ``∇²L(w)`` by
  power iteration with Hessian-vector products;
* :func:`m_sharpness` -- the m-sharpness of Foret et al. (2021) at radius ρ,
  with the one-step (SAM) approximation of the inner maximum.

They reuse the float32 tree arithmetic and ascent point of
:mod:`sam_optax._ascent`, so the perturbation measured here is exactly the one
the library's ``sam`` takes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax import _checks, _loss, _numerics

__all__ = [
    "accuracy",
    "nll",
    "expected_calibration_error",
    "adaptive_calibration_error",
    "reliability_diagram",
    "top_hessian_eigenvalue",
    "m_sharpness",
]


# --------------------------------------------------------------------------
# Input checks and per-example quantities.
# --------------------------------------------------------------------------


def _check_num_bins(name: str, num_bins: Any) -> int:
  if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"{name}: num_bins must be an integer >= 1, got num_bins={num_bins!r}.")
  return int(num_bins)


def _checked(name: str, logits: Any, labels: Any) -> tuple[jax.Array, np.ndarray]:
  """The logits (at least float32) and the labels (int64), checked."""
  logits = jnp.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(
        f"{name}: logits must have shape (num_examples, num_classes), got shape"
        f" {tuple(logits.shape)}."
    )
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"{name}: logits must be floating point, got dtype {logits.dtype}.")
  if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
    raise ValueError(
        f"{name}: labels must have shape (num_examples,) = ({logits.shape[0]},) to"
        f" match logits of shape {tuple(logits.shape)}, got shape {labels.shape}"
        " (pass integer class indices, not one-hot vectors)."
    )
  if logits.shape[0] == 0:
    raise ValueError(f"{name}: got 0 examples; a metric needs at least one.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}.")
  num_classes = logits.shape[1]
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
        f"{name}: labels must be in [0, {num_classes - 1}] for {num_classes} classes,"
        f" got values in [{labels.min()}, {labels.max()}]."
    )
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), labels.astype(np.int64)


def _confidence_and_correct(name: str, logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """Top-label confidence ``max_c softmax(z)_c`` (float64, in [0, 1]) and correctness."""
  logits, labels = _checked(name, logits, labels)
  probs = np.asarray(jax.nn.softmax(logits, axis=1))
  predictions = np.argmax(probs, axis=1)
  confidence = probs.max(axis=1).astype(np.float64)
  return np.clip(confidence, 0.0, 1.0), (predictions == labels).astype(np.float64)


# --------------------------------------------------------------------------
# Accuracy, NLL and calibration.
# --------------------------------------------------------------------------


def accuracy(logits: Any, labels: Any) -> float:
  """Top-1 accuracy: the fraction of examples with ``argmax_c logits = label``.

  Args:
    logits: ``(N, C)`` unnormalized scores.
    labels: ``(N,)`` integer class indices in ``[0, C)``.

  Returns:
    ``(1/N) Σ_i 1[argmax_c z_ic = y_i]`` as a float in [0, 1]; ties in the
    argmax go to the lowest class index.

  Example:
    >>> import numpy as np
    >>> from experiments import metrics
    >>> metrics.accuracy(np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([0, 0]))
    0.5
  """
  _, correct = _confidence_and_correct("accuracy", logits, labels)
  return float(correct.mean())


def nll(logits: Any, labels: Any) -> float:
  """Mean negative log-likelihood of the labels under ``softmax(logits)``.

  ``NLL = -(1/N) Σ_i log softmax(z_i)_{y_i}``, with ``log_softmax`` (no
  ``log`` of a rounded probability), as reported by Guo et al. (2017) and the
  SAM calibration papers.

  Args:
    logits: ``(N, C)`` unnormalized scores.
    labels: ``(N,)`` integer class indices in ``[0, C)``.

  Returns:
    The mean NLL in nats, a float ≥ 0.

  Example:
    >>> import numpy as np
    >>> from experiments import metrics
    >>> round(metrics.nll(np.zeros((3, 4)), np.array([0, 1, 2])), 4)  # log 4
    1.3863
  """
  logits, labels = _checked("nll", logits, labels)
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=1))
  picked = log_probs[np.arange(labels.shape[0]), labels].astype(np.float64)
  return float(-picked.mean())


def reliability_diagram(logits: Any, labels: Any, num_bins: int = 15) -> dict[str, Any]:
  r"""Per-bin confidence and accuracy over equal-width confidence bins.

  The top-label confidence ``p̂_i = max_c softmax(z_i)_c`` is binned into
  ``num_bins`` equal-width bins ``B_b = (b/M, (b+1)/M]`` for
  ``b = 0, ..., M-1``, right-closed, except that the first bin is closed on
  both sides (``[0, 1/M]``), so every ``p̂ ∈ [0, 1]`` falls in exactly one
  bin. For each bin, ``acc_b`` is the fraction of its examples whose argmax is
  the label and ``conf_b`` the mean of their ``p̂``. This is the binning of
  Guo et al. (2017) and of their reference code.

  Args:
    logits: ``(N, C)`` unnormalized scores.
    labels: ``(N,)`` integer class indices in ``[0, C)``.
    num_bins: ``M``, the number of bins (15 in Guo et al. and the SAM papers).

  Returns:
    A dict of NumPy arrays of length ``M``: ``bin_lower``, ``bin_upper`` (the
    edges), ``bin_confidence`` (``conf_b``), ``bin_accuracy`` (``acc_b``),
    ``bin_count`` (``n_b``, int64); ``conf_b`` and ``acc_b`` are 0 in empty
    bins (``n_b = 0``). Also ``ece``, the float
    ``Σ_b (n_b/N)|acc_b − conf_b|`` (see :func:`expected_calibration_error`),
    which :func:`experiments.plots.plot_reliability_diagrams` puts in the
    panel's title.

  References:
    Guo, Pleiss, Sun and Weinberger, `On Calibration of Modern Neural
    Networks <https://arxiv.org/abs/1706.04599>`_, ICML 2017.

  Example:
    >>> import numpy as np
    >>> from experiments import metrics
    >>> d = metrics.reliability_diagram(np.array([[3.0, 0.0], [0.0, 3.0]]),
    ...                                 np.array([0, 0]), num_bins=4)
    >>> d["bin_count"].tolist(), d["bin_accuracy"].tolist()
    ([0, 0, 0, 2], [0.0, 0.0, 0.0, 0.5])
  """
  num_bins = _check_num_bins("reliability_diagram", num_bins)
  confidence, correct = _confidence_and_correct("reliability_diagram", logits, labels)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # side="left" on the inner edges: p̂ == edge goes to the bin it closes.
  index = np.searchsorted(edges[1:-1], confidence, side="left")
  count = np.bincount(index, minlength=num_bins)
  sum_confidence = np.bincount(index, weights=confidence, minlength=num_bins)
  sum_correct = np.bincount(index, weights=correct, minlength=num_bins)
  safe = np.maximum(count, 1)
  return {
      "bin_lower": edges[:-1],
      "bin_upper": edges[1:],
      "bin_confidence": np.where(count > 0, sum_confidence / safe, 0.0),
      "bin_accuracy": np.where(count > 0, sum_correct / safe, 0.0),
      "bin_count": count.astype(np.int64),
      # (n_b/N)|acc_b − conf_b| = |Σ correct − Σ p̂| / N over the bin.
      "ece": float(np.abs(sum_correct - sum_confidence).sum() / confidence.shape[0]),
  }


def expected_calibration_error(logits: Any, labels: Any, num_bins: int = 15) -> float:
  r"""Expected calibration error over equal-width confidence bins.

  .. math::

    \mathrm{ECE} = \sum_{b=1}^{M} \frac{n_b}{N} \, |acc_b − conf_b|,

  with the top-label confidence ``p̂_i = max_c softmax(z_i)_c`` binned into
  ``M`` equal-width bins ``(lo, hi]`` (the first bin ``[0, 1/M]``), ``acc_b``
  the accuracy and ``conf_b`` the mean confidence of bin ``b``, ``n_b`` its
  size; empty bins contribute 0. See :func:`reliability_diagram` for the
  bins.

  Args:
    logits: ``(N, C)`` unnormalized scores.
    labels: ``(N,)`` integer class indices in ``[0, C)``.
    num_bins: ``M`` (15, as in Guo et al. 2017 and the SAM papers).

  Returns:
    The ECE, a float in [0, 1] (multiply by 100 for the papers' percent).

  References:
    Naeini, Cooper and Hauskrecht, Obtaining Well Calibrated Probabilities
    Using Bayesian Binning, AAAI 2015 (the ECE). Guo et al., ICML 2017
    (arXiv:1706.04599; 15 bins, top-label confidence).

  Example:
    >>> import numpy as np
    >>> from experiments import metrics
    >>> logits = np.log(np.array([[0.9, 0.1], [0.9, 0.1]]))
    >>> round(metrics.expected_calibration_error(logits, np.array([0, 1])), 4)
    0.4
  """
  num_bins = _check_num_bins("expected_calibration_error", num_bins)
  return reliability_diagram(logits, labels, num_bins)["ece"]


def adaptive_calibration_error(logits: Any, labels: Any, num_bins: int = 15) -> float:
  r"""Adaptive (equal-mass) expected calibration error.

  The ECE of :func:`expected_calibration_error` with bins of equal *mass*
  instead of equal width (the adaptive binning of Nixon et al., 2019; the
  top-label "AdaECE" of Mukhoti et al., 2020):

  .. math::

    \mathrm{ACE} = \sum_{b=1}^{M} \frac{n_b}{N} \, |acc_b − conf_b|.

  Convention: the examples are sorted by top-label confidence
  ``p̂_i = max_c softmax(z_i)_c`` (ties broken by correctness, so the result
  depends only on the multiset of ``(p̂_i, correct_i)`` and not on the order
  of the examples) and cut into ``M`` consecutive groups whose sizes differ
  by at most one, the larger groups first (``numpy.array_split``). With
  ``N < M`` the ``M − N`` empty groups contribute 0. This is the top-label
  variant; the class-wise ACE of Nixon et al. (averaged over classes) is not
  computed here.

  Args:
    logits: ``(N, C)`` unnormalized scores.
    labels: ``(N,)`` integer class indices in ``[0, C)``.
    num_bins: ``M``, the number of equal-mass bins.

  Returns:
    The adaptive ECE, a float in [0, 1].

  References:
    Nixon, Dusenberry, Zhang, Jerfel and Tran, `Measuring Calibration in Deep
    Learning <https://arxiv.org/abs/1904.01685>`_, CVPR Workshops 2019.
    Mukhoti et al., `Calibrating Deep Neural Networks using Focal Loss
    <https://arxiv.org/abs/2002.09437>`_, NeurIPS 2020.

  Example:
    >>> import numpy as np
    >>> from experiments import metrics
    >>> logits = np.log(np.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]]))
    >>> # bins {0.6, 0.7} (1 of 2 correct), {0.8, 0.9} (2 of 2): (0.3 + 0.3) / 4
    >>> round(metrics.adaptive_calibration_error(logits, np.array([0, 1, 0, 0]), 2), 4)
    0.15
  """
  num_bins = _check_num_bins("adaptive_calibration_error", num_bins)
  confidence, correct = _confidence_and_correct("adaptive_calibration_error", logits, labels)
  order = np.lexsort((correct, confidence))  # by confidence, then correctness
  gap = sum(
      abs(correct[group].sum() - confidence[group].sum())
      for group in np.array_split(order, num_bins)
  )
  return float(gap / confidence.shape[0])


# --------------------------------------------------------------------------
# Sharpness.
# --------------------------------------------------------------------------


def _check_float_params(name: str, params: Any) -> None:
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError(f"{name}: params has no arrays (got {params!r}).")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      raise TypeError(
          f"{name}: every leaf of params must be a float array, got dtype"
          f" {jnp.asarray(leaf).dtype}; pass only the trainable parameters."
      )


def _power_step(loss_fn: Callable[[Any], jax.Array], params: Any, vector: Any):
  """One power-iteration step: ``u = v/‖v‖``, ``(uᵀHu / uᵀu, Hu)``."""
  value = _loss.scalar_loss("top_hessian_eigenvalue", lambda p: loss_fn(p), has_aux=False)
  norm = _numerics.global_norm(vector)
  inverse = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
  unit = jax.tree.map(lambda v: (v.astype(jnp.float32) * inverse).astype(v.dtype), vector)
  _, product = jax.jvp(jax.grad(value), (params,), (unit,))  # forward-over-reverse
  squared = _numerics.vdot(unit, unit)
  rayleigh = jnp.where(squared > 0, _numerics.vdot(unit, product) / squared, 0.0)
  return rayleigh, product


def top_hessian_eigenvalue(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    num_iters: int = 20,
    key: jax.Array | None = None,
    tol: float = 1e-4,
) -> float:
  r"""The dominant eigenvalue ``λ_max`` of the Hessian ``∇²L(w)``, by power iteration.

  Starting from a Gaussian vector ``v_0`` (a pytree shaped like ``params``),

  .. math::

    u_k = v_k / ‖v_k‖, \qquad v_{k+1} = H u_k, \qquad λ_k = u_kᵀ H u_k,

  with the Hessian-vector product ``Hu = jvp(∇L, (w,), (u,))``
  (forward-over-reverse: about two gradients' cost, the Hessian never
  formed; the step is jitted once per call and reused by every iteration). Norms and
  inner products are accumulated in float32 (``sam_optax._ascent``).
  Iteration stops after ``num_iters`` steps or once
  ``|λ_k − λ_{k−1}| ≤ tol · |λ_k|``. Power iteration converges to the
  eigenvalue of largest *magnitude*; the returned Rayleigh quotient keeps its
  sign (negative if a negative-curvature direction dominates). Convergence is
  geometric in ``|λ_2 / λ_1|``: with a small eigengap, raise ``num_iters``.

  This is the sharpness measure reported by the SAM papers (e.g. Foret et
  al., 2021; Kwon et al., 2021; Zhuang et al., 2022).

  Args:
    loss_fn: ``loss_fn(params) -> scalar`` (bind the batch and model state
      beforehand, e.g. with ``functools.partial``; arrays it closes over are
      compiled in as constants).
    params: a pytree of float arrays, the point ``w``.
    num_iters: the maximum number of Hessian-vector products, ≥ 1.
    key: a ``jax.random`` key for ``v_0``; ``jax.random.key(0)`` if None.
    tol: the relative change of ``λ`` at which to stop early (0: never).

  Returns:
    ``λ``, the Rayleigh quotient of the last iterate, as a float.

  References:
    Foret, Kleiner, Mobahi and Neyshabur, `Sharpness-Aware Minimization for
    Efficiently Improving Generalization <https://arxiv.org/abs/2010.01412>`_,
    ICLR 2021. Yao et al., `PyHessian <https://arxiv.org/abs/1912.07145>`_,
    2020.

  Example:
    >>> import jax.numpy as jnp
    >>> from experiments import metrics
    >>> loss_fn = lambda p: 2.0 * p["a"][0] ** 2 + 0.5 * p["a"][1] ** 2 + p["b"] ** 2
    >>> params = {"a": jnp.ones(2), "b": jnp.float32(1.0)}
    >>> round(metrics.top_hessian_eigenvalue(loss_fn, params, num_iters=50), 3)
    4.0
  """
  name = "top_hessian_eigenvalue"
  _checks.check_callable("loss_fn", loss_fn, name, required=True)
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"{name}: num_iters must be an integer >= 1, got num_iters={num_iters!r}.")
  if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
    raise ValueError(f"{name}: tol must be a finite float >= 0, got tol={tol!r}.")
  _check_float_params(name, params)
  key = jax.random.key(0) if key is None else key
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  vector = jax.tree.unflatten(treedef, [
      jax.random.normal(k, jnp.shape(leaf), jnp.float32).astype(jnp.asarray(leaf).dtype)
      for k, leaf in zip(keys, leaves)
  ])
  # Jitted once per call: a fresh loss_fn (closing over a new batch) each
  # evaluation does not pile up compiled steps in a module-level cache.
  step = jax.jit(functools.partial(_power_step, loss_fn))
  previous = None
  for _ in range(num_iters):
    eigenvalue, vector = step(params, vector)
    eigenvalue = float(eigenvalue)
    if previous is not None and abs(eigenvalue - previous) <= tol * abs(eigenvalue):
      break
    previous = eigenvalue
  return eigenvalue


def _sharpness_of_batch(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any,
                        rho: jax.Array) -> jax.Array:
  """``L_B(w + ρ g/(‖g‖+δ)) − L_B(w)`` with ``g = ∇L_B(w)``."""
  value = _loss.scalar_loss("m_sharpness", lambda p, batch: loss_fn(p, batch), has_aux=False)
  loss, grads = jax.value_and_grad(value)(params, batch=batch)
  direction = _numerics.normalized(grads, _numerics.DEFAULT_EPS)
  perturbed = _numerics.ascent_point(params, direction, rho)
  return value(perturbed, batch=batch) - loss


def m_sharpness(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any],
    rho: float,
) -> float:
  r"""m-sharpness at radius ρ, with the one-step (SAM) inner maximization.

  Foret et al. (2021, §4.1) and Andriushchenko & Flammarion (2022) define,
  for a partition of the data into groups ``B`` of ``m`` examples,

  .. math::

    S^ρ_m(w) = \frac{1}{|\{B\}|} \sum_{B} \Big[\max_{‖ε‖_2 ≤ ρ} L_B(w + ε) − L_B(w)\Big].

  The inner maximum is approximated as SAM does, by one normalized gradient
  ascent step ``ε̂ = ρ · g_B / (‖g_B‖ + δ)`` with ``g_B = ∇L_B(w)`` (the
  first-order solution; δ = 1e-12). Since ``‖ε̂‖ ≤ ρ`` is feasible, each term
  is a lower bound on the exact maximum, and exact for a loss linear in the
  ball. ``ε̂`` is computed by ``sam_optax._ascent`` (float32 norm, the ascent
  point in the parameters' dtypes), i.e. exactly the perturbation of
  ``sam_optax.sam``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss ``L_B`` over
      the examples of ``batch`` (positional arguments; model state such as
      BatchNorm statistics bound beforehand, evaluation mode).
    params: a pytree of float arrays, the point ``w``.
    batches: an iterable of batches, each of ``m`` examples (any pytree that
      ``loss_fn`` takes); batches of one shape share one compilation.
    rho: the radius ρ ≥ 0.

  Returns:
    The mean over the batches of ``L_B(w + ε̂) − L_B(w)``, as a float.

  References:
    Foret, Kleiner, Mobahi and Neyshabur, `Sharpness-Aware Minimization for
    Efficiently Improving Generalization <https://arxiv.org/abs/2010.01412>`_,
    ICLR 2021. Andriushchenko and Flammarion, `Towards Understanding
    Sharpness-Aware Minimization <https://arxiv.org/abs/2206.06232>`_, ICML
    2022.

  Example:
    >>> import jax.numpy as jnp
    >>> from experiments import metrics
    >>> loss_fn = lambda w, x: jnp.sum((x @ w) ** 2)
    >>> x = jnp.eye(4)
    >>> batches = [x[:2], x[2:]]                  # m = 2
    >>> w = jnp.array([1.0, 0.0, 0.0, 0.0])      # flat on the second batch
    >>> round(metrics.m_sharpness(loss_fn, w, batches, rho=0.1), 4)  # (1.1² − 1 + 0) / 2
    0.105
  """
  name = "m_sharpness"
  _checks.check_callable("loss_fn", loss_fn, name, required=True)
  if isinstance(rho, bool) or not isinstance(rho, (int, float, np.floating)) or not (
      math.isfinite(rho) and rho >= 0):
    raise ValueError(f"{name}: rho must be a finite float >= 0, got rho={rho!r}.")
  _check_float_params(name, params)
  rho = jnp.float32(rho)
  sharpness = jax.jit(functools.partial(_sharpness_of_batch, loss_fn))  # once per batch shape
  values = [float(sharpness(params, batch, rho)) for batch in batches]
  if not values:
    raise ValueError(f"{name}: batches is empty; pass at least one batch of m examples.")
  return float(np.mean(values))
