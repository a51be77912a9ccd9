"""Tests of experiments.plots: real PNG files, clear errors on bad input."""

import struct

import numpy as np
import pytest
from matplotlib import image as mpl_image

from experiments import metrics, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width=300, min_height=200):
  """A valid PNG of a non-trivial size whose pixels are not all one colour."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_SIGNATURE
  assert data[12:16] == b"IHDR"
  width, height = struct.unpack(">II", data[16:24])
  assert width >= min_width and height >= min_height, (width, height)
  assert len(data) > 10_000
  pixels = mpl_image.imread(path)
  assert pixels.shape[:2] == (height, width)
  assert pixels[..., :3].std() > 0.05  # something is drawn
  return width, height


def histories(num_methods=3, epochs=8, keys=("train_loss", "test_accuracy", "test_nll", "test_ece")):
  rng = np.random.default_rng(0)
  out = {}
  for m in range(num_methods):
    out[f"method_{m}"] = {k: list(np.cumsum(rng.random(epochs))) for k in keys}
  return out


def diagram(seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(500, 10)) * rng.uniform(0.5, 4, size=(500, 1))
  labels = np.where(rng.random(500) < 0.6, logits.argmax(1), rng.integers(0, 10, 500))
  return metrics.reliability_diagram(logits.astype(np.float32), labels)


# --------------------------------------------------------------------------
# Files written.
# --------------------------------------------------------------------------


def test_learning_curves_png(tmp_path):
  path = tmp_path / "curves.png"
  out = plots.plot_learning_curves(histories(), path)
  assert out == str(path)
  assert_png(path)


def test_learning_curves_with_partial_keys_epochs_and_nan(tmp_path):
  data = histories(2, epochs=5)
  data["sam"] = {"epoch": [2, 4, 6], "train_loss": [1.0, float("nan"), 0.5],
                 "test_adaptive_ece": [0.1, 0.05, 0.04]}
  width_many, _ = assert_png(plots.plot_learning_curves(data, tmp_path / "a.png"))
  width_one, _ = assert_png(plots.plot_learning_curves(
      {"sgd": {"train_loss": [1.0]}}, tmp_path / "b.png"), min_width=200)
  assert width_many > width_one  # five panels are wider than one


def test_learning_curves_creates_parent_folders(tmp_path):
  path = tmp_path / "deep" / "er" / "curves.png"
  plots.plot_learning_curves(histories(1, 3), str(path))
  assert_png(path)


def test_reliability_diagrams_png(tmp_path):
  d = {"sgd": diagram(0), "sam": diagram(1), "gsam": diagram(2), "bsam": diagram(3)}
  path = plots.plot_reliability_diagrams(d, tmp_path / "reliability.png")
  assert_png(path)


def test_reliability_diagram_without_ece_and_with_empty_bins(tmp_path):
  d = {k: v for k, v in diagram(0).items() if k != "ece"}
  d["bin_count"] = d["bin_count"].copy()
  d["bin_count"][:5] = 0
  assert_png(plots.plot_reliability_diagrams({"sgd": d}, tmp_path / "r.png"), min_width=250)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


def test_empty_inputs_raise(tmp_path):
  with pytest.raises(ValueError, match="histories is empty"):
    plots.plot_learning_curves({}, tmp_path / "a.png")
  with pytest.raises(ValueError, match=r"histories\['sgd'\] must be a non-empty dict"):
    plots.plot_learning_curves({"sgd": {}}, tmp_path / "a.png")
  with pytest.raises(ValueError, match="the series are empty"):
    plots.plot_learning_curves({"sgd": {"train_loss": []}}, tmp_path / "a.png")
  with pytest.raises(ValueError, match="diagrams is empty"):
    plots.plot_reliability_diagrams({}, tmp_path / "b.png")
  assert not list(tmp_path.iterdir())  # nothing half-written


def test_mismatched_lengths_raise(tmp_path):
  with pytest.raises(ValueError, match=r"histories\['sam'\].*same length.*'test_ece': 2"):
    plots.plot_learning_curves(
        {"sgd": {"train_loss": [1, 2, 3]}, "sam": {"train_loss": [1, 2, 3], "test_ece": [1, 2]}},
        tmp_path / "a.png")
  with pytest.raises(ValueError, match="same length"):
    plots.plot_learning_curves({"sgd": {"epoch": [1, 2], "train_loss": [1, 2, 3]}},
                               tmp_path / "a.png")
  d = diagram(0)
  d["bin_accuracy"] = d["bin_accuracy"][:-1]
  with pytest.raises(ValueError, match=r"diagrams\['sgd'\].*equal, non-zero length"):
    plots.plot_reliability_diagrams({"sgd": d}, tmp_path / "b.png")
  assert not list(tmp_path.iterdir())


def test_malformed_values_raise(tmp_path):
  with pytest.raises(ValueError, match=r"histories\['sgd'\]\['train_loss'\] must be a sequence"):
    plots.plot_learning_curves({"sgd": {"train_loss": ["a", "b"]}}, tmp_path / "a.png")
  with pytest.raises(ValueError, match="1-D"):
    plots.plot_learning_curves({"sgd": {"train_loss": [[1, 2]]}}, tmp_path / "a.png")
  with pytest.raises(ValueError, match="has only 'epoch'"):
    plots.plot_learning_curves({"sgd": {"epoch": [1, 2]}}, tmp_path / "a.png")
  with pytest.raises(ValueError, match=r"lacks \['bin_count'\]"):
    d = diagram(0)
    del d["bin_count"]
    plots.plot_reliability_diagrams({"sgd": d}, tmp_path / "b.png")
  assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------
# Hessian spectral density.
# --------------------------------------------------------------------------


def spectral_density(center=4.0):
  """A bulk at 0 and one outlier at ``center``, as SpectralDensity's fields."""
  grid = np.linspace(-1.0, 6.0, 300)
  bump = lambda c, s: np.exp(-0.5 * ((grid - c) / s) ** 2) / (s * np.sqrt(2 * np.pi))
  return {"grid": grid, "density": 0.99 * bump(0.0, 0.05) + 0.01 * bump(center, 0.1)}


