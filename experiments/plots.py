"""Figures of the comparison: learning curves, reliability diagrams, Hessian spectra.

Every function draws on a fresh :class:`matplotlib.figure.Figure` rendered by
the Agg canvas (no display and no global ``pyplot`` state or backend switch,
so it is safe in scripts, threads and tests), writes it to ``path`` (the format from its suffix, PNG by default;
missing parent folders are created) and returns ``path`` as a string. Bad
input (nothing to plot, series of different lengths, missing keys) raises a
``ValueError`` that names the method and key before anything is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["plot_learning_curves", "plot_reliability_diagrams", "plot_spectral_density",
           "save_figure"]

# The keys of a history in the order the panels are drawn; others follow in
# the order they are first seen.
_PREFERRED_ORDER = (
    "train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_nll",
    "test_ece", "test_adaptive_ece",
)
# Keys of a history that give the x axis instead of a panel.
_X_KEYS = ("epoch", "step")

_DIAGRAM_KEYS = ("bin_lower", "bin_upper", "bin_confidence", "bin_accuracy", "bin_count")

_NAMES = {"nll": "NLL", "ece": "ECE", "adaptive_ece": "adaptive ECE", "loss": "loss",
          "accuracy": "accuracy"}


def _label(key: str) -> str:
  """``'test_ece'`` -> ``'Test ECE'``."""
  words = key.split("_", 1)
  if len(words) == 2 and words[0] in ("train", "test", "val", "eval"):
    rest = _NAMES.get(words[1], words[1].replace("_", " "))
    return f"{words[0].capitalize()} {rest}"
  return key.replace("_", " ").capitalize()


def colors(count: int) -> list[Any]:
  """``count`` distinguishable colors (tab10, or tab20 beyond ten)."""
  cmap = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(count)]


def _series(where: str, values: Any) -> np.ndarray:
  try:
    array = np.asarray(values, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"{where} must be a sequence of numbers, got {values!r}.") from None
  if array.ndim != 1:
    raise ValueError(f"{where} must be a 1-D sequence of numbers, got shape {array.shape}.")
  return array


def save_figure(figure: Figure, path: str | os.PathLike[str], *, tight: bool = False) -> str:
  """Renders ``figure`` with the Agg canvas to ``path`` (parents created); returns ``path``.

  ``tight``: crop to the drawn content (for legends placed outside the axes).
  """
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=120, bbox_inches="tight" if tight else None)
  return path


def _grid(count: int, max_cols: int) -> tuple[int, int]:
  cols = min(count, max_cols)
  return math.ceil(count / cols), cols


def plot_learning_curves(
    histories: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike[str],
) -> str:
  """Learning curves of several methods: one panel per metric, one line per method.

  Args:
    histories: ``{method: {key: values}}``, e.g. ``{"sam": {"train_loss":
      [...], "test_accuracy": [...], "test_nll": [...], "test_ece": [...]}}``
      with one value per epoch. Every key present in any method gets a panel
      (``train_loss`` and ``test_accuracy`` first); a method lacking a key is
      absent from that panel. An ``epoch`` (or ``step``) key, if present,
      gives the x values of that method; otherwise the x values are
      ``1, 2, ...``. Within a method every series must have the same length.
      NaN values (a diverged run) leave gaps.
    path: the output file (``.png``).

  Returns:
    ``path``, as a string.

  Raises:
    ValueError: if ``histories`` or a method's history is empty, a series is
      empty or not numbers, or the series of a method differ in length.

  Example:
    >>> import tempfile, os
    >>> from experiments import plots
    >>> out = os.path.join(tempfile.mkdtemp(), "curves.png")
    >>> plots.plot_learning_curves(
    ...     {"sgd": {"train_loss": [1.0, 0.5], "test_accuracy": [0.6, 0.7]},
    ...      "sam": {"train_loss": [1.1, 0.6], "test_accuracy": [0.62, 0.75]}},
    ...     out) == out
    True
  """
  if not histories:
    raise ValueError("plot_learning_curves: histories is empty; pass {method: {key: values}}.")
  checked: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
  keys: list[str] = []
  for method, history in histories.items():
    where = f"plot_learning_curves: histories[{method!r}]"
    if not isinstance(history, Mapping) or not history:
      raise ValueError(f"{where} must be a non-empty dict {{key: values}}, got {history!r}.")
    series = {key: _series(f"{where}[{key!r}]", values) for key, values in history.items()}
    lengths = {key: len(values) for key, values in series.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(
          f"{where}: every series must have one value per epoch (the same length), got"
          f" lengths {lengths}."
      )
    if not next(iter(lengths.values())):
      raise ValueError(f"{where}: the series are empty.")
    x_key = next((k for k in _X_KEYS if k in series), None)
    x = series.pop(x_key) if x_key else np.arange(1, next(iter(lengths.values())) + 1)
    if not series:
      raise ValueError(f"{where} has only {x_key!r}; nothing to plot.")
    checked[str(method)] = (x, series)
    keys.extend(k for k in series if k not in keys)
  first_seen = list(keys)
  keys.sort(key=lambda k: _PREFERRED_ORDER.index(k) if k in _PREFERRED_ORDER
            else len(_PREFERRED_ORDER) + first_seen.index(k))
  x_label = next((k for k in _X_KEYS if any(k in h for h in histories.values())), "epoch")

  rows, cols = _grid(len(keys), 3)
  figure = Figure(figsize=(4.2 * cols + 1.8, 3.2 * rows), layout="constrained")
  axes = figure.subplots(rows, cols, squeeze=False).ravel()
  color_of = dict(zip(checked, colors(len(checked))))
  for ax, key in zip(axes, keys):
    for method, (x, series) in checked.items():
      if key in series:
        ax.plot(x, series[key], label=method, color=color_of[method],
                marker="o" if len(x) <= 20 else None, markersize=3, linewidth=1.5)
    ax.set_title(_label(key))
    ax.set_xlabel(x_label.capitalize())
    ax.set_ylabel(_label(key))
    ax.grid(True, alpha=0.3)
  for ax in axes[len(keys):]:
    ax.set_visible(False)
  handles = [Line2D([], [], color=color_of[m], linewidth=2) for m in checked]
  figure.legend(handles, list(checked), loc="outside right upper", title="method")
  return save_figure(figure, path)


def plot_reliability_diagrams(
    diagrams: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike[str],
) -> str:
  """Reliability diagrams (Guo et al., 2017), one panel per method.

  Each panel shows the accuracy of each confidence bin as a bar, the gap to
  the bin's mean confidence as a hatched box (red above the bar where the
  model is overconfident, orange inside it where it is underconfident), and the diagonal of perfect
  calibration; empty bins are left blank. The panel title carries the ECE if
  the dict has an ``ece`` entry (as :func:`experiments.metrics.reliability_diagram`
  returns).

  Args:
    diagrams: ``{method: diagram}`` with each ``diagram`` the output of
      :func:`experiments.metrics.reliability_diagram` (arrays ``bin_lower``,
      ``bin_upper``, ``bin_confidence``, ``bin_accuracy``, ``bin_count`` of
      one length; optional float ``ece``).
    path: the output file (``.png``).

  Returns:
    ``path``, as a string.

  Raises:
    ValueError: if ``diagrams`` is empty, a key is missing, or the arrays of a
      diagram differ in length.

  Example:
    >>> import tempfile, os
    >>> import numpy as np
    >>> from experiments import metrics, plots
    >>> logits, labels = np.random.default_rng(0).normal(size=(100, 3)), np.zeros(100, int)
    >>> out = os.path.join(tempfile.mkdtemp(), "reliability.png")
    >>> plots.plot_reliability_diagrams(
    ...     {"sgd": metrics.reliability_diagram(logits, labels)}, out) == out
    True
  """
  if not diagrams:
    raise ValueError("plot_reliability_diagrams: diagrams is empty; pass {method: diagram}.")
  checked = {}
  for method, diagram in diagrams.items():
    where = f"plot_reliability_diagrams: diagrams[{method!r}]"
    if not isinstance(diagram, Mapping):
      raise ValueError(f"{where} must be the dict of metrics.reliability_diagram, got {diagram!r}.")
    missing = [k for k in _DIAGRAM_KEYS if k not in diagram]
    if missing:
      raise ValueError(
          f"{where} lacks {missing}; pass the output of metrics.reliability_diagram.")
    arrays = {k: _series(f"{where}[{k!r}]", diagram[k]) for k in _DIAGRAM_KEYS}
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1 or not lengths["bin_count"]:
      raise ValueError(f"{where}: the bin arrays must have one equal, non-zero length, got {lengths}.")
    checked[str(method)] = (arrays, diagram.get("ece"))

  rows, cols = _grid(len(checked), 3)
  figure = Figure(figsize=(3.6 * cols, 3.7 * rows), layout="constrained")
  axes = figure.subplots(rows, cols, squeeze=False).ravel()
  for index, (ax, (method, (arrays, ece))) in enumerate(zip(axes, checked.items())):
    filled = arrays["bin_count"] > 0
    left = arrays["bin_lower"][filled]
    width = (arrays["bin_upper"] - arrays["bin_lower"])[filled]
    accuracy = arrays["bin_accuracy"][filled]
    confidence = arrays["bin_confidence"][filled]
    ax.bar(left, accuracy, width=width, align="edge", color="tab:blue",
           edgecolor="black", linewidth=0.6, label="accuracy")
    over = confidence > accuracy  # overconfident bins: the gap lies above the bar
    for gap_bins, color, label in ((over, "tab:red", "gap: overconfident"),
                                   (~over, "orange", "gap: underconfident")):
      if gap_bins.any():
        ax.bar(left[gap_bins], (confidence - accuracy)[gap_bins],
               bottom=accuracy[gap_bins], width=width[gap_bins], align="edge",
               fill=False, edgecolor=color, linewidth=0.8, hatch="//", label=label)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    title = method if ece is None else f"{method}  (ECE = {float(ece):.3f})"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if index == 0:
      ax.legend(loc="upper left", fontsize="small")
  for ax in axes[len(checked):]:
    ax.set_visible(False)
  return save_figure(figure, path)


def _density_curve(where: str, density: Any) -> tuple[np.ndarray, np.ndarray]:
  """``(grid, density)`` of a ``SpectralDensity`` (or a dict with those keys), checked."""
  if isinstance(density, Mapping):
    missing = [k for k in ("grid", "density") if k not in density]
    grid, values = (None, None) if missing else (density["grid"], density["density"])
  else:
    missing = [k for k in ("grid", "density") if not hasattr(density, k)]
    grid, values = (None, None) if missing else (density.grid, density.density)
  if missing:
    raise ValueError(
        f"{where} lacks {missing}; pass the output of"
        f" sam_optax.sharpness.hessian_spectral_density, got {type(density).__name__}.")
  grid = _series(f"{where}.grid", grid)
  values = _series(f"{where}.density", values)
  if len(grid) != len(values) or len(grid) < 2:
    raise ValueError(f"{where}: grid and density must have one equal length >= 2, got"
                     f" {len(grid)} and {len(values)}.")
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise ValueError(f"{where}.density must be finite and >= 0, got values in"
                     f" [{np.nanmin(values)}, {np.nanmax(values)}].")
  return grid, values


def plot_spectral_density(
    density: Any,
    path: str | os.PathLike[str],
    *,
    floor: float = 1e-6,
    title: str | None = None,
) -> str:
  """The Hessian's eigenvalue density on a log scale, as in Ghorbani et al. (2019).

  One curve per model: the smoothed density ``φ(t)`` of
  :func:`sam_optax.sharpness.hessian_spectral_density` (stochastic Lanczos
  quadrature) against the eigenvalue ``t``, the y axis logarithmic so that
  the few outlying large eigenvalues stay visible next to the bulk near 0.
  Values below ``floor`` are drawn at ``floor`` (the density of a Gaussian
  mixture is never exactly 0, but far from every node it underflows).

  Args:
    density: a ``SpectralDensity`` (anything with ``grid`` and ``density``
      arrays of one length, or a dict with those keys), or ``{label:
      density}`` to overlay several models (e.g. SGD and SAM).
    path: the output file (``.png``).
    floor: the bottom of the y axis, > 0.
    title: the panel's title (default: "Hessian eigenvalue density").

  Returns:
    ``path``, as a string.

  Raises:
    ValueError: if nothing is given, a density lacks ``grid`` or
      ``density``, their lengths differ, or a density is negative or not
      finite.

  References:
    Ghorbani, Krishnan and Xiao, `An Investigation into Neural Net
    Optimization via Hessian Eigenvalue Density
    <https://arxiv.org/abs/1901.10159>`_, ICML 2019.

  Example:
    >>> import tempfile, os
    >>> import numpy as np
    >>> from experiments import plots
    >>> grid = np.linspace(-1.0, 5.0, 200)
    >>> bump = lambda c, s: np.exp(-0.5 * ((grid - c) / s) ** 2) / (s * np.sqrt(2 * np.pi))
    >>> density = {"grid": grid, "density": 0.99 * bump(0.0, 0.05) + 0.01 * bump(4.0, 0.1)}
    >>> out = os.path.join(tempfile.mkdtemp(), "spectrum.png")
    >>> plots.plot_spectral_density({"sgd": density}, out) == out
    True
  """
  name = "plot_spectral_density"
  if not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0):
    raise ValueError(f"{name}: floor must be a finite float > 0, got floor={floor!r}.")
  if isinstance(density, Mapping) and not {"grid", "density"} <= set(density):
    if not density:
      raise ValueError(f"{name}: density is empty; pass a SpectralDensity or {{label: it}}.")
    curves = {str(label): _density_curve(f"{name}: density[{label!r}]", d)
              for label, d in density.items()}
  else:
    curves = {"": _density_curve(f"{name}: density", density)}

  figure = Figure(figsize=(6.4, 4.0), layout="constrained")
  ax = figure.add_subplot()
  for (label, (grid, values)), color in zip(curves.items(), colors(len(curves))):
    ax.semilogy(grid, np.maximum(values, floor), color=color, linewidth=1.5,
                label=label or None)
  ax.set_ylim(bottom=floor)
  ax.set_xlabel("Eigenvalue")
  ax.set_ylabel("Density (log scale)")
  ax.set_title(title or "Hessian eigenvalue density")
  ax.grid(True, alpha=0.3)
  if any(curves):
    ax.legend(loc="upper right")
  return save_figure(figure, path)
