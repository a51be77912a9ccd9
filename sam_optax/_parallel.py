"""Where the perturbation is computed: the one data-parallel option.

Every method that re-evaluates the gradient takes ``perturbation=``, one of

* ``None`` (the default): one perturbation from the gradient the step is
  given; no communication. Under a sharded ``jax.jit`` the gradient is the
  global batch's.
* :class:`PerDevice` ``(axis_name)``: inside ``jax.pmap`` / ``shard_map``,
  every device perturbs with its own, local gradient (m-sharpness with m the
  per-device batch, as in Foret et al.); the surrogate is averaged over
  ``axis_name`` once.
* :class:`Synced` ``(axis_name)``: one perturbation from the gradient
  averaged over ``axis_name``, every re-evaluated gradient averaged too: the
  step of the single-device method on the global batch.
* :class:`Splits` ``(n, batch_argnames=("batch",), axis_name=None)``: a
  perturbation per group of ``B / n`` examples inside the batch (m-sharpness
  within a device, or under a sharded ``jax.jit`` with ``n`` = the device
  count); with ``axis_name`` the surrogate is also averaged over that axis.

Each is a frozen dataclass that checks its fields when built, so a
contradictory combination (a synchronized perturbation per group, a
synchronized perturbation without an axis) cannot be written.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence


def _check_axis_name(kind: str, axis_name: object, optional: bool = False) -> None:
  if optional and axis_name is None:
    return
  if not isinstance(axis_name, str) or not axis_name:
    expected = "a non-empty string or None" if optional else "a non-empty string"
    raise TypeError(
        f"{kind}: axis_name must be {expected} (the axis of jax.pmap or"
        f" shard_map), got {axis_name!r}.")


@dataclasses.dataclass(frozen=True)
class _OnAxis:
  """An option that averages over a named data-parallel axis."""

  axis_name: str

  def __post_init__(self):
    _check_axis_name(type(self).__name__, self.axis_name)


class PerDevice(_OnAxis):
  """Each device perturbs with its own gradient; the surrogate is averaged once.

  Pass the local, un-averaged gradient to ``update`` inside ``jax.pmap`` or
  ``shard_map`` over ``axis_name``.

  Attributes:
    axis_name: the data-parallel axis.

  Example:
    >>> import sam_optax
    >>> tx = sam_optax.sam(0.05, perturbation=sam_optax.PerDevice("data"))
  """


class Synced(_OnAxis):
  """One perturbation from the gradient averaged over ``axis_name``.

  Every re-evaluated gradient is averaged too (one all-reduce per gradient
  evaluation), so the step equals the single-device step on the global
  batch.

  Attributes:
    axis_name: the data-parallel axis.

  Example:
    >>> import sam_optax
    >>> tx = sam_optax.gsam(0.05, perturbation=sam_optax.Synced("data"))
  """


@dataclasses.dataclass(frozen=True)
class Splits:
  """A perturbation per group of ``B / n`` examples of the batch.

  The extra arguments of ``update`` named in ``batch_argnames`` are split
  along axis 0 into ``n`` groups; each group's gradient ``g_i = ∇L_i(w)``
  is recomputed (one extra pass, vectorized over the groups) and the
  method's rule runs per group with ``g_i`` and ``∇L_i``; the surrogate is
  the mean over groups (and over ``axis_name`` if given). Under ``jax.jit``
  with a batch sharded over ``n`` devices, ``Splits(n)`` gives the
  per-device perturbation of ``pmap``.

  Attributes:
    n: the number of groups, an int ≥ 1.
    batch_argnames: the extra arguments of ``update`` to split (model state
      such as BatchNorm statistics is not split).
    axis_name: the data-parallel axis to average over as well, or None.

  Example:
    >>> import sam_optax
    >>> tx = sam_optax.sam(0.05, perturbation=sam_optax.Splits(8))
  """

  n: int
  batch_argnames: Sequence[str] = ("batch",)
  axis_name: str | None = None

  def __post_init__(self):
    if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral) or self.n < 1:
      raise ValueError(f"Splits: n must be an int >= 1, got n={self.n!r}.")
    names = self.batch_argnames
    if (isinstance(names, str) or not isinstance(names, Sequence) or not names
        or not all(isinstance(name, str) for name in names)):
      raise TypeError(
          "Splits: batch_argnames must be a non-empty sequence of names of"
          f" update()'s extra arguments, got {names!r}.")
    object.__setattr__(self, "batch_argnames", tuple(names))
    _check_axis_name("Splits", self.axis_name, optional=True)


Perturbation = PerDevice | Synced | Splits
"""Where the perturbation is computed (see the module docstring)."""


def check_perturbation(method: str, perturbation: object) -> None:
  """Raises ``TypeError`` unless ``perturbation`` is None or one of the three."""
  if perturbation is None or isinstance(perturbation, (PerDevice, Synced, Splits)):
    return
  raise TypeError(
      f"{method}: perturbation must be None, sam_optax.PerDevice(axis_name),"
      " sam_optax.Synced(axis_name) or sam_optax.Splits(n, ...), got"
      f" {type(perturbation).__name__} {perturbation!r}.")


def axis_of(perturbation: Perturbation | None) -> str | None:
  """The axis the surrogate is averaged over (None if there is none)."""
  return None if perturbation is None else perturbation.axis_name
