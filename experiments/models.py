"""Flax linen networks for the experiments, and the :func:`get_model` factory.

Every model is called as ``model.apply(variables, x, train=...)``. Models with
BatchNorm keep their running statistics in the ``batch_stats`` collection:
with ``train=True`` they normalize with the batch's statistics and update the
collection (pass ``mutable=['batch_stats']``), with ``train=False`` they use
the running averages. This is the pattern the library documents for SAM: the
user's first forward pass updates ``batch_stats``; the re-evaluations at the
perturbed weights run with ``train=True`` (batch statistics) but their updated
statistics are dropped.

Models:

* :class:`MLP` and :class:`CNN1D` -- small networks for MNIST-1D (inputs
  ``[N, 40]``), after Greydanus (2020), arXiv:2011.14439;
* :class:`ResNet` -- CIFAR-style ResNet-18 (He et al., 2016) with a width
  multiplier, and the ImageNet ResNet-50 with bottleneck blocks;
* :class:`WideResNet` -- WRN-d-k (Zagoruyko & Komodakis, 2016), pre-activation;
* :class:`ViT` -- a small Vision Transformer (Dosovitskiy et al., 2021).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _pooled_logits(x, num_classes: int):
  """Global average pooling over the spatial axes, then a float32 linear head."""
  return nn.Dense(num_classes, dtype=jnp.float32)(jnp.mean(x, axis=(1, 2)))


def _batch_norm(train: bool, dtype: Any) -> Callable[..., nn.Module]:
  return functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=_BN_MOMENTUM,
      epsilon=_BN_EPSILON, dtype=dtype)


# --------------------------------------------------------------------------
# MNIST-1D.
# --------------------------------------------------------------------------


class MLP(nn.Module):
  """A multilayer perceptron with ReLU (MNIST-1D's MLP baseline: 2 × 100)."""

  num_classes: int = 10
  features: Sequence[int] = (100, 100)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm, no dropout
    x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
    for width in self.features:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


class CNN1D(nn.Module):
  """MNIST-1D's small 1-D CNN: 3 convolutions (strides 1, 2, 2), BatchNorm, ReLU.

  Inputs ``[N, L]`` (one channel) or ``[N, L, C]``.
  """

  num_classes: int = 10
  channels: Sequence[int] = (32, 32, 32)
  kernel_size: int = 5
  batch_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    if x.ndim == 2:
      x = x[..., None]
    for index, width in enumerate(self.channels):
      stride = 1 if index == 0 else 2
      x = nn.Conv(width, (self.kernel_size,), strides=(stride,), padding="SAME",
                  use_bias=not self.batch_norm, dtype=self.dtype)(x)
      if self.batch_norm:
        x = _batch_norm(train, self.dtype)()(x)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


# --------------------------------------------------------------------------
# ResNets.
# --------------------------------------------------------------------------


class _ResidualBlock(nn.Module):
  """``relu(shortcut(x) + branch(x))``; a projection shortcut when the shape changes."""

  features: int
  strides: int = 1
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = nn.BatchNorm

  def branch(self, x):
    raise NotImplementedError

  @nn.compact
  def __call__(self, x):
    y = self.branch(x)
    if x.shape != y.shape:
      x = self.norm()(self.conv(y.shape[-1], (1, 1), (self.strides, self.strides))(x))
    return nn.relu(x + y)


class BasicBlock(_ResidualBlock):
  """ResNet basic block: two 3×3 convolutions."""

  def branch(self, x):
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3))(y)
    return self.norm(scale_init=nn.initializers.zeros)(y)


class BottleneckBlock(_ResidualBlock):
  """ResNet bottleneck block: 1×1, 3×3 (strided), 1×1 with 4× expansion."""

  def branch(self, x):
    y = nn.relu(self.norm()(self.conv(self.features, (1, 1))(x)))
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features * 4, (1, 1))(y)
    return self.norm(scale_init=nn.initializers.zeros)(y)


