"""Checks of the machine a run is about to use, made before any data or teacher is loaded, so a
wrong device or an unwritable folder fails at once with one line instead of after minutes."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used here, or None. ``auto`` always works."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"device: expected auto, cpu, cuda, cuda:N or mps, but got {shorten(device)}"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return (f"device: {device!r} asked for, but CUDA is not available here (torch {torch.__version__}, "
                    f"{torch.cuda.device_count()} GPUs visible); use device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"device: {device!r} asked for, but only {torch.cuda.device_count()} CUDA devices are visible"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        return f"device: {device!r} asked for, but MPS is not available here; use device cpu or auto"
    elif dev.type not in ("cpu", "cuda", "mps"):
        return f"device: expected auto, cpu, cuda, cuda:N or mps, but got {shorten(device)}"
    return None


def writable_dir_problem(path: str | Path, what: str) -> str | None:
    """Create ``path`` (and its parents) and write a file in it; why that failed, or None."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kdtune-write-check"):
            pass
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
        return f"{what} {path}: cannot be created or written: {e.strerror or e}{where}"
    return None


def shorten(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages quote user values, which can be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

