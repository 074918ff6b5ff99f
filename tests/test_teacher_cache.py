"""The exact teacher-output cache: cached logits are the live teacher's, runs with and without it
agree, the key follows everything the values depend on, broken files are rebuilt, resume holds."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from kdtune.config import RunConfig
from kdtune.data import TrainLoader, load_dataset
from kdtune.models import build_model
from kdtune.run import build_engine
from kdtune.teacher_cache import HEADER_BYTES, build_pays, cache_key, open_cache, use_cache


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(123)
    return build_model("resnet8", num_classes=10, in_channels=1).eval()


@pytest.fixture(scope="module")
def tiny():
    """12 one-channel 8x8 images with CIFAR's augmentation (162 views): cheap cache builds."""
    return load_dataset("synthetic", val_size=0, options=dict(train_size=12, test_size=1, num_classes=10,
                                                              image_size=8, channels=1))


@pytest.fixture(scope="module")
def logits_dir(tmp_path_factory) -> Path:
    """The cache_dir of the tests whose runs read the one cache of ``teacher`` on digits (same key:
    teacher, images, views, fp32): the first of them builds it, the others load it. The tests
    that assert a build or a rebuild use folders of their own."""
    return tmp_path_factory.mktemp("logits")


def _cfg(cache_dir: Path, **kw) -> RunConfig:
    base = dict(dataset="digits", val_size=200, teacher="resnet8", student="resnet8", method="kd", epochs=2,
                batch_size=64, device="cpu", seed=0, cache_dir=str(cache_dir))
    base.update(kw)
    return RunConfig.from_dict(base)


