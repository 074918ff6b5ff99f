"""The model registry and the small pieces every CIFAR model shares.

Kept apart from ``kdtune.models.__init__`` so the model modules can import
``MODELS`` without a circular import.
"""
from __future__ import annotations

import math
from typing import TypedDict

import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.registry import Registry

MODELS = Registry("model")


class Features(TypedDict):
    """The intermediate outputs a model returns next to its logits (mdistiller's layout).

    ``feats``: stage outputs after their activation, stem first.
    ``preact_feats``: the same stages before that activation (same length).
    ``pooled_feat``: the globally pooled penultimate vector, shape (B, D).
    """

    feats: list[Tensor]
    preact_feats: list[Tensor]
    pooled_feat: Tensor


class Stage(nn.Sequential):
    """A run of blocks that each return ``(output, pre_activation)``.

    Returns the last block's pair, so a model can read a stage's pre-activation
    without hooks. State-dict keys are those of a plain ``nn.Sequential``.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        preact = x
        for block in self:
            x, preact = block(x)
        return x, preact


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: (N, g*k, H, W) -> interleave the g groups."""
    if groups == 1:
        return x
    # reshape, not view: the input may be channels_last (non-contiguous in NCHW terms)
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class GlobalAvgPool(nn.Module):
    """Average over the whole feature map: ``(B, C, H, W) -> (B, C, 1, 1)``.

    mdistiller pools CIFAR maps with a fixed ``AvgPool2d(8)`` / ``avg_pool2d(x, 4)``,
    which breaks on other input sizes. Pooling with a kernel the size of the map is
    the same operation there (bit for bit, unlike ``AdaptiveAvgPool2d(1)``, which
    reduces through ``mean`` and rounds differently) and works on any input size.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=(x.shape[-2], x.shape[-1]))


def init_normal_fan_out(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """The CRD/mdistiller init of VGG, WRN and MobileNetV2, written out as they do it.

    Convolutions: N(0, 2 / fan_out), bias 0; batch norm: weight 1, bias 0; linear layers:
    N(0, linear_std) and bias 0 (``linear_std=None`` keeps PyTorch's default weight, as WRN does).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def init_kaiming_fan_out(model: nn.Module) -> None:
    """The init of mdistiller's ResNets: Kaiming-normal (fan_out) convolutions, BN weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
