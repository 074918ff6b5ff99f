"""Feature distillers: AT, FitNet, NST, VID (per sample) and SP, PKT, RKD, CC (relational).

Two layers, so that SAKD can reuse the losses with its own gates:

* **Loss modules**, registered in ``FEATURE_LOSSES`` under lower-case names. Each class says
  where it distils (``spot``), its default weights and whether its loss splits over samples:

  - ``spot``: ``"stages"`` (``feats[1:]``, every stage after the stem, paired from the first
    one up to the shorter model's count, as mdistiller's ``zip`` does), ``"hint"`` (the one
    stage ``feats[hint_layer]``), ``"last"`` (``feats[-1]``) or ``"pooled"`` (``pooled_feat``);
  - ``weight``: the standalone feature-loss weight (mdistiller's ``cfg.py`` defaults; CC's,
    which mdistiller lacks, from CRD's scripts);
  - ``sakd_weight`` / ``sakd_gamma``: SA's ``other_kd`` and ``classify_weight``;
  - ``per_sample``: ``True`` when the reference loss is a mean of per-sample values (the batch
    mean of the returned tensor is then the reference loss); ``False`` for relational
    losses, whose one batch value is returned broadcast to ``[B]``.

  ``loss(s_feats, t_feats)`` takes the spot tensors (``loss.select(features)``) and returns one
  unweighted per-sample tensor ``[B]`` per spot, computed in float32 with autocast off (the
  inputs may be bf16). Teacher features are detached. ``build_feature_loss`` builds one from
  the two models' ``feature_shapes``.

* **Standalone methods** in ``METHODS`` (``at``, ``fitnet``, ``nst``, ``vid``, ``sp``, ``pkt``,
  ``rkd``, ``cc``): ``ce_weight * CE + feat_weight * sum over spots``; terms ``"ce"`` and ``"feat"``.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.distillers.base import CE_WEIGHT, METHODS, Distiller
from kdtune.distillers.connectors import ConvReg, feature_shapes, no_autocast
from kdtune.hparams import Configurable, Schema, hp
from kdtune.models.base import Features
from kdtune.registry import Registry

FEATURE_LOSSES = Registry("feature loss")
SPOTS = ("stages", "hint", "last", "pooled")
DEFAULT_HINT_LAYER = 2  # mdistiller's FITNET.HINT_LAYER; SA's FitNet spot is also feats[2]


def spot_indices(spot: str, num_feats: int, hint_layer: int = DEFAULT_HINT_LAYER) -> list[int]:
    """The indices into ``features["feats"]`` of a spatial spot (not ``"pooled"``)."""
    if spot == "stages":
        return list(range(1, num_feats))
    if spot == "hint":
        if not 0 <= hint_layer < num_feats:
            raise IndexError(f"hint_layer {hint_layer} out of range: the model has {num_feats} "
                             f"feature maps (0 is the stem)")
        return [hint_layer]
    if spot == "last":
        return [num_feats - 1]
    raise ValueError(f"no feature-map indices for spot {spot!r}; spatial spots: "
                     f"{', '.join(s for s in SPOTS if s != 'pooled')}")


def spot_features(features: Features, spot: str, hint_layer: int = DEFAULT_HINT_LAYER) -> list[Any]:
    """The entries of ``features`` (tensors, or ``torch.Size`` from ``feature_shapes``) a spot uses."""
    if spot == "pooled":
        return [features["pooled_feat"]]
    if spot not in SPOTS:
        raise ValueError(f"unknown spot {spot!r}; known: {', '.join(SPOTS)}")
    feats = features["feats"]
    return [feats[i] for i in spot_indices(spot, len(feats), hint_layer)]


def match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger map down to the smaller one's size (as AT/NST/VID in
    CRD/mdistiller do; they compare heights only and pool to a square, the same for square maps)."""
    h, w = min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3])
    if tuple(f_s.shape[2:]) != (h, w):
        f_s = F.adaptive_avg_pool2d(f_s, (h, w))
    if tuple(f_t.shape[2:]) != (h, w):
        f_t = F.adaptive_avg_pool2d(f_t, (h, w))
    return f_s, f_t


