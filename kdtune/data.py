"""Datasets by name, a seeded validation split, and a device-resident training loader.

Every dataset is held as uint8 NCHW tensors. The training loader keeps the whole (padded)
train split on the run's device and draws CIFAR's augmentation -- random crop with zero
padding plus horizontal flip -- for a whole batch in one gather, so there are no PIL
transforms, no worker processes and no host synchronisation per batch.

A dataset too large for that (``imagenet``, :mod:`kdtune.imagenet`) streams from disk instead; the
engine asks the data for its loaders (``data.train_loader``, ``data.eval_batches``), so it runs
either kind the same way.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from kdtune.plugins import load_plugins
from kdtune.registry import Registry

if TYPE_CHECKING:
    from kdtune.distributed import Workers

DATASETS = Registry("dataset")


class DataError(RuntimeError):
    """A dataset cannot be loaded (missing or malformed files)."""


@dataclass(frozen=True)
class Split:
    images: Tensor  # uint8 [N, C, H, W]
    labels: Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class ImageData:
    """The splits of one dataset plus how to normalise and augment its images.

    ``val`` is carved from the original training set with ``split_seed``: searches select on
    it. ``test`` is the dataset's own test split, used only by final runs.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    def train_loader(self, **kwargs) -> TrainLoader:
        """The engine's training loader (a streaming dataset returns its own kind)."""
        return TrainLoader(self, **kwargs)

    def eval_batches(self, split: Split, *, batch_size: int, device: torch.device | str) -> list[tuple[Tensor, Tensor]]:
        """The engine's evaluation batches of ``split`` (see :func:`eval_batches`)."""
        return eval_batches(split, self, batch_size=batch_size, device=device)

    def train_digest(self) -> str:
        """A hash of the train split's pixels and labels (what teacher files are keyed on)."""
        digest = hashlib.sha256()
        digest.update(self.train.images.numpy().tobytes())
        digest.update(self.train.labels.numpy().tobytes())
        return digest.hexdigest()

    def for_final(self) -> ImageData:
        """Train on train+val (the whole original training set); evaluate on test."""
        merged = Split(
            torch.cat([self.train.images, self.val.images]),
            torch.cat([self.train.labels, self.val.labels]),
        )
        empty = Split(self.val.images[:0], self.val.labels[:0])
        return ImageData(
            self.name, merged, empty, self.test, self.num_classes, self.mean, self.std,
            self.crop_padding, self.flip,
        )


@dataclass(frozen=True)
class RawData:
    """What a dataset builder returns before the validation split is carved (a plugin's
    builder returns one too: ``train`` and ``test`` splits of uint8 NCHW images and int64
    labels; ``mean``/``std`` None to compute them from the training images)."""

    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...] | None  # None: computed from the training images
    std: tuple[float, ...] | None
    crop_padding: int
    flip: bool
    default_val_size: int


_Raw = RawData  # the former private name


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    val_size: int | None = None,
    split_seed: int = 0,
    download: bool = False,
    options: dict | None = None,
) -> ImageData:
    """Load a registered dataset and carve a seeded validation split from its train split.

    Args:
        name: a key of ``DATASETS`` (``cifar100``, ``cifar10``, ``digits``, ``synthetic``).
        root: directory holding the dataset files (CIFAR only).
        val_size: images moved from train to val; ``None`` takes the dataset's default.
        split_seed: seed of the train/val split. Keep it fixed across a search so that
            every trial is scored on the same validation images.
        download: fetch missing CIFAR files (needs network access).
        options: extra keyword arguments of the dataset builder (``synthetic`` only).
    """
    load_plugins()
    builder = DATASETS.get(name)
    kwargs = dict(options or {})
    # A builder that declares ``root`` (and ``download``) gets the run's data_root (download):
    # CIFAR's, and a plugin's that reads files.
    takes = inspect.signature(builder).parameters
    kwargs.update({k: v for k, v in (("root", root), ("download", download)) if k in takes})
    raw = builder(**kwargs)
    if not isinstance(raw, RawData):  # a streaming dataset (kdtune.imagenet) carves its own file list
        return raw.carve(name, val_size=val_size, split_seed=split_seed)
    val_idx, train_idx = carve_indices(len(raw.train), raw.default_val_size if val_size is None else val_size,
                                       split_seed, name)
    train = Split(raw.train.images[train_idx], raw.train.labels[train_idx])
    val = Split(raw.train.images[val_idx], raw.train.labels[val_idx])
    mean, std = raw.mean, raw.std
    if mean is None or std is None:
        # float64: a float32 sum depends on the thread count's reduction order, and a trial (one
        # thread) then normalised differently from the driver that built its teacher cache (two),
        # so their cache keys differed and every trial rebuilt the cache.
        pixels = train.images.double().div_(255).transpose(0, 1).flatten(1)
        mean = tuple(pixels.mean(1).tolist())
        std = tuple(pixels.std(1).clamp_min(1e-3).tolist())
    return ImageData(name, train, val, raw.test, raw.num_classes, mean, std, raw.crop_padding, raw.flip)


