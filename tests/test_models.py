"""The CIFAR model zoo: mdistiller checkpoint compatibility and the forward contract.

``data/mdistiller_cifar_shapes.json`` holds, for every model of mdistiller's
``cifar_model_dict`` (num_classes=100, in_channels=3), the ``state_dict()`` key ->
shape map and the parameter count, dumped from mdistiller's own definitions.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdtune.models import MODELS, build_model
from kdtune.registry import UnknownNameError

MANIFEST: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "mdistiller_cifar_shapes.json").read_text()
)
SHAPES: dict[str, dict[str, list[int]]] = MANIFEST["state_dicts"]
PARAM_COUNTS: dict[str, int] = MANIFEST["param_counts"]

# Teachers with published mdistiller CIFAR-100 checkpoints.
PUBLISHED_TEACHERS = ["resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13"]

# torchvision's ImageNet models (tv_*) are checked in test_imagenet.py: built here for every test
# below, they cost 45 s of the suite's 8 minutes (ResNet-50's 25 M parameters, initialised each time).
ALL_MODELS = [name for name in MODELS.names() if not name.startswith("tv_")]
MDISTILLER_MODELS = [name for name in ALL_MODELS if name in SHAPES]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These batch-2 passes are too small to gain from intra-op threads, and on a
    # busy 2-core CI runner multi-threaded kernels stall (measured: 15 s -> 100 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_output(out: Any, batch: int, num_classes: int) -> torch.Tensor:
    logits, feats = out
    assert logits.shape == (batch, num_classes)
    assert torch.isfinite(logits).all()
    assert set(feats) >= {"feats", "preact_feats", "pooled_feat"}
    assert len(feats["feats"]) == len(feats["preact_feats"]) >= 1
    for f, p in zip(feats["feats"], feats["preact_feats"]):
        assert f.dim() == 4 and f.shape[0] == batch
        assert p.shape == f.shape
        assert torch.isfinite(f).all() and torch.isfinite(p).all()
    pooled = feats["pooled_feat"]
    assert pooled.dim() == 2 and pooled.shape[0] == batch
    return logits


def _train_step(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    model.train()
    logits = _check_output(model(x), x.shape[0], num_classes)
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"


def test_manifest_has_the_published_teachers() -> None:
    for name in PUBLISHED_TEACHERS:
        assert name in SHAPES and name in PARAM_COUNTS


def test_every_mdistiller_model_is_registered() -> None:
    assert sorted(SHAPES) == sorted(PARAM_COUNTS)
    assert set(SHAPES) <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_factory_signature(name: str) -> None:
    assert {"num_classes", "in_channels"} <= set(MODELS.parameters(name))


@pytest.mark.parametrize("name", MDISTILLER_MODELS)
def test_state_dict_matches_mdistiller(name: str) -> None:
    model = build_model(name, num_classes=100, in_channels=3)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = SHAPES[name]
    assert sorted(set(expected) - set(ours)) == [], "keys missing"
    assert sorted(set(ours) - set(expected)) == [], "unexpected keys"
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}
    # A checkpoint with exactly mdistiller's keys and shapes loads strictly.
    ckpt = {k: torch.zeros(shape) for k, shape in expected.items()}
    model.load_state_dict(ckpt, strict=True)


@pytest.mark.parametrize("name", MDISTILLER_MODELS)
def test_parameter_count_matches_mdistiller(name: str) -> None:
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_cifar_forward_backward(name: str) -> None:
    model = build_model(name, num_classes=100, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    _train_step(model, x, 100)
    model.eval()
    with torch.no_grad():
        _check_output(model(x), 2, 100)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_tiny_grayscale_input(name: str) -> None:
    """8x8 single-channel images with 10 classes (scikit-learn digits)."""
    model = build_model(name, num_classes=10, in_channels=1)
    _train_step(model, torch.randn(2, 1, 8, 8), 10)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_channels_last_bf16_autocast(name: str) -> None:
    model = build_model(name).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference, _ = model(x.contiguous())
        logits, _ = model(x)
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _check_output(model(x), 2, 100)


def _run_stages(model: nn.Module, x: torch.Tensor) -> Any:
    """``forward`` rebuilt from ``forward_stage`` / ``forward_head`` (how SAKD drives a model)."""
    feats, preacts = [], []
    for i in range(model.num_stages):
        x, preact = model.forward_stage(i, x)
        feats.append(x)
        preacts.append(preact)
    logits, pooled = model.forward_head(x)
    return logits, {"feats": feats, "preact_feats": preacts, "pooled_feat": pooled}


def _assert_stages_match_forward(model: nn.Module, x: torch.Tensor, train: bool) -> None:
    # Two copies, so the BN running statistics start equal and each path updates its own.
    whole, staged = copy.deepcopy(model).train(train), copy.deepcopy(model).train(train)
    with torch.no_grad():
        logits, feats = whole(x)
        s_logits, s_feats = _run_stages(staged, x)
    assert whole.num_stages == len(feats["feats"])
    assert torch.equal(s_logits, logits)
    assert torch.equal(s_feats["pooled_feat"], feats["pooled_feat"])
    for key in ("feats", "preact_feats"):
        assert len(s_feats[key]) == len(feats[key])
        for i, (ours, ref) in enumerate(zip(s_feats[key], feats[key])):
            assert torch.equal(ours, ref), f"{key}[{i}] differs"
    # In train mode this checks the running statistics too (WRN updates some BNs twice).
    ref_state = whole.state_dict()
    for key, value in staged.state_dict().items():
        assert torch.equal(value, ref_state[key]), f"{key} differs"


@pytest.mark.parametrize(
    ("num_classes", "in_channels", "size"), [(100, 3, 32), (10, 1, 8)], ids=["cifar", "tiny"]
)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_stage_by_stage_equals_forward(name: str, num_classes: int, in_channels: int, size: int) -> None:
    model = build_model(name, num_classes=num_classes, in_channels=in_channels)
    x = torch.randn(2, in_channels, size, size)
    for train in (False, True):  # one model built for both modes (each check copies it)
        _assert_stages_match_forward(model, x, train)


@pytest.mark.parametrize("name", ["vgg8", "wrn_16_1", "MobileNetV2", "ShuffleV2"])
def test_stage_by_stage_channels_last(name: str) -> None:
    model = build_model(name).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    for train in (False, True):
        _assert_stages_match_forward(model, x, train)


def test_vgg_stages_keep_mdistillers_tiny_imagenet_pool() -> None:
    """The fourth max-pool runs on 64x64 inputs only, so the last stage is 4x4 on both sizes."""
    model = build_model("vgg8", num_classes=200).eval()
    for size in (32, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            _, feats = model(x)
        assert feats["feats"][-1].shape[-2:] == (4, 4)
        _assert_stages_match_forward(model, x, train=False)


def test_forward_stage_rejects_out_of_range_stages() -> None:
    model = build_model("resnet8")
    x = torch.randn(1, 3, 32, 32)
    for i in (-1, model.num_stages):
        with pytest.raises(IndexError):
            model.forward_stage(i, x)


def test_fixed_pool_equivalence_on_32x32() -> None:
    """Global pooling must equal mdistiller's fixed AvgPool2d(8) on CIFAR's 8x8 maps."""
    model = build_model("resnet8").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, feats = model(x)
    last = feats["feats"][-1]
    assert last.shape[-2:] == (8, 8)
    fixed = nn.AvgPool2d(8)(last).flatten(1)
    assert torch.equal(feats["pooled_feat"], fixed)


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UnknownNameError) as info:
        build_model("resnet8x5")
    message = str(info.value)
    assert "resnet8x4" in message
    for name in ("resnet56", "wrn_40_2", "ShuffleV2"):
        assert name in message


def test_parameter_counts_are_plausible() -> None:
    # Sanity anchors on the manifest itself (commonly quoted sizes, in millions).
    quoted = {"resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26, "vgg13": 9.46}
    for name, millions in quoted.items():
        assert math.isclose(PARAM_COUNTS[name] / 1e6, millions, abs_tol=0.01)
