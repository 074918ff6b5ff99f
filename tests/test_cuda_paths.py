"""What reading the code predicted would break on CUDA (docs/cuda.md), checked on the CPU:
resume with the checkpoint's tensors mapped away from the CPU, count_macs on a model that is
not on the CPU, fp32 evaluation and control modules under bf16 autocast, RKD without a
data-dependent shape, the batch sizes cuDNN autotunes under KDAS, trial resources and the
driver's teacher resolution. ``tests/test_gpu.py`` checks the same on a GPU."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kdtune import devices
from kdtune.data import TrainLoader, load_dataset
from kdtune.distillers import build_distiller
from kdtune.distillers.feature import RKDLoss
from kdtune.engine import Engine, Recipe
from kdtune.models import build_model
from kdtune.sampling import KDAS

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def small():
    """A small 1x8x8 dataset (256 train, 64 val images): these tests need steps, not accuracy."""
    return load_dataset("synthetic", val_size=64, options=dict(num_classes=10, image_size=8, channels=1,
                                                               train_size=320, test_size=16))


def _engine(data, method: str = "kd", seed: int = 0, batch_size: int = 128, **kw) -> Engine:
    torch.manual_seed(seed)
    s = build_model("resnet8", num_classes=10, in_channels=1)
    t = build_model("resnet8", num_classes=10, in_channels=1)
    return Engine(build_distiller(method, s, t, input_shape=SHAPE), data,
                  Recipe(epochs=2, batch_size=batch_size), seed=seed, **kw)


# --------------------------------------------------------------------------- resume


def test_resume_never_maps_rng_states_to_the_engine_device(small, tmp_path) -> None:
    from kdtune.search.trainable import KDTrainable

    whole = _engine(small)
    expected = [m["train/loss"] for m in whole.run()]
    first = _engine(small)
    first.train_epoch()
    torch.save(first.state_dict(), tmp_path / "engine.pth")
    # A checkpoint mapped to a device other than the CPU cannot restore an RNG state:
    mapped = torch.load(tmp_path / "engine.pth", map_location="meta", weights_only=True)
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(mapped["torch_rng"])
    # ... so the trainable's resume path must not map to the engine's device (here a fake one).
    resumed = _engine(small)
    resumed.device = torch.device("meta")
    KDTrainable.load_checkpoint(SimpleNamespace(engine=resumed), str(tmp_path))
    resumed.device = torch.device("cpu")
    assert resumed.epoch == 1 and resumed.loader.generator.get_state().device.type == "cpu"
    assert resumed.train_epoch()["train/loss"] == expected[1]


def test_rng_states_go_back_as_cpu_byte_tensors() -> None:
    state = torch.get_rng_state()
    assert devices.cpu_rng_state(state) is state
    widened = devices.cpu_rng_state(state.to(torch.int64))
    assert widened.dtype == torch.uint8 and torch.equal(widened, state)


def test_checkpoint_from_another_kind_of_device_is_refused_before_anything_changes(small) -> None:
    engine = _engine(small)
    state = engine.state_dict()
    state["epoch"] = 5
    state["loader"] = {"generator": torch.zeros(16, dtype=torch.uint8)}  # a CUDA (Philox) state
    with pytest.raises(ValueError, match=r"different kind of device \(16 bytes; a cpu generator keeps"):
        engine.load_state_dict(state)
    assert engine.epoch == 0


# --------------------------------------------------------------------------- bench


def test_count_macs_feeds_its_input_to_the_models_device() -> None:
    from kdtune.benchmarks import count_macs

    on_cpu = count_macs(build_model("resnet8", num_classes=100), (3, 32, 32))
    # "meta" stands in for a GPU: a CPU input to a model elsewhere fails the same way.
    elsewhere = count_macs(build_model("resnet8", num_classes=100).to("meta"), (3, 32, 32))
    assert elsewhere == on_cpu > 10_000_000


# --------------------------------------------------------------------------- precision


def _dtypes_of(module: nn.Module, log: list) -> None:
    module.register_forward_hook(lambda m, i, out: log.append(out.dtype))


def test_evaluation_runs_in_fp32_when_training_runs_in_bf16(small) -> None:
    from kdtune.teachers import evaluate_accuracy

    engine = _engine(small, amp=True)
    head = [m for m in engine.distiller.student.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.dtype] = []
    _dtypes_of(head, seen)
    x, y, *_ = next(engine.loader.batches())
    with engine.autocast():
        engine.distiller(x, y)
    assert seen == [torch.bfloat16]  # the autocast this test relies on is real on the CPU
    seen.clear()
    engine.evaluate()
    evaluate_accuracy(engine.distiller.student, small, torch.device("cpu"))
    assert seen and set(seen) == {torch.float32}


def test_ctkd_temperature_mlp_stays_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    d = build_distiller("ctkd", build_model("resnet8", num_classes=10, in_channels=1),
                        build_model("resnet8", num_classes=10, in_channels=1), input_shape=SHAPE,
                        temperature_mode="instance")
    seen: list[torch.dtype] = []
    for layer in d.ctkd.mlp:
        _dtypes_of(layer, seen)
    x = torch.randn(16, *SHAPE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = d(x, torch.arange(16) % 10)
        temperature = d.ctkd(logits, logits)
    assert logits.dtype == torch.bfloat16
    assert set(seen) == {torch.float32} and len(seen) == 2 * len(d.ctkd.mlp)
    assert temperature.dtype == torch.float32


def test_sakd_gate_policy_stays_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    d = build_distiller("sakd", build_model("resnet8", num_classes=10, in_channels=1),
                        build_model("resnet14", num_classes=10, in_channels=1), input_shape=SHAPE)
    seen: list[torch.dtype] = []
    _dtypes_of(d.router.policy, seen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, losses = d(torch.randn(16, *SHAPE), torch.arange(16) % 10)
    assert logits.dtype == torch.bfloat16 and seen == [torch.float32]
    sum(v.mean() for v in losses.values()).backward()
    assert d.router.policy.weight.grad is not None


# --------------------------------------------------------------------------- host syncs


class _OpLog(TorchDispatchMode):
    """Records the aten ops run, marking index ops that take a boolean mask."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("aten.index") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ())):
            name += "[bool mask]"
        self.ops.add(name)
        return func(*args, **(kwargs or {}))


