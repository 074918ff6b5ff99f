"""CTKD: Curriculum Temperature for KD (Li et al., AAAI'23), global and instance-wise.

The distillation temperature becomes learnable and is trained *adversarially*: the student
minimises the distillation loss, the temperature module maximises it through a gradient
reversal layer whose strength lambda follows an easy-to-hard curriculum. CTKD is a
temperature provider: ``ctkd`` puts it under KD and ``ctkd_dkd`` under DKD, both with
logit standardization as a switch, and both work with the KDAS sampler.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdtune.distillers.base import METHODS
from kdtune.distillers.dkd import DKD
from kdtune.distillers.kd import KD
from kdtune.hparams import Configurable, Schema, hp

CURRICULA = ("cosine", "linear", "constant", "linear_released")
TEMPERATURE_MODES = ("global", "instance")


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lambda_ * grad, None


def gradient_reversal(x: Tensor, lambda_: float) -> Tensor:
    """Identity forward; the gradient times ``-lambda_`` backward (Ganin & Lempitsky, 2015).

    The released CTKD code keeps the sign in lambda (running 0 -> -1) and multiplies by it;
    here lambda is the paper's non-negative strength and the layer carries the sign. The
    updates are the same.
    """
    return _GradientReversal.apply(x, lambda_)


def curriculum_lambda(epoch: int, curriculum_epochs: int, lambda_max: float = 1.0,
                      shape: str = "cosine") -> float:
    """Reversal strength for 1-based ``epoch``: a ramp from 0 to ``lambda_max`` over
    ``curriculum_epochs``, then flat.

    ``cosine`` is the reference (``CosineDecay`` with decay_max 0, decay_min -1, loops 10:
    |lambda| = 0.0245 at epoch 1, 1 from epoch 10). ``linear`` ramps linearly to
    ``lambda_max``. ``linear_released`` is the released ``LinearDecay``, kept for
    comparison: it ignores its lower bound and clamps the step at ``loops - 1``, so it tops
    out at 0.9 * lambda_max (a bug; ``linear`` is the intended schedule).
    """
    n = min(epoch, curriculum_epochs)
    if shape == "cosine":
        return lambda_max * (1.0 - math.cos(math.pi * n / curriculum_epochs)) / 2.0
    if shape == "linear":
        return lambda_max * n / curriculum_epochs
    if shape == "linear_released":
        return lambda_max * min(epoch, curriculum_epochs - 1) / curriculum_epochs
    if shape == "constant":
        return lambda_max
    raise ValueError(f"curriculum must be one of {CURRICULA}, got {shape!r}")


class CurriculumTemperature(nn.Module):
    """The learnable temperature: ``T = t_start + t_end * sigmoid(GRL(theta, lambda))``.

    ``global``: one parameter theta (reference init 1.0, so T starts at 1 + 20 * 0.731 = 15.6).
    ``instance``: theta per sample from a 2-layer MLP on the concatenated teacher and student
    logits (the released module is not public; its width is a hyperparameter). The MLP's
    inputs are detached, so the student learns only through the KL term, not by steering its
    own temperature; its last layer starts at zero weight and bias ``theta_init``, so every
    sample starts at the global initial temperature. A LayerNorm on the inputs keeps the MLP
    blind to the logits' overall scale, which grows as training goes: without it (or with a
    BatchNorm in the hidden layer) every per-sample temperature hit the upper bound within
    two epochs on digits; with it they stay inside (mean 8, min 4, max 12 after 12 epochs).

    It also accumulates, on the device, the mean/min/max of the temperatures it produced
    since :meth:`reset_stats`.
    """

    def __init__(self, mode: str, num_classes: int, *, t_start: float, t_end: float,
                 theta_init: float, hidden: int) -> None:
        super().__init__()
        self.mode = mode
        self.t_start, self.t_end = t_start, t_end
        self.lambda_ = 0.0
        if mode == "global":
            self.theta = nn.Parameter(torch.full((), float(theta_init)))
        else:
            self.mlp = nn.Sequential(nn.LayerNorm(2 * num_classes), nn.Linear(2 * num_classes, hidden),
                                     nn.ReLU(inplace=True), nn.Linear(hidden, 1))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.constant_(self.mlp[-1].bias, float(theta_init))
        self._stats: tuple[Tensor, Tensor, Tensor] | None = None
        self._count = 0

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """A scalar temperature (global) or one per sample ([B], instance)."""
        if self.mode == "global":
            theta = self.theta
        else:
            inputs = torch.cat([teacher_logits, student_logits], dim=1).detach().float()
            # fp32 under bf16 autocast too: a learned control signal, cheap, and bf16's 8-bit
            # mantissa would quantise the temperatures it sets.
            with torch.autocast(inputs.device.type, enabled=False):
                theta = self.mlp(inputs).squeeze(1)
        temperature = self.t_start + self.t_end * torch.sigmoid(gradient_reversal(theta, self.lambda_))
        self._accumulate(temperature.detach())
        return temperature

    def _accumulate(self, t: Tensor) -> None:
        t = t.reshape(-1)
        if self._stats is None:
            self._stats = (t.sum(), t.min(), t.max())
        else:
            total, low, high = self._stats
            self._stats = (total + t.sum(), torch.minimum(low, t.min()), torch.maximum(high, t.max()))
        self._count += t.numel()

    def reset_stats(self) -> None:
        self._stats, self._count = None, 0

    def stats(self) -> dict[str, float]:
        """Mean/min/max temperature since the last reset (host reads: call once per epoch)."""
        if self._stats is None:
            return {}
        total, low, high = (s.item() for s in self._stats)
        return {"temperature": total / self._count, "temperature_min": low, "temperature_max": high}


def _num_classes(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"CTKD's instance temperature needs the student's classifier (its last "
                         f"nn.Linear); {type(model).__name__} has none")
    return linears[-1].out_features


class _CurriculumTemperatureMixin(Configurable):
    """What CTKD adds to a logit distiller: the module, its curriculum, its optimizer group
    and its metrics. The distiller asks :meth:`current_temperature` for each batch; the fixed
    ``temperature`` of the distiller below is no hyperparameter here."""

    hparams = Schema(
        temperature_mode=hp("global", choices=TEMPERATURE_MODES,
                            help="one learned temperature, or one per sample from a small MLP"),
        t_start=hp(1.0, gt=0, help="lower bound of the learned temperature"),
        t_end=hp(20.0, gt=0, help="width of its range: T = t_start + t_end * sigmoid(theta)"),
        theta_init=hp(1.0, help="initial theta (global), or the MLP's initial output (instance)"),
        curriculum=hp("cosine", choices=CURRICULA, help="shape of the reversal strength's ramp"),
        curriculum_epochs=hp(10, gt=0, help="epochs until the reversal strength reaches lambda_max"),
        lambda_max=hp(1.0, ge=0, help="final strength of the gradient reversal"),
        temperature_lr_scale=hp(1.0, ge=0, help="the temperature's learning rate relative to the student's"),
        temperature_hidden=hp(128, gt=0, help="hidden width of the instance-mode MLP"),
    )
    drop_hparams = ("temperature",)

    def __init__(self, student: nn.Module, teacher: nn.Module, **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        num_classes = _num_classes(self.student) if self.temperature_mode == "instance" else 0
        self.ctkd = CurriculumTemperature(self.temperature_mode, num_classes, t_start=self.t_start,
                                          t_end=self.t_end, theta_init=self.theta_init,
                                          hidden=self.temperature_hidden)

    def current_temperature(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return self.ctkd(student_logits, teacher_logits)

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        self.ctkd.lambda_ = curriculum_lambda(epoch, self.curriculum_epochs, self.lambda_max,
                                              self.curriculum)
        self.ctkd.reset_stats()

    def param_groups(self) -> list[dict[str, Any]]:
        # The temperature shares the student's SGD (momentum, weight decay, schedule) as in the
        # reference; only its learning rate can be scaled.
        return self.groups_apart(self.ctkd, lr_scale=self.temperature_lr_scale)

    def epoch_metrics(self) -> dict[str, float]:
        metrics = {"ctkd/lambda": self.ctkd.lambda_}
        metrics.update({f"ctkd/{k}": v for k, v in self.ctkd.stats().items()})
        return metrics


@METHODS.register("ctkd")
class CTKD(_CurriculumTemperatureMixin, KD):
    """KD with a curriculum temperature: ``ce_weight * CE + kd_weight * T^2 * KL`` with learned T.

    Defaults are the reference's (CE 0.1, KD 0.9, t_start 1, t_end 20, theta 1, cosine
    curriculum over 10 epochs up to lambda 1). With ``logit_stand`` the learned T divides the
    standardized logits (the LS repository's CTKD). ``temperature_lr_scale`` scales the
    temperature's learning rate relative to the student's (1: the reference's shared SGD).
    """


@METHODS.register("ctkd_dkd")
class CTDKD(_CurriculumTemperatureMixin, DKD):
    """DKD with a curriculum temperature (the reference passes the learned T into DKD).

    DKD's own defaults (alpha 1, beta 8, warm-up 20, CE 1) and CTKD's as in ``ctkd``. The
    reference reports that DKD + CTKD can go NaN in the first iterations. The cause is
    NCKD's ``kl_div`` once T is learned: the teacher target ``softmax(t/T - 1000 * gt_mask)``
    now needs a gradient, and it is exactly 0 at the masked class, where ``kl_div``'s gradient
    with respect to its target is 0 x log 0 = NaN. So the temperature's gradient is NaN at
    every T, from the first step (measured on the released ``DKDloss``; TCKD's part stays
    finite, and detaching that target removes the NaN). kdtune's per-sample KL takes no log of
    a target probability, so the gradient through the teacher's side is finite.
    """