def carve_indices(n: int, val_size: int, split_seed: int, name: str) -> tuple[Tensor, Tensor]:
    """Sorted (val, train) indices of a seeded split of ``n`` training images."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) for {name}, but got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[:val_size].sort().values, perm[val_size:].sort().values


# --------------------------------------------------------------------------- datasets


# The only globals a CIFAR pickle refers to: numpy's array and scalar reconstructors (under
# their numpy 1 and numpy 2 module names; the official files are Python 2 pickles of numpy 1
# arrays) and ``_codecs.encode``, with which protocols 0-2 spell bytes. Everything else a pickle
# can name (os.system, builtins.eval, ...) is refused before it is called.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
}


class UnsafePickleError(DataError):
    """A data file whose pickle names something other than plain data."""


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise UnsafePickleError(
                f"{self.path}: refused: the pickle names {module}.{name}, which a CIFAR data file never "
                f"holds (only dicts, lists, bytes, str, ints and numpy arrays); it was not loaded")
        import numpy

        # numpy 2 moved numpy.core to numpy._core; import it by its current name (no warning)
        if module.startswith("numpy.core.") and hasattr(numpy, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.path}: refused: the pickle uses persistent ids, which a CIFAR "
                                f"data file never holds")


def _unpickle(path: Path) -> dict:
    """A CIFAR batch file, read with an unpickler that builds only plain data and numpy arrays."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or foreign file
        raise DataError(f"{path}: cannot be read as a CIFAR pickle ({type(e).__name__}: "
                        f"{str(e)[:200]})") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a CIFAR pickle holding a dict, found {type(d).__name__}")
    return d


