"""ReviewKD: Distilling Knowledge via Knowledge Review (Chen, Liu, Zhao, Jia; CVPR 2021).

Each of the student's stage outputs (and its pooled feature, as a 1x1 map) is fused with the
fused result of the deeper ones by an attention-based fusion (ABF) module, and each fused map
is compared with the teacher's feature of the same depth by the hierarchical context loss
(HCL): a mean squared error at full resolution and on 4x4, 2x2 and 1x1 average-pooled
versions. The student's shallow stages thus learn from the teacher's deeper ones ("review").
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.distillers.base import CE_WEIGHT, METHODS, Distiller
from kdtune.distillers.connectors import feature_shapes, no_autocast, num_stages
from kdtune.hparams import Schema, hp
from kdtune.models.base import Features

HCL_LEVELS = (4, 2, 1)  # the pooled sizes HCL adds, each at half the previous one's weight


def review_spots(features: Features, preact: bool) -> list[Any]:
    """The maps ReviewKD pairs: every stage after the stem (``feats``, or ``preact_feats`` with
    ``preact``), then the pooled feature as a 1x1 map. Works on tensors and on the
    ``torch.Size`` entries of :func:`~kdtune.distillers.connectors.feature_shapes`."""
    maps = list(features["preact_feats" if preact else "feats"][1:])
    pooled = features["pooled_feat"]
    pooled = pooled[:, :, None, None] if isinstance(pooled, Tensor) else torch.Size([*pooled, 1, 1])
    return maps + [pooled]


def hcl_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss, per sample [B], summed over the pairs of maps.

    For each pair (same shape): ``(mse + sum_l w_l mse_l) / (1 + sum_l w_l)``, where ``mse`` is
    the squared error averaged over the map and ``mse_l`` that of both maps average-pooled to
    l x l, for l in 4, 2, 1 below the map's height, with weights 1/2, 1/4, 1/8. Every sample
    has the same number of values, so the batch mean is the release's ``hcl_loss`` (its
    ``mse_loss`` means over the whole batch): the loss splits over samples exactly.
    """
    total = torch.zeros((), device=student[0].device)
    for f_s, f_t in zip(student, teacher):
        f_s, f_t = f_s.float(), f_t.detach().float()
        loss = (f_s - f_t).pow(2).flatten(1).mean(1)
        weight, norm = 1.0, 1.0
        for level in HCL_LEVELS:
            if level >= f_s.shape[2]:
                continue
            weight /= 2.0
            pooled = F.adaptive_avg_pool2d(f_s, level) - F.adaptive_avg_pool2d(f_t, level)
            loss = loss + weight * pooled.pow(2).flatten(1).mean(1)
            norm += weight
        total = total + loss / norm
    return total


