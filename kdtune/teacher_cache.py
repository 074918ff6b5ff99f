"""The exact teacher-output cache: the frozen teacher's logits for every training image in every
view the loader can draw, computed once and shared by every trial that distils from it.

Why it is exact: the teacher is frozen and in eval mode, so its output depends only on the input
image, and the training augmentation has a finite set of views (CIFAR: 81 crop offsets x 2 flips
= 162; digits: 9 offsets). The loader reports the view of every sample
(:meth:`kdtune.data.TrainLoader.batches`), and the engine reads ``cache[index, view]`` instead
of running the teacher. Logits are computed at the run's precision (fp32 on the CPU; bf16
autocast and channels_last on CUDA) and stored as fp32 by default, so the cached value is the
live teacher's value (up to the last bits that a different batch composition can change in a
convolution kernel); ``teacher_cache_dtype: float16`` halves the file.

The file: ``<cache_dir>/teacher_logits/<key>.logits``, a 4 KiB header (magic, then JSON with
the key, shape and dtype) followed by the ``[N, views, classes]`` array. ``<key>`` hashes the
teacher's weights, the train images, the view set, the normalisation, the precision and the
storage dtype, so a change to any of them makes a new file. It is written to a temporary name
and renamed when complete (a crash never leaves a file under the final name), built under an
exclusive lock (two processes on a node build it once, the second waits and reads it), and
memory-mapped read-only-shared, so every trial on a node shares one copy in the page cache. A
file whose header or size does not match is reported and rebuilt.

Where the table lives during training: on the CPU the memory-mapped file itself (a gather of a
batch's rows touches a few pages). On CUDA the table is copied to the device once per process
when it takes at most half of the free device memory (CIFAR-100 in fp32: 2.9 GB; fp16:
1.46 GB), so the per-step lookup is a device gather with no host synchronisation. Otherwise it
stays on the host in pinned memory and each step copies its indices to the host (one
synchronisation per step): correct, but slower; use fp16 or fewer trials per GPU to avoid it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from kdtune.data import TrainLoader

logger = logging.getLogger(__name__)

MAGIC = b"KDTUNE-TEACHER-LOGITS\n"
HEADER_BYTES = 4096
VERSION = 1
DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}


class CacheError(RuntimeError):
    """A cache file that cannot be used (wrong key, truncated, unreadable header)."""


def publish(tmp: Path, path: Path) -> None:
    """Move the finished file ``tmp`` to ``path``: flushed to disk first, then renamed, so that
    readers (other trials, other nodes on a shared cache_dir) see no file or a complete one."""
    with open(tmp, "r+b") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def use_cache(setting: str, method: str, sampler: str = "none", dataset: str | None = None) -> tuple[bool, str]:
    """Whether a run with ``teacher_cache: setting`` and ``method`` (on ``dataset``) reads a cache,
    and the line that tells the user which applies. ``crops``: the FKD-style cache
    (:mod:`kdtune.fkd_cache`) of a streaming dataset."""
    from kdtune.data import DATASETS
    from kdtune.distillers import METHODS

    cls = METHODS.get(method)
    if not cls.needs_teacher:
        return False, f"teacher cache: not used (method {method!r} trains without a teacher)"
    if setting == "off":
        return False, "teacher cache: off (teacher_cache: off); the teacher runs live every step"
    streaming = dataset in DATASETS and getattr(DATASETS.get(dataset), "streaming", False)
    if streaming and setting != "crops":
        return False, (f"teacher cache: not used (dataset {dataset!r} draws RandomResizedCrops, no finite set of "
                       f"views to cache; teacher_cache: crops stores a fixed set of crops per image instead); the "
                       f"teacher runs live every step")
    if getattr(cls, "strong_view", None) is not None:
        return False, (f"teacher cache: not used (method {method!r} also trains on a strong view, random "
                       f"augmentations with no finite set of views to cache); the teacher runs live every step")
    if not getattr(cls, "teacher_logits_only", False):
        return False, (f"teacher cache: not used (method {method!r} reads the teacher's features, not only "
                       f"its logits); the teacher runs live every step")
    user = "KDAS scoring and training read" if sampler == "kdas" else "training reads"
    if setting == "crops":
        return True, (f"teacher cache: crops (method {method!r} uses only the teacher's logits; {user} the top-k "
                      f"logits of stored crops, and the loader samples among those crops)")
    when = "" if setting == "on" else ", when one exists or building one costs less than running the teacher live"
    return True, f"teacher cache: {setting} (method {method!r} uses only the teacher's logits; {user} them from the cache{when})"


def build_pays(planned_epochs: float | None, views: int) -> tuple[bool, str]:
    """Whether building the cache costs fewer teacher passes than the planned runs would make
    live, and the numbers that say so. A build runs the teacher once per training image and
    view; a live run once per training sample it draws, about once per image per epoch (a
    KDAS epoch scores more samples than it trains on, so this errs towards running live). Both
    are teacher forwards on the same device, so the comparison holds on a CPU and a GPU alike.
    ``planned_epochs`` None: ``teacher_cache: on``, always build."""
    if planned_epochs is None:
        return True, "teacher_cache: on"
    numbers = (f"the planned training makes about {planned_epochs:.0f} teacher passes per training image "
               f"({planned_epochs:.0f} epochs in all), a build {views} (one per view)")
    if planned_epochs >= views:
        return True, f"auto: {numbers}"
    return False, f"auto: {numbers}; teacher_cache: on builds it anyway"


# --------------------------------------------------------------------------- the key


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def cache_key(teacher: nn.Module, loader: TrainLoader, images: Tensor, *, precision: dict[str, Any],
              dtype: str) -> str:
    """A hash of everything the cached values depend on (24 hex digits)."""
    h = hashlib.sha256()
    meta = {"version": VERSION, "teacher": type(teacher).__name__, "images": list(images.shape),
            "pad": loader.pad, "flip": loader.flip, "views": loader.num_views,
            "mean": loader.normalize.shift.flatten().tolist(), "scale": loader.normalize.scale.flatten().tolist(),
            "precision": precision, "dtype": dtype}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, value in sorted(teacher.state_dict().items()):
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(_tensor_bytes(value))
    h.update(_tensor_bytes(images))
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- the file


def _header(key: str, shape: tuple[int, ...], dtype: str, meta: dict[str, Any]) -> bytes:
    text = json.dumps({"key": key, "shape": list(shape), "dtype": dtype, **meta}).encode()
    blob = MAGIC + text + b"\n"
    if len(blob) > HEADER_BYTES:
        raise ValueError("teacher cache header too large")
    return blob.ljust(HEADER_BYTES, b"\0")


def read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        blob = f.read(HEADER_BYTES)
    if len(blob) < HEADER_BYTES or not blob.startswith(MAGIC):
        raise CacheError(f"{path}: no teacher-cache header")
    try:
        return json.loads(blob[len(MAGIC):].split(b"\n", 1)[0])
    except ValueError as e:
        raise CacheError(f"{path}: unreadable teacher-cache header ({e})") from e


def check_file(path: Path, key: str, shape: tuple[int, ...], dtype: str) -> dict[str, Any]:
    """The header of a complete cache file for ``key``; :class:`CacheError` says what is wrong."""
    header = read_header(path)
    if header.get("key") != key or tuple(header.get("shape", ())) != shape or header.get("dtype") != dtype:
        raise CacheError(f"{path}: header (key {header.get('key')}, shape {header.get('shape')}, dtype "
                         f"{header.get('dtype')}) does not match (key {key}, shape {list(shape)}, dtype {dtype})")
    expected = HEADER_BYTES + int(np.prod(shape)) * np.dtype(DTYPES[dtype][1]).itemsize
    size = path.stat().st_size
    if size != expected:
        raise CacheError(f"{path}: {size} bytes, expected {expected} (truncated or partial)")
    return header


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside ``path`` (``flock`` on ``<path>.lock``): concurrent builders of
    ``path`` on one node wait for the first (the teacher-output cache, the cached teachers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class TeacherCache:
    """An open cache: ``lookup(indices, views)`` gives the teacher's logits, float32 on the device."""

    path: Path
    key: str
    shape: tuple[int, int, int]  # images, views, classes
    dtype: str
    source: str  # "loaded", "built" or "rebuilt"
    build_s: float  # seconds to build (0.0 when loaded)
    table: Tensor  # [images * views, classes]
    lookup_sync: bool = False  # True when the table is on the host and the indices on CUDA

    @property
    def size_bytes(self) -> int:
        return HEADER_BYTES + int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype][1]).itemsize

    def lookup(self, indices: Tensor, views: Tensor) -> Tensor:
        rows = indices * self.shape[1] + views
        if self.lookup_sync:  # host table, CUDA indices: the documented slow path
            out = self.table.index_select(0, rows.cpu()).pin_memory()
            return out.to(indices.device, non_blocking=True).float()
        return self.table.index_select(0, rows).float()

    def describe(self) -> str:
        where = "device" if self.table.device.type == "cuda" else ("pinned host" if self.lookup_sync else "mmap")
        return (f"{self.path} ({self.shape[0]} images x {self.shape[1]} views x {self.shape[2]} classes, "
                f"{self.dtype}, {self.size_bytes / 1e6:.1f} MB, {self.source}"
                + (f" in {self.build_s:.1f}s" if self.build_s else "") + f", lookup from {where})")

    def records(self) -> dict[str, float]:
        """Numbers for a search's records (MLflow parent run)."""
        return {"teacher_cache/size_mb": self.size_bytes / 1e6, "teacher_cache/build_s": self.build_s,
                "teacher_cache/views": float(self.shape[1])}


