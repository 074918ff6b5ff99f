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

from torch import nn

from kdtune.models.base import MODELS

# The classes live in torchvision_classes, imported when a model is built (see its docstring).


@MODELS.register("tv_resnet18")
def tv_resnet18(*, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 (ImageNet; published weights: resnet18-f37072fd.pth)."""
    from kdtune.models import torchvision_classes as tv

    return tv.TorchvisionResNet(tv.tvm.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("tv_resnet34")
def tv_resnet34(*, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-34 (ImageNet; published weights: resnet34-b627a593.pth)."""
    from kdtune.models import torchvision_classes as tv

    return tv.TorchvisionResNet(tv.tvm.resnet.BasicBlock, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("tv_resnet50")
def tv_resnet50(*, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-50 (ImageNet; published weights: resnet50-0676ba61.pth (V1) or
    resnet50-11ad3fa6.pth (V2))."""
    from kdtune.models import torchvision_classes as tv

    return tv.TorchvisionResNet(tv.tvm.resnet.Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("tv_mobilenet_v2")
def tv_mobilenet_v2(*, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """torchvision's MobileNetV2, width 1.0 (ImageNet; published weights: mobilenet_v2-b0353104.pth).
    Not the CIFAR ``MobileNetV2`` (CRD's mobile_half, width 0.5)."""
    from kdtune.models import torchvision_classes as tv

    return tv.TorchvisionMobileNetV2(num_classes=num_classes, in_channels=in_channels)
