"""MLKD: its losses, gradients and one training step against the released code (with and without
logit standardization), its strong view against the release's augmentations, learning on digits,
exact resume, the strong view made only for methods that ask for it, and its settings' checks."""
from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdtune.config import ConfigError, RunConfig
from kdtune.distillers import build_distiller
from kdtune.distillers.mlkd import MLKD, cutout, rand_augment, strong_augment
from kdtune.models import build_model
from kdtune.run import build_engine
from kdtune.teacher_cache import use_cache
from learning import assert_learns

sys.path.insert(0, str(Path(__file__).parent / "tools"))
from goldens_mlkd import Half  # noqa: E402  (the stored logits as "models", as the goldens ran the release)

GOLDEN = json.loads((Path(__file__).parent / "data" / "reference_mlkd.json").read_text())
EXTRA = [3.0, 5.0, 2.0, 6.0]  # the release's fixed temperatures after cfg.KD.TEMPERATURE


def _inputs(i: int) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in GOLDEN["inputs"][i].items()}


def _mlkd(student, teacher, case: dict, **kw) -> MLKD:
    return MLKD(student, teacher, temperature=case["temperature"], extra_temperatures=EXTRA,
                ce_weight=case["ce_weight"], kd_weight=case["kd_weight"], logit_stand=case["logit_stand"], **kw)


RELEASED = {"mask_mode": "released", "released_strong_kd": True}


@pytest.mark.parametrize("case", GOLDEN["cases"],
                         ids=lambda c: f"{c['source']}-in{c['input']}-ls{int(c['logit_stand'])}")
