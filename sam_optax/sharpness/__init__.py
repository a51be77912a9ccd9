"""Sharpness you can measure: the Hessian's spectrum and the SAM family's sharpness.

Every function takes the loss in the library's form, ``loss_fn(params,
**batch) -> scalar``, the point ``params`` (any pytree of float arrays,
possibly sharded with ``NamedSharding``) and ``batches``: None
(``loss_fn(params)``), one mapping of keyword arguments of ``loss_fn``, or an
iterable of them (the quantity is then that of the mean loss over the
batches, or the mean over the batches of a per-batch quantity, as each
function says). Every function is pure and can be called under ``jax.jit``
(its integer and string options are static; called eagerly, each call
compiles its program once, so wrap repeated measurements in your own
``jax.jit`` to compile them once); with ``axis_name`` it runs
inside ``jax.pmap`` or ``jax.shard_map(..., check_vma=False)`` on per-device
shards of the batches (``check_vma=True`` is refused: JAX would already sum
the gradients over the axis).

* :func:`top_hessian_eigenvalues` -- the ``k`` largest eigenvalues of the
  Hessian (Lanczos, full reorthogonalization), and their eigenvectors;
* :func:`hessian_trace` -- Hutchinson's estimate of ``tr(H)`` with its
  standard error;
* :func:`hessian_spectral_density` -- stochastic Lanczos quadrature
  (Ghorbani et al., 2019);
* :func:`m_sharpness` -- SAM's m-sharpness, the perturbation computed by the
  optimizers' own code (SAM's or ASAM's ascent);
* :func:`adaptive_sharpness` -- worst-case and average-case adaptive
  sharpness (Andriushchenko et al., 2023), pinned to the authors' code.

The Krylov methods run on `matfree <https://github.com/pnkraemer/matfree>`_,
an optional dependency: ``pip install 'sam_optax[sharpness]'``; the last two
do not need it.
"""

from sam_optax.sharpness._hessian import (HessianEigen, SpectralDensity, TraceEstimate,
                                          hessian_spectral_density, hessian_trace,
                                          top_hessian_eigenvalues)
from sam_optax.sharpness._perturbed import adaptive_sharpness, apgd_checkpoints, m_sharpness

__all__ = [
    "HessianEigen",
    "SpectralDensity",
    "TraceEstimate",
    "adaptive_sharpness",
    "apgd_checkpoints",
    "hessian_spectral_density",
    "hessian_trace",
    "m_sharpness",
    "top_hessian_eigenvalues",
]