class ResNet(nn.Module):
  """ResNet (He et al., CVPR 2016, arXiv:1512.03385).

  ``stem='cifar'``: one 3×3 convolution, no pooling (32×32 inputs);
  ``stem='imagenet'``: 7×7 stride-2 convolution and 3×3 max-pooling. The last
  BatchNorm of each block starts at zero scale (Goyal et al., 2017).

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block_cls: :class:`BasicBlock` or :class:`BottleneckBlock`.
    num_classes: outputs.
    num_filters: channels of the first stage (64), times ``width``.
    width: width multiplier (1.0 is the standard network).
    stem: ``'cifar'`` or ``'imagenet'``.
    dtype: computation dtype (bfloat16 on TPU); logits are float32.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  width: float = 1.0
  stem: str = "cifar"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", dtype=self.dtype)
    norm = _batch_norm(train, self.dtype)
    base = max(1, int(round(self.num_filters * self.width)))
    x = jnp.asarray(x, self.dtype)
    if self.stem == "imagenet":
      x = conv(base, (7, 7), (2, 2), name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    elif self.stem == "cifar":
      x = conv(base, (3, 3), name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
    else:
      raise ValueError(f"ResNet: stem must be 'cifar' or 'imagenet', got {self.stem!r}.")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(base * 2**i, strides=strides, conv=conv, norm=norm)(x)
    return _pooled_logits(x, self.num_classes)


# --------------------------------------------------------------------------
# Wide ResNet.
# --------------------------------------------------------------------------


class WideBlock(nn.Module):
  """Pre-activation wide block: BN-ReLU-conv3×3 twice (optional dropout between)."""

  features: int
  strides: int
  dropout_rate: float
  conv: ModuleDef
  norm: ModuleDef
  train: bool

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(x))
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = self.conv(self.features, (1, 1), (self.strides, self.strides))(y)
    y = self.conv(self.features, (3, 3), (self.strides, self.strides))(y)
    y = nn.relu(self.norm()(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not self.train)(y)
    y = self.conv(self.features, (3, 3))(y)
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-depth-width (Zagoruyko & Komodakis, BMVC 2016, arXiv:1605.07146).

  ``depth = 6n + 4``: three groups of ``n`` pre-activation blocks with
  ``16k, 32k, 64k`` channels. WRN-28-10 (36.5 M parameters) is the network of
  the SAM, CSAM and ASAM CIFAR experiments. ``dropout_rate > 0`` needs a
  ``'dropout'`` rng when training.
  """

  num_classes: int
  depth: int = 28
  width: int = 10
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"WideResNet: depth must be 6n + 4 >= 10, got depth={self.depth}.")
    blocks = (self.depth - 4) // 6
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", dtype=self.dtype)
    norm = _batch_norm(train, self.dtype)
    x = conv(16, (3, 3), name="conv_init")(jnp.asarray(x, self.dtype))
    for group, channels in enumerate((16, 32, 64)):
      for j in range(blocks):
        strides = 2 if group > 0 and j == 0 else 1
        x = WideBlock(channels * self.width, strides, self.dropout_rate, conv, norm,
                      train)(x)
    return _pooled_logits(nn.relu(norm()(x)), self.num_classes)


# --------------------------------------------------------------------------
# Vision Transformer.
# --------------------------------------------------------------------------


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: self-attention and a GELU MLP."""

  num_heads: int
  mlp_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  """A Vision Transformer (Dosovitskiy et al., ICLR 2021, arXiv:2010.11929).

  Patches embedded by a strided convolution, a class token, learned position
  embeddings, ``depth`` pre-LN blocks, the class token's features to the head.
  No BatchNorm: there is no model state.
  """

  num_classes: int
  patch_size: int = 4
  hidden_size: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 384
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, name="embedding")(jnp.asarray(x, self.dtype))
    n, h, w, c = x.shape
    x = x.reshape((n, h * w, c))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)).astype(x.dtype), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    x = x + pos.astype(x.dtype)
    for _ in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype)(x)
    x = nn.LayerNorm(dtype=self.dtype)(x[:, 0])
    return nn.Dense(self.num_classes, dtype=jnp.float32,
                    kernel_init=nn.initializers.zeros, name="head")(x)


# --------------------------------------------------------------------------
# Factory.
# --------------------------------------------------------------------------

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1D,
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                                  block_cls=BasicBlock, stem="cifar"),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                                  block_cls=BottleneckBlock, stem="imagenet"),
    "wrn": WideResNet,
    "wrn28_10": functools.partial(WideResNet, depth=28, width=10),
    "vit_small": ViT,
    "vit_s16": functools.partial(ViT, patch_size=16, hidden_size=384, depth=12,
                                 num_heads=6, mlp_dim=1536),
}

MODEL_NAMES = tuple(sorted(_MODELS))


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """The linen model called ``name`` with ``num_classes`` outputs.

  Names: ``mlp``, ``cnn1d`` (MNIST-1D), ``resnet18`` (CIFAR stem, ``width``
  multiplier), ``wrn`` / ``wrn28_10`` (``depth``, ``width``), ``resnet50``
  (ImageNet stem), ``vit_small`` (patch 4, for 32×32) and ``vit_s16``
  (ViT-S/16). Keyword arguments set the model's attributes (``width=0.25``,
  ``depth=16``, ``dtype=jnp.bfloat16`` ...).

  Raises:
    ValueError: for an unknown name or attribute, naming the choices.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = get_model('resnet18', num_classes=10, width=0.125)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    >>> sorted(variables)
    ['batch_stats', 'params']
    >>> model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}.")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
  try:
    return _MODELS[name](num_classes=num_classes, **kwargs)
  except TypeError as error:
    raise ValueError(f"model {name!r}: bad keyword arguments {sorted(kwargs)}: {error}") from None
