"""mdistiller's ImageNet MobileNet-V1 (``MobileNetV1``), the student of the seeds' ResNet-50 ->
MobileNet-V1 pair (mdistiller's DKD: 72.05 % top-1). Torchvision has none.

State-dict keys are mdistiller's (``model.0`` ... ``model.13``, ``fc``), so its checkpoints load.
Five stages at strides 2 to 32, to pair with ``tv_resnet50`` stage by stage (mdistiller itself
exposes the last four): ``model[0:2]``, ``[2:4]``, ``[4:6]``, ``[6:12]``, ``[12:14]``. A stage's
pre-activation is its last block's second BN output, before the final ReLU (mdistiller's
``preact_feats``). mdistiller pools with a fixed ``AvgPool2d(7)``, which only fits 224 inputs;
pooling the whole map is the same there and works at any resolution.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.base import MODELS, GlobalAvgPool, StagedModel


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class MobileNetV1(StagedModel):
    """MobileNet-V1 (width 1.0) for ImageNet-sized inputs, in mdistiller's layout."""

    num_stages = 5
    BOUNDS = (0, 2, 4, 6, 12, 14)  # model[BOUNDS[i]:BOUNDS[i + 1]] is stage i

    def __init__(self, *, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        widths = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
                  *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1)]
        self.model = nn.Sequential(_conv_bn(in_channels, 32, 2), *(_conv_dw(*w) for w in widths), GlobalAvgPool())
        self.fc = nn.Linear(1024, num_classes)

    def _forward_stage(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        blocks = self.model[self.BOUNDS[i]:self.BOUNDS[i + 1]]
        for block in blocks[:-1]:
            x = block(x)
        preact = blocks[-1][:-1](x)  # the block without its final (in-place) ReLU
        return F.relu(preact), preact

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.model[14](x).flatten(1)
        return self.fc(pooled), pooled


@MODELS.register("MobileNetV1")
def mobilenet_v1(*, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """mdistiller's ImageNet MobileNet-V1 (the seeds' ResNet-50 -> MobileNet-V1 student)."""
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels)
