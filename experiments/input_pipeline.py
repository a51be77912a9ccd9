"""Input pipelines: MNIST-1D in memory, CIFAR-10/100 and ImageNet from TFDS.

Every pipeline yields batches as dicts of NumPy arrays::

  {'x': float32 inputs, 'y': int32 labels, 'index': int32 example ids}

``index`` is a stable integer id of the training example in ``[0, N)`` (its
position in the split), carried with the example through shuffling, so that
methods that keep per-example memory (SAF's logit bank) can address it.

Resuming bit-exactly: the order of epoch ``e`` and each example's augmentation
are pure functions of ``(seed, e, index)`` (per-epoch seeded shuffles and
stateless random augmentation), so a pipeline restarted at ``(epoch, step)``
yields exactly the batches an uninterrupted run would have.

* :class:`MNIST1D` generates the data set in memory with
  ``mnist1d.data.make_dataset`` (deterministic, about 1 s; nothing is
  downloaded or cached on disk).
* :class:`TFDSPipeline` reads ``cifar10``, ``cifar100`` or ``imagenet2012``
  from an already prepared TFDS ``data_dir`` (it never downloads), with each
  process reading its own contiguous slice of the training split
  (per-host sharding), the papers' augmentation (CIFAR: 4-pixel padded random
  crop and horizontal flip; ImageNet: Inception crop to 224 and flip,
  resize-256 centre crop for evaluation), and ``tf.data`` prefetching.

TensorFlow is imported only when a TFDS pipeline is built.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]

DATASETS = ("mnist1d", "cifar10", "cifar100", "imagenet2012")


class DataNotFoundError(RuntimeError):
  """A TFDS data set is not prepared in the given ``data_dir``."""


# --------------------------------------------------------------------------
# Shared helpers.
# --------------------------------------------------------------------------


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
  """Symmetric label noise: exactly ``round(fraction·N)`` labels changed.

  The flipped examples are chosen uniformly without replacement; each gets a
  class drawn uniformly from the ``num_classes − 1`` *other* classes.

  Example:
    >>> y = np.zeros(10, np.int32)
    >>> noisy = flip_labels(y, 0.3, num_classes=10, seed=0)
    >>> int((noisy != y).sum())
    3
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"label_noise must be in [0, 1], got {fraction!r}.")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  count = int(round(fraction * len(labels)))
  chosen = rng.permutation(len(labels))[:count]
  noisy = labels.copy()
  shift = rng.integers(1, num_classes, size=count)
  noisy[chosen] = (labels[chosen] + shift) % num_classes
  return noisy


def epoch_seed(seed: int, epoch: int) -> int:
  """A 31-bit seed for epoch ``epoch`` of a run with seed ``seed``."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Runs ``iterator`` ``size`` items ahead in a background thread.

  Used to overlap host-side batch assembly and the transfer to the device
  (``jax.device_put``) with the training step.
  """
  if size <= 0:
    yield from iterator
    return
  buffer: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        if stop.is_set():
          return
        buffer.put(item)
    except BaseException as error:  # pylint: disable=broad-except
      buffer.put(_Raised(error))
      return
    buffer.put(done)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()


@dataclasses.dataclass
class _Raised:
  error: BaseException


# --------------------------------------------------------------------------
# MNIST-1D.
# --------------------------------------------------------------------------


def make_mnist1d(num_samples: int = 5000, train_split: float = 0.8,
                 data_seed: int = 42) -> dict[str, np.ndarray]:
  """MNIST-1D (Greydanus, 2020) generated in memory; never downloads.

  Calls ``mnist1d.data.make_dataset(get_dataset_args())`` with ``num_samples``,
  ``train_split`` and ``seed`` replaced. The generator reseeds NumPy's global
  random state; it is saved and restored around the call. Deterministic: the
  same arguments give the same arrays.

  Returns:
    ``x``, ``x_test`` float32 ``[N, 40]``; ``y``, ``y_test`` int32.
  """
  from mnist1d import data as mnist1d_data  # pylint: disable=import-outside-toplevel

  args = mnist1d_data.get_dataset_args()
  args.num_samples = int(num_samples)
  args.train_split = float(train_split)
  args.seed = int(data_seed)
  state = np.random.get_state()
  try:
    raw = mnist1d_data.make_dataset(args)
  finally:
    np.random.set_state(state)
  return {
      "x": raw["x"].astype(np.float32), "y": raw["y"].astype(np.int32),
      "x_test": raw["x_test"].astype(np.float32), "y_test": raw["y_test"].astype(np.int32),
  }


