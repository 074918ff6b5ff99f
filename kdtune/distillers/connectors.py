"""Pieces feature distillers share: the student->teacher ``ConvReg`` connector and a shape probe."""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.models.base import Features


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: feature losses and embeddings compute in float32."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def num_stages(model_name: str) -> int:
    """The number of stages of a registered model (SAKD's and ReviewKD's spots depend on it)."""
    from kdtune.models import build_model

    with torch.device("meta"):  # the stage count without allocating or initialising weights
        return build_model(model_name).num_stages


def _chw(shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of a feature-map shape given with or without its batch dimension."""
    if len(shape) not in (3, 4):
        raise ValueError(f"expected a (C, H, W) or (N, C, H, W) feature-map shape, got {tuple(shape)}")
    c, h, w = (int(v) for v in tuple(shape)[-3:])
    return c, h, w


class ConvReg(nn.Module):
    """Convolutional regression of a student feature map onto the teacher's shape (FitNet's hint
    connector), with the layer choice of CRD / mdistiller's ``ConvReg``:

    * student map twice the teacher's (both sides): 3x3 convolution, stride 2, padding 1;
    * student map half the teacher's: 4x4 transposed convolution, stride 2, padding 1;
    * student map at least as large as the teacher's: a convolution whose kernel,
      ``(1 + s_H - t_H, 1 + s_W - t_W)``, makes the sizes match (1x1 for equal sizes);

    then batch norm and, with ``use_relu`` (the default, as theirs), a ReLU.

    Fallback, where the references raise: a student map smaller than the teacher's but not
    exactly half of it (say 3x3 -> 8x8, or one side larger and the other smaller) is resized
    to the teacher's size with bilinear interpolation, then mapped by a 1x1 convolution.
    (SA's copy uses a transposed convolution with stride ``floor(t/s)`` there; the resize
    also covers non-square mismatches.) Sizes are compared per side, so non-square maps work.

    Shapes may be given with or without the batch dimension.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        s_c, s_h, s_w = _chw(s_shape)
        t_c, t_h, t_w = _chw(t_shape)
        self.use_relu = use_relu
        self.resize: tuple[int, int] | None = None
        if s_h == 2 * t_h and s_w == 2 * t_w:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h and 2 * s_w == t_w:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            self.resize = (t_h, t_w)
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=1)
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: Tensor) -> Tensor:
        if self.resize is not None:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


@torch.no_grad()
def feature_shapes(model: nn.Module, input_shape: Sequence[int]) -> Features:
    """The shapes (``torch.Size``, no batch dimension) of ``model``'s features for inputs of
    ``input_shape`` (C, H, W): ``Features(feats=[...], preact_feats=[...], pooled_feat=...)``.

    Runs the model once in eval mode, without gradients, on a batch of two zero images on
    the model's own device, then puts every submodule back in the mode it was in, so neither
    BN running statistics nor train/eval flags change.
    """
    modes = [(m, m.training) for m in model.modules()]
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        _, features = model(torch.zeros(2, *(int(v) for v in input_shape), device=device))
    finally:
        for m, training in modes:
            m.training = training
    return Features(
        feats=[f.shape[1:] for f in features["feats"]],
        preact_feats=[f.shape[1:] for f in features["preact_feats"]],
        pooled_feat=features["pooled_feat"].shape[1:],
    )
