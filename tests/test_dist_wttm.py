"""DIST and WTTM: the released code's values (goldens), per-sample and batch-level terms, whole
runs on digits (they learn, they resume exactly) and the hyperparameters' validation."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdtune.config import ConfigError, RunConfig
from kdtune.distillers import METHODS, build_distiller
from kdtune.distillers.dist import dist_loss
from kdtune.distillers.functional import kl_logits
from kdtune.distillers.wttm import wttm_loss
from kdtune.models import build_model
from kdtune.run import build_engine
from learning import assert_learns

DATA = Path(__file__).parent / "data"
DIST = json.loads((DATA / "reference_dist.json").read_text())
WTTM = json.loads((DATA / "reference_wttm.json").read_text())
TERMS = {"dist": ("inter", "intra"), "wttm": ("wttm",)}


def _t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _cases(golden: dict) -> list[tuple[dict, dict]]:
    return [(c, r) for c in golden["cases"] for r in c["results"]]


# ----------------------------------------------------------------------------- goldens


def test_goldens_name_the_reference_commits() -> None:
    assert set(DIST["_meta"]["sources"]) == {"hunto/DIST_KD", "hunto/image_classification_sota"}
    assert set(WTTM["_meta"]["sources"]) == {"zkxufo/TTM"}
    for sha in [*DIST["_meta"]["sources"].values(), *WTTM["_meta"]["sources"].values()]:
        assert len(sha) == 40 and int(sha, 16) >= 0


@pytest.mark.parametrize("case, r", _cases(DIST), ids=[f"T{r['temperature']}" for _, r in _cases(DIST)])
def test_dist_equals_the_release(case, r) -> None:
    student = _t(case["student"]).requires_grad_(True)
    inter, intra = dist_loss(student, _t(case["teacher"]), r["temperature"])
    loss = r["beta"] * inter.mean() + r["gamma"] * intra
    assert inter.mean().item() == pytest.approx(r["inter"], rel=1e-5)
    assert intra.item() == pytest.approx(r["intra"], rel=1e-5)
    assert loss.item() == pytest.approx(r["loss"], rel=1e-5)
    if "grad" in r:
        loss.backward()
        torch.testing.assert_close(student.grad, _t(r["grad"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case, r", _cases(WTTM), ids=[f"gamma{r['gamma']}" for _, r in _cases(WTTM)])
def test_wttm_equals_the_release(case, r) -> None:
    s, t = _t(case["student"]).requires_grad_(True), _t(case["teacher"])
    loss = wttm_loss(s, t, r["gamma"]).mean()
    assert loss.item() == pytest.approx(r["loss"], rel=1e-5)
    # without the weight it is the release's TTM: the transformed teacher is softmax(gamma * z_t)
    assert kl_logits(r["gamma"] * t, s).mean().item() == pytest.approx(r["ttm"], rel=1e-5)
    if "grad" in r:
        loss.backward()
        torch.testing.assert_close(s.grad, _t(r["grad"]), rtol=1e-4, atol=1e-6)


class _Linear(nn.Module):
    """The goldens' tiny student, with the zoo's output convention ``(logits, features)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        self.fc.load_state_dict({"weight": weight, "bias": bias})

    def forward(self, x):
        return self.fc(x), {}


