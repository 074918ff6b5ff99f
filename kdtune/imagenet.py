"""``imagenet``: an ImageFolder on disk, streamed through DataLoader workers that decode JPEGs.

The layout is torchvision's ImageFolder with the standard split folders::

    <data_root>/train/<class>/<image>.JPEG     # 1.28 M images in ImageNet
    <data_root>/val/<class>/<image>.JPEG       # 50,000 images, the same class folders

Class indices are the sorted folder names, torchvision's convention, so a published torchvision
weights file (trained on the synset folders) predicts the right indices. As for every kdtune
dataset, ``val`` is carved from ``train/`` with ``split_seed`` (``val_size`` images; searches select
on it), and the dataset's own held-out folder, ``val/``, is kdtune's ``test`` split (final runs).

Nothing is held in memory but the file list (relative paths as one fixed-width byte array, so
that forked workers share it instead of copying Python strings). Augmentation is the standard
ImageNet recipe: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3); torchvision's algorithm)
to ``resolution`` plus a horizontal flip for training; resize the short side to ``eval_resize``
and center-crop ``resolution`` for evaluation (224 and 256 by default; tests use tiny ones).

Why the main process draws every random number: the loader's generator draws the batch order and
one seed per sample; the worker that decodes the image derives the crop and flip from that seed.
So the batches are the same with 0 or 16 workers, a checkpoint's generator state resumes the run
exactly (as kdtune's in-memory loader does), and the FKD-style crop cache (:mod:`kdtune.fkd_cache`)
can hand the worker a stored crop instead of a seed.

Decoding: ``torchvision.io.decode_image`` and a tensor ``resized_crop`` on the CPU, in
``workers`` DataLoader processes (measured faster than PIL, docs/performance.md). Batches travel as
uint8 and are normalised on the run's device, as the in-memory loader does.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from kdtune.data import DATASETS, DataError, carve_indices, normalizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png")
SCALE_MAX = 1.0
RATIO = (3 / 4, 4 / 3)

# What a worker is asked to make of an image (the second field of a sample key).
RANDOM, BOX, CENTER = 0, 1, 2


# --------------------------------------------------------------------------- the file list


@dataclass(frozen=True)
class FolderSplit:
    """Images of one split as a file list: paths relative to ``root``, labels, file sizes."""

    root: str
    paths: np.ndarray  # fixed-width bytes (dtype S), relative to root
    labels: Tensor  # int64 [N]
    sizes: np.ndarray  # int64 file sizes in bytes (part of the content key)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Tensor) -> FolderSplit:
        rows = idx.numpy()
        return FolderSplit(self.root, self.paths[rows], self.labels[idx], self.sizes[rows])

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def digest(self) -> str:
        """A hash of the list: paths, labels and sizes (not the pixels: hashing 140 GB of JPEGs per
        run would cost minutes; a file replaced by one of exactly the same size goes unnoticed)."""
        h = hashlib.sha256()
        h.update(self.paths.tobytes())
        h.update(self.labels.numpy().tobytes())
        h.update(self.sizes.tobytes())
        return h.hexdigest()


def _concat(a: FolderSplit, b: FolderSplit) -> FolderSplit:
    width = max(a.paths.dtype.itemsize, b.paths.dtype.itemsize)
    paths = np.concatenate([a.paths.astype(f"S{width}"), b.paths.astype(f"S{width}")])
    return FolderSplit(a.root, paths, torch.cat([a.labels, b.labels]), np.concatenate([a.sizes, b.sizes]))


def _classes(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def scan(root: Path, split: str, classes: list[str]) -> FolderSplit:
    """The images of ``root/split/<class>/``, classes indexed by their position in ``classes``."""
    paths, labels, sizes, empty = [], [], [], []
    for label, name in enumerate(classes):
        files = sorted((e for e in os.scandir(root / split / name)
                        if e.is_file() and e.name.lower().endswith(EXTENSIONS)), key=lambda e: e.name)
        if not files:
            empty.append(name)
        paths += [f"{split}/{name}/{e.name}" for e in files]
        sizes += [e.stat().st_size for e in files]
        labels += [label] * len(files)
    if empty:
        raise DataError(f"imagenet: {root / split}: class folders without images ({', '.join(EXTENSIONS)}): "
                        f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    return FolderSplit(str(root), np.array(paths, dtype="S"), torch.tensor(labels, dtype=torch.int64),
                       np.array(sizes, dtype=np.int64))


# --------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class FolderData:
    """A streaming dataset: what :class:`kdtune.data.ImageData` is for in-memory data, with file lists
    for splits. The engine asks it for its loaders (:meth:`train_loader`, :meth:`eval_batches`)."""

    name: str
    train: FolderSplit
    val: FolderSplit
    test: FolderSplit
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resolution: int
    eval_resize: int
    min_scale: float
    workers: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    @property
    def in_channels(self) -> int:
        return 3

    def for_final(self) -> FolderData:
        """Train on train+val (all of ``train/``); evaluate on test (``val/``)."""
        return replace(self, train=_concat(self.train, self.val), val=self.val.subset(torch.arange(0)))

    def train_digest(self) -> str:
        return self.train.digest()

    def train_loader(self, *, batch_size: int, device: torch.device | str, seed: int, channels_last: bool = False,
                     strong_view: Callable | None = None) -> StreamingLoader:
        return StreamingLoader(self, batch_size=batch_size, device=device, seed=seed, channels_last=channels_last,
                               strong_view=strong_view)

    def eval_batches(self, split: FolderSplit, *, batch_size: int, device: torch.device | str) -> StreamingEval:
        return StreamingEval(self, split, batch_size=batch_size, device=torch.device(device))


@dataclass(frozen=True)
class RawFolder:
    """What the ``imagenet`` builder returns: :func:`kdtune.data.load_dataset` calls :meth:`carve`."""

    train: FolderSplit
    test: FolderSplit
    classes: tuple[str, ...]
    resolution: int
    eval_resize: int
    min_scale: float
    workers: int
    default_val_size: int = 10_000  # 10 per class on ImageNet

    def carve(self, name: str, *, val_size: int | None, split_seed: int) -> FolderData:
        val_idx, train_idx = carve_indices(len(self.train), self.default_val_size if val_size is None else val_size,
                                           split_seed, name)
        return FolderData(name, self.train.subset(train_idx), self.train.subset(val_idx), self.test,
                          len(self.classes), self.classes, IMAGENET_MEAN, IMAGENET_STD, self.resolution,
                          self.eval_resize, self.min_scale, self.workers)


def _option(name: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise DataError(f"imagenet: dataset_options.{name}: expected {expected}, but got {value!r}")


@DATASETS.register("imagenet")
def imagenet(*, root: str | Path | None = None, resolution: int = 224, eval_resize: int | None = None,
             min_scale: float = 0.08, workers: int | None = None) -> RawFolder:
    """An ImageFolder with ``train/`` and ``val/`` under the data root (ImageNet's layout).

    Options (``dataset_options``): ``resolution`` (train and eval crop, default 224),
    ``eval_resize`` (short side before the eval center crop; default ``resolution * 256 / 224``),
    ``min_scale`` (RandomResizedCrop's lower area bound, default 0.08), ``workers`` (DataLoader
    decoding processes; default the CPU count, at most 8; 0 decodes in the training process).
    """
    _option("resolution", resolution, isinstance(resolution, int) and not isinstance(resolution, bool)
            and resolution >= 8, "an integer >= 8")
    eval_resize = round(resolution * 256 / 224) if eval_resize is None else eval_resize
    _option("eval_resize", eval_resize, isinstance(eval_resize, int) and eval_resize >= resolution,
            f"an integer >= resolution ({resolution})")
    _option("min_scale", min_scale, isinstance(min_scale, (int, float)) and 0 < min_scale <= SCALE_MAX,
            "a number in (0, 1]")
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    _option("workers", workers, isinstance(workers, int) and workers >= 0, "an integer >= 0")
    if root is None:
        raise DataError("imagenet needs a data root (data_root / --data-root): the folder that holds train/ and val/")
    root = Path(root).expanduser().resolve()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"imagenet: {root / split}: folder not found; expected ImageFolder layout "
                            f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG (val/ sorted into class "
                            f"folders, e.g. with the devkit's ground truth)")
    classes, val_classes = _classes(root / "train"), _classes(root / "val")
    if not classes:
        raise DataError(f"imagenet: {root / 'train'}: no class folders")
    if classes != val_classes:
        only_train = sorted(set(classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(classes))[:5]
        raise DataError(f"imagenet: the class folders of {root / 'train'} ({len(classes)}) and {root / 'val'} "
                        f"({len(val_classes)}) differ: only in train/: {only_train or 'none'}; only in val/: "
                        f"{only_val or 'none'}; both must hold the same classes")
    return RawFolder(scan(root, "train", classes), scan(root, "val", classes), tuple(classes), resolution,
                     eval_resize, float(min_scale), workers)


imagenet.streaming = True  # config validation reads it: no finite view set, no in-memory loader


# --------------------------------------------------------------------------- decoding (in the workers)


def crop_box(width: int, height: int, seed: int, min_scale: float) -> tuple[int, int, int, int, int]:
    """``(top, left, height, width, flip)`` of a RandomResizedCrop plus flip, drawn from ``seed``:
    torchvision's ``RandomResizedCrop.get_params`` algorithm (10 tries, then a center crop of
    the nearest allowed aspect ratio) with a private generator instead of the global one."""
    rng = random.Random(seed)
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(min_scale, SCALE_MAX)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w, int(rng.random() < 0.5)
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, int(rng.random() < 0.5)


def decode(path: str) -> Tensor:
    """uint8 RGB [3, H, W]. libjpeg-turbo through torchvision (1.3-1.6x PIL's rate with the crop,
    docs/performance.md); PIL for what it refuses (ImageNet holds a few CMYK JPEGs) and, should a
    later torchvision drop its decoders (0.29 deprecates them in favour of TorchCodec), for all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's notice, once per image
            from torchvision.io import ImageReadMode, decode_image, read_file

            return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except (ImportError, RuntimeError):
        from PIL import Image

        with Image.open(path) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


