"""The CUDA checks (docs/cuda.md): skipped without a GPU, and runnable with torch and
torchvision alone (no Ray, Optuna or MLflow; only the driver-memory check also needs PyYAML).

    PYTHONPATH=$PWD python -m pytest -q -s -p no:cacheprovider tests/test_gpu.py

``-s`` shows the figures (context size, one trial against four packed ones); the tests assert
behaviour only, never speed. About 3 minutes on one H100.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from kdtune import devices
from kdtune.data import TrainLoader, load_dataset
from kdtune.distillers import METHODS, build_distiller
from kdtune.engine import Engine, Recipe
from kdtune.models import build_model
from kdtune.sampling import KDAS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 20, 64


def _cifar_shaped(train: int = STEPS * BATCH, val: int = 256):
    return load_dataset("synthetic", val_size=val, options=dict(
        num_classes=100, image_size=32, channels=3, train_size=train + val, test_size=16))


@pytest.fixture(scope="module")
def data():
    return _cifar_shaped()


def _engine(data, method: str = "kd", sampler=None, epochs: int = 4, seed: int = 0, compile: bool = False,
            **params) -> Engine:
    torch.manual_seed(seed)
    student = build_model("resnet8x4", num_classes=100)
    teacher = build_model("resnet32x4", num_classes=100) if METHODS.get(method).needs_teacher else None
    distiller = build_distiller(method, student, teacher, input_shape=(3, 32, 32), **params).to(CUDA)
    return Engine(distiller, data, Recipe(epochs=epochs, batch_size=BATCH), device=CUDA, seed=seed,
                  sampler=sampler, compile=compile)


def _python(code: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# --------------------------------------------------------------------------- 1. loader


def test_loader_draws_exactly_the_162_views_and_replays(data) -> None:
    loader = TrainLoader(data, batch_size=BATCH, device=CUDA, seed=0, channels_last=True)
    idx = torch.zeros(20_000, dtype=torch.long, device=CUDA)  # one image, many draws
    drawn = loader.images(idx).contiguous()
    assert drawn.is_contiguous() and drawn.shape == (20_000, 3, 32, 32)
    views = torch.unique(drawn.flatten(1), dim=0)
    # The 81 crops of the 4-pixel zero-padded image, plain and mirrored, built independently on the CPU.
    cpu = TrainLoader(data, batch_size=BATCH, device="cpu", seed=0)
    padded = nn.functional.pad(data.train.images[0], (4, 4, 4, 4))  # zero raw pixels, as RandomCrop(padding=4)
    crops = torch.stack([c if f == 0 else c.flip(2) for dy in range(9) for dx in range(9)
                         for c in [padded[:, dy:dy + 32, dx:dx + 32]] for f in (0, 1)])
    expected = torch.unique(cpu.normalize(crops).flatten(1), dim=0)
    assert views.shape[0] == expected.shape[0] == 162
    torch.testing.assert_close(views.cpu(), expected, rtol=0, atol=1e-4)
    state = loader.state_dict()
    first = [idx.clone() for _, _, idx, _ in loader.batches()]
    loader.load_state_dict(state)
    assert all(torch.equal(a, b) for (_, _, b, _), a in zip(loader.batches(), first))


# --------------------------------------------------------------------------- 2. resume


@pytest.mark.parametrize("mapped_to", ["cpu (read_engine_state)", "cuda (the old map_location)"])
def test_resume_on_cuda_continues_close_to_an_uninterrupted_run(data, tmp_path, mapped_to) -> None:
    whole = _engine(data, epochs=2)
    expected = [m["train/loss"] for m in whole.run()]
    first = _engine(data, epochs=2)
    first.train_epoch()
    torch.save(first.state_dict(), tmp_path / "engine.pth")
    resumed = _engine(data, epochs=2)
    state = (devices.read_engine_state(tmp_path / "engine.pth") if mapped_to.startswith("cpu")
             else torch.load(tmp_path / "engine.pth", map_location=CUDA, weights_only=True))
    resumed.load_state_dict(state)  # crashed with a TypeError before the fix
    # cuDNN autotuning and atomic-add backward kernels: close, not bit-equal.
    assert resumed.train_epoch()["train/loss"] == pytest.approx(expected[1], rel=0.05)


# --------------------------------------------------------------------------- 3. host syncs


def _in_sync_error_mode(batches):
    """Wraps a batch generator: every step the engine runs between its yields runs with
    host syncs raising; the epoch-end metric reads (after it ends) are allowed."""
    def wrapped(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from batches(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return wrapped


CASES = [(m, {}) for m in METHODS.names() if m != "none"] + [("none", {}), ("ctkd", {"temperature_mode": "instance"}),
                                                     ("kd+kdas", {})]


@pytest.mark.parametrize("method,params", CASES, ids=[m + ("-instance" if p else "") for m, p in CASES])
def test_training_steps_never_sync_with_the_host(data, method: str, params: dict) -> None:
    name, _, sampler = method.partition("+")
    engine = _engine(data, name, sampler=KDAS() if sampler else None, epochs=8, **params)
    engine.train_epoch()  # warm-up outside the check: cuDNN autotuning, allocator growth
    if engine.sampler is not None:
        engine.sampler.batches = _in_sync_error_mode(engine.sampler.batches)
        epochs = 2  # epoch 2 scores, epoch 3 trains on the cached selection
    else:
        engine.loader.batches = _in_sync_error_mode(engine.loader.batches)
        epochs = 1
    for _ in range(epochs):
        metrics = engine.train_epoch()
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_the_compiled_step_trains_as_the_eager_one(data) -> None:
    """``compile: auto`` is on for CUDA: Inductor with CUDA graphs (mode reduce-overhead). Two
    epochs of KD, compiled and eager, from the same seed: the same losses within bf16 autocast's
    rounding (the suite's CPU test compiles with Dynamo and AOTAutograd only)."""
    runs = {}
    for compiled in (False, True):
        engine = _engine(data, epochs=2, compile=compiled)
        assert (engine.compiled is not None) == compiled
        runs[compiled] = list(engine.run())
    for eager, compiled in zip(runs[False], runs[True]):
        for key in ("train/loss", "train/loss_kd", "train/loss_ce"):
            assert abs(compiled[key] - eager[key]) <= 2e-2 * abs(eager[key]) + 1e-3, (key, compiled, eager)


# --------------------------------------------------------------------------- 4. precision


def test_evaluation_is_fp32_and_control_modules_stay_fp32(data) -> None:
    engine = _engine(data, "ctkd", temperature_mode="instance")
    assert engine.amp
    head = [m for m in engine.distiller.student.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.dtype] = []
    head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    mlp: list[torch.dtype] = []
    for layer in engine.distiller.ctkd.mlp:
        layer.register_forward_hook(lambda m, i, out: mlp.append(out.dtype))
    engine.train_epoch()
    train_dtypes, eval_dtypes = set(seen[:STEPS]), set(seen[STEPS:])
    assert train_dtypes == {torch.bfloat16} and eval_dtypes == {torch.float32}
    assert set(mlp) == {torch.float32}
    sakd = _engine(data, "sakd")
    policy: list[torch.dtype] = []
    sakd.distiller.router.policy.register_forward_hook(lambda m, i, out: policy.append(out.dtype))
    sakd.train_epoch()
    assert set(policy) == {torch.float32}
    # How often bf16 logits would have tied on top-1 (the reason evaluation is fp32).
    x, y = sakd.eval_set[0]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = sakd.distiller.student(x.contiguous(memory_format=torch.channels_last))[0]
    top2 = logits.float().topk(2, dim=1).values
    print(f"\n[gpu] bf16 top-1 ties in one eval batch: {(top2[:, 0] == top2[:, 1]).sum().item()} / {len(y)}")


# --------------------------------------------------------------------------- 5. driver memory


def test_the_driver_keeps_no_cuda_memory_after_resolving_the_teacher(tmp_path) -> None:
    pytest.importorskip("yaml")  # RunConfig's module reads YAML files
    out = _python(f"""
        import json, torch
        from kdtune.config import RunConfig
        from kdtune.run import resolve_teacher_records, teacher_records
        cfg = RunConfig.from_dict(dict(dataset="synthetic", val_size=64, dataset_options=dict(
            num_classes=10, image_size=32, channels=3, train_size=576, test_size=16), teacher="resnet20",
            teacher_epochs=1, student="resnet8", cache_dir={str(tmp_path)!r}, device="cuda"))
        info = resolve_teacher_records(cfg)  # trains and caches the teacher in a child process
        isolated = torch.cuda.is_initialized()
        again = teacher_records(cfg)  # the old in-process way, for comparison (cached now)
        print(json.dumps({{"source": info["source"], "initialized": isolated, "same": again["path"] == info["path"],
                          "in_process_reserved": torch.cuda.memory_reserved()}}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    print(f"\n[gpu] driver after teacher resolution: {result}")
    assert result["source"] == "trained" and result["same"]
    assert result["initialized"] is False  # no CUDA context, no cached blocks on the driver
    assert result["in_process_reserved"] > 0


# --------------------------------------------------------------------------- 6. packing

_TRIAL = """
    import json, sys, time, torch
    from kdtune import devices
    from kdtune.data import load_dataset
    from kdtune.distillers import build_distiller
    from kdtune.engine import Engine, Recipe
    from kdtune.models import build_model
    share, others = float(sys.argv[1]), int(sys.argv[2])  # others: bytes in use before this process
    fraction = devices.limit_trial_memory(share)
    data = load_dataset("synthetic", val_size=64, options=dict(num_classes=100, image_size=32, channels=3,
                                                               train_size=64 * 100 + 64, test_size=16))
    torch.manual_seed(0)
    d = build_distiller("kd", build_model("resnet8x4"), build_model("resnet32x4")).cuda()
    e = Engine(d, data, Recipe(epochs=3, batch_size=64), device="cuda")
    e.train_epoch()
    start = time.perf_counter()
    e.train_epoch()
    e.train_epoch()
    ips = 2 * 6400 / (time.perf_counter() - start)
    free, total = torch.cuda.mem_get_info()
    outside = (total - free) - others - torch.cuda.memory_reserved()  # context, handles, workspaces
    print(json.dumps({"ips": ips, "fraction": fraction, "peak": torch.cuda.max_memory_reserved(),
                      "outside_allocator": outside, "total": total}))
"""


def _trials(n: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    free, total = torch.cuda.mem_get_info()
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_TRIAL), str(1 / n if n > 1 else 1),
                               str(total - free)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_one_trial_against_four_packed_on_the_gpu() -> None:
    one = _trials(1)[0]
    four = _trials(4)
    total = one["total"]
    print(f"\n[gpu] one trial: {one['ips']:,.0f} img/s, peak {one['peak'] / 2**20:,.0f} MiB, "
          f"outside the allocator {one['outside_allocator'] / 2**20:,.0f} MiB")
    each = ", ".join(f"{r['ips']:,.0f}" for r in four)
    print(f"[gpu] four trials at 0.25: {sum(r['ips'] for r in four):,.0f} img/s in all ({each}), "
          f"fraction {four[0]['fraction']:.4f}")
    assert one["fraction"] is None and all(r["fraction"] < 0.25 for r in four)
    assert all(r["peak"] <= r["fraction"] * total for r in four)
    # The context allowance covers what a trial holds outside the allocator (on an idle card;
    # co-tenants' allocations would show up here too).
    assert one["outside_allocator"] <= devices.CONTEXT_BYTES


def test_memory_fraction_is_enforced_in_a_trial_process() -> None:
    out = _python("""
        import json, torch
        from kdtune import devices
        fraction = devices.limit_trial_memory(0.25)
        total = torch.cuda.get_device_properties(0).total_memory
        ok = torch.empty(int(0.8 * fraction * total), dtype=torch.uint8, device="cuda")
        try:
            torch.empty(int(0.3 * total), dtype=torch.uint8, device="cuda")
            refused = False
        except torch.OutOfMemoryError:
            refused = True
        print(json.dumps({"fraction": fraction, "refused": refused}))
    """)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["refused"] and result["fraction"] < 0.25
