"""The distiller interface: a student, a frozen teacher and per-sample loss terms."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.hparams import Configurable, Problem, hp
from kdtune.registry import Registry

METHODS = Registry("method")
# The label loss's weight, which most methods take (each with its reference's default).
CE_WEIGHT = hp(1.0, ge=0, help="weight of the cross-entropy label loss")


class Distiller(Configurable, nn.Module):
    """Base class of every method.

    ``forward(x, y, teacher_logits=None)`` returns ``(student_logits, losses)`` where ``losses`` maps a term name
    to a per-sample tensor [B], already multiplied by its weight. The engine minimises
    ``sum(term.mean())``. The term named ``"ce"`` is the label loss; every other term is a
    distillation term, which is what a sample-weighting policy (KDAS) reweights. Teacher logits
    a sample policy already computed for the batch are passed in so the teacher runs once.

    Extension points, and the only ones the engine calls:
      * :meth:`on_epoch_start` -- warm-ups and curricula (DKD's warm-up, CTKD's lambda);
      * trainable parameters other than the student's (connectors, a learnable temperature,
        a policy net) are registered as submodules/parameters; the optimizer takes every
        parameter with ``requires_grad`` -- the teacher's are frozen here;
      * :meth:`param_groups` for parameters that need their own optimizer settings.

    Hyperparameters are declared once, in ``hparams`` (a :class:`~kdtune.hparams.Schema`;
    subclasses inherit and extend it); the constructor takes them as keywords
    (``**hparams``) and sets one attribute per hyperparameter.
    """

    needs_teacher = True
    # True when the method uses the teacher only through its logits (``teacher_logits`` passed
    # to forward, or ``self.teacher_logits(x)``): then the engine may serve them from the exact
    # teacher-output cache (kdtune.teacher_cache) instead of running the teacher. Methods that
    # read teacher features or run teacher blocks (feature distillers, SAKD) keep False.
    teacher_logits_only = False
    # Terms a sample policy (KDAS) leaves unweighted: the label loss, and batch-level terms
    # that are not a per-sample distillation signal (SAKD's routing loss).
    unweighted_terms: tuple[str, ...] = ("ce",)
    # A method with a memory over the training set (CRD): the engine calls
    # ``bind_train_set(labels)`` with the labels of the split it trains on, and passes each
    # batch's training-set indices to ``forward`` as ``indices=``.
    needs_indices = False
    # A method that also trains on a strongly augmented view of each image (MLKD) names the
    # augmentation, ``f(pixels, generator) -> pixels``; only then does the loader make that view,
    # and ``forward`` gets it as ``strong=``.
    strong_view: Callable[[Tensor, torch.Generator], Tensor] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        clashes = [n for n in cls.hparams if hasattr(nn.Module, n)]
        if clashes:
            raise TypeError(f"{cls.__name__}: hyperparameter {clashes[0]!r} would hide nn.Module.{clashes[0]}")

    def __init__(self, student: nn.Module, teacher: nn.Module | None, **hparams: Any) -> None:
        super().__init__()
        self.set_hparams(hparams)
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.epoch = 0

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen BN statistics, whatever the student's mode
        return self

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Called before each epoch (1-based)."""
        self.epoch = epoch

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups. A group may carry ``lr_scale`` (relative to the run's lr)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def groups_apart(self, module: nn.Module, **settings: Any) -> list[dict[str, Any]]:
        """Two groups: ``module``'s parameters with ``settings`` (e.g. ``lr_scale``,
        ``weight_decay``), and every other trainable parameter with the run's settings."""
        apart = [p for p in module.parameters() if p.requires_grad]
        ids = {id(p) for p in apart}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": apart, **settings}]

    def epoch_metrics(self) -> dict[str, float]:
        """Method-specific values to log at the end of an epoch (e.g. CTKD's temperature)."""
        return {}

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        assert self.teacher is not None
        return self.teacher(x)[0]

    def student_state_dict(self) -> dict[str, Tensor]:
        return self.student.state_dict()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Everything but the (frozen) teacher: what a checkpoint needs."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"distiller state mismatch: missing {missing}, unexpected {unexpected}")

    def ce(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), target, reduction="none")

    @classmethod
    def check_models(cls, teacher: str, student: str, params: dict[str, Any]) -> list[Problem | str]:
        """Problems with this teacher-student pair (by model name), found before any work starts;
        ``params`` holds every hyperparameter (defaults filled in)."""
        return []


@METHODS.register("none")
class Vanilla(Distiller):
    """The student trained on labels alone: the baseline every search compares against."""

    needs_teacher = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__(student, None)

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)[0]
        return logits, {"ce": self.ce(logits, y)}

