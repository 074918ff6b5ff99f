"""CTKD: the gradient reversal, the curriculum, the temperature's range, the adversarial step,
instance mode, and CTKD composed with DKD, logit standardization and KDAS."""
from __future__ import annotations

import math
import re

import pytest
import torch

from kdtune.config import ConfigError, RunConfig
from kdtune.distillers import build_distiller
from kdtune.distillers.ctkd import CURRICULA, curriculum_lambda, gradient_reversal
from kdtune.distillers.functional import kd_loss
from kdtune.models import build_model
from kdtune.run import build_engine
from learning import assert_learns


def test_gradient_reversal_is_identity_forward_and_scales_the_gradient_by_minus_lambda() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    y = gradient_reversal(x, 0.3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.3 * w)
    x.grad = None
    (gradient_reversal(x, 0.0) * w).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(w))


def test_reference_curriculum_ramps_along_a_cosine_to_one_at_epoch_ten() -> None:
    values = [curriculum_lambda(n, 10) for n in range(1, 16)]
    # The values the LS repository's CTKD log prints (with the sign the released code keeps in lambda).
    assert [round(v, 4) for v in values[:4]] == [0.0245, 0.0955, 0.2061, 0.3455]
    assert all(b > a for a, b in zip(values[:10], values[1:10]))
    assert values[9] == pytest.approx(1.0) and values[10:] == [values[9]] * 5
    assert values[4] == pytest.approx(0.5)
    assert curriculum_lambda(3, 10, lambda_max=2.0) == pytest.approx(2 * values[2])


def test_linear_constant_and_released_linear_curricula() -> None:
    assert [curriculum_lambda(n, 4, 1.0, "linear") for n in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert curriculum_lambda(1, 4, 0.5, "constant") == 0.5
    released = [curriculum_lambda(n, 10, 1.0, "linear_released") for n in (1, 9, 10, 50)]
    assert released == pytest.approx([0.1, 0.9, 0.9, 0.9])  # the released LinearDecay stops at 0.9
    # every curriculum offered reaches its plateau by curriculum_epochs and stays there
    plateaus = {name: [curriculum_lambda(n, 10, 1.0, name) for n in (10, 11, 40)] for name in CURRICULA}
    expected = {"cosine": 1.0, "linear": 1.0, "constant": 1.0, "linear_released": 0.9}
    assert plateaus.keys() == expected.keys()
    for name, values in plateaus.items():  # pytest >= 9.1 refuses approx() of nested containers
        assert values == pytest.approx([expected[name]] * 3), name
    with pytest.raises(ValueError, match="curriculum must be one of"):
        curriculum_lambda(1, 10, 1.0, "sine")


def _pair(num_classes: int = 10):
    torch.manual_seed(0)
    student = build_model("resnet8", num_classes=num_classes, in_channels=1)
    teacher = build_model("resnet14", num_classes=num_classes, in_channels=1)
    return student, teacher


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_temperature_stays_inside_its_range(mode: str) -> None:
    student, teacher = _pair()
    d = build_distiller("ctkd", student, teacher, temperature_mode=mode, t_start=2.0, t_end=10.0)
    s, t = 30 * torch.randn(16, 10), 30 * torch.randn(16, 10)
    with torch.no_grad():
        for p in d.ctkd.parameters():  # push theta to extremes either way
            p.copy_(torch.full_like(p, 6.0) if p.dim() < 2 else 5 * torch.randn_like(p))
        high = d.current_temperature(s, t)
        for p in d.ctkd.parameters():
            p.neg_()
        low = d.current_temperature(s, t)
    for temp in (high, low):  # sigmoid saturates in float32: the bounds are reachable, never crossed
        assert ((temp >= 2.0) & (temp <= 12.0)).all()
    assert high.max() > 11.9 and low.min() < 2.1


def test_initial_global_temperature_is_the_references() -> None:
    d = build_distiller("ctkd", *_pair())
    assert d.current_temperature(None, None).item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))


@pytest.mark.parametrize("mode", ["global", "instance"])
def test_a_step_moves_the_temperature_up_the_kd_loss_and_the_student_down(mode: str) -> None:
    student, teacher = _pair()
    with torch.no_grad():  # trained-size logits: at init they are so small the loss is flat in T
        student.fc.weight.mul_(30)
        teacher.fc.weight.mul_(60)
    d = build_distiller("ctkd", student, teacher, temperature_mode=mode, ce_weight=0.0, kd_weight=1.0,
                        theta_init=-1.0)
    d.on_epoch_start(10, 20)  # lambda = 1
    d.train()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    if mode == "instance":  # leave the zero-initialised last layer so temperatures differ per sample
        torch.nn.init.normal_(d.ctkd.mlp[-1].weight, std=0.1)

    def kd_value() -> float:
        with torch.no_grad():
            return d(x, y)[1]["kd"].mean().item()

    before = kd_value()
    d(x, y)[1]["kd"].mean().backward()
    temperature_params = list(d.ctkd.parameters())
    student_params = list(d.student.parameters())
    saved = [p.detach().clone() for p in student_params]
    with torch.no_grad():  # the temperature's step alone: the distillation loss goes up
        for p in temperature_params:
            p -= 0.01 * p.grad
    assert kd_value() > before
    with torch.no_grad():  # undo it; the student's step alone: the loss goes down
        for p in temperature_params:
            p += 0.01 * p.grad
        assert kd_value() == pytest.approx(before)
        for p in student_params:
            p -= 1e-3 * p.grad
    assert kd_value() < before
    with torch.no_grad():
        for p, s in zip(student_params, saved):
            p.copy_(s)


