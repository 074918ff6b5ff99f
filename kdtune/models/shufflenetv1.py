"""ShuffleNet V1 for CIFAR (mdistiller's ``ShuffleV1``: groups 3, widths 240/480/960).

A 1x1 stem (no downsampling) and three stages; each stage opens with a stride-2
unit that concatenates a 3x3 average-pooled shortcut, the other units add it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.base import MODELS, ConvStemModel, GlobalAvgPool, Stage, channel_shuffle

_STEM = 24


class ShuffleUnit(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; returns ``(relu(y), y)``.

    ``cout`` is the width of the residual branch; a stride-2 unit concatenates the
    pooled input to it, so its output has ``cin + cout`` channels.
    """

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = cout // 4
        # The unit fed by the narrow stem uses a dense first 1x1 conv (mdistiller tests
        # ``in_planes == 24``), as in the ShuffleNet paper.
        self.first_groups = 1 if cin == _STEM else groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            preact = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            preact = out + x
        return F.relu(preact), preact


class ShuffleNetV1(ConvStemModel):
    """ShuffleNet V1 with stage widths ``widths`` and ``num_blocks`` units per stage."""

    num_stages = 4  # the stem and three stages

    def __init__(
        self,
        widths: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        *,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, _STEM, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM)
        cin = _STEM
        stages = []
        for width, n in zip(widths, num_blocks):
            # the first unit's branch only fills what the concatenated shortcut leaves
            units = [ShuffleUnit(cin, width - cin, 2, groups)]
            units += [ShuffleUnit(width, width, 1, groups) for _ in range(n - 1)]
            stages.append(Stage(*units))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = GlobalAvgPool()  # mdistiller: avg_pool2d(4) on the 4x4 map
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.avgpool(x).flatten(1)
        return self.linear(pooled), pooled


@MODELS.register("ShuffleV1")
def ShuffleV1(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:  # noqa: N802
    """ShuffleNet V1, 3 groups, widths 240/480/960, units 4/8/4."""
    return ShuffleNetV1(num_classes=num_classes, in_channels=in_channels)
