"""Input pipelines: MNIST-1D in memory, TFDS CIFAR / ImageNet with mock data.

No download: TFDS is mocked (``tfds.testing.mock_data``) with a fake split
whose example ``i`` is known (label ``i % 10``, an image that encodes ``i``),
and which honours split slices such as ``train[24:48]`` so that per-host
sharding is tested too.
"""

import re

import numpy as np
import pytest

from experiments import input_pipeline
from experiments.input_pipeline import MNIST1D, flip_labels, make_mnist1d

# --------------------------------------------------------------------------
# MNIST-1D.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d():
  return MNIST1D(batch_size=50, seed=3, label_noise=0.2, num_samples=500)


def test_make_mnist1d_is_deterministic_and_keeps_numpy_state():
  np.random.seed(123)
  expected_next = np.random.rand()
  np.random.seed(123)
  a = make_mnist1d(num_samples=200)
  assert np.random.rand() == expected_next  # the global state was restored
  b = make_mnist1d(num_samples=200)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert a["x"].shape == (160, 40) and a["x_test"].shape == (40, 40)
  assert a["x"].dtype == np.float32 and a["y"].dtype == np.int32
  c = make_mnist1d(num_samples=200, data_seed=7)
  assert not np.array_equal(a["x"], c["x"])


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4, 1.0])
def test_flip_labels_flips_exactly_that_fraction_to_other_classes(fraction):
  labels = np.random.default_rng(0).integers(0, 10, 1000).astype(np.int32)
  noisy = flip_labels(labels, fraction, 10, seed=1)
  changed = noisy != labels
  assert changed.sum() == round(fraction * 1000)
  assert noisy.min() >= 0 and noisy.max() < 10
  np.testing.assert_array_equal(noisy, flip_labels(labels, fraction, 10, seed=1))
  if fraction >= 0.4:  # every other class is used
    shifts = (noisy[changed] - labels[changed]) % 10
    assert set(shifts.tolist()) == set(range(1, 10))


def test_flip_labels_rejects_a_bad_fraction():
  with pytest.raises(ValueError, match="label_noise must be in"):
    flip_labels(np.zeros(3, np.int32), 1.5, 10, 0)


def test_mnist1d_epochs_are_seeded_permutations(mnist1d):
  assert mnist1d.steps_per_epoch == 8
  epoch = list(mnist1d.train_epoch(0))
  assert len(epoch) == 8
  index = np.concatenate([b["index"] for b in epoch])
  assert len(np.unique(index)) == 400  # every example once
  for batch in epoch:  # the index addresses the example
    np.testing.assert_array_equal(batch["x"], mnist1d.x[batch["index"]])
    np.testing.assert_array_equal(batch["y"], mnist1d.y[batch["index"]])
  again = np.concatenate([b["index"] for b in mnist1d.train_epoch(0)])
  np.testing.assert_array_equal(index, again)
  other = np.concatenate([b["index"] for b in mnist1d.train_epoch(1)])
  assert not np.array_equal(index, other)
  tail = np.concatenate([b["index"] for b in mnist1d.train_epoch(0, start_step=5)])
  np.testing.assert_array_equal(tail, index[250:])  # resuming at step 5


def test_mnist1d_label_noise_is_on_train_labels_only(mnist1d):
  clean = make_mnist1d(num_samples=500)
  assert (mnist1d.y != clean["y"]).sum() == 80
  np.testing.assert_array_equal(mnist1d.y_clean, clean["y"])
  test = list(mnist1d.eval_batches())
  np.testing.assert_array_equal(np.concatenate([b["y"] for b in test]), clean["y_test"])
  sample = mnist1d.train_sample(30)
  np.testing.assert_array_equal(sample["y"], mnist1d.y[:30])


def test_mnist1d_processes_split_each_global_batch():
  whole = MNIST1D(batch_size=40, seed=0, num_samples=500)
  parts = [MNIST1D(batch_size=40, seed=0, num_samples=500, process_index=p, process_count=2)
           for p in range(2)]
  for batch, first, second in zip(whole.train_epoch(2), parts[0].train_epoch(2),
                                  parts[1].train_epoch(2)):
    np.testing.assert_array_equal(batch["index"],
                                  np.concatenate([first["index"], second["index"]]))


