"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR'22)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdtune.distillers.base import METHODS, Distiller, check_ranges
from kdtune.distillers.functional import dkd_loss


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

    def __init__(self, student: nn.Module, teacher: nn.Module, *, alpha: float = 1.0,
                 beta: float = 8.0, temperature: float = 4.0, warmup: int = 20,
                 ce_weight: float = 1.0, kd_weight: float = 1.0, logit_stand: bool = False) -> None:
        super().__init__(student, teacher)
        self.alpha, self.beta = alpha, beta
        self.temperature = temperature
        self.warmup = warmup
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.logit_stand = logit_stand

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

    @classmethod
    def check(cls, params: dict[str, Any]) -> list[str]:
        return check_ranges(params, positive=("temperature",),
                            non_negative=("alpha", "beta", "warmup", "ce_weight", "kd_weight"))
