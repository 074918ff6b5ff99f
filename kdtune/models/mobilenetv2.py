"""MobileNetV2 for CIFAR (mdistiller's ``mobile_half``: expansion 6, width 0.5).

Differences from torchvision's MobileNetV2 that mdistiller's checkpoints rely on:
a stride-2 stem, an expansion 1x1 conv even where the expansion ratio is 1,
and blocks grouped per setting row under ``blocks.<row>.<i>``.
"""
from __future__ import annotations


from torch import Tensor, nn

from kdtune.models.base import GlobalAvgPool, MODELS, StagedModel, init_normal_fan_out

# (expansion, output channels at width 1, repeats, first stride); None = use ``expand``.
_SETTINGS: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection (no final activation)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(StagedModel):
    """MobileNetV2 with expansion ``expand`` and channel multiplier ``width``."""

    num_stages = 5  # the stem and four groups of block rows
    # Which ``blocks`` rows run between two feature points (mdistiller's grouping):
    # the features are read after rows 1, 2, 4 and 6.
    _ROWS = ((0, 1), (2,), (3, 4), (5, 6))

    def __init__(
        self,
        expand: int = 6,
        width: float = 0.5,
        *,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTINGS:
            cout = int(c * width)
            layers = []
            for i in range(n):
                ratio = expand if t is None else t
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, ratio))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        # As in mdistiller, the head is only widened, never narrowed.
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1, 1)
        self.avgpool = GlobalAvgPool()  # mdistiller: AvgPool2d(2) on the 2x2 map
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))

        init_normal_fan_out(self)

    def _forward_stage(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        if i == 0:
            x = self.conv1(x)
        else:
            for row in self._ROWS[i - 1]:
                x = self.blocks[row](x)
        # mdistiller returns no "preact_feats" here. Blocks end in a linear projection
        # (BN, no ReLU), so the stage outputs already are pre-activations; the stem is
        # reused as in the other models.
        return x, x

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.avgpool(self.conv2(x)).flatten(1)
        return self.classifier(pooled), pooled


@MODELS.register("MobileNetV2")
def MobileNetV2(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:  # noqa: N802
    """MobileNetV2 at width 0.5, expansion 6 (mdistiller ``mobile_half``)."""
    return CifarMobileNetV2(6, 0.5, num_classes=num_classes, in_channels=in_channels)
