"""ShuffleNet V2 1x for CIFAR (mdistiller's ``ShuffleV2``: widths 116/232/464, head 1024).

A 1x1 stem (no downsampling); each stage is a stride-2 unit followed by channel-
split units; a 1x1 conv widens to 1024 before global pooling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.base import MODELS, ConvStemModel, GlobalAvgPool, Stage, channel_shuffle

_STEM = 24


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


def _depthwise3x3(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)


class SplitUnit(nn.Module):
    """Half the channels pass through, the other half go 1x1-dw3x3-1x1.

    Returns ``(shuffle(cat(x1, relu(y))), cat(x1, y))``; like mdistiller, the
    pre-activation is not shuffled.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = _conv1x1(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _depthwise3x3(half, 1)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _conv1x1(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        half = x.shape[1] // 2
        x1, x2 = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        branch = self.bn3(self.conv3(out))
        preact = torch.cat([x1, branch], 1)
        out = torch.cat([x1, F.relu(branch)], 1)
        return channel_shuffle(out, 2), preact


class DownUnit(nn.Module):
    """Stride-2 unit: two branches (dw3x3-1x1 and 1x1-dw3x3-1x1), concatenated, shuffled."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        # left branch
        self.conv1 = _depthwise3x3(cin, 2)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = _conv1x1(cin, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = _conv1x1(cin, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _depthwise3x3(mid, 2)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _conv1x1(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        out = channel_shuffle(torch.cat([left, right], 1), 2)
        # Never the last unit of a stage, so its pre-activation is never reported.
        return out, out


class ShuffleNetV2(ConvStemModel):
    """ShuffleNet V2 with stage widths ``widths[:3]``, head width ``widths[3]``."""

    num_stages = 4  # the stem and three stages

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
        *,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, _STEM)
        self.bn1 = nn.BatchNorm2d(_STEM)
        cin = _STEM
        stages = []
        for width, n in zip(widths[:3], num_blocks):
            stages.append(Stage(DownUnit(cin, width), *(SplitUnit(width) for _ in range(n))))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _conv1x1(widths[2], widths[3])
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.avgpool = GlobalAvgPool()  # mdistiller: avg_pool2d(4) on the 4x4 map
        self.linear = nn.Linear(widths[3], num_classes)

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.avgpool(F.relu(self.bn2(self.conv2(x)))).flatten(1)
        return self.linear(pooled), pooled


@MODELS.register("ShuffleV2")
def ShuffleV2(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:  # noqa: N802
    """ShuffleNet V2 1x (widths 116/232/464, units 3/7/3, head 1024)."""
    return ShuffleNetV2(num_classes=num_classes, in_channels=in_channels)
