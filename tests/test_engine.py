from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from kdtune.config import RunConfig
from kdtune.data import Split
from kdtune.engine import Recipe
from kdtune.run import build_engine


def test_step_schedule_matches_the_reference_milestones() -> None:
    r = Recipe(epochs=240, lr=0.05)
    assert r.lr_factor(1) == 1 and r.lr_factor(150) == 1
    assert math.isclose(r.lr_factor(151), 0.1) and math.isclose(r.lr_factor(180), 0.1)
    assert math.isclose(r.lr_factor(181), 0.01) and math.isclose(r.lr_factor(211), 0.001)
    short = Recipe(epochs=24)  # milestones scale to 15 / 18 / 21
    assert short.lr_factor(15) == 1 and math.isclose(short.lr_factor(16), 0.1)
    assert math.isclose(short.lr_factor(22), 0.001)


def test_cosine_and_warmup() -> None:
    r = Recipe(epochs=10, lr=0.1, schedule="cosine", lr_min=0.0)
    assert r.lr_factor(1) == 1.0
    assert math.isclose(r.lr_factor(6), 0.5)
    assert r.lr_factor(10) < 0.03
    w = Recipe(epochs=10, warmup_epochs=4, schedule="constant")
    assert [w.lr_factor(e) for e in (1, 2, 4, 5)] == [0.25, 0.5, 1.0, 1.0]


def _cfg(**kw) -> RunConfig:
    base = dict(dataset="digits", method="kd", student="resnet8", teacher="resnet8", epochs=4,
                batch_size=128, val_size=200, device="cpu", seed=0)
    base.update(kw)
    return RunConfig.from_dict(base)


@pytest.fixture(scope="module")
def teacher(digits):
    from kdtune.models import build_model

    torch.manual_seed(123)
    return build_model("resnet8", num_classes=10, in_channels=1)


def _losses(engine, epochs: int | None = None) -> list[float]:
    out = []
    for m in engine.run():
        out.append(m["train/loss"])
        if epochs is not None and len(out) == epochs:
            break
    return out


@pytest.fixture(scope="module")
def kd_run(digits, teacher):
    """The default run of _cfg() (kd, 4 epochs, lr 0.05, weight decay 5e-4): its metrics, the
    teacher's state before and after it, and the donor of the copied-checkpoint test (the engine's
    state after epoch 2, with copies of the student's weights and momentum buffers then)."""
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    engine = build_engine(_cfg(), digits, teacher)
    run = engine.run()
    metrics = [next(run), next(run)]
    student = list(engine.distiller.student.parameters())
    donor = {"state": copy.deepcopy(engine.state_dict()), "weights": [p.detach().clone() for p in student],
             "momentum": [engine.optimizer.state[p]["momentum_buffer"].clone() for p in student]}
    metrics += list(run)
    after = {k: v.clone() for k, v in teacher.state_dict().items()}
    return metrics, before, after, donor


def test_seeded_run_reproduces_its_losses(digits, teacher, kd_run) -> None:
    a = [m["train/loss"] for m in kd_run[0]]
    b = _losses(build_engine(_cfg(), digits, teacher))
    c = _losses(build_engine(_cfg(seed=1), digits, teacher), epochs=1)
    assert a == b
    assert c[0] != a[0]  # another seed: another run from its first epoch on
    assert a[-1] < a[0]  # it learns


def test_save_restore_continue_equals_uninterrupted(digits, teacher, tmp_path) -> None:
    # 2 epochs, stopped after the first: DKD's warmup (2 epochs) and the step schedule's milestones
    # (scaled to 1.25, 1.5, 1.75) both change between them
    cfg = _cfg(method="dkd", warmup=2, epochs=2)
    full = build_engine(cfg, digits, teacher)
    run = full.run()
    expected = [next(run)]
    # the state after epoch 1 is what a run stopped there saves (state_dict changes nothing)
    torch.save(full.state_dict(), tmp_path / "ckpt.pth")
    expected += list(run)
    assert expected[0]["lr"] != expected[1]["lr"]
    torch.manual_seed(999)  # a different process state must not matter
    second = build_engine(_cfg(method="dkd", warmup=2, epochs=2, seed=0), digits, teacher)
    second.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True))
    tail = [m for m in second.run()]
    assert len(tail) == 1
    for got, want in zip(tail, expected[1:]):
        assert got["epoch"] == want["epoch"]
        assert got["train/loss"] == want["train/loss"]
        assert got["val/acc1"] == want["val/acc1"]
        assert got["samples/backprop"] == want["samples/backprop"]


