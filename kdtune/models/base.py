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


class StagedModel(nn.Module):
    """A zoo model that can also run one stage at a time (what SAKD needs to mix streams).

    * ``num_stages`` == ``len(features["feats"])``.
    * ``forward_stage(i, x) -> (feats[i], preact_feats[i])``: stage 0 (the stem) takes
      the image, stage ``i > 0`` takes ``feats[i - 1]``, the post-activation output of
      the previous stage. Whatever lies between two feature points (a max-pool, say)
      belongs to the later stage.
    * ``forward_head(x) -> (logits, pooled_feat)`` from ``feats[-1]``.

    ``forward`` chains those calls (WRN orders its own, see there), so running the stages
    one by one gives exactly what ``forward`` gives: bit for bit, BN running statistics
    included. Subclasses implement ``_forward_stage`` and ``forward_head``; this class
    adds no parameters or buffers, so state-dict keys stay mdistiller's.
    """

    num_stages: int

    def forward(self, x: Tensor) -> tuple[Tensor, Features]:
        feats, preacts = [], []
        for i in range(self.num_stages):
            x, preact = self.forward_stage(i, x)
            feats.append(x)
            preacts.append(preact)
        logits, pooled = self.forward_head(x)
        return logits, Features(feats=feats, preact_feats=preacts, pooled_feat=pooled)

    def forward_stage(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        # Checked here: a negative index would silently take a wrong ``_forward_stage`` branch.
        if not 0 <= i < self.num_stages:
            raise IndexError(f"stage {i} out of range for {self.num_stages} stages")
        return self._forward_stage(i, x)

    def _forward_stage(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class ConvStemModel(StagedModel):
    """A staged model whose stem is ``relu(bn1(conv1(x)))`` and whose stage ``i > 0`` is
    ``layer<i>`` (ResNets and ShuffleNets). As in mdistiller, the stem output doubles as its
    pre-activation."""

    def _forward_stage(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        if i == 0:
            x = F.relu(self.bn1(self.conv1(x)))
            return x, x
        return getattr(self, f"layer{i}")(x)


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