class FeatureLoss(Configurable, nn.Module):
    """Base of the feature losses (see the module docstring for the contract). A loss's own
    options are hyperparameters (``hparams``) of its standalone method."""

    spot: ClassVar[str]
    weight: ClassVar[float]
    sakd_weight: ClassVar[float]
    sakd_gamma: ClassVar[float] = 1.0
    per_sample: ClassVar[bool] = True
    hint_layer: int = DEFAULT_HINT_LAYER

    def __init__(self, s_shapes: Sequence[torch.Size], t_shapes: Sequence[torch.Size], **options: Any) -> None:
        super().__init__()
        self.set_hparams(options)
        self.num_spots = min(len(s_shapes), len(t_shapes))
        if self.num_spots == 0:
            raise ValueError(f"{type(self).__name__}: no feature maps to distil at spot {self.spot!r}")

    def select(self, features: Features) -> list[Tensor]:
        """This loss's spot tensors from a model's features (the pairs it was built for)."""
        return spot_features(features, self.spot, self.hint_layer)[: self.num_spots]

    def forward(self, s_feats: Sequence[Tensor], t_feats: Sequence[Tensor]) -> list[Tensor]:
        if len(s_feats) < self.num_spots or len(t_feats) < self.num_spots:
            raise ValueError(f"{type(self).__name__} expects {self.num_spots} spot tensors per model, "
                             f"got {len(s_feats)} and {len(t_feats)}")
        with no_autocast(s_feats[0].device):
            s = [f.float() for f in s_feats[: self.num_spots]]
            t = [f.detach().float() for f in t_feats[: self.num_spots]]
            return [self.spot_loss(i, f_s, f_t) for i, (f_s, f_t) in enumerate(zip(s, t))]

    def spot_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        """The loss at spot ``i`` on float32 inputs: a [B] tensor."""
        raise NotImplementedError


class RelationalLoss(FeatureLoss):
    """A loss over the batch's relations: its batch value, broadcast to [B]."""

    per_sample = False

    def spot_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        n = f_s.shape[0]
        if n < 2:  # no relations in a batch of one (the references would give NaN for RKD/CC)
            return f_s.flatten(1).sum(1) * 0.0
        return self.batch_loss(i, f_s, f_t).expand(n)

    def batch_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        raise NotImplementedError


# --- per-sample losses ----------------------------------------------------------------------


@FEATURE_LOSSES.register("at")
class ATLoss(FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR'17) at every stage.

    Attention map ``normalize(mean_c f^p)`` flattened; the loss is the mean squared difference
    of the two maps, the larger feature map average-pooled to the smaller's size first.
    """

    spot = "stages"
    weight = 1000.0
    sakd_weight = 1000.0
    sakd_gamma = 2.0

    hparams = Schema(p=hp(2.0, gt=0, help="exponent of the attention map mean_c |f|^p"))

    def attention(self, f: Tensor) -> Tensor:
        return F.normalize(f.pow(self.p).mean(1).flatten(1), dim=1)

    def spot_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = match_spatial(f_s, f_t)
        return (self.attention(f_s) - self.attention(f_t)).pow(2).mean(1)


@FEATURE_LOSSES.register("fitnet")
class FitNetLoss(FeatureLoss):
    """FitNets hints (Romero et al., ICLR'15): MSE between ``ConvReg(student map)`` and the
    teacher's map at stage ``hint_layer``."""

    spot = "hint"
    weight = 100.0
    sakd_weight = 1.0

    hparams = Schema(hint_layer=hp(DEFAULT_HINT_LAYER, ge=0, help="feature map distilled: 0 is the stem, i the i-th stage"))

    def __init__(self, s_shapes: Sequence[torch.Size], t_shapes: Sequence[torch.Size], **options: Any) -> None:
        super().__init__(s_shapes, t_shapes, **options)
        self.connectors = nn.ModuleList(ConvReg(s, t) for s, t in zip(s_shapes, t_shapes))

    def spot_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        return (self.connectors[i](f_s) - f_t).pow(2).flatten(1).mean(1)


@FEATURE_LOSSES.register("nst")
class NSTLoss(FeatureLoss):
    """Neuron selectivity transfer (Huang & Wang, 2017): squared MMD with the polynomial kernel
    ``k(a, b) = (a . b)^2`` between the channels' L2-normalised spatial activations."""

    spot = "stages"
    weight = 50.0
    sakd_weight = 50.0

    @staticmethod
    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        """Per sample, the mean over channel pairs of ``(a_i . b_j)^2``; a, b: [B, C, HW]."""
        return torch.bmm(b, a.transpose(1, 2)).pow(2).flatten(1).mean(1)

    def spot_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = match_spatial(f_s, f_t)
        s = F.normalize(f_s.flatten(2), dim=2)
        t = F.normalize(f_t.flatten(2), dim=2)
        return self.kernel_mean(t, t) + self.kernel_mean(s, s) - 2 * self.kernel_mean(s, t)


class _VIDHead(nn.Module):
    def __init__(self, s_channels: int, t_channels: int, init_pred_var: float, eps: float) -> None:
        super().__init__()
        mid = t_channels  # the references' VIDLoss(s, t, t)
        self.regressor = nn.Sequential(
            nn.Conv2d(s_channels, mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, t_channels, 1, bias=False),
        )
        # softplus(log_scale) + eps == init_pred_var at the start
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_pred_var - eps))))


