"""Teachers: load a checkpoint the user names, or train one once and cache it.

A teacher is resolved from (dataset, architecture, seed). A checkpoint file may be in
mdistiller/CRD format (``{"model": state_dict, ...}``), a bare state dict, or kdtune's own
cache format (the mdistiller layout plus metadata). Without a file, kdtune trains the teacher
with the standard recipe on the train split (so its validation accuracy is honest), stores it
under the cache directory, and every later run or search reuses it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdtune.data import ImageData
from kdtune.distillers import Vanilla
from kdtune.engine import Engine, Recipe, evaluate_model
from kdtune.models import build_model
from kdtune.teacher_cache import file_lock

logger = logging.getLogger(__name__)

FORMAT = "kdtune-teacher-v1"
# The reference recipe trains MobileNetV2 and the ShuffleNets with lr 0.01 instead of 0.05.
LOW_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the architecture."""


class TeacherNotCached(CheckpointError):
    """No teacher file was given and none is cached, and the caller asked not to train one."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class TeacherInfo:
    model: str
    path: str
    source: str  # "checkpoint" (the user's file), "cache" (trained earlier) or "trained" (just now)
    val_acc: float  # top-1 on the run's validation split, measured once


def data_key(data: ImageData) -> dict[str, Any]:
    """What identifies a dataset's train split for caching: name, shapes and a content hash."""
    return {"dataset": data.name, "num_classes": data.num_classes, "shape": list(data.image_shape),
            "train_size": len(data.train), "train_sha256": data.train_digest()[:16]}


def teacher_recipe(model: str, epochs: int) -> Recipe:
    """The standard recipe for training a teacher, shortened to ``epochs``."""
    return Recipe(epochs=epochs, lr=0.01 if model in LOW_LR_MODELS else 0.05)


def load_checkpoint(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Strictly load the weights in ``path`` into ``model``; returns the checkpoint dict.

    Raises:
        CheckpointError: naming the file and the missing, unexpected and mis-shaped keys.
    """
    path = Path(path).expanduser()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, ckpt = ckpt, {"model": ckpt}
    else:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a state dict or a dict with a 'model' state dict, "
                              f"found {keys}")
    # Checkpoints saved from DataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "") or "none"
        raise CheckpointError(
            f"{path}: weights do not fit {type(model).__name__}: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; mis-shaped: {show(misshaped)}")
    model.load_state_dict(state, strict=True)
    return ckpt


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def evaluate_accuracy(model: nn.Module, data: ImageData, device: torch.device) -> float:
    """Top-1 of ``model`` on the validation split (on test when there is no val split)."""
    split = data.val if len(data.val) else data.test
    batches = data.eval_batches(split, batch_size=512, device=device)
    return evaluate_model(model, batches)["acc1"]  # fp32, like every reported accuracy


def resolve_teacher(model_name: str, data: ImageData, *, checkpoint: str | None, cache_dir: str | Path,
                    seed: int = 0, epochs: int = 240, device: torch.device | str = "cpu",
                    log: Callable[[str], None] = logger.info, train: bool = True) -> tuple[nn.Module, TeacherInfo]:
    """The frozen teacher for this run, in eval mode on ``device``.

    With ``checkpoint`` the file is loaded; otherwise the cache is looked up by (dataset
    contents, architecture, seed, recipe) and, on a miss, the teacher is trained and stored.
    Its validation accuracy is measured once and recorded (in the cache file, or in a small
    JSON record for user checkpoints). With ``train=False`` a cache miss raises
    :class:`TeacherNotCached` instead of training.
    """
    device = torch.device(device)
    cache = Path(cache_dir).expanduser().resolve()

    def build() -> nn.Module:
        return build_model(model_name, num_classes=data.num_classes, in_channels=data.in_channels)

    key = data_key(data)
    if checkpoint is not None:
        model = build()
        path = Path(checkpoint).expanduser().resolve()
        load_checkpoint(model, path)
        model.to(device).eval()
        stat = path.stat()
        record_id = hashlib.sha256(json.dumps([str(path), stat.st_size, stat.st_mtime_ns, key]).encode())
        record = cache / "evals" / f"{record_id.hexdigest()[:20]}.json"
        if record.is_file():
            val_acc = json.loads(record.read_text())["val_acc"]
        else:
            val_acc = evaluate_accuracy(model, data, device)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"path": str(path), "model": model_name, **key, "val_acc": val_acc}))
        return model, TeacherInfo(model_name, str(path), "checkpoint", val_acc)

    recipe = teacher_recipe(model_name, epochs)
    ident = {"format": FORMAT, "arch": model_name, "seed": seed, "recipe": recipe.__dict__, **key}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=list).encode()).hexdigest()[:12]
    path = cache / "teachers" / f"{data.name}-{model_name}-seed{seed}-{digest}.pth"
    if path.is_file():
        return _cached(model_name, build(), path, device)
    if not train:
        raise TeacherNotCached(f"teacher {model_name} (seed {seed}, {epochs} epochs): not in the cache "
                               f"(looked for {path})", path)
    # Searches started together on one node (or a sweep of runs) need the same teacher: the first
    # trains it while the others wait for its file, instead of each training it again.
    with file_lock(path):
        if path.is_file():
            return _cached(model_name, build(), path, device)
        return _train_teacher(build, data, path, ident, recipe, seed=seed, device=device, log=log)


def _cached(model_name: str, model: nn.Module, path: Path, device: torch.device) -> tuple[nn.Module, TeacherInfo]:
    ckpt = load_checkpoint(model, path)
    model.to(device).eval()
    return model, TeacherInfo(model_name, str(path), "cache", float(ckpt["val_acc"]))


def _train_teacher(build: Callable[[], nn.Module], data: ImageData, path: Path, ident: dict[str, Any],
                   recipe: Recipe, *, seed: int, device: torch.device,
                   log: Callable[[str], None]) -> tuple[nn.Module, TeacherInfo]:
    model_name, epochs = ident["arch"], recipe.epochs
    log(f"teacher {model_name}: no checkpoint given and none cached; training it "
        f"({epochs} epochs, seed {seed}) -> {path}")
    torch.manual_seed(seed)
    model = build().to(device)
    engine = Engine(Vanilla(model), data, recipe, device=device, seed=seed)
    for m in engine.run():
        if m["epoch"] == recipe.epochs or m["epoch"] % max(1, recipe.epochs // 10) == 0:
            log(f"  teacher epoch {m['epoch']:>3}/{recipe.epochs}  loss {m['train/loss']:.4f}  "
                f"val acc {m.get('val/acc1', float('nan')):.2f}")
    val_acc = evaluate_accuracy(model, data, device)
    save_atomic({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "val_acc": val_acc,
                 **{k: v for k, v in ident.items() if k != "recipe"}, "epochs": epochs}, path)
    model.eval()
    return model, TeacherInfo(model_name, str(path), "trained", val_acc)
