"""flax.linen models used by the experiments.

Every model is called as ``model.apply(variables, x, train=...)``. Models with
BatchNorm keep running statistics in the ``batch_stats`` collection; in
training pass ``mutable=["batch_stats"]``. Layer names are stable (``Dense_0``,
``BatchNorm_1``, ``head``...) so method modules can select weights by path.

* `MLP` / `lenet_300_100`: fully connected, any input shape (flattened).
* `ConvNet`: conv + BatchNorm + ReLU blocks; 1-D convolutions on (N, L)
  signals such as mnist1d (or (N, L, C) with ``spatial_dims=1``), 2-D on
  (N, H, W, C) images. An (N, H, W) array is refused: add a channel axis.
* `ResNet20`: the CIFAR ResNet of He et al. 2016 (3 stages x 3 basic blocks).

Mixed precision: every model takes ``dtype``, the computation dtype (e.g.
``jnp.bfloat16``); parameters stay float32 (flax's ``param_dtype``), so
gradients and optimizer state are float32 too, and logits are returned in
float32 for a stable softmax. BatchNorm reduces its statistics in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """Fully connected ReLU network; the last layer is named ``head``."""

    features: Sequence[int] = (300, 100)
    num_classes: int = 10
    activation: Callable = nn.relu
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no train-time behaviour; the argument keeps one calling convention
        x = x.reshape((x.shape[0], -1))
        for width in self.features:
            x = self.activation(nn.Dense(width, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def lenet_300_100(num_classes: int = 10, dtype: Any = jnp.float32) -> MLP:
    """LeNet-300-100 (LeCun et al. 1998), the lottery-ticket MLP: 266,610 params on 28x28."""
    return MLP(features=(300, 100), num_classes=num_classes, dtype=dtype)


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> ReLU blocks with max-pooling, global average, linear ``head``.

    Inputs: (N, L) signals (one channel, 1-D convolutions) or (N, H, W, C)
    images (2-D). A rank-3 input is ambiguous -- (N, H, W) grey images or
    (N, L, C) multichannel signals -- so it needs ``spatial_dims=1`` (signals);
    grey images need an explicit channel axis, ``x[..., None]``, else a
    `ValueError` says so (a 1-D net over 28 "channels" would train silently).

    Attributes:
      channels: output channels of each conv block.
      num_classes: width of the ``head``.
      kernel_size: conv window along each spatial axis.
      dtype: computation dtype (parameters stay float32; see the module docstring).
      spatial_dims: 1 or 2 convolution axes; None infers them from (N, L) or
        (N, H, W, C) inputs.
    """

    channels: Sequence[int] = (32, 64, 64)
    num_classes: int = 10
    kernel_size: int = 3
    dtype: Any = jnp.float32
    spatial_dims: int | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        spatial = _spatial_dims(x.shape, self.spatial_dims)
        if x.ndim == spatial + 1:  # (N, L) signal -> one channel
            x = x[..., None]
        window = (self.kernel_size,) * spatial
        for c in self.channels:
            x = nn.Conv(c, window, use_bias=False, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
            x = nn.relu(x)
            if min(x.shape[1:-1]) >= 2:
                x = nn.max_pool(x, (2,) * spatial, strides=(2,) * spatial)
        x = jnp.mean(x, axis=tuple(range(1, 1 + spatial)))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def _spatial_dims(shape: tuple[int, ...], spatial_dims: int | None) -> int:
    """Number of convolution axes of a ConvNet input (see `ConvNet`); ValueError if unclear."""
    if spatial_dims not in (None, 1, 2):
        raise ValueError(f"ConvNet spatial_dims must be None, 1 or 2, got {spatial_dims!r}")
    if spatial_dims == 1 and len(shape) in (2, 3):
        return 1
    if spatial_dims in (None, 2) and len(shape) == 4:
        return 2
    if spatial_dims is None and len(shape) == 2:
        return 1
    if len(shape) == 3 and spatial_dims != 1:
        raise ValueError(
            f"ConvNet got input of shape {tuple(shape)}: for (N, H, W) grey images add a channel "
            f"axis, x[..., None] -> {(*shape, 1)}; for (N, L, C) signals pass spatial_dims=1"
        )
    raise ValueError(
        f"ConvNet takes (N, L) or (N, L, C) signals (spatial_dims=1) or (N, H, W, C) images "
        f"(spatial_dims=2); got input of shape {tuple(shape)} with spatial_dims={spatial_dims}"
    )


class _BasicBlock(nn.Module):
    channels: int
    strides: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)
        conv = lambda size, strides=1: nn.Conv(
            self.channels, size, strides, use_bias=False, dtype=self.dtype
        )
        y = nn.relu(norm()(conv((3, 3), self.strides)(x)))
        y = norm()(conv((3, 3))(y))
        if x.shape != y.shape:  # projection shortcut (option B)
            x = conv((1, 1), self.strides)(x)
            x = norm()(x)
        return nn.relu(x + y)


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 with BatchNorm (He et al. 2016, arXiv 1512.03385)."""

    num_classes: int = 10
    width: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
        x = nn.relu(x)
        for stage in range(3):
            for block in range(3):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(self.width * 2**stage, strides, dtype=self.dtype)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet_300_100": lenet_300_100,
    "convnet": ConvNet,
    "resnet20": ResNet20,
}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def create(name: str, num_classes: int, *, dtype: str = "float32", **kwargs: Any) -> nn.Module:
    """Builds a model by name (one of `MODELS`) computing in ``dtype`` (one of `DTYPES`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    return MODELS[name](num_classes=num_classes, dtype=DTYPES[dtype], **kwargs)
