"""Torchvision's ImageNet ResNets and MobileNetV2 as kdtune models (``tv_resnet18``, ``tv_resnet34``,
``tv_resnet50``, ``tv_mobilenet_v2``).

Each class *is* torchvision's (a subclass that adds no parameters or buffers), so its state dict
has torchvision's keys and a published weights file (``resnet34-b627a593.pth``, a bare state
dict) loads strictly as ``teacher_checkpoint``. What the subclass adds is kdtune's model
interface (:class:`kdtune.models.base.StagedModel`): ``(logits, features)`` from ``forward``, and
stage-by-stage execution, so feature distillers and SAKD work on these models too.

Five stages each, at the same strides in both families, so the seeds' pairs (ResNet34 ->
ResNet18, ResNet50 -> MobileNetV2) pair stage by stage (ReviewKD and SAKD need equal counts):

================  ==========================  ============================================
stage (stride)    ResNet                      MobileNetV2 (``features`` indices)
================  ==========================  ============================================
0 (/2)            conv1, bn1, relu            0-1: the stem conv and the first block (16)
1 (/4)            maxpool, layer1             2-3 (24 channels)
2 (/8)            layer2                      4-6 (32)
3 (/16)           layer3                      7-13 (64, then 96)
4 (/32)           layer4                      14-18 (160, 320, then the 1x1 conv to 1280)
================  ==========================  ============================================

Pre-activations: a ResNet stage's is its last block's sum before the final ReLU (the stem's is
its output, as in mdistiller); a MobileNetV2 block ends linearly, so its stage's pre-activation is
its output, except stage 4, whose last layer (the 1x1 conv) has its BN output before ReLU6.

``forward`` gives torchvision's logits bit for bit (``tests/test_imagenet.py`` checks it against
torchvision's own ``forward``). Torchvision has no MobileNet-V1, the student of the seeds' ResNet50 ->
MobileNet-V1 pair: kdtune ships mdistiller's (``MobileNetV1``, :mod:`kdtune.models.mobilenetv1`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import InvertedResidual

from kdtune.models.base import MODELS, StagedModel


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


@MODELS.register("tv_resnet18")
def tv_resnet18(*, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 (ImageNet; published weights: resnet18-f37072fd.pth)."""
    return TorchvisionResNet(tvm.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("tv_resnet34")
def tv_resnet34(*, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-34 (ImageNet; published weights: resnet34-b627a593.pth)."""
    return TorchvisionResNet(tvm.resnet.BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("tv_resnet50")
def tv_resnet50(*, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 (ImageNet; published weights: resnet50-0676ba61.pth (V1) or
    resnet50-11ad3fa6.pth (V2))."""
    return TorchvisionResNet(tvm.resnet.Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("tv_mobilenet_v2")
def tv_mobilenet_v2(*, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's MobileNetV2, width 1.0 (ImageNet; published weights: mobilenet_v2-b0353104.pth).
    Not the CIFAR ``MobileNetV2`` (CRD's mobile_half, width 0.5)."""
    return TorchvisionMobileNetV2(num_classes=num_classes, in_channels=in_channels)