class MNIST1D:
  """MNIST-1D in memory with optional label noise on the training split.

  Epoch ``e`` visits the training set in the order
  ``default_rng(epoch_seed(seed, e)).permutation(N)``, in batches of
  ``batch_size`` (the last partial batch is dropped); process ``p`` of ``P``
  takes rows ``[p·B/P, (p+1)·B/P)`` of each global batch, so the processes
  together see exactly the single-process batches. Test labels are clean;
  process ``p`` evaluates its contiguous part :func:`eval_share` of the test
  split (the trainer gathers every part).

  Args:
    batch_size: global batch size (this process gets ``batch_size / P``).
    seed: the shuffling seed.
    label_noise: fraction of training labels flipped (:func:`flip_labels`).
    noise_seed: seed of the label noise.
    num_samples, train_split, data_seed: passed to :func:`make_mnist1d`.
    eval_batch_size: batch size of :meth:`eval_batches`.
    process_index, process_count: this process's share of the batch and of
      the test split.
  """

  name = "mnist1d"
  num_classes = 10

  def __init__(self, *, batch_size: int, seed: int = 0, label_noise: float = 0.0,
               noise_seed: int = 0, num_samples: int = 5000, train_split: float = 0.8,
               data_seed: int = 42, eval_batch_size: int = 1000,
               process_index: int = 0, process_count: int = 1):
    raw = make_mnist1d(num_samples, train_split, data_seed)
    self.x, self.y_clean = raw["x"], raw["y"]
    self.y = flip_labels(self.y_clean, label_noise, self.num_classes, noise_seed)
    self.x_test, self.y_test = raw["x_test"], raw["y_test"]
    self.num_train_examples = len(self.y)
    self.num_eval_examples = len(self.y_test)
    self.input_shape = self.x.shape[1:]
    share = host_share(self.num_train_examples, batch_size, process_index, process_count)
    self.batch_size = batch_size
    self.local_batch_size = share.local_batch_size
    self.steps_per_epoch = self.num_train_examples // batch_size
    self.seed = seed
    self.eval_batch_size = eval_batch_size
    self.process_index, self.process_count = process_index, process_count

  def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """Batches ``start_step, ..., steps_per_epoch − 1`` of epoch ``epoch``."""
    order = np.random.default_rng(epoch_seed(self.seed, epoch)).permutation(
        self.num_train_examples)
    for step in range(start_step, self.steps_per_epoch):
      chunk = order[step * self.batch_size:(step + 1) * self.batch_size]
      local = chunk[self.process_index * self.local_batch_size:
                    (self.process_index + 1) * self.local_batch_size]
      yield {"x": self.x[local], "y": self.y[local], "index": local.astype(np.int32)}

  def eval_batches(self) -> Iterator[Batch]:
    """This process's part of the clean test split (all of it with one process), in order."""
    first, last = eval_share(self.num_eval_examples, self.process_index, self.process_count)
    for start in range(first, last, self.eval_batch_size):
      stop = min(start + self.eval_batch_size, last)
      yield {"x": self.x_test[start:stop], "y": self.y_test[start:stop],
             "index": np.arange(start, stop, dtype=np.int32)}

  def train_sample(self, size: int) -> Batch:
    """The first ``size`` training examples with their (noisy) training labels.

    The same on every process (the Hessian's sample).
    """
    size = min(size, self.num_train_examples)
    return {"x": self.x[:size], "y": self.y[:size],
            "index": np.arange(size, dtype=np.int32)}


def _check_batch_size(batch_size: int, process_count: int, num_examples: int) -> None:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count must be a positive int, got {process_count!r}.")
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} is not divisible by the number of processes"
        f" ({process_count}).")
  if batch_size // process_count > num_examples // process_count:
    raise ValueError(
        f"batch_size={batch_size} is larger than the training set share of a"
        f" process ({num_examples // process_count} examples per process,"
        f" {batch_size // process_count} per local batch).")


