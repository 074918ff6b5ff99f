"""MLKD: Multi-Level Logit Distillation (Jin, Wang & Lin, CVPR'23), with logit standardization
(Sun et al., CVPR'24) as a switch, and the strong view it trains on.

MLKD aligns the student's predictions with the teacher's at three levels, each over a set of
temperatures (the paper's "prediction augmentation"): per instance (KD), per batch (the B x B
sample-correlation matrix ``P P^T``) and per class (the C x C class-correlation matrix
``P^T P``). It trains on two views of every image, a weak one (crop + flip) and a strong one
(crop + flip + RandAugment + Cutout), which the training loader makes when a method's
``strong_view`` asks for it (:class:`kdtune.data.TrainLoader`).

Reference code: ``Jin-Ying/Multi-Level-Logit-Distillation`` (``mdistiller/distillers/KD_ours.py``,
trainer ``ours``, strong view in ``mdistiller/dataset/cifar100.py``) and its copy with logit
standardization in ``sunshangquan/logit-standardization-KD`` (``mdistiller/distillers/MLKD.py``).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.distillers.base import CE_WEIGHT, METHODS, Distiller
from kdtune.distillers.functional import kd_loss
from kdtune.hparams import Schema, hp

MASK_MODES = ("select", "released")


# --------------------------------------------------------------------------- losses


def correlation_rows(student: Tensor, teacher: Tensor, temperature: float, level: str) -> Tensor:
    """Per-row squared error between the teacher's and the student's correlation matrices of
    the softmax predictions at ``temperature``: ``level="batch"`` compares ``P P^T`` (B x B,
    one row per sample), ``"class"`` compares ``P^T P`` (C x C, one row per class).

    The rows' mean is the release's ``bc_loss`` (``||G_t - G_s||^2 / B``) or ``cc_loss``
    (``||M_t - M_s||^2 / C``). Computed in float32 with autocast off (a bf16 Gram matrix of
    probabilities loses the differences this term is about); no temperature^2 factor, as in
    the release.
    """
    with torch.autocast(student.device.type, enabled=False):
        p_s = F.softmax(student.float() / temperature, dim=1)
        p_t = F.softmax(teacher.float() / temperature, dim=1)
        if level == "class":
            p_s, p_t = p_s.t(), p_t.t()
        diff = p_t @ p_t.t() - p_s @ p_s.t()
        return diff.pow(2).sum(1)


def median_mask(values: Tensor) -> Tensor:
    """``values <= median(values)`` as float, the median as ``numpy.percentile(values, 50)``
    takes it (linear interpolation: the mean of the two middle values for an even count). On the
    device, with no host synchronisation (the release calls numpy every step)."""
    v = values.detach().float().sort().values
    n = v.shape[0]
    a, b = v[(n - 1) // 2], v[n // 2]
    median = b - (b - a) * 0.5  # numpy's lerp at weight 0.5 (a for an odd count)
    return (values <= median).float()


# --------------------------------------------------------------------------- the strong view

# The release's RandAugment pool (FixMatch's RandAugment as shipped in both releases'
# mdistiller/dataset/cifar100.py): name, lowest and highest magnitude. A sample's two
# operations are drawn uniformly with replacement, each with a magnitude uniform in its range;
# the "M = 10" the release passes is unused there.
AUGMENTATIONS = (
    ("autocontrast", 0.0, 1.0), ("brightness", 0.05, 0.95), ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95), ("equalize", 0.0, 1.0), ("identity", 0.0, 1.0),
    ("posterize", 4.0, 8.0), ("rotate", -30.0, 30.0), ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3), ("solarize", 0.0, 256.0),
    ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3),
)
_OP = {name: i for i, (name, _, _) in enumerate(AUGMENTATIONS)}
CUTOUT_GREY = (125, 123, 114)  # the release's Cutout fill (RGB)


def _luma(x: Tensor) -> Tensor:
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` ([B, 1, H, W]);
    a one-channel image is its own luma."""
    if x.shape[1] != 3:
        return x
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1).to(x.dtype)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)`` for factors in [0, 1]: float32 arithmetic,
    truncated to an integer (what every ``ImageEnhance`` class returns)."""
    return torch.trunc(degenerate + factor.float().view(-1, 1, 1, 1) * (x - degenerate))


def _smooth(x: Tensor) -> Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded; the
    one-pixel border is kept). Integer arithmetic: a sum over 13 is never exactly half-way, so
    rounding the exact quotient is PIL's float rounding."""
    c = x.shape[1]
    k = torch.ones(c, 1, 3, 3, device=x.device, dtype=torch.float32)
    k[:, :, 1, 1] = 5
    inner = F.conv2d(x.float(), k, groups=c)  # integer sums < 2^24: exact in float32
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = torch.div(2 * inner + 13, 26, rounding_mode="floor")
    return out


