"""KDAS (adaptive sampling + teacher-target penalty) against direct computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.config import ConfigError, RunConfig
from kdtune.models import build_model
from kdtune.run import build_engine
from kdtune.sampling import KDAS, penalty_weights, select, teacher_target_divergence
from learning import assert_learns


def test_ratio_schedule_of_the_defaults() -> None:
    # every epoch's ratio and scoring flag are compared with kdas_iccv's trainer in test_reference.py
    k = KDAS()  # start 0.6, end 0.4, periods [1, 3, 5, 10]
    assert k.rate(1, 240) == pytest.approx(0.6) and k.rate(240, 240) == pytest.approx(0.4)
    rates = [k.rate(e, 240) for e in range(1, 241)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # never rises


def test_warmup_and_int_period() -> None:
    k = KDAS(kdas_warmup=10, sampling_period=5)
    assert k.rate(10, 100) == 1.0 and k.rate(11, 100) == pytest.approx(0.6)
    assert not k.is_scoring_epoch(10, 100)
    assert [e for e in range(1, 31) if k.is_scoring_epoch(e, 100)] == [11, 16, 21, 26]


def test_exclusion_decays_after_five_eighths_of_the_run() -> None:
    k = KDAS(exclusion_rate=0.05)
    assert k.exclusion(150, 240) == 0.05
    assert k.exclusion(195, 240) == pytest.approx(0.025) and k.exclusion(240, 240) == 0.0


def test_selection_skips_the_top_share_and_keeps_the_next_batch() -> None:
    scores = torch.tensor([0.5, 9.0, 0.1, 3.0, 7.0, 0.2, 5.0, 1.0, 8.0, 0.3])
    keep = select(scores, batch_size=4, exclusion=0.0)
    assert sorted(keep.tolist()) == [1, 4, 6, 8]  # the four largest
    keep = select(scores, batch_size=4, exclusion=0.2)  # skip ceil(10 * 0.2) = 2: 9.0 and 8.0
    assert sorted(keep.tolist()) == [3, 4, 6, 7]
    assert select(scores[:3], batch_size=4, exclusion=0.5).tolist() == [0, 1, 2]  # short batch: all
    # exactly batch_size samples (ratio 1): the release (N < effective_bs keeps all) still skips
    assert sorted(select(scores[:4], batch_size=4, exclusion=0.25).tolist()) == [0, 2, 3]  # 9.0 out
    assert select(scores[:4], batch_size=4, exclusion=0.0).tolist() == [0, 1, 2, 3]


def test_penalty_weights_on_known_inputs() -> None:
    kl = torch.arange(10, dtype=torch.float32)  # q_0.2 = 1.8, q_0.8 = 7.2 (linear interpolation)
    w = penalty_weights(kl, threshold=0.2, strength=0.5, floor=0.3)
    expected = [max(0.3, 1 - 0.5 * 1.8), max(0.3, 1 - 0.5 * 0.8), 1, 1, 1, 1, 1, 1, 1 - 0.5 * 0.8,
                max(0.3, 1 - 0.5 * 1.8)]
    assert torch.allclose(w, torch.tensor(expected))
    steep = penalty_weights(kl, threshold=0.2, strength=1000.0, floor=0.5)
    assert steep[2:8].eq(1).all() and steep[[0, 1, 8, 9]].eq(0.5).all()


def test_teacher_target_divergence_is_the_smoothed_label_cross_entropy() -> None:
    t = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    smooth = torch.full((6, 5), 1e-6 / 4).scatter(1, y[:, None], 1 - 1e-6)
    expected = (smooth * (smooth.log() - F.log_softmax(t, 1))).sum(1)
    assert torch.allclose(teacher_target_divergence(t, y), expected, atol=1e-5)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(5)
    return build_model("resnet8", num_classes=10, in_channels=1)


def _engine(digits, teacher, **kw):
    cfg = dict(dataset="digits", val_size=200, teacher="resnet8", student="resnet8", method="kd",
               sampler="kdas", epochs=8, batch_size=64, device="cpu", sampling_period=[1, 4])
    cfg.update(kw)
    return build_engine(RunConfig.from_dict(cfg), digits, teacher)


def test_scoring_epoch_trains_on_the_selected_samples_with_the_scoring_teacher_logits(digits, teacher) -> None:
    engine = _engine(digits, teacher)
    sampler = engine.sampler
    engine.distiller.train()
    student = engine.distiller.student
    bn = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    before = bn.running_mean.clone()
    n = len(digits.train)
    total = 0
    for x, y, idx, _, t in sampler.batches(1, engine):
        assert x.shape[0] == y.shape[0] == idx.shape[0] == t.shape[0] <= 64
        assert torch.equal(y, digits.train.labels[idx])
        assert not t.requires_grad
        assert torch.allclose(t, engine.distiller.teacher_logits(x), atol=1e-5)  # reused, not recomputed
        total += x.shape[0]
    assert torch.equal(bn.running_mean, before)  # scoring left BN statistics alone
    enlarged = math.ceil(64 / 0.6)
    full, rest = divmod(n, enlarged)
    assert total == full * 64 + min(rest, 64)
    assert sampler.cache.shape[0] == total and sampler.samples_scored == n
    assert sampler.cache.unique().shape[0] == total


def test_ratio_one_with_exclusion_still_drops_the_outliers_of_each_full_batch(digits, teacher) -> None:
    engine = _engine(digits, teacher, start_rate=1.0, end_rate=1.0, exclusion_rate=0.25)
    engine.distiller.train()
    sizes = [x.shape[0] for x, *_ in engine.sampler.batches(1, engine)]
    full, rest = divmod(len(digits.train), 64)  # enlarged batches of ceil(64 / 1.0) = 64
    assert sizes == [64 - 16] * full + ([rest] if rest else [])  # ceil(64 * 0.25) = 16 skipped; short batch whole
    assert engine.sampler.cache.shape[0] == sum(sizes)


@pytest.fixture(scope="module")
def kdas_run(digits, teacher, tmp_path_factory):
    """The default KDAS run of _engine (8 epochs, scoring in epochs 1-5), with the engine's state
    saved after epoch 7: the resume test loads it into a fresh engine."""
    engine = _engine(digits, teacher)
    run = engine.run()
    metrics = [next(run) for _ in range(7)]
    # the state after epoch 7 is what a run stopped there saves (state_dict changes nothing)
    state = tmp_path_factory.mktemp("kdas") / "s.pth"
    torch.save(engine.state_dict(), state)
    metrics += list(run)
    return engine, metrics, state


def test_samples_backpropagated_follow_the_ratio_and_the_cache(digits, kdas_run) -> None:
    engine, metrics, _ = kdas_run
    n = len(digits.train)
    scoring = [m for m in metrics if m["kdas/scoring_epoch"]]
    assert [m["epoch"] for m in scoring] == [1, 2, 3, 4, 5]  # period 1 for 4 epochs, then every 4th
    kdas = engine.sampler
    for epoch, m in enumerate(metrics, start=1):
        # every epoch trains on exactly the cached selection: a scoring epoch builds it, the
        # epochs after it reuse it
        assert m["samples/epoch"] == m["kdas/cache_size"]
        assert m["samples/epoch"] == pytest.approx(m["kdas/ratio"] * n, rel=0.06)
        if m["kdas/scoring_epoch"]:
            assert m["kdas/ratio"] == pytest.approx(kdas.rate(epoch, 8))
            full, rest = divmod(n, math.ceil(64 / m["kdas/ratio"]))  # B of every enlarged batch
            assert m["samples/epoch"] == full * 64 + min(rest, 64)
        # penalty: 40 % of each batch lies outside the [q_0.2, q_0.8] band of the teacher-target
        # divergence, and lambda = 1000 takes (nearly) all of them down to the floor 0.5
        assert m["kdas/mean_weight"] == pytest.approx(1 - 0.4 * 0.5, abs=0.03)
    assert metrics[-1]["samples/scored"] == 5 * n
    assert metrics[-1]["samples/backprop"] == sum(m["samples/epoch"] for m in metrics)
    assert metrics[-1]["samples/backprop"] < 0.65 * 8 * n


@pytest.mark.parametrize("method,params", [("dkd", {}), ("kd", {"logit_stand": True}), ("dkd", {"logit_stand": True}),
                                           ("kd", {"reverse_kl": True})])
def test_kdas_runs_with_any_logit_method(digits, trained_resnet8, method, params) -> None:
    metrics = list(_engine(digits, trained_resnet8, method=method, epochs=3, **params).run())
    assert_learns(metrics, loss="train/loss_ce", label=(method, params))
    assert metrics[0]["kdas/mean_weight"] < 1.0  # the penalty is applied to the DKD/LS terms too


@pytest.mark.parametrize("method", ["mlkd", "dist", "wttm", "crd", "reviewkd"])
def test_kdas_runs_with_the_methods_whose_terms_are_per_sample(digits, trained_resnet8, method) -> None:
    # one scoring epoch: KDAS trains on its selection and weights the per-sample terms; the
    # batch-level ones (DIST's intra, MLKD's bc and cc) are in the method's unweighted_terms
    m = next(_engine(digits, trained_resnet8, method=method, epochs=2, batch_size=128).run())
    assert math.isfinite(m["train/loss"]) and m["kdas/scoring_epoch"] and m["kdas/mean_weight"] < 1.0
    assert m["samples/epoch"] == m["kdas/cache_size"] < len(digits.train)


def test_kdas_resumes_exactly(digits, teacher, kdas_run) -> None:
    # stopped after epoch 7: epoch 8 trains on the selection of the last scoring epoch (5), which
    # only the state carries
    _, full, state = kdas_run
    second = _engine(digits, teacher)
    second.load_state_dict(torch.load(state, weights_only=True))
    tail = list(second.run())
    keys = ("epoch", "train/loss", "val/acc1", "kdas/scoring_epoch", "kdas/cache_size", "samples/backprop")
    assert [[m[k] for k in keys] for m in tail] == [[m[k] for k in keys] for m in full[7:]]
    assert len(tail) == 1 and not tail[0]["kdas/scoring_epoch"] and full[4]["kdas/scoring_epoch"]


def test_kdas_config_is_validated() -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"sampler": "kdas", "start_rate": 0.4, "end_rate": 0.6, "threshold": 0.7,
                             "sampling_period": "1,x"})
    text = str(e.value)
    assert "end_rate: must be <= start_rate" in text and "threshold: must be in [0, 0.5]" in text
    assert "sampling_period" in text
    with pytest.raises(ConfigError, match="start_rate: unknown key; it is a hyperparameter of sampler 'kdas'"):
        RunConfig.from_dict({"start_rate": 0.7})
    with pytest.raises(ConfigError, match="needs a distillation method"):
        RunConfig.from_dict({"sampler": "kdas", "method": "none", "teacher": None})
