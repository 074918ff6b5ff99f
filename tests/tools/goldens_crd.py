"""Golden values for CRD (tests/data/reference_crd.json) from the released code.

    git clone https://github.com/megvii-research/mdistiller PATH/mdistiller
    git clone https://github.com/HobbitLong/RepDistiller PATH/RepDistiller
    python tests/tools/goldens_crd.py PATH/mdistiller [PATH/RepDistiller] [--out tests/data/reference_crd.json]

Imports ``mdistiller.distillers.CRD`` (``CRD``, ``ContrastMemory``, ``ContrastLoss``, ``Embed``)
from the mdistiller checkout and, as a cross-check when its checkout is given, ``crd.criterion.CRDLoss``
from CRD's origin, RepDistiller; runs them on seeded inputs and keeps only their outputs and the inputs (both
commits in ``_meta.sources``). Nothing of the reference is copied into kdtune or into this file.

Recorded, on a toy training set (40 images, 4 classes, 8-d embeddings, K = 6 negatives from the
other classes, temperature 0.07, momentum 0.5):

* ``batches``: two consecutive calls of ``CRD.crd_loss(f_s, f_t, index, contrastive_index)``
  from the same initial memory and embedding heads: the loss, its gradient w.r.t. the student
  features, the normalisation constants Z (set by the first call, kept by the second) and both
  memories after each call. RepDistiller's ``CRDLoss`` with the same state gives the same
  numbers (checked here, not stored).
* ``step``: one training step of ``CRD.forward_train`` (CE 1 + 0.8 CRD) around a tiny student
  (:class:`TinyNet`, whose pooled feature is what CRD embeds) and a frozen tiny teacher,
  backward, one SGD step with the CIFAR recipe's settings: the losses and the updated student
  and head parameters, Z and the memories.

The ``.cuda()`` calls in ``ContrastMemory.__init__`` are the identity while it runs (CPU).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_goldens, beside this file
import reference_goldens as rg  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "reference_crd.json"
TOY = {"num_data": 40, "num_classes": 4, "s_dim": 12, "t_dim": 10, "feat_dim": 8, "nce_k": 6,
       "nce_temperature": 0.07, "nce_momentum": 0.5, "ce_weight": 1.0, "feat_weight": 0.8}
STEP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}  # mdistiller's CIFAR-100 solver


class TinyNet(nn.Module):
    """A two-layer perceptron in the zoo's interface: ``(logits, {"feats": [], "preact_feats": [],
    "pooled_feat": relu(linear(x))})``. The tests build the same module from the stored weights."""

    def __init__(self, in_features: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(in_features, width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor):
        pooled = F.relu(self.body(x.flatten(1)))
        return self.fc(pooled), {"feats": [], "preact_feats": [], "pooled_feat": pooled}


def toy_labels() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.arange(TOY["num_data"])[torch.randperm(TOY["num_data"], generator=g)] % TOY["num_classes"]


def contrast_rows(labels: torch.Tensor, index: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """[B, 1 + k]: the index itself, then k distinct other-class indices (the "exact" mode's rows)."""
    rows = []
    for i in index.tolist():
        others = (labels != labels[i]).nonzero().flatten()
        rows.append(torch.cat([torch.tensor([i]), others[torch.randperm(len(others), generator=g)[:k]]]))
    return torch.stack(rows)


def _cfg() -> types.SimpleNamespace:
    ns = types.SimpleNamespace
    return ns(CRD=ns(LOSS=ns(CE_WEIGHT=TOY["ce_weight"], FEAT_WEIGHT=TOY["feat_weight"]),
                     FEAT=ns(STUDENT_DIM=TOY["s_dim"], TEACHER_DIM=TOY["t_dim"], DIM=TOY["feat_dim"]),
                     NCE=ns(K=TOY["nce_k"], MOMENTUM=TOY["nce_momentum"], TEMPERATURE=TOY["nce_temperature"])))


def _state(module: nn.Module) -> dict[str, Any]:
    return {k: rg.tensor_list(v) for k, v in module.state_dict().items()}


def _memory(distiller: nn.Module) -> dict[str, Any]:
    c = distiller.contrast
    return {"memory_s": rg.tensor_list(c.memory_v1), "memory_t": rg.tensor_list(c.memory_v2),
            "normalizers": [c.params[2].item(), c.params[3].item()]}


def generate(root: Path, repdistiller: Path | None = None) -> dict[str, Any]:
    """``root``: a checkout of megvii-research/mdistiller; ``repdistiller``: one of HobbitLong/RepDistiller,
    to cross-check the values with CRD's origin (its commit is then recorded too)."""
    sources = {"megvii-research/mdistiller": rg.commit_of(root)}
    if repdistiller is not None:
        sources["HobbitLong/RepDistiller"] = rg.commit_of(repdistiller)
    out: dict[str, Any] = {"_meta": {
        "sources": sources,
        "note": "mdistiller/distillers/CRD.py. batches: CRD.crd_loss on stored pooled features, indices and "
                "contrastive indices (row 0 the index itself), two calls in a row from the stored initial "
                "memories (memory_s = ContrastMemory.memory_v1, the student's; memory_t = memory_v2) and heads "
                "(embed_s, embed_t): loss, d loss / d f_s, normalizers [Z_v1, Z_v2] and memories after the call; "
                "RepDistiller crd/criterion.py CRDLoss gives the same. step: CRD.forward_train around TinyNet "
                "student and teacher (body, fc), loss_ce + loss_kd, backward, one torch.optim.SGD step over "
                "get_learnable_parameters(): the updated parameters"},
        "toy": TOY, "labels": rg.tensor_list(toy_labels())}
    labels = toy_labels()
    g = torch.Generator().manual_seed(3)
    with rg.reference(root, "mdistiller"), rg.cuda_is_identity():
        crd_mod = importlib.import_module("mdistiller.distillers.CRD")
        torch.manual_seed(0)
        student = TinyNet(6, TOY["s_dim"], TOY["num_classes"])
        teacher = TinyNet(6, TOY["t_dim"], TOY["num_classes"])
        distiller = crd_mod.CRD(student, teacher, _cfg(), TOY["num_data"])
        initial = {"embed_s": _state(distiller.embed_s), "embed_t": _state(distiller.embed_t),
                   **{k: v for k, v in _memory(distiller).items() if k != "normalizers"}}
        out["initial"] = initial
        saved = {k: v.clone() for k, v in distiller.state_dict().items()}

        out["batches"] = []
        for b in (5, 6):
            index = torch.randperm(TOY["num_data"], generator=g)[:b]
            rows = contrast_rows(labels, index, TOY["nce_k"], g)
            f_s = torch.randn(b, TOY["s_dim"], generator=g).relu().requires_grad_(True)
            f_t = torch.randn(b, TOY["t_dim"], generator=g).relu()
            loss = distiller.crd_loss(f_s, f_t, index, rows)
            loss.backward()
            out["batches"].append({"index": rg.tensor_list(index), "rows": rg.tensor_list(rows),
                                   "f_s": rg.tensor_list(f_s), "f_t": rg.tensor_list(f_t), "loss": loss.item(),
                                   "grad_f_s": rg.tensor_list(f_s.grad), **_memory(distiller)})
        after = {k: v.clone() for k, v in distiller.state_dict().items()}

        # One training step of the distiller, from the same initial state.
        distiller.load_state_dict(saved)
        distiller.train()
        x = torch.randn(8, 6, generator=g)
        index = torch.randperm(TOY["num_data"], generator=g)[:8]
        y = labels[index]
        rows = contrast_rows(labels, index, TOY["nce_k"], g)
        before = {"student": _state(student), "teacher": _state(teacher)}
        optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), **STEP)
        _, losses = distiller.forward_train(image=x, target=y, index=index, contrastive_index=rows)
        loss = sum(v.mean() for v in losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out["step"] = {**STEP, "x": rg.tensor_list(x), "y": rg.tensor_list(y), "index": rg.tensor_list(index),
                       "rows": rg.tensor_list(rows), **before, "loss_ce": losses["loss_ce"].item(),
                       "loss_crd": losses["loss_kd"].item(), "student_after": _state(student),
                       "embed_s_after": _state(distiller.embed_s), "embed_t_after": _state(distiller.embed_t),
                       **_memory(distiller)}

    if repdistiller is None:
        return out
    # Cross-check: CRD's origin computes the same two batches from the same state.
    with rg.reference(repdistiller, "crd"), rg.cuda_is_identity():
        origin = importlib.import_module("crd.criterion")
        opt = types.SimpleNamespace(s_dim=TOY["s_dim"], t_dim=TOY["t_dim"], feat_dim=TOY["feat_dim"],
                                    nce_k=TOY["nce_k"], nce_t=TOY["nce_temperature"], nce_m=TOY["nce_momentum"],
                                    n_data=TOY["num_data"])
        criterion = origin.CRDLoss(opt)
        heads = ("embed_s", "embed_t", "contrast")
        criterion.load_state_dict({k: v for k, v in saved.items() if k.split(".")[0] in heads})
        for batch in out["batches"]:
            f_s = torch.tensor(batch["f_s"]).requires_grad_(True)
            loss = criterion(f_s, torch.tensor(batch["f_t"]), torch.tensor(batch["index"]), torch.tensor(batch["rows"]))
            loss.backward()
            assert loss.item() == batch["loss"], (loss.item(), batch["loss"])
            assert torch.equal(f_s.grad, torch.tensor(batch["grad_f_s"]))
        assert torch.equal(criterion.contrast.memory_v1, after["contrast.memory_v1"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mdistiller", type=Path, help="checkout of megvii-research/mdistiller")
    p.add_argument("repdistiller", type=Path, nargs="?", help="checkout of HobbitLong/RepDistiller (cross-check)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    payload = generate(args.mdistiller.resolve(), args.repdistiller and args.repdistiller.resolve())
    rg.write_golden(args.out, payload, "tests/tools/goldens_crd.py", list(rg.STUBBED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