class ABF(nn.Module):
    """Attention-based fusion of one student map with the fused map of the level below it.

    ``conv1`` (1x1 conv + BN) maps the student map to ``mid_channels``; with ``fuse``, the
    deeper level's fused map is resized (nearest) to this map's size and the two are mixed by
    two per-pixel sigmoid attention maps from a 1x1 conv over both. The mix is resized (nearest)
    to the teacher map's size and ``conv2`` (3x3 conv + BN) maps it to the teacher's channels.
    Returns ``(output for HCL, the mix passed up to the next level)``. Convolution weights start
    as the release's (Kaiming-uniform, a = 1).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            assert deeper is not None
            deeper = F.interpolate(deeper, size=tuple(x.shape[2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, deeper], dim=1))
            x = x * attention[:, :1] + deeper * attention[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _pair_problem(teacher: str, student: str, t_spots: int, s_spots: int) -> str:
    return (f"method: 'reviewkd' matches each student stage (and the pooled feature) with the teacher's at the "
            f"same depth, but teacher {teacher!r} has {t_spots} stages and student {student!r} has {s_spots}; "
            f"pick a pair with the same number of stages (e.g. resnet32x4 -> resnet8x4, wrn_40_2 -> ShuffleV1, "
            f"vgg13 -> MobileNetV2)")


@METHODS.register("reviewkd")
class ReviewKD(Distiller):
    """``ce_weight * CE + min(epoch / warmup, 1) * feat_weight * HCL(ABF(student maps), teacher maps)``.

    Student maps: its stages after the stem (post-activation; ``student_preact`` takes them
    before the activation) and its pooled feature as a 1x1 map; teacher maps: its stages
    after the stem *before* the activation, and its pooled feature. One :class:`ABF` per
    student map, built from the two models' real feature shapes (``input_shape``): input
    channels the student's, output channels and size the teacher's, middle width
    ``min(max_mid_channels, student pooled width)``. The deepest ABF (the pooled map) does not
    fuse. The ABFs are trained with the run's optimizer settings; the teacher runs once, under
    ``no_grad``.

    Defaults are mdistiller's CIFAR-100 ReviewKD (``configs/cifar100/reviewkd.yaml`` over
    ``CFG.REVIEWKD``: resnet32x4 -> resnet8x4, weight 5, warm-up 20 epochs, CE 1, max middle
    width 512, student post-activation). The release's weight is pair-specific (ReviewKD's
    ``script/reviewKD.sh``: 5 for most pairs, 8 for ShuffleV2, 0.6 for resnet56 -> resnet20,
    1 for resnet110 -> resnet32): search it.

    Supported pairs: any two models with the same number of stages (so the same number of
    maps: every pair the release ships, e.g. resnet32x4 -> resnet8x4 or ShuffleV1/V2,
    wrn_40_2 -> wrn_16_2/wrn_40_1/ShuffleV1, resnet56 -> resnet20, vgg13 -> vgg8/MobileNetV2,
    ResNet50 -> vgg8/MobileNetV2); others are refused by :meth:`check_models` and the
    constructor. The release hard-codes channels and sizes per student; here they come from
    the shapes, which give the release's numbers for its pairs.

    Per sample: HCL is a mean over each sample's own values (:func:`hcl_loss`), so it is
    returned per sample exactly (batch mean = the release's loss) and KDAS reweights it. (The
    ABFs' batch norm mixes samples in the forward pass, as the student's own BN does.)

    Where kdtune differs from the release: sizes are compared and resized per side (height and
    width; the release uses the width and square sizes: the same for square maps); HCL runs in
    float32 with autocast off.
    """

    teacher_logits_only = False  # the teacher's feature maps are needed

    hparams = Schema(
        ce_weight=CE_WEIGHT,
        feat_weight=hp(5.0, ge=0, help="weight of the HCL review loss (pair-specific in the release: 0.6-8)"),
        warmup=hp(20, ge=0, help="epochs of the linear ramp of the review loss"),
        student_preact=hp(False, help="fuse the student's pre-activation stage outputs (the release: post)"),
        max_mid_channels=hp(512, gt=0, help="cap on the ABFs' middle width (else the student's pooled width)"),
    )

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 input_shape: Sequence[int] = (3, 32, 32), **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        s_shapes = review_spots(feature_shapes(student, input_shape), self.student_preact)
        t_shapes = review_spots(feature_shapes(teacher, input_shape), preact=True)
        if len(s_shapes) != len(t_shapes):
            raise ValueError(_pair_problem(type(teacher).__name__, type(student).__name__,
                                           len(t_shapes), len(s_shapes)))
        mid = min(self.max_mid_channels, s_shapes[-1][0])
        last = len(s_shapes) - 1
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=i < last)
                                  for i, (s, t) in enumerate(zip(s_shapes, t_shapes)))
        self.out_sizes = [tuple(t[1:]) for t in t_shapes]

    def warmup_factor(self) -> float:
        # The release ramps linearly from 1/warmup in epoch 1 to 1 at epoch ``warmup``.
        return min(self.epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def review(self, s_maps: Sequence[Tensor]) -> list[Tensor]:
        """The ABF outputs, one per student map (shallow first), computed deepest first."""
        outputs: list[Tensor] = [None] * len(s_maps)  # type: ignore[list-item]
        deeper = None
        for i in reversed(range(len(s_maps))):
            outputs[i], deeper = self.abfs[i](s_maps[i], deeper, self.out_sizes[i])
        return outputs

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        logits, s_features = self.student(x)
        with torch.no_grad():
            _, t_features = self.teacher(x)
        fused = self.review(review_spots(s_features, self.student_preact))
        with no_autocast(x.device):
            hcl = hcl_loss(fused, review_spots(t_features, preact=True))
        scale = self.warmup_factor() * self.feat_weight
        return logits, {"ce": self.ce_weight * self.ce(logits, y), "hcl": scale * hcl}

    @classmethod
    def check_models(cls, teacher: str, student: str, params: dict[str, Any]) -> list[str]:
        t_spots, s_spots = num_stages(teacher), num_stages(student)  # stages after the stem + pooled
        return [] if t_spots == s_spots else [_pair_problem(teacher, student, t_spots, s_spots)]
