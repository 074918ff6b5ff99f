"""Golden values for DIST (tests/data/reference_dist.json) from the released code.

    git clone --recurse-submodules https://github.com/hunto/DIST_KD PATH/DIST_KD
    python tests/tools/goldens_dist.py PATH/DIST_KD [--out tests/data/reference_dist.json]

DIST's loss and its CIFAR-100 training code live in DIST_KD's ``classification`` submodule
(hunto/image_classification_sota, at the commit DIST_KD pins). This script imports
``lib.models.losses.dist_kd`` and ``lib.models.losses.kd_loss`` from that checkout, runs them on
seeded inputs and keeps only their outputs and the inputs; both commits are recorded in
``_meta.sources``. Nothing of the reference is copied into kdtune or into this file.

Recorded: the loss (and its inter- and intra-class parts) and its gradient w.r.t. the student
logits for several logit cases and settings; and one training step of the release's CIFAR
setting (``KDLoss(kd_method="dist_t4", ori_loss_weight=1, kd_loss_weight=2)`` around a tiny
linear student and fixed teacher logits, backward, one SGD step with the CIFAR optimizer
settings): the loss and the updated parameters.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_goldens, beside this file
import reference_goldens as rg  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "reference_dist.json"
SETTINGS = [{"temperature": 4.0, "beta": 1.0, "gamma": 1.0}, {"temperature": 1.0, "beta": 1.0, "gamma": 1.0},
            {"temperature": 2.0, "beta": 2.0, "gamma": 0.5}]
STEP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "temperature": 4.0, "ori_loss_weight": 1.0,
        "kd_loss_weight": 2.0}  # dist_cifar.yaml


class _FixedTeacher(nn.Module):
    """A teacher whose output is a given logits tensor, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.clone()


def _pinned(root: Path) -> str:
    """The commit of the ``classification`` submodule that DIST_KD's HEAD pins."""
    line = subprocess.run(["git", "-C", str(root), "ls-tree", "HEAD", "classification"], capture_output=True,
                          text=True, check=True).stdout.split()
    return line[2]


def generate(root: Path) -> dict[str, Any]:
    """``root``: a checkout of hunto/DIST_KD with its ``classification`` submodule checked out."""
    cls_root = root / "classification"
    sources = {"hunto/DIST_KD": rg.commit_of(root), "hunto/image_classification_sota": rg.commit_of(cls_root)}
    if sources["hunto/image_classification_sota"] != _pinned(root):
        raise SystemExit(f"error: {cls_root} is not at the commit DIST_KD pins ({_pinned(root)})")
    out: dict[str, Any] = {"_meta": {
        "sources": sources,
        "note": "cases: lib/models/losses/dist_kd.py DIST(beta, gamma, tau)(student, teacher) on the stored "
                "logits: loss, grad (d loss / d student logits; first setting only), inter = DIST(1, 0, tau), "
                "intra = DIST(0, 1, tau); step: lib/models/losses/kd_loss.py KDLoss(student, teacher, CrossEntropyLoss(), 'dist_t4', "
                "ori_loss_weight=1, kd_loss_weight=2) on a Linear student (weight, bias) and fixed teacher "
                "logits, backward, one torch.optim.SGD step (lr, momentum, weight_decay): the updated parameters"},
        "cases": []}
    with rg.reference(cls_root, "lib"):
        dist_mod = importlib.import_module("lib.models.losses.dist_kd")
        kd_mod = importlib.import_module("lib.models.losses.kd_loss")
        for case in rg.logit_cases() + _more_cases():
            results = []
            for i, s in enumerate(SETTINGS):
                student = case["student"].clone().requires_grad_(True)
                loss = dist_mod.DIST(s["beta"], s["gamma"], s["temperature"])(student, case["teacher"])
                loss.backward()
                inter = dist_mod.DIST(1.0, 0.0, s["temperature"])(case["student"], case["teacher"])
                intra = dist_mod.DIST(0.0, 1.0, s["temperature"])(case["student"], case["teacher"])
                results.append({**s, "loss": loss.item(), "inter": inter.item(), "intra": intra.item()})
                if i == 0:  # the gradient at the CIFAR setting only: the file stays small
                    results[-1]["grad"] = rg.tensor_list(student.grad)
            out["cases"].append({"student": rg.tensor_list(case["student"]),
                                 "teacher": rg.tensor_list(case["teacher"]), "results": results})

        g = torch.Generator().manual_seed(7)
        x, teacher = torch.randn(32, 16, generator=g), torch.randn(32, 10, generator=g) * 3
        y = torch.randint(0, 10, (32,), generator=g)
        torch.manual_seed(7)
        student = nn.Linear(16, 10)
        before = {k: v.detach().clone() for k, v in student.state_dict().items()}
        loss_fn = kd_mod.KDLoss(student, _FixedTeacher(teacher), nn.CrossEntropyLoss(), kd_method="dist_t4",
                                ori_loss_weight=STEP["ori_loss_weight"], kd_loss_weight=STEP["kd_loss_weight"])
        optimizer = torch.optim.SGD(student.parameters(), lr=STEP["lr"], momentum=STEP["momentum"],
                                    weight_decay=STEP["weight_decay"])
        loss = loss_fn(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out["step"] = {**STEP, "x": rg.tensor_list(x), "y": rg.tensor_list(y), "teacher": rg.tensor_list(teacher),
                       "weight": rg.tensor_list(before["weight"]), "bias": rg.tensor_list(before["bias"]),
                       "loss": loss.item(), "weight_after": rg.tensor_list(student.weight),
                       "bias_after": rg.tensor_list(student.bias)}
    return out


def _more_cases() -> list[dict[str, torch.Tensor]]:
    """100 classes, a longer batch and a confident teacher: most probabilities are small."""
    g = torch.Generator().manual_seed(3)
    return [{"student": torch.randn(12, 100, generator=g) * 2, "teacher": torch.randn(12, 100, generator=g) * 5}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dist_kd", type=Path, help="checkout of hunto/DIST_KD with its classification submodule")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    payload = generate(args.dist_kd.resolve())
    rg.write_golden(args.out, payload, "tests/tools/goldens_dist.py", list(rg.STUBBED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
