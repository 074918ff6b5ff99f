"""Regenerate tests/data/reference_mlkd.json from the public MLKD reference code.

    python tests/tools/goldens_mlkd.py \\
        --mlkd PATH/Multi-Level-Logit-Distillation  (Jin-Ying/Multi-Level-Logit-Distillation) \\
        --ls   PATH/logit-standardization-KD        (sunshangquan/logit-standardization-KD) \\
        [--out tests/data/reference_mlkd.json]

Each PATH is a clean git checkout; its commit goes into ``_meta.sources``. As in
``reference_goldens.py``, the reference modules are imported from the checkouts and called on
seeded inputs; only inputs and outputs are kept. What is recorded:

* ``cases``: the release's distiller (``KD_ours`` of the MLKD repository; ``MLKD`` of the LS
  repository with ``LOGIT_STAND`` on) run by its own ``forward_train`` on stored weak and strong
  logits: the four loss values and the gradient of their sum w.r.t. the student's weak and strong
  logits. The "images" are the logits themselves: the student returns the first half of each
  row, the teacher the second half, so the release's forward runs unchanged.
* ``pieces``: the release's ``kd_loss(reduce=False)``, ``bc_loss(reduce=False)`` and
  ``cc_loss(reduce=False)`` per temperature on the weak logits: the per-sample and per-entry
  values kdtune's ``mask_mode: select`` is built from.
* ``step``: one training step of a tiny linear student under the release's ``forward_train`` on
  stored weak/strong inputs (sum of the losses, backward, SGD with the release's momentum 0.9
  and weight decay 5e-4): the student's parameters after the step.
* ``augment``: the release's RandAugment operations and Cutout (``mdistiller/dataset/cifar100.py``)
  on a stored image with given magnitudes and centres.

Both releases' distiller modules import ``turtle`` (unused); where its Tk is missing it is
stubbed, and ``_meta.stubbed_imports`` lists it.
"""
from __future__ import annotations

import argparse
import base64
import importlib
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference_goldens as rg  # noqa: E402

MLKD_REPO, LS_REPO = "Jin-Ying/Multi-Level-Logit-Distillation", "sunshangquan/logit-standardization-KD"
LOSS_KEYS = ("loss_ce", "loss_kd", "loss_cc", "loss_bc")
NOTE = ("cases: the releases' forward_train on the stored weak/strong logits (loss values, gradient of their "
        "sum w.r.t. the student's weak and strong logits); pieces: kd_loss/bc_loss/cc_loss(reduce=False) per "
        "temperature on the weak logits; steps: one SGD step of a linear student under the release's loss; "
        "augment: the release's RandAugment operations and Cutout on a stored uint8 image")


class Half(torch.nn.Module):
    """Returns one half of each input row as the "logits" (student: first, teacher: second)."""

    def __init__(self, second: bool) -> None:
        super().__init__()
        self.second = second

    def forward(self, image: torch.Tensor):
        c = image.shape[1] // 2
        return (image[:, c:] if self.second else image[:, :c]), {}


def _cfg(temperature: float, ce: float, kd: float, logit_stand: bool) -> types.SimpleNamespace:
    ns = types.SimpleNamespace
    return ns(KD=ns(TEMPERATURE=temperature, LOSS=ns(CE_WEIGHT=ce, KD_WEIGHT=kd)),
              EXPERIMENT=ns(LOGIT_STAND=logit_stand))


def _logits(seed: int, b: int, c: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(b, c, generator=g) * scale for k in ("s_w", "t_w", "s_s", "t_s")}
    out["target"] = torch.randint(0, c, (b,), generator=g)
    return out


SETTINGS = [  # (repository, temperature, ce_weight, kd_weight, logit_stand)
    ("mlkd", 4.0, 0.1, 0.9, False),  # the MLKD release's cfg.KD
    ("ls", 2.0, 0.1, 9.0, True),     # LS's --logit-stand --base-temp 2 --kd-weight 9
    ("ls", 4.0, 0.1, 0.9, False),    # LS's copy without standardization: the same as the MLKD release
]


def _run_case(cls, inputs: dict[str, torch.Tensor], setting: tuple) -> dict[str, Any]:
    _, temperature, ce, kd, ls = setting
    distiller = cls(Half(False), Half(True), _cfg(temperature, ce, kd, ls))
    s_w, s_s = inputs["s_w"].clone().requires_grad_(True), inputs["s_s"].clone().requires_grad_(True)
    weak, strong = torch.cat([s_w, inputs["t_w"]], 1), torch.cat([s_s, inputs["t_s"]], 1)
    _, losses = distiller.forward_train(image_weak=weak, image_strong=strong, target=inputs["target"])
    sum(losses[k] for k in LOSS_KEYS).backward()
    return {"temperature": temperature, "ce_weight": ce, "kd_weight": kd, "logit_stand": ls,
            "losses": {k: losses[k].item() for k in LOSS_KEYS},
            "grad_s_w": rg.tensor_list(s_w.grad), "grad_s_s": rg.tensor_list(s_s.grad)}


def _pieces(module, inputs: dict[str, torch.Tensor], temperatures: list[float]) -> list[dict[str, Any]]:
    s, t = inputs["s_w"], inputs["t_w"]
    return [{"temperature": tt,
             "kd": rg.tensor_list(module.kd_loss(s, t, tt, reduce=False)),
             "bc": rg.tensor_list(module.bc_loss(s, t, tt, reduce=False)),
             "cc": rg.tensor_list(module.cc_loss(s, t, tt, reduce=False))} for tt in temperatures]


