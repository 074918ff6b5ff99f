"""VGG with batch norm for CIFAR (mdistiller's ``vgg*_bn``, registered as ``vgg8`` ... ``vgg19``).

Five conv stages separated by 2x2 max-pools and a single linear classifier on the
globally pooled 512-d vector. Each stage is a ``Sequential`` of conv-bn-relu
units whose final ReLU is left to ``forward``, so the pre-activation is available.
"""
from __future__ import annotations


import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.base import MODELS, StagedModel, init_normal_fan_out

# Conv widths per stage.
_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [
        [64, 64],
        [128, 128],
        [256, 256, 256, 256],
        [512, 512, 512, 512],
        [512, 512, 512, 512],
    ],
}


def _stage(cin: int, widths: list[int]) -> nn.Sequential:
    """conv-bn (-relu-conv-bn)*: indices 0,1,(2),3,4,... match mdistiller's keys."""
    layers: list[nn.Module] = []
    for i, cout in enumerate(widths):
        if i:
            layers.append(nn.ReLU(inplace=True))
        layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout)]
        cin = cout
    return nn.Sequential(*layers)


def _max_pool() -> nn.MaxPool2d:
    # ceil_mode keeps a 1x1 map at 1x1 (tiny inputs such as 8x8 digits);
    # it is the same as floor mode on the even sizes CIFAR produces.
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)


class VGG(StagedModel):
    """VGG-BN; ``config`` lists the conv widths of the five stages."""

    num_stages = 5  # block0 (the stem) to block4

    def __init__(
        self, config: list[list[int]], *, num_classes: int = 100, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.block0 = _stage(in_channels, config[0])
        self.block1 = _stage(config[0][-1], config[1])
        self.block2 = _stage(config[1][-1], config[2])
        self.block3 = _stage(config[2][-1], config[3])
        self.block4 = _stage(config[3][-1], config[4])
        self.pool0 = _max_pool()
        self.pool1 = _max_pool()
        self.pool2 = _max_pool()
        self.pool3 = _max_pool()
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[4][-1], num_classes)

        init_normal_fan_out(self)

    def _forward_stage(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        if i == 0:
            x = F.relu(self.block0(x))
            return x, x  # as in mdistiller, the stem output doubles as its pre-activation
        if i < 4:
            # The max-pool after a feature point opens the next stage.
            x = (self.pool0, self.pool1, self.pool2)[i - 1](x)
        elif x.shape[2] == 8:
            # mdistiller skips the fourth max-pool except on 64x64 (Tiny-ImageNet) inputs,
            # so CIFAR's last stage runs at 4x4; kept for identical numerics. A stage sees
            # only its input, so the test is on the third stage's map: 8 high for a
            # 64-high image (and, unlike mdistiller, for the never-used heights 57-63).
            x = self.pool3(x)
        preact = (self.block1, self.block2, self.block3, self.block4)[i - 1](x)
        return F.relu(preact), preact

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.pool4(x).flatten(1)
        return self.classifier(pooled), pooled


@MODELS.register("vgg8")
def vgg8(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-8-BN (mdistiller ``vgg8_bn``)."""
    return VGG(_CONFIGS["vgg8"], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("vgg11")
def vgg11(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-11-BN (mdistiller ``vgg11_bn``)."""
    return VGG(_CONFIGS["vgg11"], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("vgg13")
def vgg13(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-13-BN (mdistiller ``vgg13_bn``; a published teacher)."""
    return VGG(_CONFIGS["vgg13"], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("vgg16")
def vgg16(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-16-BN (mdistiller ``vgg16_bn``)."""
    return VGG(_CONFIGS["vgg16"], num_classes=num_classes, in_channels=in_channels)


@MODELS.register("vgg19")
def vgg19(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """VGG-19-BN (mdistiller ``vgg19_bn``)."""
    return VGG(_CONFIGS["vgg19"], num_classes=num_classes, in_channels=in_channels)