@torch.no_grad()
def _build(path: Path, key: str, shape: tuple[int, int, int], dtype: str, teacher: nn.Module,
           loader: TrainLoader, *, amp: bool, memory_format: torch.memory_format, batch_size: int,
           log: Callable[[str], None]) -> float:
    n, v, c = shape
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    start = time.perf_counter()
    was_training = teacher.training
    teacher.eval()
    device = loader.device
    per = max(1, batch_size // v)  # images per teacher batch: all their views at once
    try:
        with open(tmp, "wb") as f:
            f.write(_header(key, shape, dtype, {"built_s": None}))
            f.truncate(HEADER_BYTES + n * v * c * np.dtype(DTYPES[dtype][1]).itemsize)
        out = np.memmap(tmp, dtype=DTYPES[dtype][1], mode="r+", offset=HEADER_BYTES, shape=(n, v, c))
        all_views = torch.arange(v, device=device)
        last = start
        for lo in range(0, n, per):
            idx = torch.arange(lo, min(n, lo + per), device=device)
            x = loader.view_images(idx.repeat_interleave(v), all_views.repeat(idx.shape[0]))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = teacher(x.contiguous(memory_format=memory_format))[0]
            out[lo:lo + idx.shape[0]] = logits.float().view(idx.shape[0], v, c).cpu().numpy()
            now = time.perf_counter()
            if now - last > 10 or lo + per >= n:
                last = now
                done = min(n, lo + per)
                rate = done * v / max(now - start, 1e-9)
                eta = f", about {(n - done) * v / rate:.0f}s left" if done < n else ""
                log(f"[kdtune] teacher cache: {done}/{n} images x {v} views ({100 * done / n:.0f}%), "
                    f"{rate:.0f} views/s, {now - start:.0f}s{eta}")
        out.flush()
        del out
        publish(tmp, path)
    finally:
        teacher.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return time.perf_counter() - start


def open_cache(teacher: nn.Module, loader: TrainLoader, *, cache_dir: str | Path, amp: bool,
               memory_format: torch.memory_format = torch.contiguous_format, dtype: str = "float32",
               build_batch_size: int | None = None, log: Callable[[str], None] = logger.info,
               planned_epochs: float | None = None) -> TeacherCache | None:
    """Open the cache for ``teacher`` over ``loader``'s train images and views, building it first
    when it is missing, partial or corrupt. With ``planned_epochs`` (``teacher_cache: auto``) a
    missing cache is built only when that pays (:func:`build_pays`); otherwise None: the teacher
    runs live. An existing cache is always read: it costs nothing more."""
    if dtype not in DTYPES:
        raise ValueError(f"teacher_cache_dtype must be one of {', '.join(DTYPES)}, but got {dtype!r}")
    device = loader.device
    images = loader.flat.view(loader.num_samples, -1)  # padded uint8 images: the data's contents
    precision = {"device": device.type, "autocast": "bfloat16" if amp else None,
                 "channels_last": memory_format == torch.channels_last}
    key = cache_key(teacher, loader, images, precision=precision, dtype=dtype)
    num_classes = _num_classes(teacher, loader, memory_format)
    shape = (loader.num_samples, loader.num_views, num_classes)
    path = Path(cache_dir).expanduser() / "teacher_logits" / f"{key}.logits"
    source, build_s = "loaded", 0.0
    with file_lock(path):
        if path.exists():
            try:
                check_file(path, key, shape, dtype)
            except CacheError as e:
                log(f"[kdtune] teacher cache: {e}; rebuilding it")
                path.unlink()
                source = "rebuilt"
        if not path.exists():
            pays, why = build_pays(planned_epochs, shape[1])
            if not pays:
                log(f"[kdtune] teacher cache: not built ({why}); the teacher runs live")
                return None
            source = "built" if source == "loaded" else source
            size = HEADER_BYTES + int(np.prod(shape)) * np.dtype(DTYPES[dtype][1]).itemsize
            log(f"[kdtune] teacher cache: building {path} ({shape[0]} images x {shape[1]} views x "
                f"{shape[2]} classes, {dtype}, {size / 1e6:.1f} MB; {why})")
            batch = build_batch_size or (2048 if device.type == "cuda" else 512)
            build_s = _build(path, key, shape, dtype, teacher, loader, amp=amp, memory_format=memory_format,
                             batch_size=batch, log=log)
    # Copy-on-write mapping: reads share the page cache with every other trial on the node, and
    # the array is writable as far as torch is concerned (nothing writes to it).
    array = np.memmap(path, dtype=DTYPES[dtype][1], mode="c", offset=HEADER_BYTES, shape=(shape[0] * shape[1], shape[2]))
    table = torch.from_numpy(array)
    lookup_sync = False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if table.numel() * table.element_size() <= free // 2:
            table = table.to(device)
        else:
            table, lookup_sync = table.pin_memory(), True
    return TeacherCache(path, key, shape, dtype, source, build_s, table, lookup_sync)


@torch.no_grad()
def _num_classes(teacher: nn.Module, loader: TrainLoader, memory_format: torch.memory_format) -> int:
    was_training = teacher.training
    teacher.eval()
    zero = torch.zeros(1, dtype=torch.long, device=loader.device)
    try:
        return int(teacher(loader.view_images(zero, zero).contiguous(memory_format=memory_format))[0].shape[1])
    finally:
        teacher.train(was_training)
