"""Golden values for WTTM (tests/data/reference_wttm.json) from the released code.

    git clone https://github.com/zkxufo/TTM PATH/TTM
    python tests/tools/goldens_wttm.py PATH/TTM [--out tests/data/reference_wttm.json]

This script imports ``distiller_zoo`` (``WTTM``, ``TTM``, ``DistillKL``) and ``helper.loops``
(``train_distill``) from the checkout, runs them on seeded inputs and keeps only their outputs
and the inputs; the commit is recorded in ``_meta.sources``. Nothing of the reference is copied
into kdtune or into this file.

Recorded: WTTM's loss and its gradient w.r.t. the student logits for several logit cases and
powers gamma (``--ttm_l``), with TTM's loss beside it (the same term without the weight); and
one training step: the release's ``train_distill`` (``--distill wttm -r 1 -a 0 -b beta``) for
one batch, with a tiny linear student and fixed teacher logits, and SGD with the release's
CIFAR settings: the updated parameters.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_goldens, beside this file
import reference_goldens as rg  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "reference_wttm.json"
GAMMAS = [0.2, 0.1, 0.5, 1.0]
STEP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "gamma": 0.2, "beta": 4.0, "ce_weight": 1.0}


class _Student(nn.Module):
    """A linear classifier with the release's model interface: ``(feats, logits)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x, is_feat=False, preact=False):
        return [x], self.fc(x)


class _FixedTeacher(nn.Module):
    """A teacher whose logits are given, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x, is_feat=False, preact=False):
        return [x], self.logits.clone()


def generate(root: Path) -> dict[str, Any]:
    """``root``: a checkout of zkxufo/TTM."""
    out: dict[str, Any] = {"_meta": {
        "sources": {"zkxufo/TTM": rg.commit_of(root)},
        "note": "cases: distiller_zoo/wttm.py WTTM(gamma)(student, teacher) on the stored logits: loss, grad "
                "(d loss / d student logits; first gamma only); ttm: distiller_zoo/ttm.py TTM(gamma) (no weight); "
                "step: helper/loops.py train_distill for one batch with opt.distill='wttm', gamma (-r) = "
                "ce_weight, alpha (-a) = 0, beta (-b) = beta, criterion_list [CrossEntropyLoss, DistillKL(4), WTTM(gamma)], "
                "a Linear student (weight, bias), fixed teacher logits and torch.optim.SGD(lr, momentum, "
                "weight_decay): the loss and the updated parameters"},
        "cases": []}
    with rg.reference(root, "distiller_zoo", "helper"):
        zoo = importlib.import_module("distiller_zoo")
        loops = importlib.import_module("helper.loops")
        for case in rg.logit_cases() + _more_cases():
            results = []
            for gamma in GAMMAS:
                student = case["student"].clone().requires_grad_(True)
                loss = zoo.WTTM(gamma)(student, case["teacher"])
                loss.backward()
                ttm = zoo.TTM(gamma)(case["student"], case["teacher"])
                results.append({"gamma": gamma, "loss": loss.item(), "ttm": ttm.item()})
                if gamma == GAMMAS[0]:  # the gradient at the default power only: the file stays small
                    results[-1]["grad"] = rg.tensor_list(student.grad)
            out["cases"].append({"student": rg.tensor_list(case["student"]),
                                 "teacher": rg.tensor_list(case["teacher"]), "results": results})

        g = torch.Generator().manual_seed(11)
        x, teacher = torch.randn(32, 16, generator=g), torch.randn(32, 10, generator=g) * 3
        y = torch.randint(0, 10, (32,), generator=g)
        torch.manual_seed(11)
        student = _Student()
        before = {k: v.detach().clone() for k, v in student.fc.state_dict().items()}
        criteria = nn.ModuleList([nn.CrossEntropyLoss(), zoo.DistillKL(4), zoo.WTTM(STEP["gamma"])])
        optimizer = torch.optim.SGD(student.parameters(), lr=STEP["lr"], momentum=STEP["momentum"],
                                    weight_decay=STEP["weight_decay"])
        opt = types.SimpleNamespace(distill="wttm", gamma=STEP["ce_weight"], alpha=0.0, beta=STEP["beta"],
                                    print_freq=100)
        batches = [(x, y, torch.arange(32))]
        with rg.cuda_is_identity(), contextlib.redirect_stdout(io.StringIO()):
            _, loss = loops.train_distill(1, batches, nn.ModuleList([student, _FixedTeacher(teacher)]), criteria,
                                          optimizer, opt)
        out["step"] = {**STEP, "x": rg.tensor_list(x), "y": rg.tensor_list(y), "teacher": rg.tensor_list(teacher),
                       "weight": rg.tensor_list(before["weight"]), "bias": rg.tensor_list(before["bias"]),
                       "loss": float(loss), "weight_after": rg.tensor_list(student.fc.weight),
                       "bias_after": rg.tensor_list(student.fc.bias)}
    return out


def _more_cases() -> list[dict[str, torch.Tensor]]:
    """A confident 100-class teacher: most of its probabilities are tiny before the transform."""
    g = torch.Generator().manual_seed(3)
    return [{"student": torch.randn(6, 100, generator=g) * 2, "teacher": torch.randn(6, 100, generator=g) * 6}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ttm", type=Path, help="checkout of zkxufo/TTM")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    payload = generate(args.ttm.resolve())
    rg.write_golden(args.out, payload, "tests/tools/goldens_wttm.py", list(rg.STUBBED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