def test_batch_size_errors():
  with pytest.raises(ValueError, match="not divisible by the number of processes"):
    MNIST1D(batch_size=41, num_samples=500, process_count=2)
  with pytest.raises(ValueError, match="larger than the training set"):
    MNIST1D(batch_size=1000, num_samples=500)


def test_prefetch_keeps_order_and_reraises():
  assert list(input_pipeline.prefetch(iter(range(10)), size=3)) == list(range(10))

  def broken():
    yield 1
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    list(input_pipeline.prefetch(broken(), size=2))


# --------------------------------------------------------------------------
# TFDS, mocked.
# --------------------------------------------------------------------------

N = 48


@pytest.fixture(scope="module")
def tf_modules():
  pytest.importorskip("tensorflow_datasets", reason="the 'tfds' extra is not installed")
  tf, tfds = input_pipeline._import_tf()  # pylint: disable=protected-access
  return tf, tfds


def _fake_split(tf, split, jpeg):
  """Examples ``i`` of ``split`` (``train`` or a slice ``train[a:b]``)."""
  match = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", split)
  start = int(match.group(2) or 0)
  stop = int(match.group(3) or N)
  index = np.arange(start, stop)
  images = ((index[:, None, None, None] * 7 + np.arange(32)[None, :, None, None] * 3
             + np.arange(32)[None, None, :, None] + np.arange(3)) % 256).astype(np.uint8)
  labels = index % 10
  ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  if jpeg:
    ds = ds.map(lambda ex: {"image": tf.io.encode_jpeg(ex["image"]), "label": ex["label"]})
  return ds


@pytest.fixture()
def mock_tfds(tf_modules):
  tf, tfds = tf_modules

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del read_config, shuffle_files
    return _fake_split(tf, split, jpeg=decoders is not None)

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    yield


def _cifar(**kwargs):
  args = {"batch_size": 16, "data_dir": "/nonexistent/tfds", "seed": 1, "eval_batch_size": 20}
  args.update(kwargs)
  return input_pipeline.TFDSPipeline("cifar10", **args)


def _indices(batches):
  return np.concatenate([b["index"] for b in batches])


def test_cifar_batches_carry_stable_indices(mock_tfds):
  pipeline = _cifar()
  assert (pipeline.num_train_examples, pipeline.steps_per_epoch) == (N, 3)
  epoch = list(pipeline.train_epoch(0))
  assert len(epoch) == 3
  batch = epoch[0]
  assert batch["x"].shape == (16, 32, 32, 3) and batch["x"].dtype == np.float32
  assert batch["y"].dtype == np.int32 and batch["index"].dtype == np.int32
  index = _indices(epoch)
  assert sorted(index.tolist()) == list(range(N))  # shuffled, every example once
  assert index.tolist() != list(range(N))
  for b in epoch:  # labels travel with their index
    np.testing.assert_array_equal(b["y"], b["index"] % 10)


def test_cifar_epochs_are_deterministic_and_resumable(mock_tfds):
  pipeline = _cifar()
  first = list(pipeline.train_epoch(0))
  again = list(_cifar().train_epoch(0))
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(_indices(pipeline.train_epoch(1)), _indices(first))
  tail = list(pipeline.train_epoch(0, start_step=2))
  assert len(tail) == 1
  for key in tail[0]:
    np.testing.assert_array_equal(tail[0][key], first[2][key])


def test_cifar_augmentation_crops_and_flips(mock_tfds):
  pipeline = _cifar()
  evaluation = pipeline.train_sample(N)  # evaluation preprocessing, in order
  np.testing.assert_array_equal(evaluation["index"], np.arange(N))
  image = _fake_split(pipeline.tf, "train", jpeg=False).batch(N).get_single_element()["image"]
  np.testing.assert_allclose(evaluation["x"], (image.numpy() - pipeline.mean) / pipeline.std,
                             rtol=1e-6)
  batches = list(pipeline.train_epoch(0))
  augmented = np.concatenate([b["x"] for b in batches])[np.argsort(_indices(batches))]
  changed = np.any(augmented != evaluation["x"], axis=(1, 2, 3))
  assert changed.mean() > 0.5
  # A crop of the 4-padded image: every augmented image's interior values come
  # from the original or its mirror image.
  flipped = evaluation["x"][:, :, ::-1]
  inner = augmented[:, 4:-4, 4:-4]
  for i in range(N):
    candidates = [evaluation["x"][i], flipped[i]]
    assert any(_is_shifted_window(inner[i], c) for c in candidates), i


