"""Golden values for ReviewKD (tests/data/reference_reviewkd.json) from the released code.

    git clone https://github.com/megvii-research/mdistiller PATH/mdistiller
    python tests/tools/goldens_reviewkd.py PATH/mdistiller [--out tests/data/reference_reviewkd.json]

Imports ``mdistiller.distillers.ReviewKD`` (the distiller, its ``ABF`` modules and ``hcl_loss``)
from the checkout, runs it on seeded inputs and keeps only its outputs and the inputs (the
commit in ``_meta.sources``). Nothing of the reference is copied into kdtune or into this file.

Student and teacher are tiny convolutional nets in the zoo's interface (:class:`TinyConvNet`:
a stem and three stages, ``feats``/``preact_feats``/``pooled_feat``/logits), configured as the
release's ``CFG.REVIEWKD`` lists are for a real pair: ``IN_CHANNELS``/``SHAPES`` the student's
stages after the stem plus its pooled width (sizes deepest first), ``OUT_CHANNELS``/
``OUT_SHAPES`` the teacher's. Two pairs: ``same`` (equal map sizes) and ``smaller`` (student
maps half the teacher's, so the ABF outputs are resized, as for ShuffleNet students).

Recorded per pair:

* ``features``: ``forward_train`` with a stand-in student whose features and logits are the
  stored tensors (leaves): the CE and review losses at two epochs (inside and after the 20-epoch
  warm-up) and, at the later one, the gradients w.r.t. the student's feature maps, pooled
  feature and logits;
* ``step``: one training step with the tiny student: ``loss_ce + loss_kd``, backward, one SGD
  step over ``get_learnable_parameters()`` with the CIFAR recipe's settings: the losses and a
  :func:`digest` of the change of every student and ABF entry.

The initial ABF weights (the release's init, seeded) are stored under the release's module
names (``abfs.0`` is the deepest level's, applied to the pooled feature).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_goldens, beside this file
import reference_goldens as rg  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "reference_reviewkd.json"
STEP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}  # mdistiller's CIFAR-100 solver
WEIGHTS = {"ce_weight": 1.0, "feat_weight": 5.0, "warmup": 20}  # configs/cifar100/reviewkd.yaml over CFG
# (student widths, student strides, teacher widths, teacher strides) on 1x8x8 images
PAIRS = {"same": ((2, 3, 4, 4), (1, 1, 2, 2), (3, 4, 5, 5), (1, 1, 2, 2)),
         "smaller": ((2, 3, 4, 4), (2, 1, 2, 2), (3, 4, 5, 5), (1, 1, 2, 2))}
EPOCHS = (3, 25)


class TinyConvNet(nn.Module):
    """A stem and three stages of 3x3 convolutions (``strides`` each), ReLU after each; pooled
    feature the last map's mean; a linear head. ``(logits, {"feats", "preact_feats",
    "pooled_feat"})`` as the zoo. The tests build the same module from the stored weights."""

    def __init__(self, in_channels: int, widths: Sequence[int], strides: Sequence[int], num_classes: int) -> None:
        super().__init__()
        chans = [in_channels, *widths]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, stride=s, padding=1)
                                   for i, s in enumerate(strides))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor):
        feats, preacts = [], []
        for conv in self.convs:
            pre = conv(x)
            x = F.relu(pre)
            preacts.append(pre)
            feats.append(x)
        pooled = x.mean((2, 3))
        return self.fc(pooled), {"feats": feats, "preact_feats": preacts, "pooled_feat": pooled}


class _FixedFeatures(nn.Module):
    """A stand-in student: its output is the given logits and features, whatever the input."""

    def __init__(self, logits: torch.Tensor, features: dict[str, Any]) -> None:
        super().__init__()
        self.logits, self.features = logits, features

    def forward(self, x: torch.Tensor):
        return self.logits, self.features


def _cfg(s_shapes: list[torch.Size], t_shapes: list[torch.Size]) -> types.SimpleNamespace:
    """CFG.REVIEWKD for a pair, from the shapes of the maps ReviewKD pairs (shallow first)."""
    return types.SimpleNamespace(REVIEWKD=types.SimpleNamespace(
        SHAPES=[s[-1] for s in s_shapes][::-1], OUT_SHAPES=[t[-1] for t in t_shapes][::-1],
        IN_CHANNELS=[s[0] for s in s_shapes], OUT_CHANNELS=[t[0] for t in t_shapes],
        CE_WEIGHT=WEIGHTS["ce_weight"], REVIEWKD_WEIGHT=WEIGHTS["feat_weight"],
        WARMUP_EPOCHS=WEIGHTS["warmup"], STU_PREACT=False, MAX_MID_CHANNEL=512))


def spot_shapes(features: dict[str, Any], preact: bool) -> list[torch.Size]:
    maps = features["preact_feats" if preact else "feats"][1:]
    return [m.shape[1:] for m in maps] + [torch.Size([features["pooled_feat"].shape[1], 1, 1])]


def _state(module: nn.Module) -> dict[str, Any]:
    return {k: rg.tensor_list(v) for k, v in module.state_dict().items()}


def digest(t: torch.Tensor) -> list[float]:
    """Three numbers that move when any element of ``t`` moves: its sum, the sum of its absolute
    values and its sum with fixed random signs (float64; the signs from a seeded CPU generator)."""
    t = t.detach().double().flatten()
    signs = torch.randint(0, 2, (t.numel(),), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    return [float(t.sum()), float(t.abs().sum()), float((t * signs).sum())]


def _step_digests(module: nn.Module, before: dict[str, torch.Tensor], prefix: str = "") -> dict[str, list[float]]:
    """:func:`digest` of each floating-point entry's change in one step (``after - before``)."""
    return {prefix + k: digest(v - before[k]) for k, v in module.state_dict().items() if v.is_floating_point()}


