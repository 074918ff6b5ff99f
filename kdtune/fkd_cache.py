"""The FKD-style teacher cache (``teacher_cache: crops``): a fixed set of crops per training image,
stored with the teacher's top-k logits, for data whose augmentation has no finite set of views.

Why: the exact cache (:mod:`kdtune.teacher_cache`) stores the teacher's logits for every view the
loader can draw, which works for CIFAR's 162 crop-and-flip views. ImageNet's RandomResizedCrop has
no finite view set, and 1.28 M images x 1,000 classes per view would be too large anyway. FKD (Shen
& Xing, ECCV 2022) stores instead, per image, ``teacher_cache_crops`` crops (their box and flip)
with the teacher's top-``teacher_cache_topk`` logits; training then samples among the stored crops
and reads the teacher's output instead of running it.

What is stored, per image and crop (a float32 teacher pass at T = 1 under the run's precision):

* the crop box in the decoded image's pixels, ``(top, left, height, width, flip)`` (int32), so the
  student sees exactly the pixels the teacher saw;
* the k largest logits and their class indices (``teacher_cache_dtype``; int16 indices);
* ``rest``: the log of the mean of ``exp(logit)`` over the other C - k classes.

How the distillers get logits back (:meth:`CropCache.lookup`): the k stored logits at their
classes, and ``rest`` for every other class. At T = 1 this is exact where it matters: the k
probabilities are the teacher's, and the other classes share the teacher's remaining mass
``1 - sum(top-k probabilities)`` evenly (their total ``(C - k) * exp(rest)`` equals theirs). At
another temperature the top-k ratios stay exact, but the flattened remainder holds more mass than the
teacher's tail for T > 1 (spreading a sum evenly maximises sum(x^(1/T)) for 1/T < 1) and less for
T < 1. Anything computed from the whole logit vector changes too: logit standardisation (``+ls``)
sees a smaller spread, and DKD's non-target part is flat outside the top k. With k = 10 of
1,000 classes the tail is usually a few percent of the mass; raise k to shrink the difference.

Whether the student learns as well from a fixed set of crops as from fresh crops is an accuracy
question, not a caching detail: FKD reports 80.1 % top-1 (ResNet-50, 8 V100s) with it, and Beyer
et al. (CVPR 2022) warn that a fixed set of precomputed crops can overfit a long schedule. The exact
per-view cache stays the default wherever the views are finite; ``crops`` is only for streaming
datasets (``imagenet``), and only when asked for.

Files: ``<cache_dir>/teacher_crops/<key>/shard-NNNNN.crops``, ``SHARD_IMAGES`` images each: a 4 KiB
header (magic, JSON: key, shard, image range, shapes) then the arrays. ``<key>`` hashes the
teacher's weights, the train file list, the crop settings, the normalisation, the precision and
the storage dtype. A crop's box depends only on (key seed, image index, crop index), never on which
process built its shard, so the shards can be built by several processes at once -- one per GPU,
on one node or on several that share the folder -- and the result is the same: each builder
claims the next unbuilt shard with a non-blocking lock, builds it, and moves on; at the end it
waits for the shards others hold. ``kdtune cache RUN.yaml`` started once per GPU
does that. Each shard is written under a temporary name and renamed when complete. (The locks
are ``flock``; on NFS they are fcntl locks, which need a lock daemon on NFSv3.)
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from kdtune.data import normalizer
from kdtune.imagenet import RANDOM, BatchPlan, FolderData, FolderImages, make_loader
from kdtune.teacher_cache import DTYPES, CacheError, _tensor_bytes, publish

MAGIC = b"KDTUNE-TEACHER-CROPS\n"
HEADER_BYTES = 4096
VERSION = 1
SHARD_IMAGES = 10_000  # ImageNet: 128 shards, each a few minutes of one GPU
CROP_SEED = 0  # the stored crops are the same for every run and trial that shares the cache


def crop_seed(index: int, crop: int, crops: int) -> int:
    """The seed of image ``index``'s crop ``crop``: distinct per (image, crop), whatever the shard."""
    return (CROP_SEED << 48) + index * crops + crop


def _layout(n: int, crops: int, k: int, dtype: str) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """The arrays of a shard of ``n`` images, in file order."""
    return [("boxes", np.dtype(np.int32), (n, crops, 5)), ("values", np.dtype(DTYPES[dtype][1]), (n, crops, k)),
            ("classes", np.dtype(np.int16), (n, crops, k)), ("rest", np.dtype(np.float32), (n, crops))]


