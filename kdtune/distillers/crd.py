"""CRD: Contrastive Representation Distillation (Tian, Krishnan, Isola; ICLR 2020).

Student and teacher pooled features are embedded (a linear layer each, then L2-normalised)
and contrasted through two memory banks, one row per training image: the student's
embedding is scored against the teacher memory and the teacher's against the student
memory, the row of the image itself being the positive and ``nce_k`` rows of images of
*other* classes the negatives. Both banks are then moved towards the batch's embeddings.

The memory is state: it is sized from the training set the :class:`~kdtune.engine.Engine`
trains on (:meth:`CRD.bind_train_set`, called by the engine for methods with
``needs_indices``) and saved with the rest of the trainable state.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.distillers.base import CE_WEIGHT, METHODS, Distiller
from kdtune.distillers.connectors import feature_shapes, no_autocast
from kdtune.distillers.functional import kd_loss
from kdtune.hparams import Schema, hp

NCE_EPS = 1e-7  # the release's eps in the NCE posteriors


def contrast_scores(anchor: Tensor, memory: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """``exp(<memory[rows[b, j]], anchor[b]> / temperature)``, shape [B, 1 + K] (positive first).

    Every memory row is scored and the wanted ones gathered: B x N dot products (CIFAR: 64 x
    45,000) cost less than gathering B x (1 + K) x D memory values (64 x 16,385 x 128, half a
    gigabyte in float32), as the release does, and give the same numbers. The product keeps a
    copy of the memory for the backward pass (23 MB on CIFAR), since the memory is updated in
    place before the backward runs.
    """
    return torch.exp((anchor @ memory.t().clone()).gather(1, rows) / temperature)


def nce_loss(scores: Tensor, num_data: int) -> Tensor:
    """CRD's NCE loss (the release's ``ContrastLoss``), one value per anchor: with ``P = scores /
    Z`` (positive first, K negatives) and noise ``K * Pn``, ``Pn = 1 / num_data``,
    ``-(log(P_0 / (P_0 + K Pn + eps)) + sum_j log(K Pn / (P_j + K Pn + eps)))``; its batch mean
    is the release's loss."""
    noise = (scores.shape[1] - 1) / num_data
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + NCE_EPS))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + NCE_EPS)).sum(1)
    return -(log_pos + log_neg)


@torch.no_grad()
def momentum_update(memory: Tensor, rows: Tensor, embedding: Tensor, momentum: float) -> None:
    """``memory[rows] <- normalise(momentum * memory[rows] + (1 - momentum) * embedding)``."""
    moved = memory[rows] * momentum + embedding.detach() * (1 - momentum)
    memory.index_copy_(0, rows, moved / moved.pow(2).sum(1, keepdim=True).sqrt())


