"""DIST: Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdtune.distillers.base import CE_WEIGHT, METHODS, Distiller
from kdtune.hparams import Schema, hp


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of the rows of ``a`` and ``b`` (one value per row); ``eps`` is added
    to the product of the norms, as in the release, so a constant row gives 0, not NaN."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """DIST's two relations, each times T^2: ``(inter [B], intra [])``.

    ``y = softmax(z / T)``; inter-class: ``1 - pearson(y_s[i], y_t[i])`` for each sample (across
    the classes); intra-class: ``1 - mean_c pearson(y_s[:, c], y_t[:, c])`` (each class across
    the batch), one value for the batch. Computed in float32.
    """
    y_s = F.softmax(student.float() / temperature, dim=1)
    y_t = F.softmax(teacher.float() / temperature, dim=1)
    inter = 1 - pearson(y_s, y_t)
    intra = 1 - pearson(y_s.t(), y_t.t()).mean()
    scale = temperature**2
    return scale * inter, scale * intra


@METHODS.register("dist")
class DIST(Distiller):
    """``ce_weight * CE + beta * T^2 * inter + gamma * T^2 * intra``.

    ``inter`` is one minus the Pearson correlation, across classes, of each sample's
    ``softmax(z_s / T)`` and ``softmax(z_t / T)``; ``intra`` is one minus the mean over classes
    of the correlation, across the batch, of each class's probabilities. ``inter`` is per
    sample; ``intra`` is batch-level: it is returned broadcast to [B] and listed in
    ``unweighted_terms``, so a sample policy (KDAS) leaves it unweighted.

    Defaults: the release's CIFAR-100 setting (hunto/image_classification_sota @ d9662f7, the
    ``classification`` submodule of hunto/DIST_KD): ``configs/strategies/distill/dist_cifar.yaml``
    sets ``kd: dist_t4`` (T 4), ``ori_loss_weight: 1`` (CE 1) and ``kd_loss_weight: 2``, and
    ``lib/models/losses/kd_loss.py`` builds ``DIST(beta=1, gamma=1, tau=4)`` for it, so the
    effective weights are beta = gamma = 2 (kdtune has no separate ``kd_loss_weight``: it only
    multiplies both). The release's ImageNet setting (``resnet_dist.yaml``, ``kd: dist``) is
    T 1 with the same weights. The teacher is used only through its logits; the relations are
    computed in float32 (the release: in the logits' dtype).
    """

    teacher_logits_only = True  # the teacher-output cache can serve it
    unweighted_terms = ("ce", "intra")  # intra is one value for the batch: not a per-sample signal

    hparams = Schema(
        beta=hp(2.0, ge=0, help="weight of the inter-class relation (per sample)"),
        gamma=hp(2.0, ge=0, help="weight of the intra-class relation (batch-level; KDAS leaves it unweighted)"),
        temperature=hp(4.0, gt=0, help="softmax temperature tau of both networks' probabilities"),
        ce_weight=CE_WEIGHT,
    )

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)[0]
        teacher = self.teacher_logits(x) if teacher_logits is None else teacher_logits
        inter, intra = dist_loss(logits, teacher, self.temperature)
        return logits, {"ce": self.ce_weight * self.ce(logits, y), "inter": self.beta * inter,
                        "intra": (self.gamma * intra).expand(logits.shape[0])}