def _size(n: int, crops: int, k: int, dtype: str) -> int:
    return HEADER_BYTES + sum(int(np.prod(shape)) * dt.itemsize for _, dt, shape in _layout(n, crops, k, dtype))


@dataclass(frozen=True)
class Plan:
    """What a cache for one teacher, data and setting is: its key, folder and shards."""

    key: str
    folder: Path
    num_images: int
    crops: int
    k: int
    num_classes: int
    dtype: str

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // SHARD_IMAGES)

    def shard_path(self, s: int) -> Path:
        return self.folder / f"shard-{s:05d}.crops"

    def shard_range(self, s: int) -> tuple[int, int]:
        return s * SHARD_IMAGES, min(self.num_images, (s + 1) * SHARD_IMAGES)

    def header(self, s: int) -> dict[str, Any]:
        lo, hi = self.shard_range(s)
        return {"key": self.key, "version": VERSION, "shard": s, "shards": self.num_shards, "images": [lo, hi],
                "crops": self.crops, "k": self.k, "num_classes": self.num_classes, "dtype": self.dtype}

    def check_shard(self, s: int) -> None:
        """:class:`CacheError` unless shard ``s`` is complete and this plan's."""
        path = self.shard_path(s)
        with open(path, "rb") as f:
            blob = f.read(HEADER_BYTES)
        if len(blob) < HEADER_BYTES or not blob.startswith(MAGIC):
            raise CacheError(f"{path}: no crop-cache header")
        try:
            header = json.loads(blob[len(MAGIC):].split(b"\n", 1)[0])
        except ValueError as e:
            raise CacheError(f"{path}: unreadable crop-cache header ({e})") from e
        if header != self.header(s):
            raise CacheError(f"{path}: header {header} does not match the expected {self.header(s)}")
        lo, hi = self.shard_range(s)
        expected = _size(hi - lo, self.crops, self.k, self.dtype)
        if path.stat().st_size != expected:
            raise CacheError(f"{path}: {path.stat().st_size} bytes, expected {expected} (truncated or partial)")

    def arrays(self, s: int, mode: str = "r") -> dict[str, np.ndarray]:
        lo, hi = self.shard_range(s)
        out, offset = {}, HEADER_BYTES
        for name, dt, shape in _layout(hi - lo, self.crops, self.k, self.dtype):
            out[name] = np.memmap(self.shard_path(s), dtype=dt, mode=mode, offset=offset, shape=shape)
            offset += int(np.prod(shape)) * dt.itemsize
        return out


def plan_for(teacher: nn.Module, data: FolderData, *, crops: int, k: int, num_classes: int, cache_dir: str | Path,
             precision: dict[str, Any], dtype: str) -> Plan:
    if dtype not in DTYPES:
        raise ValueError(f"teacher_cache_dtype must be one of {', '.join(DTYPES)}, but got {dtype!r}")
    if not 1 <= k < num_classes:
        raise CacheError(f"teacher_cache_topk: must be in [1, {num_classes}) for a teacher with {num_classes} "
                         f"classes (the rest's mass needs at least one class outside the top k), but got {k}")
    if num_classes > np.iinfo(np.int16).max:
        raise CacheError(f"teacher_cache: crops stores class indices as int16; {num_classes} classes do not fit")
    h = hashlib.sha256()
    meta = {"version": VERSION, "teacher": type(teacher).__name__, "train": data.train_digest(),
            "resolution": data.resolution, "min_scale": data.min_scale, "crops": crops, "k": k, "seed": CROP_SEED,
            "mean": list(data.mean), "std": list(data.std), "precision": precision, "dtype": dtype,
            "shard_images": SHARD_IMAGES}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, value in sorted(teacher.state_dict().items()):
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        h.update(_tensor_bytes(value))
    key = h.hexdigest()[:24]
    return Plan(key, Path(cache_dir).expanduser() / "teacher_crops" / key, len(data.train), crops, k, num_classes,
                dtype)


# --------------------------------------------------------------------------- building