class FolderImages(torch.utils.data.Dataset):
    """Decodes and crops one image per key ``(index, mode, a, b, c, d, e)``: mode RANDOM draws the
    crop from seed ``a``; BOX takes ``(top, left, height, width, flip) = (a, b, c, d, e)``; CENTER is
    the evaluation crop. Returns the uint8 crop and the box it used (the FKD build stores it)."""

    def __init__(self, split: FolderSplit, resolution: int, eval_resize: int, min_scale: float) -> None:
        self.split, self.resolution, self.eval_resize, self.min_scale = split, resolution, eval_resize, min_scale

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        import torchvision.transforms.v2.functional as TF

        index, mode = key[0], key[1]
        path = self.split.path(index)
        try:
            image = decode(path)
        except Exception as e:  # a truncated or foreign file: name it, whichever worker met it
            raise DataError(f"imagenet: {path}: cannot be decoded as an image ({type(e).__name__}: "
                            f"{str(e)[:200]})") from e
        size = [self.resolution, self.resolution]
        if mode == CENTER:
            image = TF.center_crop(TF.resize(image, [self.eval_resize], antialias=True), size)
            return image, torch.zeros(5, dtype=torch.int32)
        box = crop_box(image.shape[2], image.shape[1], key[2], self.min_scale) if mode == RANDOM else key[2:7]
        top, left, h, w, flip = box
        image = TF.resized_crop(image, top, left, h, w, size, antialias=True)
        if flip:
            image = image.flip(-1)
        return image, torch.tensor(box, dtype=torch.int32)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one process per core: intra-op threads would oversubscribe them