@FEATURE_LOSSES.register("vid")
class VIDLoss(FeatureLoss):
    """Variational information distillation (Ahn et al., CVPR'19) at every stage: the Gaussian
    negative log-likelihood of the teacher map under a mean regressed from the student map (three
    1x1 convolutions) and a learned per-channel variance ``softplus(log_scale) + eps``."""

    spot = "stages"
    weight = 1.0
    sakd_weight = 1.0
    sakd_gamma = 2.0

    eps = 1e-5
    hparams = Schema(init_pred_var=hp(5.0, gt=1e-4, help="initial variance of the Gaussian the teacher map is scored under"))

    def __init__(self, s_shapes: Sequence[torch.Size], t_shapes: Sequence[torch.Size], **options: Any) -> None:
        super().__init__(s_shapes, t_shapes, **options)
        self.heads = nn.ModuleList(_VIDHead(s[0], t[0], self.init_pred_var, self.eps)
                                   for s, t in zip(s_shapes, t_shapes))

    def spot_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = match_spatial(f_s, f_t)
        head = self.heads[i]
        mean = head.regressor(f_s)
        var = (F.softplus(head.log_scale) + self.eps).view(1, -1, 1, 1)
        nll = 0.5 * ((mean - f_t).pow(2) / var + var.log())
        return nll.flatten(1).mean(1)


# --- relational losses ----------------------------------------------------------------------


@FEATURE_LOSSES.register("sp")
class SPLoss(RelationalLoss):
    """Similarity-preserving KD (Tung & Mori, ICCV'19) on the last stage: the squared Frobenius
    distance of the row-normalised batch Gram matrices, divided by B^2."""

    spot = "last"
    weight = 3000.0
    sakd_weight = 3000.0

    def batch_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        s, t = f_s.flatten(1), f_t.flatten(1)
        g_s = F.normalize(s @ s.t(), dim=1)
        g_t = F.normalize(t @ t.t(), dim=1)
        return (g_t - g_s).pow(2).sum() / s.shape[0] ** 2


@FEATURE_LOSSES.register("pkt")
class PKTLoss(RelationalLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV'18) on the pooled features: KL
    between the row-normalised cosine-similarity distributions of teacher and student (mean
    over all B^2 entries, eps 1e-7, as the reference)."""

    spot = "pooled"
    weight = 30000.0
    sakd_weight = 30000.0
    eps = 1e-7

    def _probabilities(self, x: Tensor) -> Tensor:
        x = torch.nan_to_num(x / (x.norm(dim=1, keepdim=True) + self.eps), nan=0.0)
        sim = (x @ x.t() + 1.0) / 2.0
        return sim / sim.sum(1, keepdim=True)

    def batch_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        p_s, p_t = self._probabilities(f_s.flatten(1)), self._probabilities(f_t.flatten(1))
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


@FEATURE_LOSSES.register("rkd")
class RKDLoss(RelationalLoss):
    """Relational KD (Park et al., CVPR'19) on the pooled features:
    ``distance_weight * smooth_l1(distances / their mean) + angle_weight * smooth_l1(angles)``
    (Euclidean, not squared, distances; pdist eps 1e-12, as mdistiller's defaults)."""

    spot = "pooled"
    weight = 1.0
    sakd_weight = 1.0
    sakd_gamma = 2.0
    pdist_eps = 1e-12

    hparams = Schema(distance_weight=hp(25.0, ge=0, help="weight of the distance term"),
                     angle_weight=hp(50.0, ge=0, help="weight of the angle term"))

    def _distances(self, e: Tensor) -> Tensor:
        sq = e.pow(2).sum(1)
        d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=self.pdist_eps).sqrt()
        d = d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))  # zero diagonal
        # Mean of the positive distances without boolean-mask indexing (its data-dependent
        # shape would make the host wait for the GPU every step); d >= 0, so their sum is d's.
        return d / (d.sum() / (d > 0).sum())

    @staticmethod
    def _angles(e: Tensor) -> Tensor:
        diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    def batch_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        s, t = f_s.flatten(1), f_t.flatten(1)
        loss_d = F.smooth_l1_loss(self._distances(s), self._distances(t))
        loss_a = F.smooth_l1_loss(self._angles(s), self._angles(t))
        return self.distance_weight * loss_d + self.angle_weight * loss_a


