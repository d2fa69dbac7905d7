"""Routed backbones: VGG-11 (the TR paper), the TAG CelebA ResNet, ResNet-18, a small CNN, an MLP.

Each is a :class:`~tr_jax.models.base.MultiTaskModel`: a Task Routing Layer after every
conv(+BN) / hidden Dense, before the nonlinearity, when ``sharing`` is set.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tr_jax.models.base import MultiTaskModel
from tr_jax.models.layers import ConvNormRoute, RoutingSpec, maybe_route
from tr_jax.nn import max_pool
from tr_jax.routing import TaskIds

VGG_CFGS = {  # numbers are conv widths, "M" a 2x2 max-pool
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
}


class VGGEncoder(nn.Module):
    """VGG trunk with a TRL after every conv(+BN); global average pool -> (B, C_last)."""

    cfg: Sequence
    routing: RoutingSpec | None
    batch_norm: bool = True
    width_multiplier: float = 1.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, task: TaskIds, train: bool) -> jax.Array:
        for v in self.cfg:
            if v == "M":
                # Small inputs (8x8, 32x32) run out of resolution before the 5th pool:
                # a pool that would reduce a 1-pixel map is skipped.
                if min(x.shape[1:3]) >= 2:
                    x = max_pool(x, (2, 2), (2, 2))
            else:
                x = nn.relu(ConvNormRoute(max(1, int(v * self.width_multiplier)), self.routing,
                                          batch_norm=self.batch_norm, dtype=self.dtype)(
                    x, task, train))
        return x.mean(axis=(1, 2))


class RoutedVGG(MultiTaskModel):
    """VGG-11 (cfg "A") with a Task Routing Layer after every conv, one head per task.

    Differences from the official PyTorch code, on purpose: its classifier expects
    ``1024 * 7 * 7`` inputs from a 512-channel trunk and its ``vgg11_bn`` has no BatchNorm;
    here the trunk is global-average-pooled to (B, 512) and ``batch_norm=True`` really adds BN.

    Attributes:
      cfg: ``"A"`` (VGG-11) or ``"B"`` (VGG-13).
      batch_norm: BatchNorm after every conv (VGG-11-BN).
      width_multiplier: scales every conv width (1.0 = the paper's network).
    """

    cfg: str = "A"
    batch_norm: bool = True
    width_multiplier: float = 1.0

    def make_encoder(self):
        return VGGEncoder(VGG_CFGS[self.cfg], self.routing_spec, self.batch_norm,
                          self.width_multiplier, self.dtype, name="encoder")


class _ResidualBlock(nn.Module):
    """Basic residual block: (conv-BN-TRL-ReLU, conv-BN-TRL) + skip, ReLU."""

    features: int
    routing: RoutingSpec | None
    strides: int = 1
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, task: TaskIds, train: bool) -> jax.Array:
        r = nn.relu(ConvNormRoute(self.features, self.routing, strides=(self.strides,) * 2,
                                  dtype=self.dtype)(x, task, train))
        r = ConvNormRoute(self.features, self.routing, dtype=self.dtype)(r, task, train)
        if x.shape != r.shape:
            x = ConvNormRoute(self.features, self.routing, kernel_size=(1, 1),
                              strides=(self.strides,) * 2, dtype=self.dtype)(x, task, train)
        return nn.relu(x + r)


class TagResNetEncoder(nn.Module):
    """The TAG CelebA encoder: conv3x3-``width``, BN, ReLU, maxpool 3/2 ("SAME"), one residual
    block ``width``, avgpool 2, flatten -> (B, h * w * width) with h = floor(ceil(H / 2) / 2),
    w likewise."""

    routing: RoutingSpec | None
    width: int = 64
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, task: TaskIds, train: bool) -> jax.Array:
        x = nn.relu(ConvNormRoute(self.width, self.routing, dtype=self.dtype)(x, task, train))
        x = max_pool(x, (3, 3), (2, 2), padding="SAME")
        x = _ResidualBlock(self.width, self.routing, dtype=self.dtype)(x, task, train)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return x.reshape(x.shape[0], -1)


class RoutedResNet(MultiTaskModel):
    """The small ResNet of TAG's CelebA study (``sharing=None`` for the official unrouted net)."""

    width: int = 64

    def make_encoder(self):
        return TagResNetEncoder(self.routing_spec, self.width, self.dtype, name="encoder")


class ResNet18Encoder(nn.Module):
    """ResNet-18 (basic blocks 2-2-2-2, widths 64..512), CIFAR-style 3x3 stem for small
    inputs or the ImageNet 7x7/2 stem + maxpool; global average pool -> (B, 512)."""

    routing: RoutingSpec | None
    imagenet_stem: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, task: TaskIds, train: bool) -> jax.Array:
        if self.imagenet_stem:
            x = nn.relu(ConvNormRoute(64, self.routing, (7, 7), (2, 2), dtype=self.dtype)(
                x, task, train))
            x = max_pool(x, (3, 3), (2, 2), padding="SAME")
        else:
            x = nn.relu(ConvNormRoute(64, self.routing, dtype=self.dtype)(x, task, train))
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                x = _ResidualBlock(width, self.routing, 2 if (i and not j) else 1,
                                   self.dtype)(x, task, train)
        return x.mean(axis=(1, 2))


class RoutedResNet18(MultiTaskModel):
    """Routed ResNet-18."""

    imagenet_stem: bool = False

    def make_encoder(self):
        return ResNet18Encoder(self.routing_spec, self.imagenet_stem, self.dtype, name="encoder")


class SmallCNNEncoder(nn.Module):
    """conv-BN-TRL-ReLU blocks with 2x2 max-pools, then global average pool."""

    routing: RoutingSpec | None
    widths: Sequence[int] = (32, 64)
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, task: TaskIds, train: bool) -> jax.Array:
        for w in self.widths:
            x = nn.relu(ConvNormRoute(w, self.routing, dtype=self.dtype)(x, task, train))
            if min(x.shape[1:3]) >= 2:
                x = max_pool(x, (2, 2), (2, 2))
        return x.mean(axis=(1, 2))


class SmallCNN(MultiTaskModel):
    """A small routed CNN for 8x8 .. 64x64 images (the quickstart model)."""

    widths: Sequence[int] = (32, 64)

    def make_encoder(self):
        return SmallCNNEncoder(self.routing_spec, tuple(self.widths), self.dtype, name="encoder")


class MLPEncoder(nn.Module):
    """Dense-TRL-ReLU layers on flattened inputs."""

    routing: RoutingSpec | None
    hidden: Sequence[int] = (128, 128)
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, task: TaskIds, train: bool) -> jax.Array:
        del train
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.relu(maybe_route(self.routing, nn.Dense(h, dtype=self.dtype)(x), task))
        return x


class MLP(MultiTaskModel):
    """A routed multi-layer perceptron on flattened inputs (B, ...)."""

    hidden: Sequence[int] = (128, 128)
    input_ndim: int = 2

    def make_encoder(self):
        return MLPEncoder(self.routing_spec, tuple(self.hidden), self.dtype, name="encoder")