@pytest.mark.parametrize("name, params", [
    ("dist", lambda g: {"beta": g["kd_loss_weight"], "gamma": g["kd_loss_weight"],  # DIST(1, 1) x kd_loss_weight
                        "temperature": g["temperature"], "ce_weight": g["ori_loss_weight"]}),
    ("wttm", lambda g: {"gamma": g["gamma"], "beta": g["beta"], "ce_weight": g["ce_weight"]}),
], ids=["dist", "wttm"])
def test_one_training_step_equals_the_release(name, params) -> None:
    g = (DIST if name == "dist" else WTTM)["step"]
    student = _Linear(_t(g["weight"]), _t(g["bias"]))
    distiller = build_distiller(name, student, None, **params(g))
    optimizer = torch.optim.SGD(student.parameters(), lr=g["lr"], momentum=g["momentum"],
                                weight_decay=g["weight_decay"])
    _, losses = distiller(_t(g["x"]), _t(g["y"], torch.long), teacher_logits=_t(g["teacher"]))
    loss = sum(term.mean() for term in losses.values())
    loss.backward()
    optimizer.step()
    assert loss.item() == pytest.approx(g["loss"], rel=1e-5)
    torch.testing.assert_close(student.fc.weight.detach(), _t(g["weight_after"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(student.fc.bias.detach(), _t(g["bias_after"]), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- terms


def _logits(b: int = 6, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 3, torch.randn(b, c, generator=g) * 3


def test_terms_are_per_sample_and_intra_is_batch_level() -> None:
    s, t = _logits()
    student = _Linear(torch.eye(10), torch.zeros(10))
    y = torch.arange(6)
    _, losses = build_distiller("dist", student, None)(s, y, teacher_logits=t)
    assert set(losses) == {"ce", "inter", "intra"} and all(v.shape == (6,) for v in losses.values())
    assert torch.all(losses["intra"] == losses["intra"][0])  # one value for the batch, broadcast
    inter, intra = dist_loss(s, t, 4.0)
    torch.testing.assert_close(losses["inter"], 2.0 * inter)  # defaults: beta = gamma = 2, T 4
    assert losses["intra"][0].item() == pytest.approx(2.0 * intra.item())
    # a sample's inter term depends on that sample alone; the intra term on the whole batch
    torch.testing.assert_close(dist_loss(s[:3], t[:3], 4.0)[0], inter[:3])
    assert dist_loss(s[:3], t[:3], 4.0)[1].item() != pytest.approx(intra.item())
    _, losses = build_distiller("wttm", student, None)(s, y, teacher_logits=t)
    assert set(losses) == {"ce", "wttm"} and losses["wttm"].shape == (6,)
    for name in ("dist", "wttm"):
        cls = METHODS.get(name)
        assert cls.teacher_logits_only  # the exact teacher-output cache may serve the logits
    assert METHODS.get("dist").unweighted_terms == ("ce", "intra")  # KDAS reweights inter, not intra
    assert METHODS.get("wttm").unweighted_terms == ("ce",)


def test_wttm_weight_is_the_teachers_power_sum_and_has_no_gradient() -> None:
    s, t = _logits()
    t.requires_grad_(True)
    gamma = 0.3
    weight = (torch.softmax(t.detach().double(), 1) ** gamma).sum(1)
    kl = kl_logits(gamma * t.detach(), s)
    torch.testing.assert_close(wttm_loss(s, t, gamma).double(), weight * kl.double(), rtol=1e-5, atol=0)
    assert not wttm_loss(s, t, gamma).requires_grad  # the teacher's logits carry no gradient
    # gamma 1: no transform and a weight of 1, i.e. KD at T = 1
    torch.testing.assert_close(wttm_loss(s, t.detach(), 1.0), kl_logits(t.detach(), s))
    # bf16 logits are computed in float32
    assert wttm_loss(s.bfloat16(), t.detach().bfloat16(), gamma).dtype == torch.float32
    assert dist_loss(s.bfloat16(), t.detach().bfloat16(), 4.0)[0].dtype == torch.float32


# ----------------------------------------------------------------------------- whole runs


def _cfg(**kw) -> RunConfig:
    base = dict(dataset="digits", student="resnet8", teacher="resnet8", epochs=3, batch_size=64,
                val_size=200, device="cpu", seed=0)
    base.update(kw)
    return RunConfig.from_dict(base)


@pytest.mark.parametrize("name", ["dist", "wttm"])
def test_each_method_learns_on_digits_and_resumes_exactly(digits, trained_resnet8, name, tmp_path) -> None:
    cfg = _cfg(method=name)
    straight = build_engine(cfg, digits, trained_resnet8)
    run = straight.run()
    metrics = [next(run), next(run)]
    # the state after epoch 2 is what a run stopped there saves (state_dict changes nothing)
    torch.save(straight.state_dict(), tmp_path / "s.pth")
    metrics += list(run)
    assert_learns(metrics, loss="train/loss_ce", label=name)
    for m in metrics:
        terms = [m[f"train/loss_{k}"] for k in ("ce", *TERMS[name])]
        assert math.isclose(m["train/loss"], sum(terms), rel_tol=1e-5)
        assert all(v > 0 for v in terms), (name, m)  # every distillation term is live
    # a fresh engine loads the state and runs the last epoch: the same losses, bit for bit
    resumed = build_engine(cfg, digits, trained_resnet8)
    resumed.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True))
    keys = ("epoch", "train/loss", "val/acc1")
    assert [[m[k] for k in keys] for m in resumed.run()] == [[m[k] for k in keys] for m in metrics[2:]]


# ----------------------------------------------------------------------------- validation


def test_hyperparameters_are_validated() -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"method": "dist", "beta": -1, "gamma": "x", "temperature": 0})
    text = str(e.value)
    for expected in ("beta: must be >= 0", "gamma: expected a number", "temperature: must be > 0"):
        assert expected in text
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"method": "wttm", "gamma": 0, "beta": -0.5, "temperature": 4})
    text = str(e.value)
    # WTTM's temperature is its transform (1 / gamma): there is no temperature to set
    for expected in ("gamma: must be > 0", "beta: must be >= 0", "temperature: unknown key"):
        assert expected in text
    student, teacher = build_model("resnet8", num_classes=10), build_model("resnet8", num_classes=10)
    with pytest.raises(ValueError, match="gamma"):
        build_distiller("wttm", student, teacher, gamma=-1.0)
    with pytest.raises(TypeError, match="logit_stand"):  # not part of either paper or release
        build_distiller("dist", student, teacher, logit_stand=True)
    for name in ("dist", "wttm"):  # the teacher-output cache may be forced on, and KDAS runs over them
        cfg = RunConfig.from_dict({"method": name, "teacher_cache": "on", "sampler": "kdas"})
        assert (cfg.method, cfg.teacher_cache, cfg.sampler) == (name, "on", "kdas")
