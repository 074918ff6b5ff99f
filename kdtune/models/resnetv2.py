"""ImageNet-style ResNet-18/50 adapted to CIFAR (mdistiller's ``resnetv2.py``).

A 3x3 stride-1 stem (no max-pool) followed by four stages at widths
64/128/256/512 (x4 for bottlenecks); stages 2-4 halve the resolution.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.base import MODELS, ConvStemModel, Stage, init_kaiming_fan_out


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    """1x1 conv + BN shortcut where the shape changes, identity elsewhere."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs; returns ``(relu(sum), sum)``."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(cin, planes, stride)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        preact = out + self.shortcut(x)
        return F.relu(preact), preact


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; returns ``(relu(sum), sum)``."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        preact = out + self.shortcut(x)
        return F.relu(preact), preact


class ResNetV2(ConvStemModel):
    """Four-stage ResNet; ``num_blocks`` per stage, ``block`` basic or bottleneck."""

    num_stages = 5  # the stem and four stages

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        *,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            blocks = []
            for stride in strides:
                blocks.append(block(cin, planes, stride))
                cin = planes * block.expansion
            stages.append(Stage(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

        init_kaiming_fan_out(self)

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.avgpool(x).flatten(1)
        return self.linear(pooled), pooled


@MODELS.register("ResNet18")
def ResNet18(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:  # noqa: N802
    """ResNet-18 (basic blocks 2-2-2-2)."""
    return ResNetV2(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


@MODELS.register("ResNet50")
def ResNet50(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:  # noqa: N802
    """ResNet-50 (bottlenecks 3-4-6-3; a published mdistiller teacher)."""
    return ResNetV2(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels)