def test_gradient_on_the_temperature_is_the_reversed_direct_gradient() -> None:
    student, teacher = _pair()
    d = build_distiller("ctkd", student, teacher, ce_weight=0.0, kd_weight=1.0)
    d.on_epoch_start(3, 20)
    lam = curriculum_lambda(3, 10)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    d(x, y)[1]["kd"].mean().backward()
    with torch.no_grad():
        s, t = d.student(x)[0], d.teacher(x)[0]
    theta = d.ctkd.theta.detach().clone().requires_grad_(True)
    kd_loss(s, t, 1 + 20 * torch.sigmoid(theta)).mean().backward()
    assert d.ctkd.theta.grad.item() == pytest.approx(-lam * theta.grad.item(), rel=1e-4)


def test_instance_mode_gives_one_temperature_per_sample() -> None:
    d = build_distiller("ctkd", *_pair(), temperature_mode="instance", temperature_hidden=16)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    temp = d.current_temperature(s, t)
    assert temp.shape == (8,)
    assert torch.allclose(temp, torch.full((8,), 1 + 20 / (1 + math.exp(-1))))  # starts at the global init
    torch.nn.init.normal_(d.ctkd.mlp[-1].weight)
    assert d.current_temperature(s, t).unique().numel() == 8
    # The student learns through the KL only, never by steering its own temperature.
    s.requires_grad_(True)
    d.current_temperature(s, t).sum().backward()
    assert s.grad is None or torch.equal(s.grad, torch.zeros_like(s))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(5)
    return build_model("resnet8", num_classes=10, in_channels=1)


def _engine(digits, teacher, **kw):
    cfg = dict(dataset="digits", val_size=200, teacher="resnet8", student="resnet8", method="ctkd",
               epochs=3, batch_size=128, device="cpu", curriculum_epochs=2)
    cfg.update(kw)
    return build_engine(RunConfig.from_dict(cfg), digits, teacher)


@pytest.fixture(scope="module")
def ctkd_run(digits, trained_resnet8, tmp_path_factory):
    """Plain CTKD (global temperature, 3 epochs) with the trained teacher, the engine's state saved
    after epoch 2: the composition test reads its metrics, the resume test continues it."""
    engine = _engine(digits, trained_resnet8)
    run = engine.run()
    metrics = [next(run), next(run)]
    # the state after epoch 2 is what a run stopped there saves (state_dict changes nothing)
    state = tmp_path_factory.mktemp("ctkd") / "s.pth"
    torch.save(engine.state_dict(), state)
    return metrics + list(run), state


@pytest.mark.parametrize("params", [
    {},
    {"method": "ctkd_dkd", "warmup": 2},
    {"logit_stand": True, "t_start": 2.0},
    {"method": "ctkd_dkd", "logit_stand": True},
    {"sampler": "kdas", "sampling_period": 2},
    {"temperature_mode": "instance", "temperature_hidden": 32, "method": "ctkd_dkd"},
])
def test_ctkd_composes_with_dkd_logit_standardization_and_kdas(digits, trained_resnet8, params, request) -> None:
    if params:
        metrics = list(_engine(digits, trained_resnet8, **params).run())
    else:  # plain CTKD: the run the resume test continues
        metrics = request.getfixturevalue("ctkd_run")[0]
    assert len(metrics) == 3
    assert_learns(metrics, loss="train/loss_ce", label=params)
    low = params.get("t_start", 1.0)
    for epoch, m in enumerate(metrics, start=1):
        assert m["ctkd/lambda"] == pytest.approx(curriculum_lambda(epoch, 2))
        assert low < m["ctkd/temperature_min"] <= m["ctkd/temperature"] <= m["ctkd/temperature_max"] < low + 20
    if params.get("temperature_mode") == "instance":
        assert metrics[-1]["ctkd/temperature_min"] < metrics[-1]["ctkd/temperature_max"]
    if "sampler" in params:
        assert metrics[0]["kdas/mean_weight"] < 1.0


def test_the_temperature_has_its_own_learning_rate_and_resumes_exactly(digits, teacher, trained_resnet8,
                                                                      ctkd_run) -> None:
    engine = _engine(digits, teacher, temperature_lr_scale=0.1, lr=0.05)
    theta = engine.distiller.ctkd.theta
    group = next(g for g in engine.optimizer.param_groups if any(p is theta for p in g["params"]))
    assert group["lr"] == pytest.approx(0.005) and len(group["params"]) == 1
    assert group["weight_decay"] == engine.recipe.weight_decay  # the student's SGD settings otherwise
    # a fresh engine loads the state saved after epoch 2 of the plain CTKD run and runs epoch 3
    full, state = ctkd_run
    second = _engine(digits, trained_resnet8)
    second.load_state_dict(torch.load(state, weights_only=True))
    keys = ("epoch", "train/loss", "val/acc1", "ctkd/temperature", "ctkd/lambda")
    assert [[m[k] for k in keys] for m in second.run()] == [[m[k] for k in keys] for m in full[2:]]


def test_ctkd_config_is_validated() -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"method": "ctkd", "t_start": 0, "curriculum": "sine",
                             "temperature_mode": "sample", "lambda_max": -1})
    text = str(e.value)
    for expected in ("t_start: must be > 0", "curriculum: must be one of cosine, linear, constant",
                     "temperature_mode: must be one of global, instance", "lambda_max: must be >= 0"):
        assert expected in text
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"method": "ctkd", "temperature": 4})  # learned, not set
    text = str(e.value)
    # the key is refused as unknown to ctkd, and the hint names the methods that do take it
    assert "temperature: unknown key" in text and re.search(r"it is a hyperparameter of methods [^;]*'kd'", text)
