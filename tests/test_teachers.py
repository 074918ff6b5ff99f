from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from kdtune.data import load_dataset
from kdtune.models import build_model
from kdtune.teacher_cache import file_lock
from kdtune.teachers import CheckpointError, TeacherNotCached, load_checkpoint, resolve_teacher


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_loads_mdistiller_format_and_dataparallel_prefix(tmp_path: Path) -> None:
    src = build_model("resnet8", num_classes=10, in_channels=1)
    state = src.state_dict()
    torch.save({"model": state, "epoch": 240, "accuracy": 71.2}, tmp_path / "md.pth")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "dp.pth")
    for name in ("md.pth", "dp.pth"):
        dst = build_model("resnet8", num_classes=10, in_channels=1)
        load_checkpoint(dst, tmp_path / name)
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in state.items())


def test_wrong_architecture_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "wrn.pth"
    torch.save({"model": build_model("wrn_16_1", num_classes=10).state_dict()}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(build_model("resnet8", num_classes=10), path)
    msg = str(e.value)
    assert str(path) in msg and "missing keys: " in msg and "unexpected keys: " in msg
    assert "block1" in msg  # a wrn key


def test_mis_shaped_keys_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "c100.pth"
    torch.save({"model": build_model("resnet8", num_classes=100).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"mis-shaped: .*fc.weight \(file \(100, 64\), model \(10, 64\)\)"):
        load_checkpoint(build_model("resnet8", num_classes=10), path)


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="bad.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(build_model("resnet8"), bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(build_model("resnet8"), tmp_path / "nope.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="odd.pth: expected a state dict"):
        load_checkpoint(build_model("resnet8"), tmp_path / "odd.pth")


def test_teacher_is_trained_once_then_reused(digits, cache_dir: Path) -> None:
    logs: list[str] = []
    t1, info1 = resolve_teacher("resnet8", digits, checkpoint=None, cache_dir=cache_dir, epochs=2,
                                log=logs.append)
    assert info1.source == "trained" and logs and Path(info1.path).is_file()
    assert not t1.training
    # the recorded accuracy is the model's on the validation split, computed here independently
    # (normalised by hand, no eval helper), and two epochs on digits beat chance (10 %) by far
    mean, std = torch.tensor(digits.mean).view(1, -1, 1, 1), torch.tensor(digits.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = t1((digits.val.images.float() / 255 - mean) / std)[0]
    direct = 100.0 * (logits.argmax(1) == digits.val.labels).float().mean().item()
    assert info1.val_acc == pytest.approx(direct, abs=1e-3)
    assert info1.val_acc > 50, info1.val_acc
    logs.clear()
    t2, info2 = resolve_teacher("resnet8", digits, checkpoint=None, cache_dir=cache_dir, epochs=2,
                                log=logs.append)
    assert info2.source == "cache" and not logs and info2.val_acc == info1.val_acc
    assert all(torch.equal(a, b) for a, b in zip(t1.state_dict().values(), t2.state_dict().values()))
    # a different seed or recipe is a different teacher
    _, info3 = resolve_teacher("resnet8", digits, checkpoint=None, cache_dir=cache_dir, epochs=1,
                               log=logs.append)
    assert info3.source == "trained" and info3.path != info1.path


def test_a_teacher_another_process_is_training_is_waited_for_not_trained_again(digits, cache_dir: Path,
                                                                              tmp_path: Path) -> None:
    """Searches started together need the same teacher: while one holds the teacher's lock (it
    trains it), another waits for its file and loads it."""
    with pytest.raises(TeacherNotCached) as missing:
        resolve_teacher("resnet8", digits, checkpoint=None, cache_dir=cache_dir, epochs=1, train=False)
    path = missing.value.path
    logs: list[str] = []
    found = []
    with file_lock(path):  # the other process, training
        waiter = threading.Thread(target=lambda: found.append(resolve_teacher(
            "resnet8", digits, checkpoint=None, cache_dir=cache_dir, epochs=1, log=logs.append)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not logs  # waiting, training nothing
        # the other process's teacher lands (one trained elsewhere: the file name is the teacher's key)
        _, trained = resolve_teacher("resnet8", digits, checkpoint=None, cache_dir=tmp_path / "elsewhere", epochs=1,
                                     log=lambda *_: None)
        shutil.copyfile(trained.path, path)
    waiter.join(timeout=60)
    (_, info), = found
    assert info.source == "cache" and info.path == str(path) and not logs
    assert info.val_acc == trained.val_acc


def test_user_checkpoint_accuracy_is_measured_once(digits, cache_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "t.pth"
    torch.save({"model": build_model("resnet8", num_classes=10, in_channels=1).state_dict()}, path)
    _, info = resolve_teacher("resnet8", digits, checkpoint=str(path), cache_dir=cache_dir)
    assert info.source == "checkpoint" and info.path == str(path.resolve())
    records = list((cache_dir / "evals").glob("*.json"))
    assert len(records) == 1
    _, again = resolve_teacher("resnet8", digits, checkpoint=str(path), cache_dir=cache_dir)
    assert again.val_acc == info.val_acc and len(list((cache_dir / "evals").glob("*.json"))) == 1
