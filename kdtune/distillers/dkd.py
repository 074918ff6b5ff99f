"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR'22)."""
from __future__ import annotations

from torch import Tensor

from kdtune.distillers.base import CE_WEIGHT, METHODS, Distiller
from kdtune.distillers.functional import dkd_loss
from kdtune.hparams import Schema, hp


@METHODS.register("dkd")
class DKD(Distiller):
    """``ce_weight * CE + min(epoch / warmup, 1) * kd_weight * (alpha * TCKD + beta * NCKD)``.

    Defaults are mdistiller's (alpha 1, beta 8, T 4, warm-up 20 epochs, CE 1). ``beta`` is
    pair-specific in the reference configs (2, 6 or 8): search it. ``kd_weight`` multiplies
    alpha and beta together, which is how logit standardization's reference scales DKD
    (``--kd-weight``); it is 1 for plain DKD. With ``logit_stand`` the logits are z-scored
    and ``temperature`` is the base temperature.
    """

    teacher_logits_only = True  # the teacher-output cache can serve it

    hparams = Schema(
        alpha=hp(1.0, ge=0, help="weight of TCKD, the target-class term"),
        beta=hp(8.0, ge=0, help="weight of NCKD, the non-target term (pair-specific: 2, 6 or 8)"),
        temperature=hp(4.0, gt=0, help="softmax temperature T (the base temperature with logit_stand)"),
        warmup=hp(20, ge=0, help="epochs of the linear ramp of the distillation terms"),
        ce_weight=CE_WEIGHT,
        kd_weight=hp(1.0, ge=0, help="multiplies alpha and beta together (LS's --kd-weight)"),
        logit_stand=hp(False, help="z-score both logits per sample first (logit standardization)"),
    )

    def warmup_factor(self) -> float:
        # The reference ramps linearly from 1/warmup in epoch 1 to 1 at epoch ``warmup``.
        return min(self.epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)[0]
        teacher = self.teacher_logits(x) if teacher_logits is None else teacher_logits
        temperature = self.current_temperature(logits, teacher)
        tckd, nckd = dkd_loss(logits, teacher, y, self.alpha, self.beta, temperature, self.logit_stand)
        scale = self.warmup_factor() * self.kd_weight
        return logits, {"ce": self.ce_weight * self.ce(logits, y), "tckd": scale * tckd,
                        "nckd": scale * nckd}

    def current_temperature(self, student_logits: Tensor, teacher_logits: Tensor) -> float | Tensor:
        """The batch's temperature: fixed here, learned by CTKD (``kdtune.distillers.ctkd``)."""
        return self.temperature