def _autocontrast(x: Tensor) -> Tensor:
    """PIL's ``ImageOps.autocontrast`` (no cutoff): each channel stretched from [lo, hi] to
    [0, 255], ``int(v * scale - lo * scale)`` in float64; unchanged where hi <= lo."""
    lo = x.amin((2, 3), keepdim=True).double()
    hi = x.amax((2, 3), keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp(min=1)
    out = torch.trunc(x.double() * scale + (-lo * scale)).clamp(0, 255).to(x.dtype)
    return torch.where(hi > lo, out, x)


def _equalize(x: Tensor) -> Tensor:
    """PIL's ``ImageOps.equalize``: per channel, ``lut[i] = (step // 2 + #pixels below i) // step``
    with ``step = (#pixels - #pixels at the top value) // 255``; unchanged when a channel has
    one value or ``step`` is 0 (every image of 255 pixels or fewer)."""
    b, c, h, w = x.shape
    flat = x.long().reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    top = hist.gather(1, flat.amax(1, keepdim=True))
    step = (h * w - top) // 255
    below = hist.cumsum(1) - hist
    lut = torch.div(step // 2 + below, step.clamp(min=1), rounding_mode="floor").clamp(max=255)
    out = lut.gather(1, flat)
    keep = ((hist > 0).sum(1, keepdim=True) <= 1) | (step == 0)
    return torch.where(keep, flat, out).reshape(b, c, h, w).to(x.dtype)


def _affine(x: Tensor, m: Tensor) -> Tensor:
    """PIL's ``Image.transform(size, AFFINE, m)`` with nearest sampling, black outside. ``m``:
    [B, 6] float64; output pixel (i, j) takes input pixel ``floor(m @ (j + .5, i + .5, 1))``.

    Computed as PIL computes it: a pure translation in float64 (``ImagingScaleAffine``), every
    other matrix in 16.16 fixed point (``affine_fixed``: each coefficient rounded to 1/65536,
    which moves a shear of 0.2000001 to 0.19999695 and so, at some rows, the source pixel).
    """
    b, c, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    m = m.view(b, 6, 1, 1)
    fix = torch.floor(m * 65536.0 + 0.5).long()
    x_fixed = (torch.floor((m[:, 2] + m[:, 0] * 0.5 + m[:, 1] * 0.5) * 65536.0 + 0.5).long()
               + ys * fix[:, 1] + xs * fix[:, 0]) >> 16
    y_fixed = (torch.floor((m[:, 5] + m[:, 3] * 0.5 + m[:, 4] * 0.5) * 65536.0 + 0.5).long()
               + ys * fix[:, 4] + xs * fix[:, 3]) >> 16
    x_float = torch.floor((m[:, 2] + m[:, 0] * 0.5) + xs * m[:, 0]).long()
    y_float = torch.floor((m[:, 5] + m[:, 4] * 0.5) + ys * m[:, 4]).long()
    translation = (m[:, 1] == 0) & (m[:, 3] == 0)
    xin = torch.where(translation, x_float, x_fixed)
    yin = torch.where(translation, y_float, y_fixed)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    index = (yin.clamp(0, h - 1) * w + xin.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return torch.where(inside.unsqueeze(1), out, torch.zeros_like(out))


def _geometry(op: Tensor, v: Tensor, h: int, w: int) -> Tensor:
    """Each sample's affine matrix [B, 6] (float64) for rotate, shear and translate (PIL's
    conventions: rotate ``v`` degrees counter-clockwise about the centre; shear ``(1, v, 0, 0, 1,
    0)``; translate by ``v`` times the width/height); identity for every other operation."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    # PIL's rotate takes the angle modulo 360 and builds the matrix of -radians(angle)
    theta = -torch.deg2rad(torch.remainder(v, 360.0))
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = w / 2.0, h / 2.0
    # PIL's order of operations: the centre's image under the rotation, then the centre added
    rotate = torch.stack([cos, sin, (cos * -cx + sin * -cy) + cx, -sin, cos, (-sin * -cx + cos * -cy) + cy], 1)
    identity = torch.stack([one, zero, zero, zero, one, zero], 1)
    shear_x = torch.stack([one, v, zero, zero, one, zero], 1)
    shear_y = torch.stack([one, zero, zero, v, one, zero], 1)
    translate_x = torch.stack([one, zero, v * w, zero, one, zero], 1)
    translate_y = torch.stack([one, zero, zero, zero, one, v * h], 1)
    m = identity
    for name, matrix in (("rotate", rotate), ("shear_x", shear_x), ("shear_y", shear_y),
                         ("translate_x", translate_x), ("translate_y", translate_y)):
        m = torch.where((op == _OP[name]).unsqueeze(1), matrix, m)
    return m


def rand_augment(x: Tensor, ops: Tensor, magnitudes: Tensor) -> Tensor:
    """The release's RandAugment on a batch of images with pixel values 0..255 (any float or
    integer dtype; [B, C, H, W]): operation ``ops[:, k]`` (indices into :data:`AUGMENTATIONS`)
    with magnitude ``magnitudes[:, k]`` (float64), for k = 0, 1, ... in turn, each sample its own.

    Each operation is PIL's on a uint8 image, reproduced on tensors (``tests/test_mlkd.py``
    checks them against the release's functions on PIL images). Every operation is computed for
    the whole batch and each sample keeps its own: a few dozen elementwise passes over a batch,
    no per-sample launches and no host synchronisation.
    """
    x = x.float()
    for k in range(ops.shape[1]):
        op, v = ops[:, k], magnitudes[:, k].double()
        _, c, h, w = x.shape
        out = _affine(x, _geometry(op, v, h, w))  # identity for the non-geometric operations
        luma = _luma(x)
        mean = torch.floor(luma.double().mean((1, 2, 3), keepdim=True) + 0.5).float()
        bits = v.floor().clamp(min=1).long().view(-1, 1, 1, 1)  # int(v), at least 1
        keep = (255 - ((1 << (8 - bits.clamp(max=8))) - 1))
        colour = {
            "autocontrast": lambda: _autocontrast(x),
            "brightness": lambda: _blend(torch.zeros_like(x), x, v),
            "color": lambda: _blend(luma.expand_as(x), x, v),
            "contrast": lambda: _blend(mean.expand_as(x), x, v),
            "equalize": lambda: _equalize(x),
            "posterize": lambda: (x.long() & keep).float(),
            "sharpness": lambda: _blend(_smooth(x), x, v),
            "solarize": lambda: torch.where(x.double() < v.view(-1, 1, 1, 1), x, 255 - x),
        }
        for name, make in colour.items():
            out = torch.where((op == _OP[name]).view(-1, 1, 1, 1), make(), out)
        x = out
    return x


def cutout(x: Tensor, size: Tensor, centre_x: Tensor, centre_y: Tensor) -> Tensor:
    """The release's Cutout: a grey square of side ``size`` pixels (float, [B]) at the drawn
    centre, PIL-rectangle semantics (corners truncated to ints, both ends inclusive, clipped to
    the image); nothing for ``size <= 0``. The release fills with RGB (125, 123, 114); an image
    with another channel count is filled with that grey's luma (123)."""
    b, c, h, w = x.shape
    x0 = torch.clamp(centre_x - size / 2, min=0).floor()
    y0 = torch.clamp(centre_y - size / 2, min=0).floor()
    x1 = torch.minimum(x0 + size, torch.full_like(size, w)).floor()
    y1 = torch.minimum(y0 + size, torch.full_like(size, h)).floor()
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    box = ((cols >= x0.view(-1, 1, 1)) & (cols <= x1.view(-1, 1, 1)) & (rows >= y0.view(-1, 1, 1))
           & (rows <= y1.view(-1, 1, 1)) & (size > 0).view(-1, 1, 1))
    fill = x.new_empty(1, c, 1, 1)
    for i, grey in enumerate(CUTOUT_GREY if c == 3 else (123,) * c):
        fill[:, i] = grey  # a fill on the device; a tensor copied from the host would synchronise
    return torch.where(box.unsqueeze(1), fill, x)


@functools.lru_cache(maxsize=8)
def _magnitude_range(device: torch.device) -> tuple[Tensor, Tensor]:
    """Each operation's lowest and highest magnitude, on ``device``: copied there once, as a copy
    from the host at every step would synchronise the host with the device."""
    table = torch.tensor([(low, high) for _, low, high in AUGMENTATIONS], dtype=torch.float64)
    return table[:, 0].to(device), table[:, 1].to(device)


def strong_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """MLKD's strong view after its crop and flip (which the loader draws): RandAugment(2) and
    Cutout, as the release's ``get_cifar100_train_transform_strong``. ``x``: crops with pixel
    values 0..255 [B, C, H, W]; returns float32 pixel values 0..255.

    Randomness is per sample, as the release's is per image (Python's ``random`` in the data
    workers): each sample draws its two operations, their magnitudes, Cutout's size (up to half
    the width) and its centre from ``generator``, on the device. Where this differs from the
    release: (1) the numbers come from torch's generator, not Python's and numpy's; (2) the
    centre is uniform in (1, W] x (1, H], which is what the release's ``np.random.uniform(w)``
    draws (numpy reads ``w`` as the *low* end and 1.0 as the high end) -- kept on purpose;
    (3) torchvision.transforms.v2.RandAugment is not used: on a batch it draws one operation and
    magnitude for all images, and its parameters are host numbers; (4) rotation's cos/sin are not
    rounded to 15 decimals as PIL rounds them before its 16.16 fixed point, which could move a
    pixel only if that rounding crossed a multiple of 1/65536.
    """
    b, device = x.shape[0], x.device
    ops = torch.randint(0, len(AUGMENTATIONS), (b, 2), device=device, generator=generator)
    u = torch.rand(b, 2, device=device, generator=generator, dtype=torch.float64)
    low, high = _magnitude_range(device)
    x = rand_augment(x, ops, low[ops] + (high[ops] - low[ops]) * u)
    h, w = x.shape[2:]
    c = torch.rand(b, 3, device=device, generator=generator, dtype=torch.float64)
    return cutout(x, c[:, 0] * 0.5 * w, w + (1 - w) * c[:, 1], h + (1 - h) * c[:, 2])


# --------------------------------------------------------------------------- the method


def _temperature_list(value: Any) -> None:
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in value):
        raise ValueError(f"extra_temperatures must be a list of positive numbers, but got {value!r}")


@METHODS.register("mlkd")
class MLKD(Distiller):
    """Multi-level logit distillation on a weak and a strong view of each image.

    With temperatures ``S = [temperature, *extra_temperatures]`` (release: [4, 3, 5, 2, 6]),
    weak/strong student logits ``s_w``/``s_s``, teacher logits ``t_w``/``t_s`` and ``w =
    kd_weight``, the loss is ``mean`` over the batch of

    * ``ce = ce_weight * (CE(s_w, y) + CE(s_s, y))``;
    * ``kd_weak = w * sum_T T^2 KL(p_t_w(T) || p_s_w(T)) * m`` (per sample);
    * ``kd_strong = w * sum_T T^2 KL(p_t_s(T) || p_s_s(T))`` (per sample, unmasked);
    * ``bc = w * sum_T mean_i(m_i * ||row_i(P_t P_t^T - P_s P_s^T)||^2)`` on the weak view (batch level);
    * ``cc = w * sum_T mean_c(k_c * ||row_c(P_t^T P_t - P_s^T P_s)||^2)`` on the weak view (class level).

    ``m`` keeps the samples whose teacher confidence on the weak view (max softmax at T = 1) is
    at most the batch median; ``k`` keeps the classes whose summed teacher probability over the
    batch is at most the median over classes (the release's ``mask`` and ``class_conf_mask``,
    both ``<=``, both from the teacher's weak-view predictions). As in the release, the strong
    view adds only instance-level KD (its batch- and class-level terms are computed there but
    left out of the loss), and ``logit_stand`` z-scores the logits of the KD terms only (LS's
    MLKD.py), not those of the correlations or the masks.

    Defaults: the MLKD release's CIFAR-100 settings (its cfg.KD: T 4, CE 0.1, KD 0.9; the fixed
    temperatures 3, 5, 2, 6; recipe: lr 0.025, batch 64, 240 epochs, steps at 150/180/210). With
    logit standardization LS runs ``temperature`` 2 (its base temperature) and ``kd_weight`` 9
    (6 for some pairs), leaving the other temperatures as they are, so its set is [2, 3, 5, 2, 6].

    Where the release has bugs, kdtune does the intended thing by default and keeps the release's
    arithmetic as an option:

    * ``mask_mode``: the release multiplies each *batch-mean* term by its mask and averages, which
      selects nothing: the term is scaled by the share kept (about 1/2). Its commented-out
      ``reduce=False`` shows the per-sample form was meant. ``select`` (default) applies the masks
      per sample (KD) and per row (the correlation terms: row i of the batch matrix belongs to
      sample i, row c of the class matrix to class c), averaged over all rows as the release's
      ``mean``; ``released`` scales each term by the share its mask keeps.
    * ``released_strong_kd``: the release's strong-view KD computes its terms at T = 2 and 6 (the
      4th and 5th temperatures) on the *weak* view's logits, unmasked (a copy-paste slip); True
      does that at the 4th and every later temperature.

    The strong view comes from the loader (``strong``, see :attr:`strong_view`); called without
    it (fixed inputs, as in tests/tools/fingerprint.py) the weak view stands in for it. The
    teacher runs live on both views: the strong view has no finite set of views for the exact
    teacher-output cache. ``unweighted_terms``: KDAS reweights ``kd_weak`` and ``kd_strong`` per
    sample; ``bc`` and ``cc`` are batch-level (the batch mean broadcast to each sample).
    """

    # The loader makes a strong view with this augmentation (kdtune.data.TrainLoader).
    strong_view = staticmethod(strong_augment)
    unweighted_terms = ("ce", "bc", "cc")

    hparams = Schema(
        temperature=hp(4.0, gt=0, help="first temperature of the set (the base temperature with logit_stand)"),
        extra_temperatures=hp((3.0, 5.0, 2.0, 6.0), type=(list, tuple), parse=_temperature_list,
                              help="the set's other temperatures (the release's fixed 3, 5, 2, 6)"),
        ce_weight=CE_WEIGHT.but(0.1),
        kd_weight=hp(0.9, ge=0, help="weight of every distillation term (instance, batch, class)"),
        logit_stand=hp(False, help="z-score both logits per sample in the KD terms (logit standardization)"),
        mask_mode=hp("select", choices=MASK_MODES,
                     help="confidence masks per sample/row (select) or as the release's scale (released)"),
        released_strong_kd=hp(False,
                              help="strong-view KD from the 4th temperature on reads the weak view (release bug)"),
    )

    @property
    def temperatures(self) -> list[float]:
        return [float(self.temperature), *(float(t) for t in self.extra_temperatures)]

    def forward(self, x: Tensor, y: Tensor, teacher_logits: Tensor | None = None,
                strong: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        strong = x if strong is None else strong
        s_w, s_s = self.student(x)[0], self.student(strong)[0]  # two passes: BN sees each view alone
        t_w = self.teacher_logits(x) if teacher_logits is None else teacher_logits
        t_s = self.teacher_logits(strong)
        terms = mlkd_terms(s_w, s_s, t_w, t_s, self.temperatures, logit_stand=self.logit_stand,
                           mask_mode=self.mask_mode, released_strong_kd=self.released_strong_kd)
        ce = self.ce_weight * (self.ce(s_w, y) + self.ce(s_s, y))
        return s_w, {"ce": ce, **{k: self.kd_weight * v for k, v in terms.items()}}


def mlkd_terms(s_w: Tensor, s_s: Tensor, t_w: Tensor, t_s: Tensor, temperatures: list[float], *,
               logit_stand: bool = False, mask_mode: str = "select",
               released_strong_kd: bool = False) -> dict[str, Tensor]:
    """MLKD's distillation terms before ``kd_weight``, each [B] (see :class:`MLKD`):
    ``kd_weak``, ``kd_strong`` per sample; ``bc`` and ``cc`` batch-level, broadcast."""
    t_w, t_s = t_w.detach().float(), t_s.detach().float()
    confidence = F.softmax(t_w, dim=1).amax(1)
    sample_mask = median_mask(confidence)
    class_mask = median_mask(F.softmax(t_w, dim=1).sum(0))
    released = mask_mode == "released"
    kd_weak = kd_strong = bc = cc = s_w.new_zeros((), dtype=torch.float32)
    for i, temperature in enumerate(temperatures):
        kd_weak = kd_weak + kd_loss(s_w, t_w, temperature, logit_stand)
        weak_slip = released_strong_kd and i >= 3  # the release's T = 2 and 6 strong terms
        kd_strong = kd_strong + (kd_loss(s_w, t_w, temperature, logit_stand) if weak_slip
                                 else kd_loss(s_s, t_s, temperature, logit_stand))
        rows_b = correlation_rows(s_w, t_w, temperature, "batch")
        rows_c = correlation_rows(s_w, t_w, temperature, "class")
        bc = bc + (rows_b.mean() * sample_mask.mean() if released else (rows_b * sample_mask).mean())
        cc = cc + (rows_c.mean() * class_mask.mean() if released else (rows_c * class_mask).mean())
    kd_weak = kd_weak * (sample_mask.mean() if released else sample_mask)
    b = s_w.shape[0]
    return {"kd_weak": kd_weak, "kd_strong": kd_strong, "bc": bc.expand(b), "cc": cc.expand(b)}