def test_rkd_loss_has_no_data_dependent_shape_and_keeps_its_values() -> None:
    torch.manual_seed(0)
    loss = RKDLoss([torch.Size([16])], [torch.Size([16])])
    s, t = torch.randn(32, 16, requires_grad=True), torch.randn(32, 16)
    for e in (s.detach(), t):  # the masked mean it replaces
        d = (e.pow(2).sum(1)[:, None] + e.pow(2).sum(1)[None, :] - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
        d = d * (1 - torch.eye(32))
        torch.testing.assert_close(loss._distances(e), d / d[d > 0].mean(), rtol=1e-6, atol=0)
    log = _OpLog()
    with log:
        loss.batch_loss(0, s, t).backward()
    syncing = {o for o in log.ops if "bool mask" in o or o in ("aten.nonzero", "aten.masked_select",
                                                               "aten._local_scalar_dense")}
    assert syncing == set() and "aten.sqrt" in log.ops


# --------------------------------------------------------------------------- KDAS and cuDNN


class _Recording(nn.Module):
    """A stand-in student/teacher that records the batch size and the autotune flag it runs under."""

    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        self.log.append((x.shape[0], torch.backends.cudnn.benchmark))
        return (self.head(x.flatten(1)),)


@pytest.fixture
def autotune_on():
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # what the engine sets on CUDA; only a flag on the CPU
    yield
    torch.backends.cudnn.benchmark = saved


def test_kdas_autotunes_one_batch_size_over_a_240_epoch_schedule(autotune_on) -> None:
    data = load_dataset("synthetic", val_size=0,
                        options=dict(num_classes=10, image_size=4, channels=1, train_size=400, test_size=10))
    log: list[tuple[int, bool]] = []
    net = _Recording(log)
    distiller = SimpleNamespace(student=net, teacher_logits=lambda x: net(x)[0])
    engine = SimpleNamespace(recipe=Recipe(epochs=240, batch_size=64), distiller=distiller, workers=None,
                             device=torch.device("cpu"),
                             loader=TrainLoader(data, batch_size=64, device="cpu", seed=0),
                             memory_format=torch.contiguous_format,
                             autocast=lambda: torch.autocast("cpu", enabled=False),
                             teacher_logits=lambda x, idx, views: net(x)[0])
    kdas = KDAS()
    trained = set()
    with torch.no_grad():
        for epoch in range(1, 241):
            for x, y, *_ in kdas.batches(epoch, engine):
                trained.add((y.shape[0], torch.backends.cudnn.benchmark))  # the flag the step runs under
    sizes = {n for n, _ in log} | {n for n, _ in trained}
    assert len(sizes) > 40  # the scoring size follows the rate; short batches vary too
    autotuned = {n for n, on in log + sorted(trained) if on}
    assert autotuned == {64}
    assert torch.backends.cudnn.benchmark  # restored after every block


def test_engine_steps_of_odd_kdas_sizes_run_forward_and_backward_without_autotuning(small, autotune_on) -> None:
    engine = _engine(small, sampler=KDAS(), batch_size=64)
    conv = next(m for m in engine.distiller.student.modules() if isinstance(m, nn.Conv2d))
    fwd: set[tuple[int, bool]] = set()
    bwd: set[tuple[int, bool]] = set()
    conv.register_forward_pre_hook(lambda m, i: fwd.add((i[0].shape[0], torch.backends.cudnn.benchmark)))
    conv.register_full_backward_pre_hook(lambda m, g: bwd.add((g[0].shape[0], torch.backends.cudnn.benchmark)))
    engine.train_epoch()
    n_train = len(engine.loader.labels)
    enlarged = -(-64 * 10 // 6)  # ceil(64 / 0.6)
    last = min(n_train % enlarged, 64)
    assert (enlarged, False) in fwd and (64, True) in fwd and (last, False) in fwd
    assert bwd == {(64, True), (last, False)}
    assert {n for n, on in fwd if on} == {64, len(small.val)}  # training and evaluation sizes


# --------------------------------------------------------------------------- trials and driver


def test_cpu_only_trials_see_no_gpu(monkeypatch) -> None:
    # set, then deleted: monkeypatch restores the variable as it was (delenv of an absent one
    # records nothing to restore, and CUDA_VISIBLE_DEVICES="" would hide GPUs from later tests)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    devices.hide_gpus_from_cpu_trial(0.25)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    devices.hide_gpus_from_cpu_trial(0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("card_gib", [16, 24, 40, 80])
@pytest.mark.parametrize("trials", [1, 2, 4])
def test_packed_trials_with_their_contexts_fit_the_card(card_gib: int, trials: int) -> None:
    total = card_gib << 30
    fraction = devices.trial_memory_fraction(1 / trials, total)
    assert trials * (fraction * total + devices.CONTEXT_BYTES) <= total
    assert fraction >= 0.5 / trials


def test_teacher_resolution_on_a_gpu_runs_in_a_child_process(monkeypatch) -> None:
    import kdtune.run

    calls = []
    monkeypatch.setattr(kdtune.run, "in_fresh_process", lambda fn, *a: calls.append((fn, a)) or "records")
    monkeypatch.setattr(kdtune.run, "resolve_device", lambda name: torch.device("cuda"))
    cfg = SimpleNamespace(device="auto")
    assert kdtune.run.resolve_teacher_records(cfg) == "records"
    assert calls == [(kdtune.run.teacher_records, (cfg, None, None, None))]


def test_fresh_process_returns_the_childs_result_and_raises_its_error() -> None:
    assert devices.in_fresh_process(os.getpid) != os.getpid()
    with pytest.raises(ValueError, match="invalid literal"):
        devices.in_fresh_process(int, "x")
