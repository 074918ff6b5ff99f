"""Checks of the machine a run is about to use, made before any data or teacher is loaded, so a
wrong device or an unwritable folder fails at once with one line instead of after minutes."""
from __future__ import annotations

import errno
import os
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


def writable_dir_problem(path: str | Path, what: str, create: bool = True) -> str | None:
    """Create ``path`` (and its parents) and write a file in it; why that failed, or None.
    ``create=False`` makes nothing: an existing folder gets the write check (its file removed at
    once), a missing one is judged by its nearest existing parent, which must be a folder that
    can be written."""
    path = Path(path)
    try:
        if create or path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".kdtune-write-check"):
                pass
            return None
        parent = path
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(parent))
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
        return f"{what} {path}: cannot be created or written: {e.strerror or e}{where}"
    return None


def model_pair(text: str, flag: str) -> str | None:
    """Why ``text`` is not a ``TEACHER:STUDENT`` pair of known models (a one-line error naming
    ``flag``), or None."""
    from kdtune.models import MODELS

    teacher, sep, student = text.partition(":")
    if not sep or not teacher or not student:
        return f"{flag} {text!r}: expected TEACHER:STUDENT, e.g. resnet32x4:resnet8x4"
    for role, name in (("teacher", teacher), ("student", student)):
        if name not in MODELS:
            return f"{flag} {text!r}: {role}: {MODELS.unknown_message(name)}"
    return None


def shorten(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages quote user values, which can be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

