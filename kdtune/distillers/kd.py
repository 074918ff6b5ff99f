"""KD (Hinton et al., 2015), with logit standardization (Sun et al., CVPR'24) as a switch."""
from __future__ import annotations

from torch import Tensor

from kdtune.distillers.base import CE_WEIGHT, METHODS, Distiller
from kdtune.distillers.functional import kd_loss
from kdtune.hparams import Schema, hp


@METHODS.register("kd")
class KD(Distiller):
    """``ce_weight * CE + kd_weight * T^2 * KL(p_t(T) || p_s(T))``.

    Defaults are mdistiller's vanilla KD (T 4, CE 0.1, KD 0.9). With ``logit_stand=True``
    both logits are z-scored per sample first and ``temperature`` is the paper's *base*
    temperature (LS's settings: temperature 2, kd_weight 9). ``reverse_kl`` computes
    KL(p_s || p_t), the form the released KDAS code uses (a bug there: every other reference,
    and kdtune by default, use the forward KL).
    """

    teacher_logits_only = True  # the teacher-output cache can serve it

    hparams = Schema(
        temperature=hp(4.0, gt=0, help="softmax temperature T (the base temperature with logit_stand)"),
        ce_weight=CE_WEIGHT.but(0.1),
        kd_weight=hp(0.9, ge=0, help="weight of the distillation term"),
        logit_stand=hp(False, help="z-score both logits per sample first (logit standardization)"),
        reverse_kl=hp(False, help="KL(p_s || p_t), the released KDAS code's form (a bug there)"),
    )

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)[0]
        teacher = self.teacher_logits(x) if teacher_logits is None else teacher_logits
        temperature = self.current_temperature(logits, teacher)
        kd = kd_loss(logits, teacher, temperature, self.logit_stand, reverse=self.reverse_kl)
        return logits, {"ce": self.ce_weight * self.ce(logits, y), "kd": self.kd_weight * kd}

    def current_temperature(self, student_logits: Tensor, teacher_logits: Tensor) -> float | Tensor:
        """The batch's temperature: fixed here, learned by CTKD (``kdtune.distillers.ctkd``)."""
        return self.temperature
