"""The classes behind :mod:`kdtune.models.torchvision_models`: torchvision's ResNet and MobileNetV2
with kdtune's model interface. Imported by the builders only, when a ``tv_*`` model is built:
importing torchvision costs about 1.5 s (its ops import torch._dynamo), which every process that
reads the model registry would otherwise pay (search drivers, commands, help).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import InvertedResidual

from kdtune.models.base import StagedModel


def _last_block(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Torchvision's BasicBlock / Bottleneck forward, returning the sum before the final ReLU too.
    The same operations as the block's own forward; out of place, so the pre-activation that is
    returned is not overwritten by the in-place ReLU torchvision uses."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, tvm.resnet.Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    preact = out + identity
    return F.relu(preact), preact


class TorchvisionResNet(StagedModel, tvm.ResNet):
    """torchvision.models.ResNet with kdtune's model interface (five stages)."""

    num_stages = 5

    def __init__(self, block: type[nn.Module], layers: list[int], *, num_classes: int, in_channels: int) -> None:
        tvm.ResNet.__init__(self, block, layers, num_classes=num_classes)
        if in_channels != 3:  # grayscale tests; published weights need 3 channels anyway
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def _forward_stage(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        if i == 0:
            x = self.relu(self.bn1(self.conv1(x)))
            return x, x
        if i == 1:
            x = self.maxpool(x)
        layer = getattr(self, f"layer{i}")
        for block in layer[:-1]:
            x = block(x)
        return _last_block(layer[-1], x)

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = torch.flatten(self.avgpool(x), 1)
        return self.fc(pooled), pooled


class TorchvisionMobileNetV2(StagedModel, tvm.MobileNetV2):
    """torchvision.models.MobileNetV2 with kdtune's model interface (five stages)."""

    num_stages = 5
    BOUNDS = (0, 2, 4, 7, 14, 19)  # features[BOUNDS[i]:BOUNDS[i + 1]] is stage i

    def __init__(self, *, num_classes: int, in_channels: int) -> None:
        tvm.MobileNetV2.__init__(self, num_classes=num_classes)
        if in_channels != 3:
            stem = self.features[0][0]
            self.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=2, padding=1, bias=False)
            nn.init.kaiming_normal_(self.features[0][0].weight, mode="fan_out")

    def _forward_stage(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        blocks = self.features[self.BOUNDS[i]:self.BOUNDS[i + 1]]
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        if isinstance(last, InvertedResidual):  # linear bottleneck: no activation after it
            x = last(x)
            return x, x
        preact = last[1](last[0](x))  # the final 1x1 conv and its BN
        return F.relu6(preact), preact

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(pooled), pooled