def _live(teacher, loader: TrainLoader, idx: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(loader.view_images(idx, views))[0]


def test_loader_reports_the_view_each_sample_got(digits) -> None:
    loader = TrainLoader(digits, batch_size=64, device="cpu", seed=0)
    assert loader.num_views == 9  # digits: 3x3 crop offsets (padding 1), no flip
    seen = set()
    for x, _, idx, views in loader.batches():
        assert torch.equal(x, loader.view_images(idx, views))
        seen |= set(views.tolist())
    assert seen == set(range(9))
    cifar = load_dataset("synthetic", val_size=0, options=dict(train_size=4, test_size=1))
    assert TrainLoader(cifar, batch_size=4, device="cpu", seed=0).num_views == 162


@pytest.mark.parametrize("dataset", ["digits", "cifar-shaped"])
def test_cached_logits_equal_the_live_teachers_on_every_view(dataset, digits, teacher, tmp_path) -> None:
    if dataset == "digits":
        data, model = digits, teacher
    else:  # 162 views: 81 crop offsets x 2 flips
        data = load_dataset("synthetic", val_size=0, options=dict(train_size=12, test_size=1, num_classes=10))
        torch.manual_seed(7)
        model = build_model("resnet8", num_classes=10).eval()
    loader = TrainLoader(data, batch_size=64, device="cpu", seed=0)
    cache = open_cache(model, loader, cache_dir=tmp_path, amp=False, log=lambda m: None)
    n, v = cache.shape[:2]
    assert (n, v) == (loader.num_samples, loader.num_views) and cache.source == "built"
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for view in range(v):
        idx = torch.randint(0, n, (5,), generator=g)
        views = torch.full_like(idx, view)
        worst = max(worst, (cache.lookup(idx, views) - _live(model, loader, idx, views)).abs().max().item())
    assert worst <= 1e-4


def test_the_engine_reads_the_cache_instead_of_running_the_teacher(digits, teacher, logits_dir) -> None:
    engine = build_engine(_cfg(logits_dir, epochs=1, teacher_cache="on"), digits, teacher)
    assert engine.teacher_cache is None and engine.teacher_cache_opener is not None  # opened at epoch 1
    engine.teacher_cache, engine.teacher_cache_opener = engine.teacher_cache_opener(), None  # builds or loads it
    calls = []
    handle = engine.distiller.teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        engine.train_epoch()
    finally:
        handle.remove()
    assert calls == [] and engine.teacher_cache is not None
    # a feature method runs its teacher live whatever the setting says in auto
    assert build_engine(_cfg(logits_dir, method="fitnet"), digits, teacher).teacher_cache_opener is None
    assert build_engine(_cfg(logits_dir, teacher_cache="off"), digits, teacher).teacher_cache_opener is None


def test_auto_builds_only_when_the_planned_epochs_pay_for_the_build(digits, teacher, tmp_path) -> None:
    """digits has 9 views: a build costs 9 teacher passes per image, a run about one per epoch."""
    said: list[str] = []
    short = build_engine(_cfg(tmp_path, epochs=8), digits, teacher, log=said.append)
    assert short.teacher_cache_opener() is None  # 8 epochs < 9 views: the teacher runs live
    assert not list((tmp_path / "teacher_logits").glob("*.logits"))
    assert any("not built (auto: " in m and "8 teacher passes per training image" in m and "a build 9" in m
               for m in said), said
    long = build_engine(_cfg(tmp_path, epochs=9), digits, teacher, log=said.append).teacher_cache_opener()
    assert long is not None and long.source == "built"
    # once built, a cache costs nothing more: a short run reads it too
    again = build_engine(_cfg(tmp_path, epochs=1), digits, teacher).teacher_cache_opener()
    assert again is not None and again.source == "loaded" and again.path == long.path


def test_build_pays_weighs_planned_passes_against_views() -> None:
    assert build_pays(None, 162) == (True, "teacher_cache: on")
    assert build_pays(162, 162)[0] and not build_pays(161.9, 162)[0]
    assert "teacher_cache: on builds it anyway" in build_pays(4, 162)[1]


def test_log_line_says_which_applies() -> None:
    assert use_cache("auto", "kd")[0] and use_cache("auto", "ctkd_dkd", "kdas")[0]
    assert "live" in use_cache("auto", "fitnet")[1] and not use_cache("auto", "sakd")[0]
    assert not use_cache("on", "none")[0] and "live" in use_cache("off", "kd")[1]


LOGIT_RUNS = {"kd": {}, "kd_ls": {"logit_stand": True, "temperature": 2.0, "kd_weight": 9.0},
              "dkd": {"method": "dkd"}, "ctkd": {"method": "ctkd"}, "ctkd_dkd": {"method": "ctkd_dkd"},
              "kd+kdas": {"sampler": "kdas", "sampling_period": "1,2"}}


@pytest.fixture(scope="module")
def logit_runs(digits, teacher, logits_dir) -> Callable[[str], dict]:
    """The runs of LOGIT_RUNS[name] (2 epochs) without (``off``) and with (``on``) the cache, each
    as (engine, metrics, KDAS selection after epoch 1 or None), made once per module: the KDAS
    selection test reads the "kd+kdas" runs, the compiled-step test the eager "kd" one."""
    made: dict[str, dict] = {}

    def runs(name: str) -> dict:
        if name not in made:
            made[name] = {}
            for setting in ("off", "on"):
                engine = build_engine(_cfg(logits_dir, teacher_cache=setting, epochs=2, **LOGIT_RUNS[name]),
                                      digits, teacher)
                run = engine.run()
                metrics = [next(run)]
                picks = engine.sampler.cache.clone() if engine.sampler is not None else None
                made[name][setting] = engine, metrics + list(run), picks
        return made[name]
    return runs


@pytest.mark.parametrize("name", list(LOGIT_RUNS))
def test_a_run_with_the_cache_matches_the_run_without(name, logit_runs) -> None:
    runs = logit_runs(name)
    (_, live, _), (engine, cached, _) = runs["off"], runs["on"]
    assert engine.teacher_cache is not None
    first = {k: v for k, v in live[0].items() if k.startswith("train/loss")}
    for key, value in first.items():  # first epoch: the same losses up to float noise
        assert abs(cached[0][key] - value) <= 1e-4 * max(1.0, abs(value)), key
    # Later epochs compound last-bit differences; stated tolerance on the final (2nd epoch)
    # accuracy: 1.5 pp (3 of 200 validation images).
    assert abs(cached[-1]["val/acc1"] - live[-1]["val/acc1"]) <= 1.5


def test_kdas_picks_the_same_samples_with_and_without_the_cache(logit_runs) -> None:
    runs = logit_runs("kd+kdas")
    (off, metrics, picks), (on, _, cached_picks) = runs["off"], runs["on"]
    assert metrics[0]["kdas/scoring_epoch"] and off.teacher_cache is None and on.teacher_cache is not None
    assert torch.equal(picks, cached_picks)  # the selection made in the scoring epoch 1


def test_the_key_follows_teacher_data_views_normalisation_and_precision(digits, teacher) -> None:
    loader = TrainLoader(digits, batch_size=64, device="cpu", seed=0)
    images = loader.flat.view(loader.num_samples, -1)
    fp32 = {"device": "cpu", "autocast": None, "channels_last": False}

    def key(model=teacher, ld=loader, imgs=images, precision=fp32, dtype="float32") -> str:
        return cache_key(model, ld, imgs, precision=precision, dtype=dtype)

    base = key()
    assert key() == base  # deterministic
    other = build_model("resnet8", num_classes=10, in_channels=1)
    other.load_state_dict(teacher.state_dict())
    assert key(model=other) == base  # same weights, another module: same key
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert key(model=other) != base
    changed = images.clone()
    changed[0, 0] += 1
    assert key(imgs=changed) != base
    assert key(ld=TrainLoader(digits, batch_size=64, device="cpu", seed=0, augment=False)) != base
    shifted = load_dataset("digits", val_size=200)
    object.__setattr__(shifted, "mean", (shifted.mean[0] + 0.01,))
    assert key(ld=TrainLoader(shifted, batch_size=64, device="cpu", seed=0)) != base
    assert key(precision={**fp32, "autocast": "bfloat16"}) != base
    assert key(dtype="float16") != base


def test_a_truncated_or_foreign_file_is_rebuilt(tiny, teacher, tmp_path) -> None:
    loader = TrainLoader(tiny, batch_size=64, device="cpu", seed=0)
    lines: list[str] = []
    first = open_cache(teacher, loader, cache_dir=tmp_path, amp=False, log=lines.append)
    expected = first.table.clone()
    assert first.source == "built" and any("building" in line for line in lines)
    again = open_cache(teacher, loader, cache_dir=tmp_path, amp=False, log=lines.append)
    assert again.source == "loaded" and again.build_s == 0.0
    size = first.path.stat().st_size
    with open(first.path, "r+b") as f:  # a copy cut short
        f.truncate(size - 1000)
    lines.clear()
    rebuilt = open_cache(teacher, loader, cache_dir=tmp_path, amp=False, log=lines.append)
    assert rebuilt.source == "rebuilt" and any("truncated" in line and "rebuilding" in line for line in lines)
    assert torch.equal(rebuilt.table, expected) and rebuilt.path.stat().st_size == size
    first.path.write_bytes(b"\0" * size)  # no header at all
    lines.clear()
    assert open_cache(teacher, loader, cache_dir=tmp_path, amp=False, log=lines.append).source == "rebuilt"
    assert any("no teacher-cache header" in line for line in lines)
    assert not list(first.path.parent.glob("*.tmp.*"))  # no temporary files left behind


def test_float16_storage_halves_the_file_and_stays_close(tiny, teacher, tmp_path) -> None:
    loader = TrainLoader(tiny, batch_size=64, device="cpu", seed=0)
    fp32 = open_cache(teacher, loader, cache_dir=tmp_path, amp=False, log=lambda m: None)
    fp16 = open_cache(teacher, loader, cache_dir=tmp_path, amp=False, dtype="float16", log=lambda m: None)
    assert fp16.path != fp32.path
    assert fp16.size_bytes - HEADER_BYTES == (fp32.size_bytes - HEADER_BYTES) // 2
    idx, views = torch.arange(12).repeat(14), torch.arange(168) % 162
    a, b = fp32.lookup(idx, views), fp16.lookup(idx, views)
    assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def test_exact_resume_holds_with_the_cache(digits, teacher, logits_dir, tmp_path) -> None:
    # 3 epochs: scoring, training on the selection, scoring; stopped and resumed after the 2nd
    cfg = _cfg(logits_dir, epochs=3, sampler="kdas", sampling_period="1,2", teacher_cache="on")
    straight = build_engine(cfg, digits, teacher)
    run = straight.run()
    expected = [next(run), next(run)]
    # the state after epoch 2 is what a run stopped there saves (state_dict changes nothing)
    torch.save(straight.state_dict(), tmp_path / "ckpt.pth")
    expected += list(run)
    assert [m["kdas/scoring_epoch"] for m in expected] == [True, False, True]
    torch.manual_seed(999)
    second = build_engine(cfg, digits, teacher)
    second.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True))
    tail = list(second.run())
    assert len(tail) == 1
    for got, want in zip(tail, expected[2:]):
        assert (got["epoch"], got["train/loss"], got["val/acc1"]) == (want["epoch"], want["train/loss"], want["val/acc1"])
        assert math.isfinite(got["train/loss"])


