"""Wide ResNets (Zagoruyko & Komodakis, 2016) for CIFAR, as in mdistiller's ``wrn.py``.

``wrn_<depth>_<k>``: depth ``6n + 4``, three stages of ``n`` pre-activation
blocks at widths 16k/32k/64k, then BN-ReLU, global pooling and a linear layer.
Dropout is not used (mdistiller's rate is 0).
"""
from __future__ import annotations


import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.base import (
    Features,
    GlobalAvgPool,
    MODELS,
    StagedModel,
    init_normal_fan_out,
)


class WideBlock(nn.Module):
    """Pre-activation block: bn-relu-conv-bn-relu-conv plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        # mdistiller's key name; only present where the width changes.
        self.convShortcut: nn.Conv2d | None = None  # noqa: N815
        if cin != cout:
            self.convShortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        out = self.conv2(out)
        # The projection shortcut sees the activated input, the identity the raw one.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class WideStage(nn.Module):
    """``n`` wide blocks under ``.layer`` (mdistiller's ``NetworkBlock``)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(StagedModel):
    """WRN-depth-k for 32x32 inputs."""

    num_stages = 4  # the stem and three stages

    def __init__(
        self, depth: int, widen: int, *, num_classes: int = 100, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.avgpool = GlobalAvgPool()  # mdistiller: avg_pool2d(8) on the 8x8 map
        self.fc = nn.Linear(widths[3], num_classes)

        init_normal_fan_out(self, linear_std=None)  # convolutions have no bias here

    def _next_bns(self) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm2d]:
        """The BNs that first touch the outputs of stages 1-3 (next block's, or the head's)."""
        return self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1

    def _forward_stage(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        if i == 0:
            x = self.conv1(x)
            return x, x  # a bare conv: no activation to be "pre"
        x = (self.block1, self.block2, self.block3)[i - 1](x)
        # Stage outputs are sums that no BN-ReLU has touched yet (pre-activation design);
        # their "pre-activation" is the BN the next stage (or the head) applies to them.
        # Like mdistiller, apply that BN here and again where it belongs: same values, and
        # in training mode the same extra running-statistics update mdistiller makes, so
        # students trained here match students trained there.
        return x, self._next_bns()[i - 1](x)

    def forward(self, x: Tensor) -> tuple[Tensor, Features]:
        # Not the generic stage loop, which would apply those extra BNs inside the pass:
        # same values and running statistics, but mdistiller applies them after the head,
        # and autograd sums the gradient contributions a tensor receives in an order set by
        # when they were created. A loss on both feats[i] and preact_feats[i] (three
        # contributions to feats[i]) would then round differently from mdistiller.
        feats = [self.conv1(x)]
        for block in (self.block1, self.block2, self.block3):
            feats.append(block(feats[-1]))
        logits, pooled = self.forward_head(feats[-1])
        preacts = [feats[0]] + [bn(f) for bn, f in zip(self._next_bns(), feats[1:])]
        return logits, Features(feats=feats, preact_feats=preacts, pooled_feat=pooled)

    def forward_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = self.avgpool(F.relu(self.bn1(x))).flatten(1)
        return self.fc(pooled), pooled


@MODELS.register("wrn_16_1")
def wrn_16_1(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("wrn_16_2")
def wrn_16_2(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("wrn_40_1")
def wrn_40_1(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes=num_classes, in_channels=in_channels)


@MODELS.register("wrn_40_2")
def wrn_40_2(*, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """WRN-40-2 (a published mdistiller teacher)."""
    return WideResNet(40, 2, num_classes=num_classes, in_channels=in_channels)