class Embed(nn.Module):
    """A linear map of the flattened features to ``dim`` values, L2-normalised."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@METHODS.register("crd")
class CRD(Distiller):
    """``ce_weight * CE + feat_weight * (NCE_s + NCE_t) + kd_weight * T^2 KL(p_t(T) || p_s(T))``.

    With embeddings ``e_s = Embed_s(f_s)`` and ``e_t = Embed_t(f_t)`` of the pooled features,
    memories ``M_s``, ``M_t`` (one row per training image) and, for the image at training index
    ``i``, rows ``r = (i, n_1, ..., n_K)``: ``NCE_s`` is :func:`nce_loss` of
    ``exp(<M_t[r], e_s> / nce_temperature) / Z_s`` and ``NCE_t`` that of ``exp(<M_s[r], e_t> /
    nce_temperature) / Z_t``. ``Z_s``, ``Z_t`` are the release's normalisation constants: set
    once, on the first batch, to ``N * mean(exp(...))`` over that batch's scores (N training
    images), then fixed. After the losses, ``M_s[i]`` and ``M_t[i]`` move towards ``e_s``,
    ``e_t`` with ``nce_momentum`` and are renormalised. The memories start uniform in
    ``±1 / sqrt(feat_dim / 3)``, drawn from the CPU generator (the same on any device).

    Negatives (the release's ``CIFAR100InstanceSample``, mode ``"exact"``): the positive is the
    image itself; the ``nce_k`` negatives are drawn uniformly among the training images of other
    classes, without replacement when that class has at least ``nce_k`` of them (CIFAR-100:
    ~44,500 >= 16,384), with replacement otherwise, as the release. They are drawn on the
    device, per batch, from torch's default generator of that device (random keys and a top-k,
    or random integers): no host sync, and seeded by the run's seed. The engine's checkpoint
    holds that generator's state (``torch_rng``, ``cuda_rng``), so a resumed run draws the
    same negatives.

    Defaults are mdistiller's CIFAR-100 CRD (``CFG.CRD``: CE 1, feature weight 0.8, 128-d
    embeddings, K 16384, temperature 0.07, momentum 0.5), which are RepDistiller's
    (``train_student.py``; ``-r 1 -a 0 -b 0.8``). Neither has a KD term in CRD alone:
    ``kd_weight`` 0 here; RepDistiller's "CRD+KD" is ``kd_weight: 1`` (``-a 1``, ``kd_T`` 4).

    Per sample: the NCE value of each anchor, summed over the two directions, is returned per
    sample; its batch mean is the release's loss. KDAS may reweight it, and it does: the memory
    rows and the constants Z are detached (the release's too), so an anchor's term sends
    gradient only to its own embedding (and the heads), and a weight scales exactly that
    sample's share. What a weight does not touch is the memory update, which moves each row
    with its sample's embedding whatever the weight, as the release's update does; rows of
    samples KDAS does not select in an epoch keep their older embeddings until they are seen.

    Where kdtune differs from the release: the negatives come from the device's generator in
    the training step, not from NumPy in the data loader (same distribution); the memory has one
    row per image of the split kdtune trains on (45,000 CIFAR-100 images in a search, 50,000 in
    a final run; the release: 50,000), and ``Pn`` is 1 / that count; Z is set on the device
    without a host read; embeddings and NCE run in float32 with autocast off (``exp(s / 0.07)``
    reaches 1.6e6); scores are a product with the whole memory, gathered (same values).
    """

    needs_indices = True  # the engine passes each batch's training-set indices (memory rows)
    teacher_logits_only = False  # the teacher's pooled features are needed

    hparams = Schema(
        ce_weight=CE_WEIGHT,
        feat_weight=hp(0.8, ge=0, help="weight of the contrastive term (both directions)"),
        kd_weight=hp(0.0, ge=0, help="weight of a KD term on the logits (1: RepDistiller's CRD+KD)"),
        temperature=hp(4.0, gt=0, help="softmax temperature of the KD term"),
        feat_dim=hp(128, gt=0, help="width of the embeddings and memory rows"),
        nce_k=hp(16384, gt=0, help="negatives per anchor, drawn from the other classes' images"),
        nce_temperature=hp(0.07, gt=0, help="temperature of the contrastive scores exp(<m, e> / t)"),
        nce_momentum=hp(0.5, ge=0, lt=1, help="momentum of the memory update"),
    )

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 input_shape: Sequence[int] = (3, 32, 32), **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        s_dim = math.prod(feature_shapes(student, input_shape)["pooled_feat"])
        t_dim = math.prod(feature_shapes(teacher, input_shape)["pooled_feat"])
        self.embed_s = Embed(s_dim, self.feat_dim)
        self.embed_t = Embed(t_dim, self.feat_dim)
        # Empty until bind_train_set sizes them, so the state-dict keys exist from the start.
        self.register_buffer("memory_s", torch.empty(0, self.feat_dim))
        self.register_buffer("memory_t", torch.empty(0, self.feat_dim))
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z_s, Z_t; < 0: not set yet
        # The negative sampler's tables: derived from the labels, so rebuilt, not saved.
        for name in ("labels", "by_class", "class_start", "class_count", "replaced"):
            self.register_buffer(name, torch.empty(0, dtype=torch.long), persistent=False)
        self.sampling = "unbound"

    # ------------------------------------------------------------------ the training set

    def bind_train_set(self, labels: Tensor) -> None:
        """Size the memory (one row per training image, fresh rows, Z unset) and the negative
        sampler from the labels of the split being trained on, in training-index order."""
        labels = labels.detach().reshape(-1).long().cpu()
        n, dim = labels.numel(), self.feat_dim
        count = torch.bincount(labels)
        present = count > 0
        if int(present.sum()) < 2:
            raise ValueError("crd draws its negatives from other classes: the training set needs images "
                             "of at least two classes")
        # Without replacement where a class has enough negatives, with it elsewhere (the release).
        replaced = ((n - count) < self.nce_k) & present
        self.sampling = ("without" if not replaced.any() else
                         "with" if bool(replaced[present].all()) else "mixed")
        device = self.normalizers.device
        stdv = 1.0 / math.sqrt(dim / 3)
        self.memory_s = (torch.rand(n, dim) * (2 * stdv) - stdv).to(device)
        self.memory_t = (torch.rand(n, dim) * (2 * stdv) - stdv).to(device)
        self.normalizers = torch.full((2,), -1.0, device=device)
        self.labels = labels.to(device)
        self.by_class = torch.argsort(labels, stable=True).to(device)
        self.class_start = (torch.cumsum(count, 0) - count).to(device)
        self.class_count = count.to(device)
        self.replaced = replaced.to(device)

    @property
    def num_data(self) -> int:
        return self.memory_s.shape[0]

    def draw_negatives(self, target: Tensor) -> Tensor:
        """``nce_k`` training indices of other-class images per sample, [B, K] (see the class doc)."""
        b, n, k = target.shape[0], self.num_data, self.nce_k
        draws = []
        if self.sampling in ("without", "mixed"):
            # k distinct: the k smallest of uniform keys, own-class images keyed out of reach.
            keys = torch.rand(b, n, device=target.device)
            keys = keys.masked_fill(self.labels[None, :] == target[:, None], 2.0)
            draws.append(keys.topk(k, dim=1, largest=False, sorted=False).indices)
        if self.sampling in ("with", "mixed"):
            # Uniform over the n - count other-class positions of the class-sorted order.
            start, count = self.class_start[target][:, None], self.class_count[target][:, None]
            r = torch.randint(0, 2**62, (b, k), device=target.device) % (n - count)
            draws.append(self.by_class[r + count * (r >= start)])
        if self.sampling == "mixed":
            return torch.where(self.replaced[target][:, None], draws[1], draws[0])
        return draws[0]

    # ------------------------------------------------------------------ the loss

    def contrastive(self, f_s: Tensor, f_t: Tensor, indices: Tensor, negatives: Tensor) -> Tensor:
        """``NCE_s + NCE_t`` per sample for pooled features ``f_s``, ``f_t``, training indices
        ``indices`` [B] and ``negatives`` [B, K]; then Z (if unset) and the memory are updated."""
        with no_autocast(f_s.device):
            e_s = self.embed_s(f_s.float())
            e_t = self.embed_t(f_t.detach().float())
            rows = torch.cat([indices[:, None], negatives], 1)
            scores_s = contrast_scores(e_s, self.memory_t, rows, self.nce_temperature)
            scores_t = contrast_scores(e_t, self.memory_s, rows, self.nce_temperature)
            first = torch.stack([scores_s.mean(), scores_t.mean()]).detach() * self.num_data
            z = torch.where(self.normalizers < 0, first, self.normalizers)
            loss = nce_loss(scores_s / z[0], self.num_data) + nce_loss(scores_t / z[1], self.num_data)
            with torch.no_grad():
                self.normalizers.copy_(z)
                momentum_update(self.memory_s, indices, e_s, self.nce_momentum)
                momentum_update(self.memory_t, indices, e_t, self.nce_momentum)
        return loss

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None,
                indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if indices is None:
            raise ValueError("crd needs each batch's training-set indices (forward(..., indices=)): its memory "
                             "has one row per training image; kdtune's Engine passes them")
        if self.sampling == "unbound":
            raise RuntimeError("crd: no training set bound; call bind_train_set(labels) first "
                               "(kdtune's Engine does, with the labels of the split it trains on)")
        logits, s_features = self.student(x)
        with torch.no_grad():
            t_logits, t_features = self.teacher(x)
        crd = self.contrastive(s_features["pooled_feat"], t_features["pooled_feat"], indices,
                               self.draw_negatives(y))
        losses = {"ce": self.ce_weight * self.ce(logits, y), "crd": self.feat_weight * crd}
        if self.kd_weight > 0:
            losses["kd"] = self.kd_weight * kd_loss(logits, t_logits, self.temperature)
        return logits, losses