def _cifar(root: str | Path | None, download: bool, *, folder: str, train_files: list[str],
           test_file: str, label_key: bytes, num_classes: int, tv_name: str,
           mean: tuple[float, ...], std: tuple[float, ...]) -> RawData:
    if root is None:
        raise DataError(f"{tv_name} needs a data root (data_root / --data-root): the directory "
                        f"that holds {folder}/")
    root = Path(root).expanduser().resolve()
    expected = [root / folder / f for f in [*train_files, test_file]]
    missing = [p for p in expected if not p.is_file()]
    if missing and download:
        import torchvision  # only needed to download

        getattr(torchvision.datasets, tv_name)(str(root), train=True, download=True)
        missing = [p for p in expected if not p.is_file()]
    if missing:
        raise DataError(
            f"{tv_name} files missing under data root {root}: expected "
            f"{', '.join(str(p.relative_to(root)) for p in expected)}; missing "
            f"{', '.join(str(p.relative_to(root)) for p in missing)}. Get them with download: true "
            f"(kdtune train --download, kdtune search --set fixed.download=true; needs network access), "
            f"or unpack the python version of the dataset (https://www.cs.toronto.edu/~kriz/cifar.html) "
            f"into {root}."
        )

    def read(files: list[Path]) -> Split:
        images, labels = [], []
        for path in files:
            d = _unpickle(path)
            if b"data" not in d or label_key not in d:
                found = ", ".join(sorted(map(repr, d))[:10])
                raise DataError(f"{path}: expected keys b'data' and {label_key!r}, found {found[:200]}")
            try:
                images.append(torch.as_tensor(d[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
                labels.append(torch.as_tensor(d[label_key], dtype=torch.int64))
            except (TypeError, ValueError, RuntimeError) as e:
                raise DataError(f"{path}: b'data' must be N x 3072 uint8 pixels and {label_key!r} a list of "
                                f"N integers ({type(e).__name__}: {str(e)[:200]})") from e
            if len(images[-1]) != len(labels[-1]):
                raise DataError(f"{path}: {len(images[-1])} images but {len(labels[-1])} labels")
        return Split(torch.cat(images), torch.cat(labels))

    return RawData(read(expected[:-1]), read(expected[-1:]), num_classes, mean, std,
                crop_padding=4, flip=True, default_val_size=5000)


@DATASETS.register("cifar100")
def cifar100(*, root: str | Path | None = None, download: bool = False) -> RawData:
    """CIFAR-100 in torchvision's on-disk format (``<root>/cifar-100-python/{train,test}``)."""
    return _cifar(root, download, folder="cifar-100-python", train_files=["train"],
                  test_file="test", label_key=b"fine_labels", num_classes=100, tv_name="CIFAR100",
                  mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761))


@DATASETS.register("cifar10")
def cifar10(*, root: str | Path | None = None, download: bool = False) -> RawData:
    """CIFAR-10 in torchvision's on-disk format (``<root>/cifar-10-batches-py/``)."""
    return _cifar(root, download, folder="cifar-10-batches-py",
                  train_files=[f"data_batch_{i}" for i in range(1, 6)], test_file="test_batch",
                  label_key=b"labels", num_classes=10, tv_name="CIFAR10",
                  mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits' pixels [1797, 64] (0-16) and labels, read from the file scikit-learn ships
    them in, as ``load_digits`` reads it: importing scikit-learn costs about 1.5 s of CPU in every
    process that loads digits (each trial of a search), reading the file 30 ms. ``find_spec``
    locates the package without importing it; without the file, ``load_digits`` itself."""
    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        data = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if data.is_file():
            table = np.loadtxt(data, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


@DATASETS.register("digits")
def digits(*, test_fraction: float = 0.2) -> RawData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no download).

    A fixed 20% becomes the test split (seed 0, independent of ``split_seed``). Images are
    1x8x8; the crop pads by 1 pixel and there is no flip (a mirrored digit is another glyph).
    """
    pixels, target = _digits_arrays()
    images = torch.as_tensor(pixels * (255.0 / 16.0)).round().to(torch.uint8).reshape(-1, 1, 8, 8)
    labels = torch.as_tensor(target, dtype=torch.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(round(test_fraction * len(labels)))
    test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
    return RawData(Split(images[train_idx], labels[train_idx]), Split(images[test_idx], labels[test_idx]),
                10, None, None, crop_padding=1, flip=False, default_val_size=300)


@DATASETS.register("synthetic")
def synthetic(*, num_classes: int = 10, image_size: int = 32, channels: int = 3,
              train_size: int = 5000, test_size: int = 1000, noise: float = 0.5,
              seed: int = 0) -> RawData:
    """Random but learnable images: one random prototype per class plus per-image noise.

    For benchmarks and tests: any shape and class count, deterministic given ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, channels, image_size, image_size, generator=g)

    def make(n: int) -> Split:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        x = (1 - noise) * protos[labels] + noise * torch.rand(n, channels, image_size, image_size, generator=g)
        return Split(x.mul(255).round().to(torch.uint8), labels)

    return RawData(make(train_size), make(test_size), num_classes, None, None, crop_padding=4,
                flip=True, default_val_size=train_size // 10)


# --------------------------------------------------------------------------- loaders


def normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Callable[[Tensor], Tensor]:
    """uint8 pixels -> normalised float32, on ``device`` (shared with the streaming loaders)."""
    return _Normalizer(mean, std, device)


class _Normalizer:
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        # Folding the /255 into mean and std saves one elementwise pass per batch.
        self.shift = torch.tensor(mean, device=device).mul(255).view(1, -1, 1, 1)
        self.scale = torch.tensor(std, device=device).mul(255).reciprocal().view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float() - self.shift) * self.scale


# The strong view's generator is seeded with the run's seed plus this, so that its stream is not
# the loader's own (which draws the batch order and the weak views).
_STRONG_SEED_OFFSET = 0x5EED


class TrainLoader:
    """Shuffled, augmented batches of the train split, held on ``device``.

    Each batch is ``(images, labels, indices, views)``: ``indices`` index the train split
    (sample-selection methods such as KDAS key on them) and ``views`` say which of the
    :attr:`num_views` augmentations each sample got, so that the exact teacher-output cache
    (``kdtune.teacher_cache``) can serve the teacher's logits for that very view. A view is
    ``(dy * (2p + 1) + dx) * flips + mirror`` for crop offset ``(dy, dx)`` with padding ``p``
    (CIFAR: 81 offsets x 2 flips = 162 views; digits: 9 offsets, no flip). Randomness comes from
    a private generator whose state is part of :meth:`state_dict`, so a resumed run draws the
    same batches as an uninterrupted one.

    ``strong_view``: a method that trains on a second, strongly augmented view of each image
    (MLKD) passes its augmentation, ``f(pixels, generator) -> pixels`` on a batch of crops with
    values 0..255; :meth:`strong_images` then makes that view with its own crop and flip. It
    draws from a generator of its own, so the batches and weak views are the same with or
    without it; without it (every other method) nothing of it exists.
    """

    def __init__(self, data: ImageData, *, batch_size: int, device: torch.device | str,
                 seed: int, augment: bool = True, channels_last: bool = False,
                 strong_view: Callable[[Tensor, torch.Generator], Tensor] | None = None) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        p = data.crop_padding if augment else 0
        self.pad = p
        self.flip = data.flip and augment
        images = data.train.images.to(self.device)
        # Zero padding in raw pixel space, exactly what RandomCrop(padding=p) does to a PIL image.
        padded = torch.nn.functional.pad(images, (p, p, p, p)) if p else images
        self.flat = padded.reshape(-1)
        self.labels = data.train.labels.to(self.device)
        self.num_samples = len(data.train)
        n, c, h, w = images.shape
        hp, wp = h + 2 * p, w + 2 * p
        self.image_stride, self.row_stride = c * hp * wp, wp
        # Offsets of the top-left crop's pixels inside one padded image, once plain and once
        # mirrored; a crop at (dy, dx) adds dy * row_stride + dx. Ordered (H, W, C) for
        # channels_last output so the gather writes the layout the convolutions want.
        ch = torch.arange(c, device=self.device).view(c, 1, 1) * hp * wp
        row = torch.arange(h, device=self.device).view(1, h, 1) * wp
        col = torch.arange(w, device=self.device).view(1, 1, w)
        offsets = torch.stack([ch + row + col, ch + row + col.flip(2)])  # [2, C, H, W]
        if channels_last:
            offsets = offsets.permute(0, 2, 3, 1)
        self.offsets = offsets.reshape(2, -1)
        self.out_shape = (h, w, c) if channels_last else (c, h, w)
        self.channels_last = channels_last
        self.normalize = _Normalizer(data.mean, data.std, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.flips = 2 if self.flip else 1
        self.num_views = (2 * p + 1) ** 2 * self.flips
        self.strong_view = strong_view
        # kdtune.distributed.Workers when this is one of several data-parallel processes (the
        # engine sets it): batches() then yields this rank's shard of each global batch.
        self.workers: Workers | None = None
        if strong_view is not None:
            self.strong_generator = torch.Generator(device=self.device).manual_seed(seed + _STRONG_SEED_OFFSET)

    def batches(self, indices: Tensor | None = None,
                batch_size: int | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """One epoch over ``indices`` (default: the whole split) in a fresh random order.

        Yields ``(images, labels, indices, views)``. The last batch may be short, as with a
        DataLoader's default ``drop_last=False``. With :attr:`workers` (data-parallel processes)
        each batch is this rank's shard of the global batch that :meth:`draws` gives every rank.
        """
        for idx, views in self.draws(indices, batch_size):
            if self.workers is not None:
                idx, views = self.workers.shard(idx), self.workers.shard(views)
            yield self.view_images(idx, views), self.labels[idx], idx, views

    def draws(self, indices: Tensor | None = None,
              batch_size: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The ``(indices, views)`` of :meth:`batches`' global batches, without images: the same
        draws on every rank of a data-parallel run, whose generators share the seed."""
        n = self.num_samples if indices is None else indices.shape[0]
        order = torch.randperm(n, device=self.device, generator=self.generator)
        if indices is not None:
            order = indices.to(self.device)[order]
        for idx in order.split(batch_size or self.batch_size):
            yield idx, self.draw_views(idx.shape[0])

    def draw_views(self, b: int, generator: torch.Generator | None = None) -> Tensor:
        """Random views for ``b`` samples (int64 on the device). The draws (offsets, then
        mirrors) are the ones the loader has always made, so batches did not change.
        ``generator``: another stream than the loader's own (the strong view's)."""
        generator = self.generator if generator is None else generator
        p = self.pad
        views = torch.zeros(b, dtype=torch.long, device=self.device)
        if p:
            shift = torch.randint(0, 2 * p + 1, (2, b), device=self.device, generator=generator)
            views = shift[0] * (2 * p + 1) + shift[1]
        if self.flip:
            mirror = torch.randint(0, 2, (b,), device=self.device, generator=generator)
            views = views * 2 + mirror
        return views

    def images(self, idx: Tensor) -> Tensor:
        """Randomly augmented, normalised images for train-split indices ``idx``."""
        return self.view_images(idx, self.draw_views(idx.shape[0]))

    def view_images(self, idx: Tensor, views: Tensor) -> Tensor:
        """Normalised images of train-split indices ``idx`` in views ``views`` (float32, NCHW
        shape; NHWC memory with ``channels_last``)."""
        return self.normalize(self.view_pixels(idx, views))

    def strong_images(self, idx: Tensor) -> Tensor:
        """The strong view of train-split indices ``idx`` (only with ``strong_view``): a crop and
        flip of its own, then ``strong_view`` on the pixels, normalised as :meth:`view_images`."""
        views = self.draw_views(idx.shape[0], self.strong_generator)
        return self.normalize(self.strong_view(self.view_pixels(idx, views), self.strong_generator))

    def view_pixels(self, idx: Tensor, views: Tensor) -> Tensor:
        """The uint8 pixels of :meth:`view_images`, before normalisation."""
        b, p = idx.shape[0], self.pad
        base = idx * self.image_stride
        offset = views // self.flips  # dy * (2p + 1) + dx
        if p:
            base = base + (offset // (2 * p + 1)) * self.row_stride + offset % (2 * p + 1)
        offsets = self.offsets[views % self.flips] if self.flip else self.offsets[0].expand(b, -1)
        # One gather from the flat padded dataset does index, crop and flip for the batch.
        x = self.flat.take(base[:, None] + offsets).view(b, *self.out_shape)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return x

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state()}
        if self.strong_view is not None:
            state["strong_generator"] = self.strong_generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.strong_view is not None:  # a CPU ByteTensor, wherever the checkpoint was mapped to
            self.strong_generator.set_state(state["strong_generator"].to("cpu", torch.uint8))


def eval_batches(split: Split, data: ImageData, *, batch_size: int,
                 device: torch.device | str) -> list[tuple[Tensor, Tensor]]:
    """Normalised, unaugmented batches of ``split``, built once and kept on ``device``."""
    device = torch.device(device)
    normalize = _Normalizer(data.mean, data.std, device)
    images, labels = split.images.to(device), split.labels.to(device)
    return [
        (normalize(images[i:i + batch_size]), labels[i:i + batch_size])
        for i in range(0, len(split), batch_size)
    ]