def generate(root: Path) -> dict[str, Any]:
    """``root``: a checkout of megvii-research/mdistiller."""
    out: dict[str, Any] = {"_meta": {
        "sources": {"megvii-research/mdistiller": rg.commit_of(root)},
        "note": "mdistiller/distillers/ReviewKD.py ReviewKD(student, teacher, cfg) with cfg.REVIEWKD from the "
                "tiny pair's shapes (see the generator). features: forward_train(image, target, epoch) with a "
                "student returning the stored logits/feats/preact_feats/pooled_feat: loss_ce and loss_kd (the "
                "review loss, weighted and warmed up) per epoch, and at the last epoch d(loss_ce + loss_kd) / d "
                "each student tensor (those of TinyConvNet(x) with the stored weights). step: TinyConvNet student, "
                "loss_ce + loss_kd at step.epoch, backward, one torch.optim.SGD step over "
                "get_learnable_parameters(): digest() of each student and abfs entry's change (BN running "
                "statistics included). "
                "BN in the ABFs in training mode (batch statistics)."},
        **WEIGHTS, "epochs": list(EPOCHS), "pairs": {}}
    g = torch.Generator().manual_seed(5)
    with rg.reference(root, "mdistiller"):
        review_mod = importlib.import_module("mdistiller.distillers.ReviewKD")
        for name, (s_widths, s_strides, t_widths, t_strides) in PAIRS.items():
            torch.manual_seed(1)
            student = TinyConvNet(1, s_widths, s_strides, 5)
            teacher = TinyConvNet(1, t_widths, t_strides, 5).eval()
            x = torch.randn(4, 1, 8, 8, generator=g)
            y = torch.randint(0, 5, (4,), generator=g)
            with torch.no_grad():
                s_logits, s_feats = student(x)
                t_shapes = spot_shapes(teacher(x)[1], preact=True)
            cfg = _cfg(spot_shapes(s_feats, preact=False), t_shapes)
            torch.manual_seed(2)
            distiller = review_mod.ReviewKD(student, teacher, cfg).train()
            abfs = {f"abfs.{k}": v for k, v in _state(distiller.abfs).items()}
            saved = {k: v.clone() for k, v in distiller.state_dict().items()}
            abfs_before = {k: v.clone() for k, v in distiller.abfs.state_dict().items()}
            student_before = {k: v.clone() for k, v in student.state_dict().items()}
            pair: dict[str, Any] = {"student_widths": list(s_widths), "student_strides": list(s_strides),
                                    "teacher_widths": list(t_widths), "teacher_strides": list(t_strides),
                                    "in_channels": cfg.REVIEWKD.IN_CHANNELS, "shapes": cfg.REVIEWKD.SHAPES,
                                    "out_channels": cfg.REVIEWKD.OUT_CHANNELS,
                                    "out_shapes": cfg.REVIEWKD.OUT_SHAPES, "x": rg.tensor_list(x),
                                    "y": rg.tensor_list(y), "student": _state(student),
                                    "teacher": _state(teacher), "abfs": abfs}

            # Losses and gradients with the student's outputs as leaves.
            leaves = {"feats": [f.clone().requires_grad_(True) for f in s_feats["feats"]],
                      "preact_feats": [f.clone() for f in s_feats["preact_feats"]],
                      "pooled_feat": s_feats["pooled_feat"].clone().requires_grad_(True)}
            logits = s_logits.clone().requires_grad_(True)
            fixed = review_mod.ReviewKD(_FixedFeatures(logits, leaves), teacher, cfg).train()
            fixed.abfs.load_state_dict(distiller.abfs.state_dict())
            # The student tensors are not stored: the tests recompute them with the stored weights.
            pair["features"] = {"losses": {}}
            for epoch in EPOCHS:
                _, losses = fixed.forward_train(image=x, target=y, epoch=epoch)
                pair["features"]["losses"][str(epoch)] = {k: v.item() for k, v in losses.items()}
            sum(losses.values()).backward()
            pair["features"]["grad_feats"] = [rg.tensor_list(f.grad) for f in leaves["feats"][1:]]
            pair["features"]["grad_pooled_feat"] = rg.tensor_list(leaves["pooled_feat"].grad)
            pair["features"]["grad_logits"] = rg.tensor_list(logits.grad)

            # One training step with the tiny student.
            distiller.load_state_dict(saved)
            optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), **STEP)
            _, losses = distiller.forward_train(image=x, target=y, epoch=EPOCHS[0])
            optimizer.zero_grad()
            sum(v.mean() for v in losses.values()).backward()
            optimizer.step()
            pair["step"] = {**STEP, "epoch": EPOCHS[0], "losses": {k: v.item() for k, v in losses.items()},
                            "student_change": _step_digests(student, student_before),
                            "abfs_change": _step_digests(distiller.abfs, abfs_before, "abfs.")}
            out["pairs"][name] = pair
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mdistiller", type=Path, help="checkout of megvii-research/mdistiller")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    payload = generate(args.mdistiller.resolve())
    rg.write_golden(args.out, payload, "tests/tools/goldens_reviewkd.py", list(rg.STUBBED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
