"""The rule that turns seeds into a verdict: holds, does not hold, inconclusive.

One rule, stated once in :data:`RULE` and used for every claim of the study
(:mod:`experiments.study`): a difference between two arms counts when it
exceeds twice its standard error over seeds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

RULE = (
    "A difference d = mean(a) − mean(b) between two arms counts when it exceeds twice its"
    " standard error, se = sqrt(s_a²/n_a + s_b²/n_b) (s the sample standard deviation over"
    " seeds, ddof = 1). A claimed ordering *holds* when d has the claimed sign and"
    " |d| > 2·se; it *does not hold* when d has the opposite sign and |d| > 2·se; otherwise it"
    " is *inconclusive*. A claim \"a ≥ b\" (no loss) holds unless \"a < b\" counts. A claim"
    " that bounds a measured ratio (a cost \"≤ 1.10× SGD\") holds when the interval's upper"
    " end is within the bound, does not hold when its lower end is above it, and is"
    " inconclusive otherwise. A claim of several parts holds when every part holds, does not"
    " hold when any part does not hold, and is inconclusive otherwise. Seeds are paired (the"
    " same seed gives two arms the same initialization and data order), but the rule treats"
    " them as independent samples, the more conservative reading.")
"""The verdict rule, in words (the report prints it)."""

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"

#: How many standard errors a difference must exceed to count.
THRESHOLD = 2.0


@dataclasses.dataclass(frozen=True)
class Comparison:
  """``a`` against ``b`` under the rule: the numbers and the verdict."""

  difference: float
  standard_error: float
  verdict: str

  def describe(self) -> str:
    return f"{self.difference:+.3g} ± {self.standard_error:.2g} (se) → {self.verdict}"


def _values(name: str, values: Iterable[float]) -> np.ndarray:
  array = np.asarray(list(values), dtype=np.float64)
  if array.ndim != 1 or array.size < 2:
    raise ValueError(f"{name} needs at least 2 values (seeds) to have a standard error,"
                     f" got {array.tolist()!r}.")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} has a value that is not finite: {array.tolist()!r}.")
  return array


def standard_error(values: Sequence[float]) -> float:
  """``s / sqrt(n)`` with ``s`` the sample standard deviation (``ddof = 1``)."""
  array = _values("values", values)
  return float(np.std(array, ddof=1) / math.sqrt(array.size))


def compare(a: Sequence[float], b: Sequence[float], *, claim: str) -> Comparison:
  """The verdict on ``a > b`` (``claim='greater'``) or ``a < b`` (``'less'``).

  Example:
    >>> compare([0.90, 0.91, 0.92], [0.80, 0.81, 0.79], claim="greater").verdict
    'holds'
    >>> compare([0.80, 0.81, 0.79], [0.90, 0.91, 0.92], claim="greater").verdict
    'does not hold'
    >>> compare([0.80, 0.90, 0.70], [0.81, 0.91, 0.69], claim="less").verdict
    'inconclusive'
  """
  if claim not in ("greater", "less"):
    raise ValueError(f"claim must be 'greater' or 'less', got {claim!r}.")
  a_values, b_values = _values("a", a), _values("b", b)
  difference = float(a_values.mean() - b_values.mean())
  error = math.hypot(standard_error(a_values), standard_error(b_values))
  signed = difference if claim == "greater" else -difference
  if abs(difference) > THRESHOLD * error and signed > 0:
    verdict = HOLDS
  elif abs(difference) > THRESHOLD * error and signed < 0:
    verdict = FAILS
  else:
    verdict = INCONCLUSIVE
  return Comparison(difference, error, verdict)


def at_most(value: float, spread: float, bound: float) -> str:
  """The verdict on ``value ≤ bound`` for a measurement ``value ± spread``.

  ``spread`` is the half-width of the measurement's interval (for a ratio
  of times, e.g. from its interquartile range).

  Example:
    >>> at_most(1.00, 0.04, 1.10), at_most(1.21, 0.05, 1.10), at_most(1.08, 0.05, 1.10)
    ('holds', 'does not hold', 'inconclusive')
  """
  for name, number in (("value", value), ("spread", spread), ("bound", bound)):
    if not math.isfinite(number):
      raise ValueError(f"{name} must be finite, got {number!r}.")
  if spread < 0:
    raise ValueError(f"spread must be >= 0, got {spread!r}.")
  if value + spread <= bound:
    return HOLDS
  if value - spread > bound:
    return FAILS
  return INCONCLUSIVE


def combine(verdicts: Iterable[str]) -> str:
  """All parts hold → holds; any part fails → does not hold; else inconclusive.

  Example:
    >>> combine(["holds", "holds"]), combine(["holds", "does not hold"])
    ('holds', 'does not hold')
    >>> combine(["holds", "inconclusive"])
    'inconclusive'
  """
  verdicts = list(verdicts)
  if not verdicts:
    raise ValueError("combine needs at least one verdict.")
  unknown = set(verdicts) - {HOLDS, FAILS, INCONCLUSIVE}
  if unknown:
    raise ValueError(f"unknown verdicts {sorted(unknown)!r}; expected {HOLDS!r}, {FAILS!r}"
                     f" or {INCONCLUSIVE!r}.")
  if FAILS in verdicts:
    return FAILS
  if all(v == HOLDS for v in verdicts):
    return HOLDS
  return INCONCLUSIVE
