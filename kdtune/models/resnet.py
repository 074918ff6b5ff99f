"""CIFAR ResNets (He et al., 2016) with mdistiller's parameter names.

Depth ``6n + 2``: a 3x3 stem and three stages of ``n`` basic blocks at widths
``widths[1:]`` (the second and third stage halve the resolution). The ``x4``
variants are four times wider.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.base import MODELS, ConvStemModel, GlobalAvgPool, Stage, init_kaiming_fan_out


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut; returns ``(relu(sum), sum)``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        # A 1x1 projection only where the shape changes (mdistiller calls it "downsample").
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return F.relu(preact), preact


class CifarResNet(ConvStemModel):
    """ResNet-(6n+2) for 32x32 inputs; ``widths`` = (stem, stage1, stage2, stage3)."""

    num_stages = 4  # the stem and three stages

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        *,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = GlobalAvgPool()  # mdistiller: AvgPool2d(8) on the 8x8 map
        self.fc = nn.Linear(widths[3], num_classes)

        init_kaiming_fan_out(self)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> Stage:
        blocks = [BasicBlock(cin, cout, stride)]
        blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
        return Stage(*blocks)

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.avgpool(x).flatten(1)
        return self.fc(pooled), pooled


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@MODELS.register("resnet8")
def resnet8(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-8."""
    return CifarResNet(8, _THIN, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("resnet14")
def resnet14(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-14."""
    return CifarResNet(14, _THIN, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("resnet20")
def resnet20(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-20."""
    return CifarResNet(20, _THIN, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("resnet32")
def resnet32(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-32."""
    return CifarResNet(32, _THIN, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("resnet44")
def resnet44(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-44."""
    return CifarResNet(44, _THIN, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("resnet56")
def resnet56(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-56 (a published mdistiller teacher)."""
    return CifarResNet(56, _THIN, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("resnet110")
def resnet110(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-110 (a published mdistiller teacher)."""
    return CifarResNet(110, _THIN, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("resnet8x4")
def resnet8x4(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-8, four times wider."""
    return CifarResNet(8, _WIDE, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("resnet32x4")
def resnet32x4(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """ResNet-32, four times wider (a published mdistiller teacher)."""
    return CifarResNet(32, _WIDE, num_classes=num_classes, in_channels=in_channels)