def test_metrics_per_epoch(digits, kd_run) -> None:
    metrics = kd_run[0]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    m = metrics[-1]
    n = len(digits.train)
    assert m["samples/backprop"] == 4 * n and m["samples/epoch"] == n
    for key in ("train/loss", "train/loss_ce", "train/loss_kd", "train/acc1", "train/acc5",
                "val/acc1", "val/acc5", "val/loss", "lr", "time/epoch_s"):
        assert key in m and math.isfinite(m[key]), key
    assert math.isclose(m["train/loss"], m["train/loss_ce"] + m["train/loss_kd"], rel_tol=1e-6)
    assert 0 <= m["val/acc1"] <= m["val/acc5"] <= 100


def test_final_run_trains_on_train_plus_val_and_reports_test(digits, teacher) -> None:
    engine = build_engine(_cfg(epochs=1, final=True), digits, teacher)
    m = next(engine.run())
    assert m["samples/epoch"] == len(digits.train) + len(digits.val)
    assert "test/acc1" in m and "val/acc1" not in m


def test_teacher_stays_frozen_through_training(kd_run) -> None:
    _, before, after, _ = kd_run  # around the 4 epochs of the default run
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included


def test_cuda_settings_bf16_and_channels_last_run_on_cpu(digits, teacher) -> None:
    """The CUDA defaults (bf16 autocast, NHWC) exercised on the CPU: same math within bf16 error."""
    from kdtune.engine import Engine
    from kdtune.distillers import build_distiller
    from kdtune.models import build_model

    # bfloat16 convolutions are emulated on CPUs without bf16 units: 320 training images in batches
    # of 32 make as many steps (10 an epoch) as digits' 1238 in batches of 128, at a quarter the cost
    data = dataclasses.replace(digits, train=Split(digits.train.images[:320], digits.train.labels[:320]))

    def run(**kw) -> dict:
        torch.manual_seed(0)
        student = build_model("resnet8", num_classes=10, in_channels=1)
        engine = Engine(build_distiller("kd", student, teacher), data, Recipe(epochs=2, batch_size=32), **kw)
        metrics = list(engine.run())
        assert [m["samples/epoch"] for m in metrics] == [320, 320]
        return metrics[-1]

    fast = run(amp=True, channels_last=True)
    plain = run(amp=False, channels_last=False)
    assert math.isfinite(fast["train/loss"]) and fast["train/loss"] != plain["train/loss"]  # bf16 did run
    assert abs(fast["train/loss"] - plain["train/loss"]) < 0.1 * plain["train/loss"]


def test_a_copied_checkpoint_keeps_the_trials_own_hyperparameters(digits, teacher, kd_run) -> None:
    """What a PBT trial does after copying another trial's checkpoint: that trial's weights and
    momentum, its own (mutated) learning rate, weight decay and temperature."""
    donor = kd_run[3]  # the default run after epoch 2
    state = donor["state"]
    assert (state["epoch"], state["recipe"]["lr"], state["recipe"]["weight_decay"]) == (2, 0.05, 5e-4)
    mutated = build_engine(_cfg(epochs=4, lr=0.08, weight_decay=1e-3, temperature=6.0), digits, teacher)
    mutated.load_state_dict(state, keep_hyperparameters=True)
    assert mutated.epoch == 2
    assert [g["base_lr"] for g in mutated.optimizer.param_groups] == [0.08]
    assert [g["weight_decay"] for g in mutated.optimizer.param_groups] == [1e-3]
    assert mutated.distiller.temperature == 6.0
    params = list(mutated.distiller.student.parameters())
    assert len(params) == len(donor["weights"])
    for p, weight, momentum in zip(params, donor["weights"], donor["momentum"]):
        assert torch.equal(p, weight)
        assert torch.equal(mutated.optimizer.state[p]["momentum_buffer"], momentum)
    assert next(mutated.run())["lr"] == pytest.approx(0.08 * mutated.recipe.lr_factor(3))
    # without the flag, the checkpoint's settings come back (an exact resume of the same run)
    plain = build_engine(_cfg(epochs=4, lr=0.08), digits, teacher)
    plain.load_state_dict(state)
    assert [g["base_lr"] for g in plain.optimizer.param_groups] == [0.05]
