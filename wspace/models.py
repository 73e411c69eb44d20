"""flax.linen models used by the experiments.

Every model is called as ``model.apply(variables, x, train=...)``. Models with
BatchNorm keep running statistics in the ``batch_stats`` collection; in
training pass ``mutable=["batch_stats"]``. Layer names are stable (``Dense_0``,
``BatchNorm_1``, ``head``...) so method modules can select weights by path.

* `MLP` / `lenet_300_100`: fully connected, any input shape (flattened).
* `ConvNet`: conv + BatchNorm + ReLU blocks; 1-D convolutions on (N, L) or
  (N, L, C) signals such as mnist1d, 2-D on (N, H, W, C) images.
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
    """Conv -> BatchNorm -> ReLU blocks with max-pooling, global average, linear ``head``."""

    channels: Sequence[int] = (32, 64, 64)
    num_classes: int = 10
    kernel_size: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim == 2:  # (N, L) signal -> one channel
            x = x[..., None]
        spatial = x.ndim - 2
        window = (self.kernel_size,) * spatial
        for c in self.channels:
            x = nn.Conv(c, window, use_bias=False, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
            x = nn.relu(x)
            if min(x.shape[1:-1]) >= 2:
                x = nn.max_pool(x, (2,) * spatial, strides=(2,) * spatial)
        x = jnp.mean(x, axis=tuple(range(1, 1 + spatial)))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


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


MODELS = {"mlp": MLP, "lenet_300_100": lenet_300_100, "convnet": ConvNet, "resnet20": ResNet20}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def create(name: str, num_classes: int, *, dtype: str = "float32", **kwargs) -> nn.Module:
    """Builds a model by name (one of `MODELS`) computing in ``dtype`` (one of `DTYPES`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    return MODELS[name](num_classes=num_classes, dtype=DTYPES[dtype], **kwargs)