def _step_tensors() -> dict[str, torch.Tensor]:
    """A linear student and teacher (12 inputs -> 10 classes) and a batch of weak/strong inputs."""
    g = torch.Generator().manual_seed(7)
    b, d, c = 8, 12, 10
    out = {"weak": torch.randn(b, d, generator=g), "strong": torch.randn(b, d, generator=g),
           "target": torch.randint(0, c, (b,), generator=g)}
    out["w_s"], out["b_s"] = torch.randn(c, d, generator=g) * 0.3, torch.randn(c, generator=g) * 0.1
    out["w_t"], out["b_t"] = torch.randn(c, d, generator=g), torch.randn(c, generator=g) * 0.1
    return out


class _Linear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor):
        return self.fc(x), {}


def _step(cls, setting: tuple, t: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One step under the release's loss: sum of the loss means, backward, SGD (lr 0.05 and the
    release's momentum 0.9, weight decay 5e-4): the student's parameters after it."""
    _, temperature, ce, kd, ls = setting
    student, teacher = _Linear(t["w_s"], t["b_s"]), _Linear(t["w_t"], t["b_t"])
    distiller = cls(student, teacher, _cfg(temperature, ce, kd, ls))
    distiller.train()
    opt = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt.zero_grad()
    _, losses = distiller.forward_train(image_weak=t["weak"], image_strong=t["strong"], target=t["target"])
    sum(v.mean() for v in losses.values()).backward()
    opt.step()
    return {"temperature": temperature, "ce_weight": ce, "kd_weight": kd, "logit_stand": ls,
            "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
            "weight_after": rg.tensor_list(student.fc.weight), "bias_after": rg.tensor_list(student.fc.bias)}


def _bytes(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).decode()


def augment(root: Path) -> dict[str, Any]:
    from PIL import Image

    with rg.reference(root, "mdistiller"):
        data = importlib.import_module("mdistiller.dataset.cifar100")
        pool = data.augment_list()
        rng = np.random.default_rng(0)
        h = w = 20  # > 16 x 16, so that Equalize has a non-zero step
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[3:9, 3:9] = rng.integers(100, 140, (6, 6, 3))  # a flat patch for the filters
        image[-4:] = 0  # a crop's zero padding
        ops = []
        for index, (fn, low, high) in enumerate(pool):
            for u in (0.123, 0.77):
                v = low + (high - low) * u
                ops.append({"op": index, "name": fn.__name__, "magnitude": v,
                            "out": _bytes(np.asarray(fn(Image.fromarray(image), v)))})
        cutouts = []
        for v, cx, cy in [(0.3, 5.5, 7.2), (0.49, w - 0.1, 1.2), (0.1, 2.0, h - 2.0), (0.25, 1.0001, float(h))]:
            centre = iter([cx, cy])
            saved = np.random.uniform
            np.random.uniform = lambda *a, **k: next(centre)  # the release draws the centre with numpy
            try:
                out = np.asarray(data.Cutout(Image.fromarray(image), v))
            finally:
                np.random.uniform = saved
            cutouts.append({"size_fraction": v, "centre_x": cx, "centre_y": cy, "out": _bytes(out)})
    return {"shape_hwc": [h, w, 3], "image": _bytes(image), "ops": ops, "cutouts": cutouts,
            "note": "uint8 HWC images, base64; op indices into the release's augment_list()"}


def generate(root: Path, ls_root: Path) -> dict[str, Any]:
    """The goldens from the two reference checkouts (MLKD's and LS's)."""
    rg._stub("turtle", st=None)  # both releases' distiller modules import turtle.st (unused)
    sources = {MLKD_REPO: rg.commit_of(root), LS_REPO: rg.commit_of(ls_root)}
    inputs = [_logits(0, 8, 10, 3.0), _logits(1, 7, 5, 5.0)]  # an odd batch and class count too
    cases, pieces, steps = [], [], []
    for name, path, module_name, cls_name in (("mlkd", root, "mdistiller.distillers.KD_ours", "KD_ours"),
                                             ("ls", ls_root, "mdistiller.distillers.MLKD", "MLKD")):
        with rg.reference(path, "mdistiller"):
            module = importlib.import_module(module_name)
            cls = getattr(module, cls_name)
            for setting in (s for s in SETTINGS if s[0] == name):
                for i, x in enumerate(inputs):
                    cases.append({"source": name, "input": i, **_run_case(cls, x, setting)})
                steps.append({"source": name, **_step(cls, setting, _step_tensors())})
            if name == "mlkd":
                pieces = [{"input": i, "temperatures": _pieces(module, x, [4.0, 3.0, 5.0, 2.0, 6.0])}
                          for i, x in enumerate(inputs)]
    return {
        "_meta": {"sources": sources, "note": NOTE},
        "inputs": [{k: rg.tensor_list(v) for k, v in x.items()} for x in inputs],
        "cases": cases, "pieces": pieces,
        "step_inputs": {k: rg.tensor_list(v) for k, v in _step_tensors().items()}, "steps": steps,
        "augment": augment(root),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlkd", type=Path, required=True)
    p.add_argument("--ls", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "data" / "reference_mlkd.json")
    args = p.parse_args(argv)
    with rg.cuda_is_identity():
        payload = generate(args.mlkd, args.ls)
    rg.write_golden(args.out, payload, "tests/tools/goldens_mlkd.py", list(rg.STUBBED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
