"""``python -m kdtune.bench``: images per second of the training pipeline and of a KD step.

(a) The device-resident pipeline (crop + flip + normalise, batched on the device) against
torchvision's usual DataLoader with PIL RandomCrop + RandomHorizontalFlip (2 workers), both
on CIFAR-shaped data, side by side in one run.
(b) A full training step (teacher forward, student forward/backward, SGD, augmentation),
steady state, through the same Engine the searches use: KD, and other methods (``--methods``)
as a multiple of KD's step time on the same pair.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from kdtune.checks import device_problem
from kdtune.data import ImageData, Split, TrainLoader, load_dataset
from kdtune.distillers import METHODS, build_distiller
from kdtune.engine import Engine, Recipe, resolve_device
from kdtune.models import build_model


def cifar_shaped(n: int) -> ImageData:
    return load_dataset("synthetic", val_size=0, options=dict(
        num_classes=100, image_size=32, channels=3, train_size=n, test_size=1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_device_pipeline(data: ImageData, device: torch.device, batch_size: int) -> float:
    loader = TrainLoader(data, batch_size=batch_size, device=device, seed=0)
    for _ in loader.batches():  # warm-up epoch
        pass
    _sync(device)
    start = time.perf_counter()
    for x, y, idx in loader.batches():
        pass
    _sync(device)
    return len(data.train) / (time.perf_counter() - start)


class _PILDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR dataset does per sample: uint8 HWC array -> PIL -> transforms."""

    def __init__(self, split: Split, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        import torchvision.transforms as T

        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = split.labels.tolist()
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def bench_torchvision_pipeline(data: ImageData, device: torch.device, batch_size: int,
                               workers: int) -> float:
    loader = torch.utils.data.DataLoader(
        _PILDataset(data.train, data.mean, data.std), batch_size=batch_size, shuffle=True,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    for _ in loader:  # warm-up epoch (starts the workers)
        pass
    start = time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
    _sync(device)
    return len(data.train) / (time.perf_counter() - start)


def bench_step(method: str, teacher: str, student: str, device: torch.device, batch_size: int,
               steps: int) -> float:
    """Steady-state images/s of Engine epochs of ``steps`` training steps of ``method`` (with its
    default hyperparameters) after one warm-up epoch."""
    data = cifar_shaped(batch_size * steps)
    torch.manual_seed(0)
    t = build_model(teacher, num_classes=100)
    s = build_model(student, num_classes=100)
    engine = Engine(build_distiller(method, s, t).to(device), data,
                    Recipe(epochs=3, batch_size=batch_size), device=device)
    engine.train_epoch()  # warm-up: cuDNN autotuning, allocator
    times = [engine.train_epoch()["time/epoch_s"] for _ in range(2)]
    return batch_size * steps / min(times)


def count_macs(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the convolutions and linear layers for one input of ``shape``."""
    total = 0

    def hook(module: torch.nn.Module, _: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += out.numel() * k
        elif isinstance(module, torch.nn.Linear):
            total += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model.eval()
    device = next(model.parameters()).device  # the input goes where the model is (a GPU, in bench --kdas)
    with torch.no_grad():
        model(torch.zeros(1, *shape, device=device))
    for h in handles:
        h.remove()
    return total


def bench_kdas(teacher: str, student: str, device: torch.device, batch_size: int, images: int) -> None:
    """KDAS vs KD epoch wall time on one pipeline, and the whole-schedule ratio for the defaults."""
    from kdtune.sampling import KDAS

    data = cifar_shaped(images)
    torch.manual_seed(0)
    t = build_model(teacher, num_classes=100).to(device)

    def engine(sampler: KDAS | None) -> Engine:
        torch.manual_seed(0)
        s = build_model(student, num_classes=100)
        return Engine(build_distiller("kd", s, t).to(device), data, Recipe(epochs=4, batch_size=batch_size),
                      device=device, sampler=sampler)

    kd = engine(None)
    kd_time = min(kd.train_epoch()["time/epoch_s"] for _ in range(3))
    scoring, cached = {}, {}
    for rate in (0.6, 0.4):
        e = engine(KDAS(start_rate=rate, end_rate=rate, sampling_period=2))
        times = [e.train_epoch()["time/epoch_s"] for _ in range(4)]  # scoring, cached, scoring, cached
        scoring[rate], cached[rate] = min(times[0::2]) / kd_time, min(times[1::2]) / kd_time
    print(f"kdas      {teacher}->{student}, {images} CIFAR-shaped images, batch {batch_size}; KD epoch {kd_time:.2f}s")
    for rate in (0.6, 0.4):
        print(f"kdas      ratio {rate}: scoring epoch {scoring[rate]:.3f}x KD, non-scoring epoch {cached[rate]:.3f}x KD")

    def interpolate(table: dict[float, float], r: float) -> float:
        return table[0.4] + (table[0.6] - table[0.4]) * (r - 0.4) / 0.2

    k = KDAS()  # the released defaults: 0.6 -> 0.4, periods [1, 3, 5, 10], no warm-up
    epochs = 240
    wall = sum(interpolate(scoring if k.is_scoring_epoch(e, epochs) else cached, k.rate(e, epochs))
               for e in range(1, epochs + 1)) / epochs
    tm, sm = count_macs(t, (3, 32, 32)), count_macs(build_model(student, num_classes=100), (3, 32, 32))
    kd_work = tm + 3 * sm  # teacher forward + student forward and backward (~2x forward)
    work = sum(((tm + sm) + k.rate(e, epochs) * 3 * sm) if k.is_scoring_epoch(e, epochs)
               else k.rate(e, epochs) * kd_work for e in range(1, epochs + 1)) / (epochs * kd_work)
    print(f"kdas      whole schedule (defaults, 240 epochs, 98 scoring): wall time {wall:.3f}x KD; "
          f"work (MACs: teacher {tm / 1e6:.0f}M, student {sm / 1e6:.0f}M per image) {work:.3f}x KD")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, but got {value}")
    return value


def _nonnegative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def _pair(text: str, flag: str) -> tuple[str, str]:
    """``TEACHER:STUDENT`` with both models known, else a one-line error naming the flag."""
    from kdtune.models import MODELS

    teacher, sep, student = text.partition(":")
    if not sep or not teacher or not student:
        raise ValueError(f"{flag} {text!r}: expected TEACHER:STUDENT, e.g. resnet32x4:resnet8x4")
    for role, name in (("teacher", teacher), ("student", student)):
        if name not in MODELS:
            raise ValueError(f"{flag} {text!r}: {role}: {MODELS.unknown_message(name)}")
    return teacher, student


def main(argv: list[str] | None = None) -> int:
    import sys

    if "--search" in (sys.argv[1:] if argv is None else argv):
        # Search strategies need Ray and Optuna: the search layer's benchmark, loaded only here.
        from kdtune.search.bench_search import main as bench_search
        return bench_search(argv)
    p = argparse.ArgumentParser(prog="python -m kdtune.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--pipeline-images", type=_positive, default=10000)
    p.add_argument("--workers", type=_nonnegative, default=2, help="DataLoader workers for the torchvision baseline")
    p.add_argument("--pairs", default="resnet32x4:resnet8x4,vgg13:vgg8")
    p.add_argument("--steps", type=_positive, default=None, help="steps per timed epoch (default 10 CPU, 200 CUDA)")
    p.add_argument("--methods", default="kd", help="methods to time per pair, e.g. kd,ctkd,sakd (KD is the reference)")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--kdas", default=None, metavar="TEACHER:STUDENT",
                   help="also time KDAS against KD epochs for this pair (e.g. resnet32:resnet8)")
    p.add_argument("--kdas-images", type=_positive, default=2048)
    args = p.parse_args(argv)
    # Every name is checked before the first benchmark runs (minutes on a CPU).
    try:
        pairs = [_pair(pair, "--pairs") for pair in args.pairs.split(",")] if not args.skip_step else []
        kdas = _pair(args.kdas, "--kdas") if args.kdas else None
        methods = list(dict.fromkeys(["kd", *args.methods.split(",")]))
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: {METHODS.unknown_message(unknown[0])}")
        problem = device_problem(args.device)
        if problem:
            raise ValueError(f"--{problem}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}")
    if not args.skip_pipeline:
        data = cifar_shaped(args.pipeline_images)
        ours = bench_device_pipeline(data, device, args.batch_size)
        base = bench_torchvision_pipeline(data, device, args.batch_size, args.workers)
        print(f"pipeline  kdtune on-device crop+flip : {ours:12,.0f} img/s")
        print(f"pipeline  torchvision PIL, {args.workers} workers : {base:12,.0f} img/s")
        print(f"pipeline  speed-up                   : {ours / base:12.1f}x")
    if not args.skip_step:
        steps = args.steps or (200 if device.type == "cuda" else 10)
        for teacher, student in pairs:
            rates = {m: bench_step(m, teacher, student, device, args.batch_size, steps) for m in methods}
            for m, ips in rates.items():
                ratio = "" if m == "kd" else f"  ({rates['kd'] / ips:.2f}x KD's step time)"
                print(f"{m + ' step':<10}{teacher}->{student:<10}: {ips:12,.0f} img/s{ratio}")
    if kdas:
        teacher, student = kdas
        bench_kdas(teacher, student, device, args.batch_size, args.kdas_images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