@dataclasses.dataclass(frozen=True)
class HostShare:
  """What one process of ``P`` reads of the training split (per-host sharding).

  Attributes:
    start, size: its contiguous slice ``[start, start + size)`` of the split
      (``size = N // P``; the last ``N mod P`` examples are never read).
    local_batch_size: its rows of each global batch, ``B / P``.
    steps_per_epoch: ``size // (B / P) = N // B``, the same on every process.
  """

  start: int
  size: int
  local_batch_size: int
  steps_per_epoch: int


def host_share(num_examples: int, batch_size: int, process_index: int = 0,
               process_count: int = 1) -> HostShare:
  """Process ``process_index``'s share of ``num_examples`` training examples.

  Example:
    >>> host_share(1_281_167, 4096, process_index=3, process_count=8)
    HostShare(start=480435, size=160145, local_batch_size=512, steps_per_epoch=312)

  Raises:
    ValueError: if the global batch does not divide among the processes, the
      index is out of range, or a process's share is smaller than its batch.
  """
  _check_batch_size(batch_size, process_count, num_examples)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is out of range for"
                     f" process_count={process_count}.")
  size = num_examples // process_count
  local = batch_size // process_count
  return HostShare(process_index * size, size, local, size // local)


def eval_share(num_examples: int, process_index: int = 0,
               process_count: int = 1) -> tuple[int, int]:
  """``(start, stop)`` of process ``process_index``'s contiguous part of an evaluation split.

  Every example belongs to exactly one process; the parts differ by at most one.

  Example:
    >>> [eval_share(10, p, 3) for p in range(3)]
    [(0, 4), (4, 7), (7, 10)]
  """
  base, extra = divmod(num_examples, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (process_index < extra)


# --------------------------------------------------------------------------
# TFDS: CIFAR-10, CIFAR-100, ImageNet.
# --------------------------------------------------------------------------

_TFDS = {
    # name: (num_classes, train split, eval split, mean, std) -- RGB in [0, 255].
    "cifar10": (10, "train", "test", (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "cifar100": (100, "train", "test", (129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
    "imagenet2012": (1000, "train", "validation", (123.675, 116.28, 103.53),
                     (58.395, 57.12, 57.375)),
}


def _import_tf():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(
        f"the TFDS pipelines (cifar10, cifar100, imagenet2012) need TensorFlow and"
        f" tensorflow-datasets: pip install -e '.[experiments,tfds]' ({error})") from None

  try:  # TF must not take accelerator memory from JAX.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  return tf, tfds


class TFDSPipeline:
  """CIFAR-10/100 or ImageNet (``imagenet2012``) from a prepared TFDS directory.

  Training: process ``p`` of ``P`` reads ``train[p·N/P : (p+1)·N/P]`` in file
  order; ``index`` is the example's position in the full split. Each epoch
  shuffles that slice with a buffer (the whole slice for CIFAR) and the seed
  ``epoch_seed(seed, epoch)``; augmentation uses stateless random ops seeded
  by ``(epoch_seed, index)``. Restarting at ``(epoch, step)`` skips the
  already used examples before decoding.

  Args:
    name: ``cifar10``, ``cifar100`` or ``imagenet2012``.
    batch_size: global batch size.
    data_dir: the TFDS data directory (None: TFDS's default).
    seed: shuffling and augmentation seed.
    label_noise: probability that a training label is replaced by another
      class (a function of ``(noise_seed, index)``, so the same every epoch).
    image_size: ImageNet crop size (224).
    shuffle_buffer: ImageNet's shuffle buffer (CIFAR shuffles its whole slice).
    cache: cache the decoded CIFAR training slice in memory.
    num_train_examples: the size of the training split; read from the data
      set's metadata when None.
    eval_batch_size: evaluation batch size (per process).
    process_index, process_count: per-host sharding.

  Raises:
    DataNotFoundError: if the data set is not prepared in ``data_dir``.
  """

  def __init__(self, name: str, *, batch_size: int, data_dir: str | None = None,
               seed: int = 0, label_noise: float = 0.0, noise_seed: int = 0,
               image_size: int = 224, shuffle_buffer: int = 16_384, cache: bool = True,
               num_train_examples: int | None = None, eval_batch_size: int = 500,
               process_index: int = 0, process_count: int = 1):
    if name not in _TFDS:
      raise ValueError(f"unknown TFDS data set {name!r}; choose one of {', '.join(_TFDS)}.")
    if not 0.0 <= label_noise <= 1.0:
      raise ValueError(f"label_noise must be in [0, 1], got {label_noise!r}.")
    self.tf, self.tfds = _import_tf()
    self.name = name
    (self.num_classes, self.train_split, self.eval_split, mean, std) = _TFDS[name]
    self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self.imagenet = name == "imagenet2012"
    self.image_size = image_size if self.imagenet else 32
    self.input_shape = (self.image_size, self.image_size, 3)
    self.builder = self.tfds.builder(name, data_dir=data_dir)
    self.data_dir = data_dir
    full = self._read(self.train_split)
    if num_train_examples is None:
      num_train_examples = int(full.cardinality().numpy())
      if num_train_examples < 0:
        raise ValueError(f"{name}: the size of the training split is unknown;"
                         " pass num_train_examples.")
    self.num_train_examples = num_train_examples
    host = host_share(num_train_examples, batch_size, process_index, process_count)
    self.batch_size = batch_size
    self.local_batch_size = host.local_batch_size
    self.start, self.share = host.start, host.size
    share = host.size
    self.steps_per_epoch = host.steps_per_epoch
    self.seed, self.label_noise, self.noise_seed = seed, label_noise, noise_seed
    self.shuffle_buffer = share if not self.imagenet else min(shuffle_buffer, share)
    self.cache = cache and not self.imagenet
    self.eval_batch_size = eval_batch_size
    self.process_index, self.process_count = process_index, process_count
    self._train_slice = None

  # -- reading --------------------------------------------------------------

  def _read(self, split: str):
    decoders = {"image": self.tfds.decode.SkipDecoding()} if self.imagenet else None
    try:
      return self.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    except (AssertionError, FileNotFoundError, ValueError) as error:
      where = self.data_dir or "the default TFDS data directory (~/tensorflow_datasets)"
      raise DataNotFoundError(
          f"TFDS data set {self.name!r} (split {split!r}) is not prepared in {where}."
          f" This program never downloads: prepare it first, e.g. `tfds build"
          f" {self.name} --data_dir=DIR` (ImageNet needs the manual download),"
          f" then pass --config.data_dir=DIR. ({str(error).splitlines()[0]})"
      ) from None

  def _train_examples(self):
    """This process's slice of the training split as (index, image, label)."""
    if self._train_slice is None:
      tf = self.tf
      split = f"{self.train_split}[{self.start}:{self.start + self.share}]"
      ds = self._read(split)
      ds = ds.enumerate(start=self.start).map(
          lambda i, ex: (tf.cast(i, tf.int32), ex["image"], tf.cast(ex["label"], tf.int32)))
      if self.cache:
        ds = ds.cache()
      self._train_slice = ds
    return self._train_slice

  # -- preprocessing ---------------------------------------------------------

  def _normalize(self, image):
    tf = self.tf
    return (tf.cast(image, tf.float32) - self.mean) / self.std

  def _augment_cifar(self, image, seed):
    tf = self.tf
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(image, (32, 32, 3), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)

  def _inception_crop(self, encoded, seed):
    """Inception-style crop: area 8-100 %, aspect 3/4-4/3, resized; flipped."""
    tf = self.tf
    box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.io.extract_jpeg_shape(encoded)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=box_seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(size)
    image = tf.io.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, (self.image_size, self.image_size), "bicubic")
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)

  def _center_crop(self, encoded):
    """Evaluation: the central ``size/(size+32)`` square, resized to ``size``."""
    tf = self.tf
    shape = tf.io.extract_jpeg_shape(encoded)
    h, w = shape[0], shape[1]
    crop = tf.cast(self.image_size / (self.image_size + 32)
                   * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    y, x = (h - crop + 1) // 2, (w - crop + 1) // 2
    image = tf.io.decode_and_crop_jpeg(encoded, tf.stack([y, x, crop, crop]), channels=3)
    return tf.image.resize(image, (self.image_size, self.image_size), "bicubic")

  def _noisy(self, label, index):
    tf = self.tf
    if self.label_noise == 0.0:
      return label
    seed = tf.stack([tf.constant(self.noise_seed, tf.int64), tf.cast(index, tf.int64)])
    flip_seed, class_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    flip = tf.random.stateless_uniform([], flip_seed) < self.label_noise
    shift = tf.random.stateless_uniform([], class_seed, 1, self.num_classes, tf.int32)
    return tf.where(flip, (label + shift) % self.num_classes, label)

  # -- iteration -------------------------------------------------------------

  def train_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
    """This process's batches ``start_step, ...`` of epoch ``epoch``."""
    tf = self.tf
    seed = epoch_seed(self.seed, epoch)
    ds = self._train_examples().shuffle(self.shuffle_buffer, seed=seed,
                                        reshuffle_each_iteration=False)
    ds = ds.skip(start_step * self.local_batch_size)

    def preprocess(index, image, label):
      example_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
      if self.imagenet:
        image = self._inception_crop(image, example_seed)
      else:
        image = self._augment_cifar(image, example_seed)
      return {"x": self._normalize(image), "y": self._noisy(label, index), "index": index}

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    ds = ds.take(self.steps_per_epoch - start_step).prefetch(tf.data.AUTOTUNE)
    yield from self.tfds.as_numpy(ds)

  def _eval_dataset(self, split: str, noisy: bool = False, per_process: bool = True):
    tf = self.tf

    def preprocess(index, ex):
      image = self._center_crop(ex["image"]) if self.imagenet else ex["image"]
      index = tf.cast(index, tf.int32)
      label = tf.cast(ex["label"], tf.int32)
      return {"x": self._normalize(image), "index": index,
              "y": self._noisy(label, index) if noisy else label}

    ds = self._read(split).enumerate()
    if per_process and self.process_count > 1:
      ds = ds.shard(self.process_count, self.process_index)
    return ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def eval_batches(self) -> Iterator[Batch]:
    """This process's share of the evaluation split (every ``P``-th example; last batch smaller).

    The trainer gathers the shares of every process (by ``index``).
    """
    ds = self._eval_dataset(self.eval_split).batch(self.eval_batch_size)
    yield from self.tfds.as_numpy(ds.prefetch(self.tf.data.AUTOTUNE))

  def train_sample(self, size: int) -> Batch:
    """The first ``size`` training examples, evaluation preprocessing, training labels.

    The same on every process (not sharded): the Hessian's sample.
    """
    ds = self._eval_dataset(self.train_split, noisy=True, per_process=False)
    ds = ds.take(size).batch(size)
    return next(iter(self.tfds.as_numpy(ds)))


# --------------------------------------------------------------------------
# Factory.
# --------------------------------------------------------------------------


def get_pipeline(config: Any, process_index: int = 0, process_count: int = 1):
  """The pipeline that ``config.dataset`` names, set up from ``config``.

  Raises:
    ValueError: for an unknown data set name.
    DataNotFoundError: for a TFDS data set that is not prepared locally.
  """
  name = config.dataset
  if name == "mnist1d":
    return MNIST1D(
        batch_size=config.batch_size, seed=config.seed, label_noise=config.label_noise,
        noise_seed=config.noise_seed, num_samples=config.mnist1d.num_samples,
        train_split=config.mnist1d.train_split, data_seed=config.mnist1d.data_seed,
        eval_batch_size=config.eval_batch_size, process_index=process_index,
        process_count=process_count)
  if name in _TFDS:
    return TFDSPipeline(
        name, batch_size=config.batch_size, data_dir=config.data_dir or None,
        seed=config.seed, label_noise=config.label_noise, noise_seed=config.noise_seed,
        image_size=config.get("image_size", 224),
        shuffle_buffer=config.get("shuffle_buffer", 16_384),
        cache=config.get("cache", True),
        num_train_examples=config.get("num_train_examples") or None,
        eval_batch_size=config.eval_batch_size, process_index=process_index,
        process_count=process_count)
  raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
