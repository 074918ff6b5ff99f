"""An example plugin: one method, one sample policy, one model and one dataset.

Use it with ``KDTUNE_PLUGINS=kdtune.examples.plugin``::

    KDTUNE_PLUGINS=kdtune.examples.plugin kdtune train --list kd_ramp confidence
    KDTUNE_PLUGINS=kdtune.examples.plugin kdtune train --dataset digits_subset \\
        --teacher tiny_cnn --student tiny_cnn --method kd_ramp --set sampler=confidence --epochs 2

It imports ``kdtune.config`` on purpose: plugins are imported when a name is first looked
up, not while kdtune itself is being imported, so any kdtune module may be imported here.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.config import RunConfig  # noqa: F401  (importable from a plugin: no circular import)
from kdtune.data import DATASETS, RawData, Split, digits
from kdtune.distillers import METHODS
from kdtune.distillers.kd import KD
from kdtune.hparams import Problem, Schema, hp
from kdtune.models import MODELS
from kdtune.models.base import Features
from kdtune.sampling import SAMPLERS, Batch, Sampler


# --------------------------------------------------------------------------- a method

@METHODS.register("kd_ramp")
class KDRamp(KD):
    """KD whose distillation weight ramps linearly from ``ramp_start`` times ``kd_weight`` to
    the full ``kd_weight`` over ``ramp_epochs`` epochs.

    Inherits every KD hyperparameter (``temperature``, ``ce_weight``, ``kd_weight``,
    ``logit_stand``, ``reverse_kl``) and adds two; ``check`` adds a rule across them (KD's
    own rules still apply). Its loss terms are KD's (``ce``, ``kd``: per sample, [B]); a
    sample policy reweights ``kd`` and leaves ``ce`` alone (``unweighted_terms``).
    """

    hparams = Schema(
        ramp_epochs=hp(5, ge=0, help="epochs over which the distillation weight ramps up"),
        ramp_start=hp(0.2, ge=0, le=1, help="share of kd_weight in the first epoch"),
    )

    @classmethod
    def check(cls, params: dict[str, Any]) -> list[Problem]:
        if params["ramp_epochs"] == 0 and params["ramp_start"] != 1.0:
            return [Problem("ramp_start", "must be 1 when ramp_epochs is 0 (there is no ramp)",
                            params["ramp_start"])]
        return []

    def factor(self) -> float:
        if self.ramp_epochs == 0:
            return 1.0
        progress = min(max(self.epoch - 1, 0) / self.ramp_epochs, 1.0)
        return self.ramp_start + (1.0 - self.ramp_start) * progress

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        logits, losses = super().forward(x, y, teacher_logits)
        return logits, {**losses, "kd": self.factor() * losses["kd"]}

    def epoch_metrics(self) -> dict[str, float]:
        # Reaches metrics.jsonl, MLflow and the results table as kd_ramp/factor.
        return {**super().epoch_metrics(), "kd_ramp/factor": self.factor()}


# --------------------------------------------------------------------------- a sample policy

@SAMPLERS.register("confidence")
class Confidence(Sampler):
    """Every sample once per epoch; the distillation terms weighted per sample by the
    teacher's confidence in the label, ``p_t(y) ** power`` (never below ``floor``)."""

    hparams = Schema(
        power=hp(1.0, ge=0, help="exponent of the teacher's probability of the label"),
        floor=hp(0.1, ge=0, le=1, help="smallest weight a sample gets"),
    )

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self._sum, self._count = None, 0

    def batches(self, epoch: int, engine: Any) -> Iterator[Batch]:
        self._sum, self._count = None, 0
        yield from super().batches(epoch, engine)  # every sample; teacher logits: None (the engine asks)

    def needs_teacher_logits(self, epoch: int) -> bool:
        return True

    def weights(self, teacher_logits: Tensor | None, target: Tensor, epoch: int) -> Tensor | None:
        if teacher_logits is None:
            return None
        p = F.softmax(teacher_logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        w = p.pow(self.power).clamp(min=self.floor)
        self._sum = w.sum() if self._sum is None else self._sum + w.sum()  # on the device
        self._count += w.shape[0]
        return w

    def epoch_metrics(self) -> dict[str, float]:
        return {"confidence/mean_weight": self._sum.item() / self._count if self._count else 1.0}


# --------------------------------------------------------------------------- a model

@MODELS.register()
def tiny_cnn(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Two conv stages and a linear head (a model builder takes num_classes and in_channels)."""
    return TinyCNN(num_classes, in_channels)


class TinyCNN(nn.Module):
    """``forward(x) -> (logits, features)``: what every method needs from a model. The
    feature distillers read ``feats`` (stage outputs, stem first) and ``pooled_feat``."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Features]:
        f0 = self.stem(x)
        f1 = self.stage(f0)
        pooled = torch.flatten(F.adaptive_avg_pool2d(f1, 1), 1)
        return self.fc(pooled), Features(feats=[f0, f1], preact_feats=[f0, f1], pooled_feat=pooled)


# --------------------------------------------------------------------------- a dataset

@DATASETS.register("digits_subset")
def digits_subset(*, root: str | None = None, classes: int = 10) -> RawData:
    """scikit-learn's digits restricted to the labels below ``classes`` (a dataset option:
    ``dataset_options: {classes: 5}``). A builder that declares ``root`` receives the run's
    ``data_root`` (unused here: the digits ship with scikit-learn)."""
    raw = digits()
    keep = [s for s in (raw.train, raw.test)]
    train, test = ((Split(s.images[s.labels < classes], s.labels[s.labels < classes])) for s in keep)
    return RawData(train, test, classes, None, None, crop_padding=raw.crop_padding, flip=raw.flip,
                   default_val_size=len(train) // 5)
