"""The Hessian's spectrum by Krylov methods (matfree): top eigenvalues, trace, density."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sam_optax import _checks, _loss
from sam_optax.sharpness import _common
from sam_optax.sharpness._common import Batches


class HessianEigen(NamedTuple):
  """The result of :func:`top_hessian_eigenvalues`.

  Attributes:
    eigenvalues: ``[k]``, the ``k`` largest (algebraic) eigenvalues of the
      Hessian, in descending order, in the work dtype (float32 for bf16 or
      float32 params, float64 for float64 params).
    eigenvectors: a pytree like the params whose leaves have a leading axis
      of size ``k`` (``eigenvectors[i]`` is the unit eigenvector of
      ``eigenvalues[i]``, up to sign), or None unless asked for.
  """

  eigenvalues: jax.Array
  eigenvectors: Any


class TraceEstimate(NamedTuple):
  """The result of :func:`hessian_trace`.

  Attributes:
    trace: the Hutchinson estimate ``(1/S) Σ_s v_sᵀ H v_s``.
    stderr: its standard error ``std(v_sᵀ H v_s) / √S`` (sample standard
      deviation, ``ddof=1``).
    num_samples: ``S``, the number of probes.
  """

  trace: jax.Array
  stderr: jax.Array
  num_samples: int


class SpectralDensity(NamedTuple):
  """The result of :func:`hessian_spectral_density`.

  Attributes:
    grid: ``[G]``, the points ``t`` where the density is evaluated.
    density: ``[G]``, ``φ_σ(t)``, normalized so that its trapezoidal integral
      over ``grid`` is 1.
    nodes: ``[S, K]``, the Ritz values ``θ_sj`` (Gauss quadrature nodes) of
      probe ``s``.
    weights: ``[S, K]``, their weights ``τ_sj = (u_sj)_1²`` (each row sums
      to 1), so that ``Σ_j τ_sj θ_sj^p = v̂_sᵀ H^p v̂_s`` exactly for
      ``p < 2K``: the moments ``tr(H^p)/n`` are estimated by
      ``mean_s Σ_j τ_sj θ_sj^p``.
  """

  grid: jax.Array
  density: jax.Array
  nodes: jax.Array
  weights: jax.Array


def _check_key(function: str, key: Any) -> None:
  if key is None:
    raise ValueError(
        f"{function}: key is required (a jax.random.key for the random start"
        " or probe vectors), got key=None.")


def _check_krylov(function: str, params: Any, num_iters: int, what: str) -> int:
  size = _common.num_params(params)
  if num_iters > size:
    raise ValueError(
        f"{function}: num_iters={num_iters} ({what}) must be <= the number of"
        f" parameters, {size}: a Krylov space has at most that many dimensions.")
  return size


def _flat_operator(function: str, loss_fn: Callable[..., Any], params: Any,
                   batches: list[Any], axis_name: str | None, has_aux: bool):
  """``(H v for flat v, the flat zero vector, unravel)`` in the work dtype."""
  value = _loss.scalar_loss(function, loss_fn, has_aux)
  product = _common.hessian_vector_product(value, params, batches, axis_name)
  dtype = _common.work_dtype(params)
  flat, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, dtype), params))

  def matvec(vector: jax.Array) -> jax.Array:
    return ravel_pytree(product(unravel(vector)))[0]

  return matvec, jnp.zeros_like(flat), unravel


def top_hessian_eigenvalues(
    loss_fn: Callable[..., Any],
    params: Any,
    batches: Batches = None,
    *,
    k: int = 1,
    num_iters: int = 20,
    key: jax.Array,
    return_eigenvectors: bool = False,
    axis_name: str | None = None,
    has_aux: bool = False,
) -> HessianEigen:
  r"""The ``k`` largest eigenvalues of the Hessian, by Lanczos with full reorthogonalization.

  With ``L̄(w) = (1/B) Σ_b L_b(w)`` the mean over the ``B`` batches of
  ``L_b(w) = loss_fn(w, **batch_b)`` and ``H = ∇²L̄(w)``, ``num_iters = K``
  Lanczos steps from a Gaussian start vector ``q_1`` build an orthonormal
  basis ``Q_K`` of the Krylov space ``span{q_1, H q_1, …, H^{K−1} q_1}``
  and the tridiagonal ``T_K = Q_Kᵀ H Q_K``; its eigenpairs ``(θ_i, u_i)``
  give the Ritz values ``θ_i`` and vectors ``Q_K u_i``, and the ``k``
  largest are returned:

  .. math::

    λ_1 ≥ … ≥ λ_k ≈ θ_K ≥ … ≥ θ_{K−k+1}, \qquad
    H v = \frac{1}{B} \sum_b \frac{∂}{∂ε} ∇L_b(w + ε v)\Big|_{ε=0}.

  Each product ``Hv`` is one forward-over-reverse pass per batch
  (``jax.jvp`` of ``jax.grad``, about two gradients' cost; the Hessian is
  never formed), averaged over the batches and, with ``axis_name``, over the
  devices (``jax.lax.pmean``). The Lanczos vectors are reorthogonalized
  against all previous ones (``matfree.decomp.tridiag_sym(K,
  reortho="full")``), so no spurious copies of converged eigenvalues
  appear; they are held in the work dtype (float32 for bf16/f16/float32
  params, float64 for float64 ones), ``K`` vectors of the size of the
  params. The extreme eigenvalues converge first and much faster than by
  power iteration (which also converges to the largest *magnitude*, here the
  largest algebraic value is returned; a negative eigenvalue is reported as
  it is). With ``K = n`` (the number of parameters) the result is exact up
  to rounding.

  .. note::
    matfree normalizes each new Lanczos vector by the norm of the residual
    with no guard: if the residual is *exactly* zero (the start vector lies
    in an invariant subspace of dimension below ``K``, which happens for toy
    Hessians such as a multiple of the identity probed by a ±1 vector, never
    in practice for a network), the results are NaN. Lower ``num_iters``
    there.

  Args:
    loss_fn: ``loss_fn(params, **batch) -> scalar`` (or ``(scalar, aux)``
      with ``has_aux``), the library's form; bind model state (BatchNorm
      statistics, evaluation mode) beforehand.
    params: a pytree of float arrays, the point ``w`` (possibly sharded with
      ``NamedSharding``; the result is the same).
    batches: None (``loss_fn(params)``), one mapping of keyword arguments
      of ``loss_fn``, or a non-empty iterable of them; the Hessian is that of
      the mean loss over the batches (every batch weighs the same). Batches of
      one shape are stacked and scanned over, one at a time.
    k: the number of eigenvalues, ``1 ≤ k ≤ num_iters``.
    num_iters: ``K``, the dimension of the Krylov space (the number of
      Hessian-vector products), ``k ≤ K ≤ n``.
    key: a ``jax.random`` key for the start vector.
    return_eigenvectors: whether to return the Ritz vectors too.
    axis_name: inside ``jax.pmap`` or ``jax.shard_map(..., check_vma=False)``
      with each device holding a shard of the batches: the mesh axis the
      products are averaged over (equal-sized shards give the Hessian of the
      whole batch).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A :class:`HessianEigen` ``(eigenvalues, eigenvectors)``.

  Raises:
    ValueError: if ``k`` or ``num_iters`` is out of range, or ``loss_fn``
      does not return a scalar.
    TypeError: if a batch has keys ``loss_fn`` does not take (or lacks ones
      it requires).
    ImportError: if matfree is not installed (``pip install
      'sam_optax[sharpness]'``).

  References:
    Lanczos, An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators, J. Res. NBS 45, 1950.
    Krämer et al., `matfree <https://github.com/pnkraemer/matfree>`_.
    Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`_, 2020 (the same quantity by power
    iteration).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from sam_optax import sharpness
    >>> def loss_fn(params, x, y):
    ...   return 0.5 * jnp.mean((x @ params['w'] + params['b'] - y) ** 2)
    >>> x = jax.random.normal(jax.random.key(0), (32, 5))
    >>> batch = {'x': x, 'y': jnp.ones(32)}
    >>> params = {'w': jnp.zeros(5), 'b': jnp.zeros(())}
    >>> top = sharpness.top_hessian_eigenvalues(
    ...     loss_fn, params, batch, k=2, num_iters=6, key=jax.random.key(1))
    >>> features = np.hstack([np.asarray(x), np.ones((32, 1))])
    >>> exact = np.linalg.eigvalsh(features.T @ features / 32)[::-1]
    >>> bool(np.allclose(top.eigenvalues, exact[:2], rtol=1e-4))
    True
  """
  function = "top_hessian_eigenvalues"
  _checks.check_int("k", k, 1, function)
  _checks.check_int("num_iters", num_iters, 1, function)
  if k > num_iters:
    raise ValueError(
        f"{function}: k={k} must be <= num_iters={num_iters}: Lanczos gives"
        " num_iters Ritz values, raise num_iters (the k largest converge first,"
        " num_iters of 2k to 3k and more is usual).")
  _checks.check_axis_name(function, axis_name)
  _check_key(function, key)
  _common.check_params(function, params)
  size = _common.num_params(params)
  if k > size:
    raise ValueError(
        f"{function}: k={k} must be <= the number of parameters, {size}.")
  _check_krylov(function, params, num_iters, "the Krylov dimension")
  batch_list = _common.batch_list(function, loss_fn, batches)
  matfree = _common.import_matfree(function)

  def run(params, batch_list, key):
    _checks.check_axis_not_checked_for_vma(function, axis_name, params, batch_list)
    matvec, zero, unravel = _flat_operator(
        function, loss_fn, params, batch_list, axis_name, has_aux)
    start = jax.random.normal(key, zero.shape, zero.dtype)
    tridiag = matfree.decomp.tridiag_sym(num_iters, reortho="full", custom_vjp=False)
    values, vectors = matfree.eig.eigh_partial(tridiag)(matvec, start)
    top = jnp.argsort(-values)[:k]  # eigh's order is ascending
    eigenvectors = jax.vmap(unravel)(vectors[top]) if return_eigenvectors else None
    return HessianEigen(values[top], eigenvectors)

  return _common.jit_call(run, params, batch_list, key)


def _rademacher_probes(matfree: Any, zero: jax.Array, key: jax.Array, num_samples: int):
  """``num_samples`` keys, and a function drawing one Rademacher probe from a key."""
  sampler = matfree.stochtrace.sampler_signs(zero, num=1)
  return jax.random.split(key, num_samples), lambda one_key: sampler(one_key)[0]


def hessian_trace(
    loss_fn: Callable[..., Any],
    params: Any,
    batches: Batches = None,
    *,
    key: jax.Array,
    num_samples: int = 100,
    axis_name: str | None = None,
    has_aux: bool = False,
) -> TraceEstimate:
  r"""The trace of the Hessian, by Hutchinson's estimator with Rademacher probes.

  With ``H = ∇²L̄(w)`` the Hessian of the mean loss over the batches (see
  :func:`top_hessian_eigenvalues`) and ``S`` independent probes ``v_s`` of
  i.i.d. ±1 entries (``E[v vᵀ] = I``):

  .. math::

    \widehat{\mathrm{tr}}(H) = \frac{1}{S} \sum_{s=1}^{S} v_sᵀ H v_s, \qquad
    \mathrm{stderr} = \frac{\mathrm{std}_s(v_sᵀ H v_s)}{\sqrt{S}},

  unbiased, with variance ``2 Σ_{i≠j} H_ij² / S`` (Rademacher probes have the
  least variance of the Hutchinson family; an exactly diagonal Hessian is
  found with no error). ``std`` is the sample standard deviation
  (``ddof=1``). The integrand is matfree's
  ``stochtrace.monte_carlo_trace``, its probes
  ``stochtrace.sampler_signs``; the probes run one after the other
  (``jax.lax.map``), so memory is that of one Hessian-vector product. Each
  product is forward-over-reverse, accumulated in the work dtype (at least
  float32), averaged over the batches and, with ``axis_name``, the devices.

  Args:
    loss_fn, params, batches, axis_name, has_aux: see
      :func:`top_hessian_eigenvalues`.
    key: a ``jax.random`` key for the probes.
    num_samples: ``S ≥ 2``, the number of probes (Hessian-vector products).

  Returns:
    A :class:`TraceEstimate` ``(trace, stderr, num_samples)``.

  References:
    Hutchinson, A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines, 1990. Avron and Toledo, Randomized
    algorithms for estimating the trace of an implicit symmetric positive
    semi-definite matrix, J. ACM 2011. Yao et al., `PyHessian
    <https://arxiv.org/abs/1912.07145>`_, 2020.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 2.0 * w[0] ** 2 + 0.5 * w[1] ** 2 + w[2] ** 2
    >>> estimate = sharpness.hessian_trace(loss_fn, jnp.ones(3), key=jax.random.key(0),
    ...                                    num_samples=10)
    >>> round(float(estimate.trace), 4), float(estimate.stderr)  # diagonal: exact
    (7.0, 0.0)
  """
  function = "hessian_trace"
  _checks.check_int("num_samples", num_samples, 2, function)
  _checks.check_axis_name(function, axis_name)
  _check_key(function, key)
  _common.check_params(function, params)
  batch_list = _common.batch_list(function, loss_fn, batches)
  matfree = _common.import_matfree(function)

  def run(params, batch_list, key):
    _checks.check_axis_not_checked_for_vma(function, axis_name, params, batch_list)
    matvec, zero, _ = _flat_operator(function, loss_fn, params, batch_list, axis_name, has_aux)
    integrand = matfree.stochtrace.monte_carlo_trace()
    keys, probe = _rademacher_probes(matfree, zero, key, num_samples)
    samples = jax.lax.map(lambda one_key: integrand(matvec, probe(one_key)), keys)
    stderr = jnp.std(samples, ddof=1) / math.sqrt(num_samples)
    return TraceEstimate(jnp.mean(samples), stderr, num_samples)

  trace, stderr, _ = _common.jit_call(run, params, batch_list, key)
  return TraceEstimate(trace, stderr, num_samples)


def hessian_spectral_density(
    loss_fn: Callable[..., Any],
    params: Any,
    batches: Batches = None,
    *,
    key: jax.Array,
    num_iters: int = 30,
    num_samples: int = 10,
    grid: jax.Array | None = None,
    sigma: float | None = None,
    axis_name: str | None = None,
    has_aux: bool = False,
) -> SpectralDensity:
  r"""The Hessian's eigenvalue density, by stochastic Lanczos quadrature (SLQ).

  For each of ``S`` Rademacher probes ``v_s`` (unit ``v̂_s = v_s/√n``),
  ``K = num_iters`` Lanczos steps with full reorthogonalization give the
  tridiagonal ``T_s = U_s diag(θ_s) U_sᵀ``; the ``K``-point Gauss quadrature
  of the spectral measure of ``H`` seen from ``v̂_s`` has nodes ``θ_sj`` and
  weights ``τ_sj = (U_s)_{1j}²``, and the density is the average of the
  Gaussian-broadened quadratures (Ghorbani, Krishnan and Xiao, 2019):

  .. math::

    φ_σ(t) = \frac{1}{S} \sum_{s=1}^{S} \sum_{j=1}^{K} τ_{sj}
      \frac{1}{σ\sqrt{2π}} e^{-(t − θ_{sj})^2 / 2σ^2}
      \;\approx\; \frac{1}{n} \sum_{i=1}^{n} \mathcal{N}(t; λ_i, σ^2),

  then divided by its trapezoidal integral over ``grid`` (so it integrates
  to 1 there). The moments are exact per probe for ``p < 2K``:
  ``Σ_j τ_sj θ_sj^p = v̂_sᵀ H^p v̂_s``, whose mean over probes is an unbiased
  estimate of ``tr(H^p)/n`` (``p = 1``: the trace over ``n``; compute it from
  ``nodes`` and ``weights``, not from the broadened density). The Hessian is
  that of the mean loss over the batches (see
  :func:`top_hessian_eigenvalues`); the probes run one after the other.

  Args:
    loss_fn, params, batches, axis_name, has_aux: see
      :func:`top_hessian_eigenvalues`.
    key: a ``jax.random`` key for the probes.
    num_iters: ``K``, the Lanczos steps per probe, ``1 ≤ K ≤ n``.
    num_samples: ``S ≥ 1``, the number of probes (``S·K`` Hessian-vector
      products in all).
    grid: the points ``t`` (1-D, increasing); default: 1000 points from
      ``min θ − m`` to ``max θ + m`` with the margin
      ``m = 0.05 · (max θ − min θ)``.
    sigma: ``σ > 0``, the standard deviation of the broadening; default:
      5 grid spacings, ``5 (t_G − t_1)/(G − 1)``.

  Returns:
    A :class:`SpectralDensity` ``(grid, density, nodes, weights)``.

  .. note::
    Ghorbani et al.'s code broadens with a variance of ``1e-5`` times the
    spectrum's range on ``10⁴`` points; on the default 1000 points such
    narrow Gaussians would fall between grid points (and not integrate to
    1), hence the default of a few grid spacings. Pass ``grid`` and
    ``sigma`` to choose.

  References:
    Ghorbani, Krishnan and Xiao, `An Investigation into Neural Net
    Optimization via Hessian Eigenvalue Density
    <https://arxiv.org/abs/1901.10159>`_, ICML 2019. Ubaru, Chen and Saad,
    Fast estimation of tr(f(A)) via stochastic Lanczos quadrature, SIAM J.
    Matrix Anal. Appl. 2017. Lin, Saad and Yang, Approximating spectral
    densities of large matrices, SIAM Review 2016.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sam_optax import sharpness
    >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 9.0) * w ** 2)  # λ = 1..8
    >>> spectrum = sharpness.hessian_spectral_density(
    ...     loss_fn, jnp.ones(8), key=jax.random.key(0), num_iters=8, num_samples=4)
    >>> spectrum.nodes.shape, spectrum.density.shape
    ((4, 8), (1000,))
    >>> # the mean first moment is tr(H)/n = 4.5 (exactly here: H is diagonal)
    >>> round(float(jnp.mean(jnp.sum(spectrum.weights * spectrum.nodes, axis=1))), 4)
    4.5
  """
  function = "hessian_spectral_density"
  _checks.check_int("num_iters", num_iters, 1, function)
  _checks.check_int("num_samples", num_samples, 1, function)
  _checks.check_axis_name(function, axis_name)
  _check_key(function, key)
  if sigma is not None:
    _checks.check_positive("sigma", sigma, function)
  _common.check_params(function, params)
  _check_krylov(function, params, num_iters, "Lanczos steps per probe")
  if grid is not None:
    shape = jnp.shape(grid)
    if len(shape) != 1 or shape[0] < 2:
      raise ValueError(
          f"{function}: grid must be a 1-D array of at least 2 points, got shape {shape}.")
    if not isinstance(grid, jax.core.Tracer) and not bool(np.all(np.diff(np.asarray(grid)) > 0)):
      raise ValueError(f"{function}: grid must be strictly increasing, got grid={grid!r}.")
  batch_list = _common.batch_list(function, loss_fn, batches)
  matfree = _common.import_matfree(function)

  def run(params, batch_list, key, grid):
    _checks.check_axis_not_checked_for_vma(function, axis_name, params, batch_list)
    matvec, zero, _ = _flat_operator(function, loss_fn, params, batch_list, axis_name, has_aux)
    tridiag = matfree.decomp.tridiag_sym(num_iters, reortho="full", custom_vjp=False)
    keys, probe = _rademacher_probes(matfree, zero, key, num_samples)

    def quadrature(one_key):
      _, tridiagonal, *_ = tridiag(matvec, probe(one_key))
      nodes, vectors = jnp.linalg.eigh(tridiagonal)
      return nodes, vectors[0, :] ** 2

    nodes, weights = jax.lax.map(quadrature, keys)
    if grid is None:
      low, high = jnp.min(nodes), jnp.max(nodes)
      spread = high - low
      spread = jnp.where(spread > 0, spread, 1e-3 * jnp.maximum(jnp.abs(high), 1.0))
      grid = jnp.linspace(low - 0.05 * spread, high + 0.05 * spread, 1000, dtype=zero.dtype)
    else:
      grid = jnp.asarray(grid, zero.dtype)
    width = (sigma if sigma is not None
             else 5.0 * (grid[-1] - grid[0]) / (grid.shape[0] - 1))
    z = (grid[:, None, None] - nodes[None]) / width
    kernel = jnp.exp(-0.5 * z * z) / (width * math.sqrt(2.0 * math.pi))
    density = jnp.mean(jnp.sum(weights[None] * kernel, axis=2), axis=1)
    density = density / jnp.trapezoid(density, grid)
    return SpectralDensity(grid, density, nodes, weights)

  return _common.jit_call(run, params, batch_list, key, grid)
