"""Sample policies: which training samples an epoch visits and how each is weighted.

The engine asks its policy for the epoch's batches and, per batch, for per-sample weights of
the distillation terms. ``kdas`` (Chae & Heo, "What to Distill? Fast Knowledge Distillation with
Adaptive Sampling", ICCV 2025) is the one policy so far; with no policy the engine visits every
sample once per epoch with weight 1.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.devices import cudnn_autotune
from kdtune.distillers.functional import kl_per_sample
from kdtune.hparams import Configurable, Problem, Schema, hp
from kdtune.registry import Registry

SAMPLERS = Registry("sampler")

Batch = tuple[Tensor, Tensor, Tensor, Tensor, "Tensor | None"]  # images, labels, indices, views, teacher logits


def parse_periods(value: int | str | list | tuple) -> tuple[int, ...]:
    """``sampling_period`` as a tuple: an int, a list, or a string such as ``"1,3,5,10"`` (the
    string form lets a search space offer lists as categorical choices)."""
    if isinstance(value, str):
        value = [int(v) for v in value.replace(" ", "").split(",") if v]
    periods = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    if not periods or any(p < 1 for p in periods):
        raise ValueError(f"sampling_period must be a positive int or a list of them, but got {value!r}")
    return periods


def select(scores: Tensor, batch_size: int, exclusion: float) -> Tensor:
    """Positions kept from one enlarged batch: skip the ceil(n * exclusion) highest scores as
    outliers, keep the next ``batch_size``. As in the released trainer (``N < effective_bs``),
    only a batch smaller than ``batch_size`` is kept whole: one of exactly ``batch_size``
    (sampling ratio 1, or a last enlarged batch of that size) still loses its outliers and
    trains on the ``n - skip`` others."""
    n = scores.shape[0]
    skip = math.ceil(n * exclusion) if n >= batch_size else 0
    if skip == 0 and n <= batch_size:
        return torch.arange(n, device=scores.device)  # nothing to drop: every sample, in order
    return scores.argsort(descending=True)[skip:skip + batch_size]


def teacher_target_divergence(teacher: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """KL(y_smooth || p_t) per sample at T=1, with y_smooth = 1-eps on the label, eps/(C-1) elsewhere."""
    c = teacher.shape[1]
    smooth = torch.full_like(teacher, eps / (c - 1), dtype=torch.float32)
    smooth.scatter_(1, target[:, None], 1 - eps)
    return kl_per_sample(smooth.log(), F.log_softmax(teacher.float(), dim=1))


def penalty_weights(kl_tg: Tensor, threshold: float, strength: float, floor: float) -> Tensor:
    """KDAS's knowledge-quality weights: 1 inside the in-batch band [q_t, q_(1-t)] of the
    teacher-target divergence, falling by ``strength`` per nat outside it, never below ``floor``."""
    # Python-float quantiles: a tensor of them would be a host-to-device copy on every batch.
    lo, hi = torch.quantile(kl_tg, threshold), torch.quantile(kl_tg, 1 - threshold)
    outside = torch.where(kl_tg < lo, lo - kl_tg, torch.where(kl_tg > hi, kl_tg - hi, torch.zeros_like(kl_tg)))
    return (1 - strength * outside).clamp(floor, 1.0)


class Sampler(Configurable):
    """Base of the sample policies: hyperparameters declared in ``hparams`` (see
    :mod:`kdtune.hparams`), taken as keywords by the constructor.

    The engine calls ``batches(epoch, engine)`` (the epoch's batches: images, labels, train
    indices, views (which crop and flip each image got: the teacher-output cache's key), teacher
    logits or None), ``needs_teacher_logits(epoch)``, ``weights(teacher_logits,
    target, epoch)`` (per-sample weights [B] of the distillation terms, or None),
    ``epoch_metrics()``, ``state_dict()`` and ``load_state_dict()``.
    """

    def __init__(self, **hparams: Any) -> None:
        self.set_hparams(hparams)

    # Defaults: every sample once per epoch, weight 1, nothing to log or save.
    def batches(self, epoch: int, engine: Any) -> Iterator[Batch]:
        for x, y, idx, views in engine.loader.batches():
            yield x, y, idx, views, None

    def needs_teacher_logits(self, epoch: int) -> bool:
        return False

    def weights(self, teacher_logits: Tensor | None, target: Tensor, epoch: int) -> Tensor | None:
        return None

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@SAMPLERS.register("none")
class AllSamples(Sampler):
    """No policy: every sample once per epoch, weight 1 (the engine's default path)."""


@SAMPLERS.register("kdas")
class KDAS(Sampler):
    """Adaptive sampling (knowledge quantity) plus the teacher-target penalty (knowledge quality).

    After ``kdas_warmup`` full-data epochs, the sampling ratio follows a cosine from ``start_rate``
    to ``end_rate``. In a scoring epoch (every ``sampling_period`` epochs; a list splits the
    post-warm-up epochs into equal segments with their own period) the data is read in enlarged
    batches of ceil(B / ratio); each sample is scored by KL(p_t || p_s) at T=1, the top
    ``exclusion_rate`` share is skipped as outliers (the rate decays linearly to 0 after 5/8 of
    the run, the released code's epoch 150 of 240) and the next B samples are trained on. The
    union of the selections is cached and the epochs until the next scoring epoch train on it.
    After warm-up every distillation term is weighted per sample by :func:`penalty_weights`
    with strength ``penalty_lambda`` ramped over ``penalty_warmup`` epochs.

    Differences from the released trainer, all intended: scoring runs without autograd and
    with batch-norm running statistics left untouched (batch statistics are still used, as in
    the reference); the selected samples reuse the scoring pass's teacher logits instead of a
    second teacher forward; the selection stays on the device. The penalty applies to every
    per-sample distillation loss (the released code has it in KD only and crashes with DKD).

    Under ``cudnn.benchmark`` (on for CUDA) only steps of the regular batch size are autotuned:
    the scoring passes (whose enlarged size changes with the rate, ~63 sizes in a 240-epoch
    CIFAR-100 run) and short last batches (~16 sizes) use cuDNN's heuristics instead of
    re-tuning every convolution per size. Batches, samples and weights are unchanged.
    """

    hparams = Schema(
        start_rate=hp(0.6, gt=0, le=1, help="share of the data trained on right after the warm-up"),
        end_rate=hp(0.4, gt=0, le=1, help="share at the last epoch (a cosine from start_rate)"),
        sampling_period=hp("1,3,5,10", type=(str, int, list, tuple), parse=parse_periods,
                           help="epochs between scoring epochs; a list splits the run into segments"),
        exclusion_rate=hp(0.0, ge=0, le=1, help="share of the highest-scored samples skipped as outliers"),
        penalty_factor=hp(0.5, ge=0, le=1, help="floor of the knowledge-quality weights"),
        penalty_lambda=hp(1000.0, ge=0, help="fall of the weights per nat outside the band"),
        penalty_warmup=hp(0, ge=0, help="epochs over which the penalty strength ramps up"),
        kdas_warmup=hp(0, ge=0, help="full-data epochs before sampling starts"),
        threshold=hp(0.2, ge=0, le=0.5, help="the band is the in-batch [q_t, q_(1-t)] of the teacher-target KL"),
    )

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.periods = parse_periods(self.sampling_period)
        self.warmup = self.kdas_warmup
        self.cache: Tensor | None = None  # train-split indices selected in the last scoring epoch
        self.samples_scored = 0
        self.ratio = 1.0
        self._scoring = False
        self._weight_sum: Tensor | None = None
        self._weight_count = 0
        # kdtune.distributed.Workers of a data-parallel run, and its device (set by batches())
        self.workers: Any = None
        self._device = torch.device("cpu")

    @classmethod
    def check(cls, params: dict[str, Any]) -> list[Problem]:
        if params["end_rate"] > params["start_rate"]:
            return [Problem("end_rate", f"must be <= start_rate, but got end_rate={params['end_rate']!r}, "
                                        f"start_rate={params['start_rate']!r}")]
        return []

    # ------------------------------------------------------------------ schedule

    def rate(self, epoch: int, epochs: int) -> float:
        if epoch <= self.warmup:
            return 1.0
        span = epochs - self.warmup - 1
        progress = (epoch - self.warmup - 1) / span if span > 0 else 0.0
        return self.end_rate + 0.5 * (self.start_rate - self.end_rate) * (1 + math.cos(math.pi * progress))

    def is_scoring_epoch(self, epoch: int, epochs: int) -> bool:
        if epoch <= self.warmup:
            return False
        e = epoch - self.warmup
        segment = max(1, (epochs - self.warmup) // len(self.periods))
        period = self.periods[min((e - 1) // segment, len(self.periods) - 1)]
        return (e - 1) % period == 0

    def exclusion(self, epoch: int, epochs: int) -> float:
        decay_start = round(150 * epochs / 240)
        if epoch <= decay_start:
            return self.exclusion_rate
        return max(0.0, self.exclusion_rate * (epochs - epoch) / max(1, epochs - decay_start))

    # ------------------------------------------------------------------ engine hooks

    def batches(self, epoch: int, engine: Any) -> Iterator[Batch]:
        epochs, batch_size = engine.recipe.epochs, engine.recipe.batch_size
        self.workers, self._device = engine.workers, engine.device
        self._weight_sum, self._weight_count = None, 0
        self._scoring = self.is_scoring_epoch(epoch, epochs) or (epoch > self.warmup and self.cache is None)
        if epoch <= self.warmup:
            for x, y, idx, views in engine.loader.batches():
                yield x, y, idx, views, None
            return
        # The engine runs each batch's step between this generator's yield and its next resume,
        # so a ``cudnn_autotune`` block around a yield covers that step's forward and backward.
        if not self._scoring:
            for x, y, idx, views in engine.loader.batches(self.cache):
                with cudnn_autotune(y.shape[0] == batch_size):
                    yield x, y, idx, views, None
            return
        self.ratio = self.rate(epoch, epochs)
        enlarged = math.ceil(batch_size / self.ratio)
        exclusion = self.exclusion(epoch, epochs)
        student = engine.distiller.student
        norms = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        selected = []
        if self.workers is not None:
            yield from self._score_data_parallel(engine, norms, enlarged, batch_size, exclusion, selected)
            self.cache = torch.cat(selected)
            return
        for x, y, idx, views in engine.loader.batches(batch_size=enlarged):
            x = x.contiguous(memory_format=engine.memory_format)
            with cudnn_autotune(False):  # the enlarged size follows the rate: a new one most epochs
                student_logits, teacher_logits = self._score_logits(engine, norms, x, idx, views)
            self.samples_scored += y.shape[0]
            scores = kl_per_sample(F.log_softmax(teacher_logits.float(), 1), F.log_softmax(student_logits.float(), 1))
            keep = select(scores, batch_size, exclusion)
            selected.append(idx[keep])
            with cudnn_autotune(keep.shape[0] == batch_size):
                yield x[keep], y[keep], idx[keep], views[keep], teacher_logits[keep]
        self.cache = torch.cat(selected)

    def _score_data_parallel(self, engine: Any, norms: list[nn.Module], enlarged: int, batch_size: int,
                             exclusion: float, selected: list[Tensor]) -> Iterator[Batch]:
        """A scoring epoch on several ranks, selecting what one process selects: every rank draws
        the same enlarged global batch, scores its shard (synchronised BN: the global batch's
        statistics), and gathers the scores and teacher logits; the selection is then made over
        the global batch on every rank alike, and each rank trains on its shard of it."""
        loader, workers = engine.loader, self.workers
        for idx, views in loader.draws(batch_size=enlarged):
            mine, my_views = workers.shard(idx), workers.shard(views)
            x = loader.view_images(mine, my_views).contiguous(memory_format=engine.memory_format)
            with cudnn_autotune(False):
                student_logits, teacher_logits = self._score_logits(engine, norms, x, mine, my_views)
            scores = kl_per_sample(F.log_softmax(teacher_logits.float(), 1), F.log_softmax(student_logits.float(), 1))
            scores, teacher_logits = workers.gather(scores), workers.gather(teacher_logits)
            self.samples_scored += idx.shape[0]
            keep = select(scores, batch_size, exclusion)
            selected.append(idx[keep])
            part = workers.shard(keep)
            with cudnn_autotune(part.shape[0] == batch_size):
                yield (loader.view_images(idx[part], views[part]), loader.labels[idx[part]], idx[part], views[part],
                       teacher_logits[part])

    @staticmethod
    def _score_logits(engine: Any, norms: list[nn.Module], x: Tensor, idx: Tensor,
                      views: Tensor) -> tuple[Tensor, Tensor]:
        """Student and teacher logits without autograd; the student's BN layers (``norms``) use
        batch statistics (as the reference's train-mode forward does) but keep their running ones.
        The teacher's come from the teacher-output cache when the engine has one."""
        student = engine.distiller.student
        saved = [m.momentum for m in norms]
        with torch.no_grad(), engine.autocast():
            for m in norms:
                m.momentum = 0.0  # running stats: (1 - 0) * running + 0 * batch
            try:
                student_logits = student(x)[0]
            finally:
                for m, momentum in zip(norms, saved):
                    m.momentum = momentum
            teacher_logits = engine.teacher_logits(x, idx, views)
        return student_logits, teacher_logits

    def needs_teacher_logits(self, epoch: int) -> bool:
        return epoch > self.warmup

    def weights(self, teacher_logits: Tensor | None, target: Tensor, epoch: int) -> Tensor | None:
        if epoch <= self.warmup or teacher_logits is None:
            return None
        e = epoch - self.warmup
        progress = min(1.0, e / self.penalty_warmup) if self.penalty_warmup > 0 else 1.0
        divergence = teacher_target_divergence(teacher_logits, target)
        if self.workers is not None:  # the band is the global batch's, as in one process
            w = penalty_weights(self.workers.gather(divergence), self.threshold, self.penalty_lambda * progress,
                                self.penalty_factor)
            w = self.workers.shard(w)
        else:
            w = penalty_weights(divergence, self.threshold, self.penalty_lambda * progress, self.penalty_factor)
        total = w.sum()
        self._weight_sum = total if self._weight_sum is None else self._weight_sum + total
        self._weight_count += w.shape[0]
        return w

    def epoch_metrics(self) -> dict[str, float]:
        if self.workers is not None:  # every rank's weights (a collective: every rank calls this)
            weight_sum = self._weight_sum if self._weight_sum is not None else torch.zeros(())
            weight_sum, count = self.workers.sum([weight_sum.to(self._device), torch.tensor(
                float(self._weight_count), device=self._device)])
            self._weight_sum, self._weight_count = weight_sum, int(count.item())
        mean_weight = self._weight_sum.item() / self._weight_count if self._weight_count else 1.0
        return {"kdas/ratio": self.ratio, "kdas/scoring_epoch": float(self._scoring),
                "kdas/cache_size": float(0 if self.cache is None else self.cache.shape[0]),
                "kdas/mean_weight": mean_weight, "samples/scored": float(self.samples_scored)}

    def state_dict(self) -> dict[str, Any]:
        return {"cache": None if self.cache is None else self.cache.cpu(), "samples_scored": self.samples_scored,
                "ratio": self.ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cache = state["cache"]
        self.samples_scored, self.ratio = state["samples_scored"], state["ratio"]