class BatchPlan(torch.utils.data.Sampler):
    """The batch sampler of a persistent DataLoader: yields the keys of the batches that the loader
    planned last (lazily, a batch at a time: an ImageNet epoch is 1.28 M keys)."""

    def __init__(self) -> None:
        self.make: Callable[[], Iterator[list[tuple[int, ...]]]] = lambda: iter(())

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        return self.make()


def make_loader(dataset: FolderImages, plan: BatchPlan, workers: int, device: torch.device,
                 persistent: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=plan, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None)


# --------------------------------------------------------------------------- the loaders


class StreamingLoader:
    """The training loader of a :class:`FolderData`, with :class:`kdtune.data.TrainLoader`'s interface:
    ``batches(indices, batch_size)`` yields ``(images, labels, indices, views)`` on the device, and
    ``state_dict`` holds the generator that draws everything random.

    ``views``: per sample, the seed of its crop and flip; after :meth:`use_stored_crops` (the
    FKD-style cache), the index of the stored crop it got, which the cache's lookup keys on.
    """

    def __init__(self, data: FolderData, *, batch_size: int, device: torch.device | str, seed: int,
                 channels_last: bool = False, strong_view: Callable | None = None) -> None:
        if strong_view is not None:
            raise DataError(f"dataset {data.name!r} streams its images; a method that trains on a second, strongly "
                            f"augmented view (mlkd) needs the in-memory loader (cifar100, cifar10, digits, synthetic)")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.split = data.train
        self.labels = data.train.labels.to(self.device)
        self.num_samples = len(data.train)
        self.normalize = normalizer(data.mean, data.std, self.device)
        self.channels_last = channels_last
        self.resolution, self.min_scale = data.resolution, data.min_scale
        # On the CPU wherever the run is: the draws are made in this process and handed to workers.
        self.generator = torch.Generator().manual_seed(seed)
        self.strong_view = None
        self.stored_crops = None  # kdtune.fkd_cache.CropCache, when training on stored crops
        self.plan = BatchPlan()
        self.dataset = FolderImages(data.train, data.resolution, data.eval_resize, data.min_scale)
        self.loader = make_loader(self.dataset, self.plan, data.workers, self.device, persistent=True)

    @property
    def num_views(self) -> int:
        """Stored crops per image; 0 while crops are drawn afresh (no finite set of views)."""
        return 0 if self.stored_crops is None else self.stored_crops.num_crops

    def use_stored_crops(self, crops: object) -> None:
        """Sample among ``crops``' stored crops from now on (:mod:`kdtune.fkd_cache`)."""
        self.stored_crops = crops

    def draw_views(self, b: int) -> Tensor:
        if self.stored_crops is None:
            return torch.randint(0, 2**62, (b,), generator=self.generator)
        return torch.randint(0, self.stored_crops.num_crops, (b,), generator=self.generator)

    def keys(self, idx: Tensor, views: Tensor) -> list[tuple[int, ...]]:
        if self.stored_crops is None:
            return [(i, RANDOM, s) for i, s in zip(idx.tolist(), views.tolist())]
        boxes = self.stored_crops.boxes_of(idx, views)
        return [(i, BOX, *box) for i, box in zip(idx.tolist(), boxes.tolist())]

    def batches(self, indices: Tensor | None = None,
                batch_size: int | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """One epoch over ``indices`` (default: the whole split) in a fresh random order; the
        last batch may be short. Everything random is drawn here, before the first batch."""
        n = self.num_samples if indices is None else indices.shape[0]
        order = torch.randperm(n, generator=self.generator)
        if indices is not None:
            order = indices.cpu()[order]
        views = self.draw_views(n)
        parts = list(zip(order.split(batch_size or self.batch_size), views.split(batch_size or self.batch_size)))
        self.plan.make = lambda: (self.keys(idx, v) for idx, v in parts)
        for (images, _), (idx, v) in zip(self.loader, parts):
            idx = idx.to(self.device)
            yield self.to_device(images), self.labels[idx], idx, v.to(self.device)

    def to_device(self, images: Tensor) -> Tensor:
        x = self.normalize(images.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))


class StreamingEval:
    """Normalised center-crop batches of a split, decoded afresh on each pass (an ImageNet val
    split does not fit on a device: 50,000 x 3 x 224 x 224 floats are 30 GB)."""

    def __init__(self, data: FolderData, split: FolderSplit, *, batch_size: int, device: torch.device) -> None:
        self.split, self.batch_size, self.device = split, batch_size, device
        self.normalize = normalizer(data.mean, data.std, device)
        self.labels = split.labels.to(device)
        self.plan = BatchPlan()
        n = len(split)
        self.plan.make = lambda: ([(i, CENTER) for i in range(lo, min(n, lo + batch_size))]
                                  for lo in range(0, n, batch_size))
        # Not persistent: its workers would sit idle through every training epoch.
        self.loader = make_loader(FolderImages(split, data.resolution, data.eval_resize, data.min_scale),
                                   self.plan, data.workers, device, persistent=False)

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for lo, (images, _) in zip(range(0, len(self.split), self.batch_size), self.loader):
            yield (self.normalize(images.to(self.device, non_blocking=True)),
                   self.labels[lo:lo + self.batch_size])