def _is_shifted_window(window, image):
  size = window.shape[0]
  for dy in range(0, 9):
    for dx in range(0, 9):
      if np.array_equal(window, image[dy:dy + size, dx:dx + size]):
        return True
  return False


def test_cifar_label_noise_is_fixed_per_example(mock_tfds):
  pipeline = _cifar(label_noise=0.5, noise_seed=4)
  first = list(pipeline.train_epoch(0))
  labels = {int(i): int(y) for b in first for i, y in zip(b["index"], b["y"])}
  flipped = [i for i, y in labels.items() if y != i % 10]
  assert 10 <= len(flipped) <= 38
  later = {int(i): int(y) for b in pipeline.train_epoch(3) for i, y in zip(b["index"], b["y"])}
  assert later == labels
  test = list(pipeline.eval_batches())
  np.testing.assert_array_equal(np.concatenate([b["y"] for b in test]), np.arange(N) % 10)


def test_cifar_per_host_slices(mock_tfds):
  hosts = [_cifar(batch_size=16, process_index=p, process_count=2) for p in range(2)]
  assert [h.local_batch_size for h in hosts] == [8, 8]
  assert [h.steps_per_epoch for h in hosts] == [3, 3]
  seen = [set(_indices(h.train_epoch(0)).tolist()) for h in hosts]
  assert seen[0] == set(range(24)) and seen[1] == set(range(24, 48))


def test_imagenet_inception_crop_and_center_crop(mock_tfds):
  pipeline = input_pipeline.TFDSPipeline(
      "imagenet2012", batch_size=8, data_dir="/nonexistent/tfds", image_size=24,
      eval_batch_size=16)
  assert pipeline.num_classes == 1000
  batch = next(pipeline.train_epoch(0))
  assert batch["x"].shape == (8, 24, 24, 3) and np.isfinite(batch["x"]).all()
  again = next(pipeline.train_epoch(0))
  np.testing.assert_array_equal(batch["x"], again["x"])
  evaluation = next(pipeline.eval_batches())
  assert evaluation["x"].shape == (16, 24, 24, 3)


def test_missing_data_set_is_a_clear_error(tf_modules, tmp_path):
  with pytest.raises(input_pipeline.DataNotFoundError, match="never downloads"):
    input_pipeline.TFDSPipeline("cifar100", batch_size=8, data_dir=str(tmp_path))


def test_get_pipeline_rejects_unknown_names():
  class Config(dict):
    __getattr__ = dict.__getitem__

  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    input_pipeline.get_pipeline(Config(dataset="svhn"))


@pytest.fixture()
def fake_splits(tf_modules, monkeypatch):
  """The fake splits read directly (``tfds.testing.mock_data`` patches the file
  system while a split opens, which would catch orbax's asynchronous writes)."""
  tf, _ = tf_modules
  monkeypatch.setattr(input_pipeline.TFDSPipeline, "_read",
                      lambda self, split: _fake_split(tf, split, jpeg=self.imagenet))


def test_a_paper_config_trains_in_its_tiny_form(fake_splits, tmp_path):
  """``imagenet_resnet50.py:tiny``: the real loop on fake JPEGs (16 examples, 2 steps)."""
  from experiments import main as cli  # pylint: disable=import-outside-toplevel
  from experiments import train  # pylint: disable=import-outside-toplevel

  config, _ = cli.parse(["main", "--config=experiments/configs/imagenet_resnet50.py:tiny"])
  result = train.train_and_evaluate(config, str(tmp_path), progress=False)
  assert result.finished and result.step == 16 // 8
  assert (result.report["dataset"], result.report["model"]) == ("imagenet2012", "resnet18")
  assert len(result.history["test_accuracy"]) == 1
  assert np.isfinite(result.report["test"]["nll"])
