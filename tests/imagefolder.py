"""A fabricated ImageNet-layout folder (``train/<class>/``, ``val/<class>/``) of small JPEGs, for the
tests of the streaming ``imagenet`` dataset and its searches: a few hundred files, each class a
colour plus noise, so that a model can learn them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")  # sorted, as ImageNet's synsets are


def write_imagefolder(root: Path, *, train: int = 24, val: int = 6, seed: int = 0) -> Path:
    """``train`` and ``val`` JPEGs per class under ``root``, in three sizes (landscape, portrait and
    a strip too wide for RandomResizedCrop's aspect ratios, which takes its fallback), one of them
    grayscale (decoded to RGB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(48, 40), (36, 52), (90, 20)]
    for c, name in enumerate(CLASSES):
        colour = rng.integers(0, 256, 3)
        for split, n in (("train", train), ("val", val)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                pixels = np.clip(colour + rng.normal(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if i == 1:
                    image = image.convert("L")
                image.save(folder / f"{name}_{i}.JPEG", quality=90)
    return root