def test_spectral_density_png_one_and_several(tmp_path):
  one = plots.plot_spectral_density(spectral_density(), tmp_path / "one.png")
  assert_png(one)
  several = {"sgd": spectral_density(5.0), "sam": spectral_density(2.0)}
  assert_png(plots.plot_spectral_density(several, tmp_path / "two.png", title="MLP"))


def test_spectral_density_reads_a_named_tuple(tmp_path):
  import collections  # pylint: disable=import-outside-toplevel
  Density = collections.namedtuple("Density", "grid density nodes weights")
  d = spectral_density()
  path = plots.plot_spectral_density(Density(d["grid"], d["density"], None, None),
                                     tmp_path / "nt.png")
  assert_png(path)


def test_spectral_density_is_drawn_on_a_log_scale_down_to_the_floor(tmp_path, monkeypatch):
  axes = []
  monkeypatch.setattr(plots, "save_figure",
                      lambda figure, path, **kw: axes.extend(figure.axes) or str(path))
  d = spectral_density()
  d["density"][:10] = 0.0                      # underflowed tails are drawn at the floor
  plots.plot_spectral_density({"sgd": d}, tmp_path / "x.png", floor=1e-4)
  (ax,) = axes
  assert ax.get_yscale() == "log"
  assert ax.get_ylim()[0] == pytest.approx(1e-4)
  (line,) = ax.get_lines()
  np.testing.assert_allclose(line.get_xdata(), d["grid"])
  np.testing.assert_allclose(line.get_ydata(), np.maximum(d["density"], 1e-4))
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sgd"]


def test_spectral_density_bad_input(tmp_path):
  with pytest.raises(ValueError, match="density is empty"):
    plots.plot_spectral_density({}, tmp_path / "a.png")
  with pytest.raises(ValueError, match=r"density\['sgd'\] lacks \['grid'\]"):
    plots.plot_spectral_density({"sgd": {"density": [1.0, 2.0]}}, tmp_path / "a.png")
  d = spectral_density()
  with pytest.raises(ValueError, match="equal length"):
    plots.plot_spectral_density({"grid": d["grid"][:-1], "density": d["density"]},
                                tmp_path / "a.png")
  with pytest.raises(ValueError, match=">= 0"):
    plots.plot_spectral_density({"grid": d["grid"], "density": -d["density"]},
                                tmp_path / "a.png")
  with pytest.raises(ValueError, match="floor"):
    plots.plot_spectral_density(d, tmp_path / "a.png", floor=0.0)
  assert not list(tmp_path.iterdir())