def top_k_rest(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(top-k logits, their classes, rest) of float32 ``logits`` [B, C]: ``rest`` is the log of the
    mean of exp(logit) over the other C - k classes (see the module's docstring)."""
    values, classes = logits.topk(k, dim=1)
    others = logits.scatter(1, classes, float("-inf"))
    rest = torch.logsumexp(others, dim=1) - math.log(logits.shape[1] - k)
    return values, classes, rest


def reconstruct(values: Tensor, classes: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """Logits [B, C] from the stored top k and rest: the top-k logits at their classes, ``rest``
    everywhere else."""
    out = rest[:, None].expand(-1, num_classes).clone()
    return out.scatter_(1, classes.long(), values)


@contextlib.contextmanager
def _claim(path: Path, wait: bool) -> Iterator[bool]:
    """An exclusive lock beside ``path``: yields whether it was taken (always, with ``wait``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@torch.no_grad()
def build_shard(plan: Plan, s: int, teacher: nn.Module, data: FolderData, *, device: torch.device, amp: bool,
                memory_format: torch.memory_format, batch_size: int, log: Callable[[str], None]) -> float:
    """Build shard ``s``: decode each of its images ``plan.crops`` times (a RandomResizedCrop and
    flip each, drawn from :func:`crop_seed`), run the teacher, store boxes and top-k."""
    lo, hi = plan.shard_range(s)
    path = plan.shard_path(s)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    start = time.perf_counter()
    was_training = teacher.training
    teacher.eval()
    normalize = normalizer(data.mean, data.std, device)
    keys = [(i, RANDOM, crop_seed(i, c, plan.crops)) for i in range(lo, hi) for c in range(plan.crops)]
    plan_batches = BatchPlan()
    plan_batches.make = lambda: (keys[b:b + batch_size] for b in range(0, len(keys), batch_size))
    loader = make_loader(FolderImages(data.train, data.resolution, data.eval_resize, data.min_scale), plan_batches,
                          data.workers, device, persistent=False)
    try:
        with open(tmp, "wb") as f:
            blob = MAGIC + json.dumps(plan.header(s)).encode() + b"\n"
            f.write(blob.ljust(HEADER_BYTES, b"\0"))
            f.truncate(_size(hi - lo, plan.crops, plan.k, plan.dtype))
        arrays = {}
        offset = HEADER_BYTES
        for name, dt, shape in _layout(hi - lo, plan.crops, plan.k, plan.dtype):
            arrays[name] = np.memmap(tmp, dtype=dt, mode="r+", offset=offset, shape=shape)
            offset += int(np.prod(shape)) * dt.itemsize
        flat = {name: a.reshape(-1, *a.shape[2:]) for name, a in arrays.items()}  # rows: image-major, then crop
        row = 0
        for images, boxes in loader:
            x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = teacher(x)[0]
            values, classes, rest = top_k_rest(logits.float(), plan.k)
            b = images.shape[0]
            flat["boxes"][row:row + b] = boxes.numpy()
            flat["values"][row:row + b] = values.cpu().numpy()
            flat["classes"][row:row + b] = classes.cpu().numpy()
            flat["rest"][row:row + b] = rest.cpu().numpy()
            row += b
        for a in arrays.values():
            a.flush()
        del arrays, flat
        publish(tmp, path)  # readers see no shard or a complete one
    finally:
        teacher.train(was_training)
        if tmp.exists():
            tmp.unlink()
    took = time.perf_counter() - start
    log(f"[kdtune] crop cache: shard {s + 1}/{plan.num_shards} ({hi - lo} images x {plan.crops} crops) built in "
        f"{took:.1f}s")
    return took


def build_all(plan: Plan, teacher: nn.Module, data: FolderData, *, device: torch.device, amp: bool,
              memory_format: torch.memory_format, batch_size: int, log: Callable[[str], None]) -> tuple[str, float]:
    """Make every shard exist: build the unbuilt ones no other process holds, then wait for the
    rest. Returns ("loaded" | "built", seconds this process spent building)."""

    def valid(s: int) -> bool:
        if not plan.shard_path(s).exists():
            return False
        try:
            plan.check_shard(s)
            return True
        except CacheError as e:
            log(f"[kdtune] crop cache: {e}; rebuilding it")
            plan.shard_path(s).unlink()
            return False

    spent, built = 0.0, False
    for wait in (False, True):  # claim what is free first; then wait for (or take over) the rest
        for s in range(plan.num_shards):
            if plan.shard_path(s).exists() and not wait:
                continue
            with _claim(plan.shard_path(s), wait) as mine:
                if mine and not valid(s):
                    spent += build_shard(plan, s, teacher, data, device=device, amp=amp,
                                         memory_format=memory_format, batch_size=batch_size, log=log)
                    built = True
    return ("built" if built else "loaded"), spent


# --------------------------------------------------------------------------- reading


@dataclass
class CropCache:
    """An open crop cache: the loader samples crops by :meth:`boxes_of`; the engine reads the
    teacher's logits by :meth:`lookup` (indices and views: the crop index each sample got)."""

    plan: Plan
    source: str
    build_s: float
    boxes: Tensor  # int32 [N, crops, 5] on the CPU (the loader's workers read it there)
    values: Tensor  # [N * crops, k] on the run's device
    classes: Tensor  # int16 [N * crops, k]
    rest: Tensor  # float32 [N * crops]

    @property
    def num_crops(self) -> int:
        return self.plan.crops

    @property
    def path(self) -> Path:
        return self.plan.folder

    @property
    def size_bytes(self) -> int:
        return sum(_size(hi - lo, self.plan.crops, self.plan.k, self.plan.dtype)
                   for lo, hi in map(self.plan.shard_range, range(self.plan.num_shards)))

    def boxes_of(self, indices: Tensor, views: Tensor) -> Tensor:
        return self.boxes[indices.cpu(), views.cpu()]

    def lookup(self, indices: Tensor, views: Tensor) -> Tensor:
        rows = indices * self.plan.crops + views
        return reconstruct(self.values.index_select(0, rows).float(), self.classes.index_select(0, rows),
                           self.rest.index_select(0, rows), self.plan.num_classes)

    def describe(self) -> str:
        p = self.plan
        return (f"{p.folder} ({p.num_images} images x {p.crops} crops, top {p.k} of {p.num_classes} classes, "
                f"{p.dtype}, {p.num_shards} shard{'s' if p.num_shards > 1 else ''}, {self.size_bytes / 1e6:.1f} MB, "
                f"{self.source}" + (f" in {self.build_s:.1f}s" if self.build_s else "") + ")")

    def records(self) -> dict[str, float]:
        return {"teacher_cache/size_mb": self.size_bytes / 1e6, "teacher_cache/build_s": self.build_s,
                "teacher_cache/views": float(self.plan.crops)}


@torch.no_grad()
def _num_classes(teacher: nn.Module, data: FolderData, device: torch.device) -> int:
    was_training = teacher.training
    teacher.eval()
    logits = teacher(torch.zeros(1, *data.image_shape, device=device))[0]
    teacher.train(was_training)
    return int(logits.shape[1])


def open_crop_cache(teacher: nn.Module, data: FolderData, *, crops: int, k: int, cache_dir: str | Path,
                    device: torch.device, amp: bool, memory_format: torch.memory_format = torch.contiguous_format,
                    dtype: str = "float32", batch_size: int | None = None,
                    log: Callable[[str], None] = print) -> CropCache:
    """Open the crop cache of ``teacher`` over ``data``'s train split, building its missing shards
    (with any other process building the same cache at the same time) first."""
    precision = {"device": device.type, "autocast": "bfloat16" if amp else None,
                 "channels_last": memory_format == torch.channels_last}
    plan = plan_for(teacher, data, crops=crops, k=k, num_classes=_num_classes(teacher, data, device),
                    cache_dir=cache_dir, precision=precision, dtype=dtype)
    missing = [s for s in range(plan.num_shards) if not plan.shard_path(s).exists()]
    if missing:
        log(f"[kdtune] crop cache: building {len(missing)} of {plan.num_shards} shards under {plan.folder} "
            f"({plan.num_images} images x {crops} crops, top {k}; {_size(plan.num_images, crops, k, dtype) / 1e6:.1f} MB)")
    source, spent = build_all(plan, teacher, data, device=device, amp=amp, memory_format=memory_format,
                              batch_size=batch_size or (512 if device.type == "cuda" else 64), log=log)
    shards = [plan.arrays(s) for s in range(plan.num_shards)]

    def cat(name: str) -> Tensor:
        return torch.cat([torch.from_numpy(np.array(a[name])) for a in shards])

    # One copy per process, on the run's device: the lookup is then a device gather with no host
    # synchronisation (ImageNet, 5 crops, top 10, float16: about 0.3 GB).
    rows = plan.num_images * crops
    return CropCache(plan, source, spent, cat("boxes"), cat("values").reshape(rows, k).to(device),
                     cat("classes").reshape(rows, k).to(device), cat("rest").reshape(rows).to(device))


if __name__ == "__main__":
    # ``kdtune cache`` (kdtune.cli.cache) is the command; it lives in the CLI layer because it
    # loads the run's data and teacher through kdtune.run, which imports this module.
    from kdtune.cli import main

    raise SystemExit(main(["cache", *sys.argv[1:]]))