def test_released_arithmetic_equals_the_release_loss_and_gradient(case) -> None:
    x = _inputs(case["input"])
    s_w, s_s = x["s_w"].clone().requires_grad_(True), x["s_s"].clone().requires_grad_(True)
    mlkd = _mlkd(Half(False), Half(True), case, **RELEASED).train()
    logits, terms = mlkd(torch.cat([s_w, x["t_w"]], 1), x["target"], strong=torch.cat([s_s, x["t_s"]], 1))
    assert torch.equal(logits, s_w) and all(v.shape == (len(s_w),) for v in terms.values())
    got = {"loss_ce": terms["ce"].mean(), "loss_kd": terms["kd_weak"].mean() + terms["kd_strong"].mean(),
           "loss_cc": terms["cc"].mean(), "loss_bc": terms["bc"].mean()}
    for key, want in case["losses"].items():
        assert math.isclose(got[key].item(), want, rel_tol=1e-4, abs_tol=1e-6), (key, got[key].item(), want)
    sum(got.values()).backward()
    torch.testing.assert_close(s_w.grad, torch.tensor(case["grad_s_w"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s_s.grad, torch.tensor(case["grad_s_s"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("ref", GOLDEN["pieces"], ids=lambda r: f"in{r['input']}")
def test_select_masks_apply_the_releases_unreduced_terms_per_sample_and_row(ref) -> None:
    x = _inputs(ref["input"])
    case = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 1.0, "logit_stand": False}
    mlkd = _mlkd(Half(False), Half(True), case).train()
    _, terms = mlkd(torch.cat([x["s_w"], x["t_w"]], 1), x["target"], strong=torch.cat([x["s_s"], x["t_s"]], 1))
    p_t = F.softmax(x["t_w"], dim=1).numpy()
    confidence, per_class = p_t.max(1), p_t.sum(0)
    m = (confidence <= np.percentile(confidence, 50)).astype(np.float64)  # the release's masks
    k = (per_class <= np.percentile(per_class, 50)).astype(np.float64)
    kd = sum(np.array(t["kd"]) for t in ref["temperatures"]) * m
    bc = sum((np.array(t["bc"]).sum(1) * m).sum() for t in ref["temperatures"])
    cc = sum((np.array(t["cc"]).sum(1) * k).sum() for t in ref["temperatures"])
    np.testing.assert_allclose(terms["kd_weak"].numpy(), kd, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(terms["bc"].numpy(), bc, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(terms["cc"].numpy(), cc, rtol=1e-4, atol=1e-7)
    assert 0 < m.sum() < len(m)  # the masks select: some samples in, some out


class _Linear(torch.nn.Module):
    def __init__(self, weight: list, bias: list) -> None:
        super().__init__()
        w = torch.tensor(weight)
        self.fc = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.copy_(torch.tensor(bias))

    def forward(self, x: torch.Tensor):
        return self.fc(x), {}


@pytest.mark.parametrize("ref", GOLDEN["steps"], ids=lambda r: f"{r['source']}-ls{int(r['logit_stand'])}")
def test_one_training_step_equals_the_release(ref) -> None:
    t = GOLDEN["step_inputs"]
    student = _Linear(t["w_s"], t["b_s"])
    mlkd = _mlkd(student, _Linear(t["w_t"], t["b_t"]), ref, **RELEASED).train()
    opt = torch.optim.SGD(student.parameters(), lr=ref["lr"], momentum=ref["momentum"],
                          weight_decay=ref["weight_decay"])
    _, terms = mlkd(torch.tensor(t["weak"]), torch.tensor(t["target"]), strong=torch.tensor(t["strong"]))
    sum(v.mean() for v in terms.values()).backward()  # the engine's reduction
    opt.step()
    torch.testing.assert_close(student.fc.weight.detach(), torch.tensor(ref["weight_after"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(student.fc.bias.detach(), torch.tensor(ref["bias_after"]), rtol=1e-4, atol=1e-6)


def _image(encoded: str) -> torch.Tensor:
    h, w, c = GOLDEN["augment"]["shape_hwc"]
    array = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).reshape(h, w, c)
    return torch.tensor(array).permute(2, 0, 1)[None].float()


def test_each_augmentation_equals_the_releases_on_pil_images() -> None:
    ref = GOLDEN["augment"]
    x = _image(ref["image"])
    for op in ref["ops"]:
        got = rand_augment(x, torch.tensor([[op["op"]]]), torch.tensor([[op["magnitude"]]], dtype=torch.float64))
        want = _image(op["out"])
        assert torch.equal(got, want), (op["name"], op["magnitude"], int((got != want).sum()))
    w = x.shape[-1]
    for c in ref["cutouts"]:
        size, centre_x, centre_y = (torch.tensor([v], dtype=torch.float64)
                                    for v in (c["size_fraction"] * w, c["centre_x"], c["centre_y"]))
        got = cutout(x, size, centre_x, centre_y)
        assert torch.equal(got, _image(c["out"])), c
    # two operations in turn, each sample its own: the batch equals the samples done one by one
    ops = torch.tensor([[7, 1], [9, 4], [11, 0]])
    mags = torch.tensor([[12.5, 0.3], [0.2, 0.5], [100.0, 0.1]], dtype=torch.float64)
    batch = rand_augment(x.expand(3, -1, -1, -1), ops, mags)
    for i in range(3):
        one = rand_augment(rand_augment(x, ops[i:i + 1, :1], mags[i:i + 1, :1]), ops[i:i + 1, 1:], mags[i:i + 1, 1:])
        assert torch.equal(batch[i:i + 1], one)


def test_strong_augment_draws_per_sample_and_repeats_with_its_generator() -> None:
    x = _image(GOLDEN["augment"]["image"]).expand(64, -1, -1, -1)
    out = strong_augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, strong_augment(x, torch.Generator().manual_seed(3)))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())
    distinct = {bytes(o.to(torch.uint8).numpy()) for o in out}
    assert len(distinct) > 60  # one image, 64 different views: each sample draws its own


def _cfg(**kw) -> RunConfig:
    base = dict(dataset="digits", val_size=200, teacher="resnet8", student="resnet8", method="mlkd",
                epochs=3, batch_size=64, device="cpu", seed=0)
    return RunConfig.from_dict({**base, **kw})


def test_mlkd_learns_on_digits_and_resumes_exactly(digits, trained_resnet8, tmp_path) -> None:
    logs = []
    cfg = _cfg()
    straight = build_engine(cfg, digits, trained_resnet8, log=logs.append)
    run = straight.run()
    metrics = [next(run), next(run)]
    # the state after epoch 2 is what a run stopped there saves (state_dict changes nothing)
    torch.save(straight.state_dict(), tmp_path / "s.pth")
    metrics += list(run)
    assert_learns(metrics, loss="train/loss_ce", label="mlkd")
    for m in metrics:
        parts = sum(m[f"train/loss_{k}"] for k in ("ce", "kd_weak", "kd_strong", "bc", "cc"))
        assert math.isclose(m["train/loss"], parts, rel_tol=1e-5)
        assert m["train/loss_kd_strong"] > 0 and m["train/loss_bc"] > 0
    assert sum("strong view" in line and "runs live" in line for line in logs) == 1  # said once
    # a fresh engine loads the state and runs the last epoch: weak and strong views alike
    state = torch.load(tmp_path / "s.pth", weights_only=True)
    assert "strong_generator" in state["loader"]
    resumed = build_engine(cfg, digits, trained_resnet8)
    resumed.load_state_dict(state)
    keys = ("epoch", "train/loss", "val/acc1")
    assert [[m[k] for k in keys] for m in resumed.run()] == [[m[k] for k in keys] for m in metrics[2:]]


def test_only_a_method_that_asks_gets_a_strong_view(digits) -> None:
    teacher = build_model("resnet8", num_classes=10, in_channels=1)
    kd, mlkd = (build_engine(_cfg(method=m), digits, teacher) for m in ("kd", "mlkd"))
    assert kd.loader.strong_view is None and set(kd.loader.state_dict()) == {"generator"}
    assert mlkd.loader.strong_view is strong_augment and not hasattr(kd.loader, "strong_generator")
    # the batches and weak views are the same with the strong view drawn or not
    for (x1, y1, i1, v1), (x2, y2, i2, v2) in zip(kd.loader.batches(), mlkd.loader.batches()):
        assert torch.equal(i1, i2) and torch.equal(v1, v2) and torch.equal(x1, x2)
        strong = mlkd.loader.strong_images(i2)
        assert strong.shape == x2.shape and not torch.equal(strong, x2)
    assert not use_cache("auto", "mlkd")[0] and "strong view" in use_cache("on", "mlkd")[1]
    assert use_cache("auto", "kd")[0]


def test_mlkd_without_a_strong_view_uses_the_weak_one() -> None:
    torch.manual_seed(0)
    mlkd = build_distiller("mlkd", build_model("resnet8", num_classes=10, in_channels=1),
                           build_model("resnet8", num_classes=10, in_channels=1), input_shape=(1, 8, 8)).train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    _, terms = mlkd(x, y)  # a direct call on fixed inputs (tests/tools/fingerprint.py)
    assert set(terms) == {"ce", "kd_weak", "kd_strong", "bc", "cc"} and MLKD.unweighted_terms == ("ce", "bc", "cc")


def test_mlkd_settings_are_validated() -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"method": "mlkd", "temperature": 0, "kd_weight": -1, "mask_mode": "both",
                             "extra_temperatures": [3, -2]})
    text = str(e.value)
    for expected in ("temperature: must be > 0", "kd_weight: must be >= 0",
                     "mask_mode: must be one of select, released", "extra_temperatures must be a list of positive"):
        assert expected in text, text
    with pytest.raises(ValueError, match="mask_mode"):
        build_distiller("mlkd", build_model("resnet8", num_classes=10, in_channels=1),
                        build_model("resnet8", num_classes=10, in_channels=1), mask_mode="median")
    cfg = RunConfig.from_dict({"method": "mlkd", "logit_stand": True, "temperature": 2, "kd_weight": 9})
    assert cfg.method_params == {"logit_stand": True, "temperature": 2.0, "kd_weight": 9.0}
