"""``kdtune bench --loader``: images per second of the streaming ``imagenet`` loader (decode, random
resized crop, flip, to the device and normalise) for a few worker counts, of its evaluation loader,
and (on a GPU, or with ``--steps``) of a whole distillation step on that stream.

Without ``--data-root`` it writes a temporary ImageFolder of ImageNet-sized JPEGs (500 x 375 on
average, quality 90: what the decoder meets in ImageNet's train/), so the figure is the decode
and crop cost of real-sized files; with it, it reads your ImageNet folder (the first ``--images``
of train/). Each figure follows a warm-up pass over the same images, so the files are read from
the page cache: a cold disk adds its own read rate (ImageNet's 140 GB fit the page cache of few
machines).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

DESCRIPTION = """kdtune bench --loader: images per second of the streaming imagenet loader (JPEG
decode, RandomResizedCrop, flip, normalise on the device) per DataLoader worker
count, of its evaluation loader, and of a distillation step on it (on a GPU, or with
--steps)."""
EXAMPLES = """examples:
  kdtune bench --loader
  kdtune bench --loader --data-root /data/imagenet --workers 8,16 --images 20000
  kdtune bench --loader --pair tv_resnet34:tv_resnet18 --steps 20"""


def write_jpegs(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    """``n`` ImageNet-sized JPEGs in ``classes`` class folders under ``root/train`` and ``root/val``
    (smooth noise plus grain, 110 kB a file on average: ImageNet's train JPEGs average about that)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (500, 333), (640, 480)]
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = sizes[i % len(sizes)]
            base = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3)).cumsum(0).cumsum(1)
            pixels = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
            pixels = (pixels - pixels.min()) / (np.ptp(pixels) + 1e-9) * 255 + rng.normal(0, 20, (h, w, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img{i}.JPEG", quality=90)


def _rate(batches, sync) -> tuple[float, int]:
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += batch[0].shape[0]
    sync()
    return seen / (time.perf_counter() - start), seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kdtune bench --loader", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loader", action="store_true", required=True, help="this benchmark")
    p.add_argument("--data-root", help="an ImageFolder with train/ and val/ (default: a temporary one of "
                                       "ImageNet-sized JPEGs)")
    p.add_argument("--images", type=int, default=512, help="training images read per measurement (default 512)")
    p.add_argument("--resolution", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", default=None,
                   help="DataLoader worker counts to measure, comma-separated (default 0 and the CPU count)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--pair", default="tv_resnet34:tv_resnet18", metavar="TEACHER:STUDENT",
                   help="the distillation step's models (default tv_resnet34:tv_resnet18)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps to time (default 20 on a GPU, "
                                                           "none on the CPU)")
    args = p.parse_args(argv)
    try:
        workers = ([0, os.cpu_count() or 1] if args.workers is None
                   else [int(w) for w in args.workers.split(",")])
        if any(w < 0 for w in workers) or args.images < 1 or args.batch_size < 1 or args.resolution < 8:
            raise ValueError("--workers must be counts >= 0, --images and --batch-size >= 1, --resolution >= 8")
        from kdtune.checks import device_problem, model_pair

        if problem := model_pair(args.pair, "--pair") or device_problem(args.device):
            raise ValueError(problem)
        teacher, _, student = args.pair.partition(":")
        from kdtune import imagenet  # noqa: F401  registers the dataset
        from kdtune.data import load_dataset

        if args.data_root:  # a missing or malformed folder, named before anything runs
            load_dataset("imagenet", root=args.data_root, val_size=0, options={"resolution": args.resolution})
    except (ValueError, RuntimeError) as e:  # RuntimeError: kdtune.data.DataError, naming the folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from kdtune.engine import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with tempfile.TemporaryDirectory(prefix="kdtune-bench-loader-") as tmp:
        root = Path(args.data_root) if args.data_root else Path(tmp)
        if not args.data_root:
            print(f"writing {args.images} ImageNet-sized JPEGs (500 x 375 and similar) under {root} ...", flush=True)
            write_jpegs(root, args.images, classes=min(10, args.images))
        print(f"kdtune bench --loader: {platform.node()}, {os.cpu_count()} CPUs, device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if cuda else "") + f", torch {torch.__version__}, "
              f"resolution {args.resolution}, batch {args.batch_size}", flush=True)
        for w in workers:
            data = load_dataset("imagenet", root=root, val_size=0,
                                options={"resolution": args.resolution, "workers": w})
            idx = torch.arange(min(args.images, len(data.train)))
            loader = data.train_loader(batch_size=args.batch_size, device=device, seed=0, channels_last=cuda)
            for _ in loader.batches(idx):  # a warm-up epoch: starts the workers, reads the files into the page cache
                pass
            rate, seen = _rate(loader.batches(idx), sync)
            print(f"  train loader, {w:>2} workers: {rate:8.1f} img/s ({seen} images)", flush=True)
            del loader
        data = load_dataset("imagenet", root=root, val_size=0,
                            options={"resolution": args.resolution, "workers": workers[-1]})
        eval_split = data.train.subset(torch.arange(min(args.images, len(data.train))))
        evaluation = data.eval_batches(eval_split, batch_size=args.batch_size, device=device)
        _rate(evaluation, sync)  # warm-up pass
        rate, seen = _rate(evaluation, sync)
        print(f"  eval loader,  {workers[-1]:>2} workers: {rate:8.1f} img/s ({seen} images)", flush=True)
        steps = args.steps if args.steps is not None else (20 if cuda else 0)
        if steps:
            print(f"  step {teacher} -> {student} (kd, teacher live): {step_rate(data, teacher, student, steps, args.batch_size, device):8.1f} img/s "
                  f"({steps} steps after 3 warm-up steps)", flush=True)
    return 0


def step_rate(data, teacher_name: str, student_name: str, steps: int, batch_size: int, device) -> float:
    """Images per second of KD steps through the Engine on the streaming loader (the teacher live)."""
    import torch

    from kdtune.distillers import build_distiller
    from kdtune.engine import Engine, Recipe
    from kdtune.models import build_model

    torch.manual_seed(0)
    teacher = build_model(teacher_name, num_classes=data.num_classes)
    student = build_model(student_name, num_classes=data.num_classes)
    distiller = build_distiller("kd", student, teacher, input_shape=data.image_shape).to(device)
    engine = Engine(distiller, data, Recipe(epochs=1, batch_size=batch_size, lr=0.1), device=device)
    idx = torch.arange((steps + 3) * batch_size) % len(data.train)
    start, seen = 0.0, 0
    # Timed from the end of the third step: loader waits count, as they do in a trial.
    for i, (x, y, _, _) in enumerate(engine.loader.batches(idx)):
        with engine.autocast():
            _, losses = engine.distiller(x.contiguous(memory_format=engine.memory_format), y)
        loss = sum(t.mean() for t in losses.values())
        engine.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        engine.optimizer.step()
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        elif i > 2:
            seen += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)

if __name__ == "__main__":
    raise SystemExit(main())