@FEATURE_LOSSES.register("cc")
class CCLoss(RelationalLoss):
    """Correlation congruence (Peng et al., ICCV'19), the form CRD and SA use: both pooled
    features linearly embedded to ``feat_dim`` (both embeddings trained), then
    ``mean_i sum_d |delta_i,d| |delta_i+1,d|`` with ``delta = e_s - e_t`` over consecutive samples."""

    spot = "pooled"
    weight = 0.02
    sakd_weight = 0.02

    hparams = Schema(feat_dim=hp(128, gt=0, help="width of the embeddings the correlations are taken in"))

    def __init__(self, s_shapes: Sequence[torch.Size], t_shapes: Sequence[torch.Size], **options: Any) -> None:
        super().__init__(s_shapes, t_shapes, **options)
        self.embed_s = nn.ModuleList(nn.Linear(math.prod(s), self.feat_dim) for s in s_shapes[: self.num_spots])
        self.embed_t = nn.ModuleList(nn.Linear(math.prod(t), self.feat_dim) for t in t_shapes[: self.num_spots])

    def batch_loss(self, i: int, f_s: Tensor, f_t: Tensor) -> Tensor:
        delta = (self.embed_s[i](f_s.flatten(1)) - self.embed_t[i](f_t.flatten(1))).abs()
        return (delta[:-1] * delta[1:]).sum(1).mean()


def build_feature_loss(name: str, s_features: Features, t_features: Features, **options: Any
                       ) -> FeatureLoss:
    """Feature loss ``name`` for a student/teacher pair, from their ``feature_shapes``."""
    cls = FEATURE_LOSSES.get(name)
    hint_layer = options.get("hint_layer", DEFAULT_HINT_LAYER)
    s_shapes = spot_features(s_features, cls.spot, hint_layer)
    t_shapes = spot_features(t_features, cls.spot, hint_layer)
    return cls(s_shapes, t_shapes, **options)


# --- standalone methods ---------------------------------------------------------------------


class FeatureDistiller(Distiller):
    """``ce_weight * CE + feat_weight * (sum over spots of the feature loss)``, per sample.

    One subclass per registered feature loss (below): its hyperparameters are ``ce_weight``,
    ``feat_weight`` (default: the loss's ``weight``) and the loss's own ``hparams``.
    ``input_shape`` (C, H, W) sizes the connectors; it is no hyperparameter
    (``build_distiller`` passes the data's shape). The teacher runs once per batch, under
    ``no_grad``, for its features; teacher logits a sample policy passes in are not needed.
    Connectors and other trainable parts live in ``feat_loss``, so the optimizer takes them
    with the run's settings.
    """

    loss_name: ClassVar[str]
    hparams = Schema(ce_weight=CE_WEIGHT,
                     feat_weight=hp(1.0, ge=0, help="weight of the feature loss (summed over its spots)"))

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 input_shape: Sequence[int] = (3, 32, 32), **hparams: Any) -> None:
        super().__init__(student, teacher, **hparams)
        options = {name: getattr(self, name) for name in FEATURE_LOSSES.get(self.loss_name).hparams}
        self.feat_loss = build_feature_loss(self.loss_name, feature_shapes(student, input_shape),
                                            feature_shapes(teacher, input_shape), **options)

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        logits, s_features = self.student(x)
        with torch.no_grad():
            _, t_features = self.teacher(x)
        spots = self.feat_loss(self.feat_loss.select(s_features), self.feat_loss.select(t_features))
        feat = torch.stack(spots).sum(0)
        return logits, {"ce": self.ce_weight * self.ce(logits, y), "feat": self.feat_weight * feat}


def _standalone(name: str, class_name: str) -> type[FeatureDistiller]:
    """The method ``name``: :class:`FeatureDistiller` over feature loss ``name``."""
    loss = FEATURE_LOSSES.get(name)
    doc = (loss.__doc__ or "").strip().split("\n\n")[0]
    cls = type(class_name, (FeatureDistiller,), {
        "__doc__": f"Standalone ``{name}``: ce_weight * CE + feat_weight * ({doc})",
        "__module__": __name__, "__qualname__": class_name, "loss_name": name,
        "hparams": FeatureDistiller.hparams.with_defaults(feat_weight=loss.weight) | loss.hparams})
    return METHODS.register(name)(cls)


AT = _standalone("at", "AT")
FitNet = _standalone("fitnet", "FitNet")
NST = _standalone("nst", "NST")
VID = _standalone("vid", "VID")
SP = _standalone("sp", "SP")
PKT = _standalone("pkt", "PKT")
RKD = _standalone("rkd", "RKD")
CC = _standalone("cc", "CC")
