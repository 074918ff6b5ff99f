"""WTTM: Knowledge Distillation Based on Transformed Teacher Matching (Zheng & Yang, ICLR 2024)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.distillers.base import CE_WEIGHT, METHODS, Distiller
from kdtune.distillers.functional import kl_logits
from kdtune.hparams import Schema, hp


def wttm_loss(student: Tensor, teacher: Tensor, gamma: float) -> Tensor:
    """``U_gamma(p_t) * KL(p_t^gamma / U_gamma(p_t) || softmax(z_s))`` per sample, [B].

    ``p_t = softmax(z_t)``, ``U_gamma(p_t) = sum_c p_t[c]^gamma`` (the power sum). The
    transformed teacher ``p_t^gamma / U`` is ``softmax(gamma * z_t)``, teacher temperature
    ``1 / gamma``, so the KL is taken from logits (:func:`kl_logits`, precise in float32) and
    ``U`` from ``logsumexp(gamma * log p_t)``: no probability is raised to a power, so none
    underflows to 0 first. The student is at temperature 1. ``U`` depends on the teacher alone
    and carries no gradient.
    """
    s, t = student.float(), teacher.float().detach()
    weight = torch.logsumexp(gamma * F.log_softmax(t, dim=1), dim=1).exp()
    return weight * kl_logits(gamma * t, s)


@METHODS.register("wttm")
class WTTM(Distiller):
    """``ce_weight * CE + beta * U_gamma(p_t) * KL(p_t^gamma / U_gamma(p_t) || p_s)``, per sample.

    Transformed teacher matching: the teacher's probabilities are power-transformed
    (``p_t^gamma``, renormalised: a teacher temperature of ``1 / gamma``) and the student, at
    temperature 1, matches them; WTTM weights each sample by the power sum
    ``U_gamma(p_t) = sum_c p_t^gamma``, which is larger for a smoother teacher distribution.
    The weight is not normalised over the batch and the loss is the batch mean of
    ``U * KL``, exactly as the release (zkxufo/TTM @ fe457b3, ``distiller_zoo/wttm.py``;
    ``helper/loops.py`` adds ``-r * CE + -b * loss``). The term is per sample, so KDAS
    reweights it.

    Defaults: ``gamma`` 0.2 and ``beta`` 4 are the release's only WTTM setting (README: ``--add
    wttm --ttm_l 0.2 -a 4``, WTTM beside CRD); its TTM example is ``--ttm_l 0.1 -b 45``
    (vgg13 -> vgg8, no weight). ``ce_weight`` 1 is ``train_student.py``'s ``-r`` default. The
    paper tunes gamma and beta per pair (its appendix A.4), which the release does not ship:
    search them. The teacher is used only through its logits.
    """

    teacher_logits_only = True  # the teacher-output cache can serve it

    hparams = Schema(
        gamma=hp(0.2, gt=0, help="power of the teacher's probabilities (1 / its temperature; the release's --ttm_l)"),
        beta=hp(4.0, ge=0, help="weight of the weighted transformed-teacher term"),
        ce_weight=CE_WEIGHT,
    )

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)[0]
        teacher = self.teacher_logits(x) if teacher_logits is None else teacher_logits
        return logits, {"ce": self.ce_weight * self.ce(logits, y),
                        "wttm": self.beta * wttm_loss(logits, teacher, self.gamma)}