@pytest.mark.slow
def test_compiled_step_equals_eager_on_cpu(digits, teacher, logits_dir, logit_runs, monkeypatch) -> None:
    """torch.compile of the distiller step (full batches; the short last batch runs eagerly),
    against the eager "kd" run with the cache of the cache-equivalence test (the same config).

    Compiled by Dynamo and AOTAutograd (the ``aot_eager`` backend): the step's capture, its
    joint forward-backward graph and the engine's use of it are kdtune's; Inductor's code
    generation is torch's, and on the CPU it compiles C++ kernels with the system compiler, 25 s of
    CPU on 2 cores with a cold cache (a new machine, as CI's), 8 s warm. On a GPU, where
    ``compile: auto`` turns it on, tests/test_gpu.py compiles with Inductor and CUDA graphs."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager_engine, eager_run, _ = logit_runs("kd")["on"]
    assert eager_engine.compiled is None and eager_engine.teacher_cache is not None
    engine = build_engine(_cfg(logits_dir, epochs=2, compile="on", teacher_cache="on"), digits, teacher)
    assert engine.compiled is not None
    runs = {"off": eager_run, "on": list(engine.run())}
    assert len(runs["on"]) == len(runs["off"]) == 2
    for eager, compiled in zip(runs["off"], runs["on"]):
        for key in ("train/loss", "train/loss_kd", "train/loss_ce"):
            assert math.isclose(compiled[key], eager[key], rel_tol=1e-4), key
        assert abs(compiled["val/acc1"] - eager["val/acc1"]) <= 1.0


ROOT = Path(__file__).resolve().parents[1]


def test_a_search_builds_the_cache_only_when_its_planned_epochs_pay(tmp_path: Path, capsys) -> None:
    """The shipped KDAS space cut to 2 epochs x 2 trials on a 600-image CIFAR-100 plans ~3 teacher
    passes per image; a build would make 162 (81 crops x 2 flips): the teacher runs live. The
    quickstart (12 trials under ASHA, digits' 9 views) plans far more, and builds it. (The teacher's
    accuracy is measured on 10 validation images: resnet32x4 takes 0.03 s an image on one core.)"""
    from conftest import write_cifar

    from kdtune.search.driver import prepare_teacher
    from kdtune.search.spec import load_spec

    write_cifar(tmp_path / "data", "cifar100", n_train=600, n_test=20)
    ckpt = tmp_path / "resnet32x4.pth"
    torch.save({"model": build_model("resnet32x4", num_classes=100).state_dict()}, ckpt)
    spec = load_spec(ROOT / "search_spaces" / "kdas.yaml",
                     ["fixed.epochs=2", "search.num_samples=2", "scheduler.grace_period=1",
                      f"fixed.data_root={tmp_path / 'data'}", f"fixed.teacher_checkpoint={ckpt}",
                      f"fixed.cache_dir={tmp_path / 'cache'}", "fixed.val_size=10", "fixed.device=cpu"])
    assert spec.planned_trial_epochs() < 162
    record = prepare_teacher(spec)
    out = capsys.readouterr().out
    assert "cache_path" not in record and not list((tmp_path / "cache").rglob("*.logits"))
    # ASHA (grace 1, factor 3): 2 trials x 1 epoch, then 2/3 of a trial x 1 more: about 3
    assert "teacher cache: not built (auto: the planned training makes about 3 teacher passes per training " \
           "image (3 epochs in all), a build 162 (one per view); teacher_cache: on builds it anyway); the " \
           "teacher runs live" in out, out
    quickstart = load_spec(ROOT / "search_spaces" / "quickstart.yaml")
    # 12 trials x 2 epochs, 6 x 2 more, 3 x 4 more, 1.5 x 4 more: 54 trial-epochs against 9 views
    assert quickstart.planned_trial_epochs() == pytest.approx(54.0)
    assert build_pays(quickstart.planned_trial_epochs(), 9)[0]
