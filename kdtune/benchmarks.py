"""The measurements behind ``kdtune bench`` (see :mod:`kdtune.bench` for what each
figure is); kept apart from the command so that its ``--help`` does not wait for torch."""
from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdtune.data import ImageData, Split, TrainLoader, load_dataset
from kdtune.distillers import build_distiller
from kdtune.engine import Engine, Recipe, resolve_device
from kdtune.models import build_model
from kdtune.teacher_cache import TeacherCache, open_cache


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
    for _ in loader.batches():
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


def timing_cache(loader: TrainLoader, num_classes: int) -> TeacherCache:
    """A teacher-output cache of the real shape, layout and lookup path for timing a step, its
    table filled with random logits (a step reads it the same way whatever the values; the
    build is timed on its own by :func:`bench_cache_build`)."""
    n, v = loader.num_samples, loader.num_views
    table = torch.randn(n * v, num_classes, generator=torch.Generator().manual_seed(0)).to(loader.device)
    return TeacherCache(Path("(timing table)"), "timing", (n, v, num_classes), "float32", "timing", 0.0, table)


def step_engine(method: str, teacher: str, student: str, device: torch.device, batch_size: int, steps: int,
                *, cache: bool = False, compile: bool = False, epochs: int = 3) -> Engine:
    data = cifar_shaped(batch_size * steps)
    torch.manual_seed(0)
    t = build_model(teacher, num_classes=100)
    s = build_model(student, num_classes=100)
    engine = Engine(build_distiller(method, s, t).to(device), data, Recipe(epochs=epochs, batch_size=batch_size),
                    device=device, compile=compile)
    if cache:
        engine.teacher_cache = timing_cache(engine.loader, 100)
    return engine


def bench_step(method: str, teacher: str, student: str, device: torch.device, batch_size: int,
               steps: int, *, cache: bool = False, compile: bool = False) -> float:
    """Steady-state images/s of Engine epochs of ``steps`` training steps of ``method`` (with its
    default hyperparameters) after one warm-up epoch (cuDNN autotuning, allocator, compilation);
    ``cache``: the teacher's logits come from a teacher-output cache instead of a forward."""
    engine = step_engine(method, teacher, student, device, batch_size, steps, cache=cache, compile=compile)
    engine.train_epoch()  # warm-up
    times = [engine.train_epoch()["time/epoch_s"] for _ in range(2)]
    return batch_size * steps / min(times)


def bench_cache_build(teacher: str, device: torch.device, images: int, batch_size: int | None = None
                      ) -> tuple[float, int, float]:
    """Build a real teacher-output cache (the code path runs use) for ``images`` CIFAR-shaped images
    x 162 views into a temporary folder; returns (seconds, bytes, teacher images/s)."""
    data = cifar_shaped(images)
    torch.manual_seed(0)
    model = build_model(teacher, num_classes=100).to(device)
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    loader = TrainLoader(data, batch_size=64, device=device, seed=0, channels_last=cuda)
    with tempfile.TemporaryDirectory(prefix="kdtune-bench-cache-") as tmp:
        cache = open_cache(model, loader, cache_dir=tmp, amp=cuda, memory_format=memory_format,
                           build_batch_size=batch_size, log=lambda msg: None)
        seconds, size = cache.build_s, cache.size_bytes
        del cache
    return seconds, size, images * loader.num_views / seconds


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


def bench_kdas(teacher: str, student: str, device: torch.device, batch_size: int, images: int,
               epochs: int) -> None:
    """KDAS (released defaults on an ``epochs``-long schedule) against KD, every epoch actually run:
    KD with the teacher live, KDAS live, KDAS with the teacher-output cache."""
    from kdtune.sampling import KDAS

    data = cifar_shaped(images)
    torch.manual_seed(0)
    t = build_model(teacher, num_classes=100).to(device)

    def run(sampler: KDAS | None, cache: bool) -> tuple[float, int]:
        torch.manual_seed(0)
        s = build_model(student, num_classes=100)
        engine = Engine(build_distiller("kd", s, t).to(device), data, Recipe(epochs=epochs, batch_size=batch_size),
                        device=device, sampler=sampler)
        if cache:
            engine.teacher_cache = timing_cache(engine.loader, 100)
        metrics = list(engine.run())
        return sum(m["time/epoch_s"] for m in metrics), int(sum(m.get("kdas/scoring_epoch", 0) for m in metrics))

    kd, _ = run(None, False)
    live, scoring = run(KDAS(), False)
    cached, _ = run(KDAS(), True)
    print(f"kdas      {teacher}->{student}, {images} CIFAR-shaped images, batch {batch_size}, {epochs} epochs "
          f"actually run ({scoring} scoring; KDAS defaults 0.6->0.4, periods 1,3,5,10 over {epochs} epochs)")
    print(f"kdas      KD live {kd:.1f}s | KDAS live {live:.1f}s ({live / kd:.3f}x KD) | "
          f"KDAS cache {cached:.1f}s ({cached / kd:.3f}x KD live)")
    k, n = KDAS(), 240
    tm, sm = count_macs(t.cpu(), (3, 32, 32)), count_macs(build_model(student, num_classes=100), (3, 32, 32))
    kd_work = tm + 3 * sm  # teacher forward + student forward and backward (~2x forward)
    for label, teacher_cost in (("live", tm), ("cache", 0)):
        work = sum(((teacher_cost + sm) + k.rate(e, n) * (teacher_cost + 3 * sm)) if k.is_scoring_epoch(e, n)
                   else k.rate(e, n) * (teacher_cost + 3 * sm) for e in range(1, n + 1)) / (n * kd_work)
        print(f"kdas      model, not run: 240-epoch MAC count with the teacher {label}: {work:.3f}x KD live "
              f"(teacher {tm / 1e6:.0f}M, student {sm / 1e6:.0f}M MACs per image)")


def bench_quickstart(trials: int, epochs: int) -> None:
    """Mean trial time of the quickstart search with the teacher-output cache off and on, each a
    real ``python -m kdtune.search`` in a subprocess (Ray is never imported here)."""
    import csv
    import subprocess

    space = Path(__file__).resolve().parent.parent / "search_spaces" / "quickstart.yaml"
    with tempfile.TemporaryDirectory(prefix="kdtune-bench-search-") as tmp:
        means = {}
        for setting in ("off", "on"):
            name = f"bench-cache-{setting}"
            cmd = [sys.executable, "-m", "kdtune.search", str(space), "--storage-path", f"{tmp}/rr",
                   "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--set", f"name={name}",
                   "--set", f"fixed.cache_dir={tmp}/cache", "--set", f"fixed.teacher_cache={setting}",
                   "--set", f"search.num_samples={trials}", "--set", f"fixed.epochs={epochs}",
                   "--set", "scheduler.type=none"]
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
            with open(Path(tmp) / "rr" / name / "results.csv") as f:
                walls = [float(row["wall_s"]) for row in csv.DictReader(f)]
            means[setting] = sum(walls) / len(walls)
    print(f"quickstart {trials} trials x {epochs} epochs (digits, resnet20->resnet8, KD): mean trial "
          f"{means['off']:.1f}s live, {means['on']:.1f}s with the cache ({means['off'] / means['on']:.2f}x)")


def _mapping_memory(path: str) -> tuple[int, int]:
    """(Rss, Pss) in bytes of this process's mappings of ``path`` (/proc/self/smaps): Pss divides
    each resident page by the number of processes that map it."""
    rss = pss = 0
    mine = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's header
                mine = line.rstrip("\n").endswith(path)
            elif mine and head and head[0] in ("Rss:", "Pss:"):
                value = int(head[1]) * 1024
                rss, pss = (rss + value, pss) if head[0] == "Rss:" else (rss, pss + value)
    return rss, pss


def _share_worker(rank: int, args: tuple, barrier, queue) -> None:  # a spawned trial process
    cache_dir, images = args
    data = cifar_shaped(images)
    torch.manual_seed(0)
    teacher = build_model("resnet8", num_classes=100)
    loader = TrainLoader(data, batch_size=64, device=torch.device("cpu"), seed=0)
    cache = open_cache(teacher, loader, cache_dir=cache_dir, amp=False, log=lambda msg: None)
    n = cache.table.shape[0]
    for start in range(0, n, 4096):  # every row once, as an epoch's lookups over all views would
        cache.lookup(torch.arange(start, min(start + 4096, n)) // loader.num_views,
                     torch.arange(start, min(start + 4096, n)) % loader.num_views)
    barrier.wait()  # every process has the whole table mapped and read
    queue.put((rank, cache.size_bytes, *_mapping_memory(str(cache.path))))
    barrier.wait()  # hold the mapping until every process has measured


def bench_cache_sharing(processes: int, images: int) -> None:
    """``processes`` trial processes open one teacher-output cache (built first, resnet8 on
    ``images`` CIFAR-shaped images x 162 views) and read every row: each one's resident (Rss) and
    proportional (Pss) memory of the mapping. Linux only (/proc/self/smaps)."""
    import multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="kdtune-bench-share-") as tmp:
        ctx = mp.get_context("spawn")
        # the first open builds the file; the measured processes only map it
        build_barrier, build_queue = ctx.Barrier(1), ctx.Queue()
        builder = ctx.Process(target=_share_worker, args=(0, (tmp, images), build_barrier, build_queue))
        builder.start()
        build_queue.get()
        builder.join()
        barrier, queue = ctx.Barrier(processes), ctx.Queue()
        procs = [ctx.Process(target=_share_worker, args=(r, (tmp, images), barrier, queue)) for r in range(processes)]
        for proc in procs:
            proc.start()
        done = sorted(queue.get() for _ in procs)
        for proc in procs:
            proc.join()
    size = done[0][1]
    each = ", ".join(f"{rss / 1e6:.1f}/{pss / 1e6:.1f}" for _, _, rss, pss in done)
    print(f"cache     {processes} trial processes reading one {size / 1e6:.0f} MB cache ({images} images x 162 views "
          f"x 100 classes, fp32): mapping Rss/Pss per process {each} MB; together {sum(d[3] for d in done) / 1e6:.1f} "
          f"MB of memory for the table (Pss sums to one copy)", flush=True)


def bench_steps_side_by_side(pairs: list[tuple[str, str]], device: torch.device, batch_size: int, steps: int,
                             compile: bool, methods: list[str]) -> None:
    """KD step img/s with the teacher live, with the teacher-output cache, and with cache + compile."""
    head = "live        cache  (x live)" + ("   cache+compile  (x live)" if compile else "")
    print(f"{'step':<14}{'pair':<24}{head}")
    for teacher, student in pairs:
        live = bench_step("kd", teacher, student, device, batch_size, steps)
        cached = bench_step("kd", teacher, student, device, batch_size, steps, cache=True)
        line = f"{'kd step':<14}{teacher + '->' + student:<24}{live:8,.0f}  {cached:9,.0f}  ({cached / live:4.2f}x)"
        if compile:
            both = bench_step("kd", teacher, student, device, batch_size, steps, cache=True, compile=True)
            line += f"   {both:13,.0f}  ({both / live:4.2f}x)"
        print(line + "  img/s", flush=True)
        for m in methods:
            if m != "kd":
                ips = bench_step(m, teacher, student, device, batch_size, steps)
                print(f"{m + ' step':<14}{teacher + '->' + student:<24}{ips:8,.0f} img/s live "
                      f"({live / ips:.2f}x KD's step time)", flush=True)


def _gpu_worker(rank: int, args: tuple, barrier, queue) -> None:  # a spawned trial process
    teacher, student, batch_size, steps, compile = args
    device = torch.device("cuda")
    engine = step_engine("kd", teacher, student, device, batch_size, steps, cache=True, compile=compile, epochs=4)
    engine.train_epoch()  # warm-up and compilation, before the common start
    barrier.wait()
    start = time.perf_counter()
    for _ in range(3):
        engine.train_epoch()
    torch.cuda.synchronize()
    queue.put((rank, start, time.perf_counter(), 3 * batch_size * steps))


def bench_gpu(pairs: list[tuple[str, str]], batch_size: int, steps: int, compile: bool, processes: int,
              cache_images: int) -> None:
    """Per pair: single-trial img/s (cache + compile), aggregate img/s of ``processes`` trial
    processes on one GPU, the cache's build time for ``cache_images`` images x 162 views, peak memory.
    Needs torch only (no ray, optuna or mlflow)."""
    import multiprocessing as mp

    device = torch.device("cuda")
    print(f"{'pair':<24}{'1 trial img/s':>14}{f'{processes} trials img/s':>18}{'peak GB/trial':>14}"
          f"{'cache build':>22}")
    for teacher, student in pairs:
        torch.cuda.reset_peak_memory_stats()
        single = bench_step("kd", teacher, student, device, batch_size, steps, cache=True, compile=compile)
        peak = torch.cuda.max_memory_allocated() / 1e9
        ctx = mp.get_context("spawn")
        barrier, queue = ctx.Barrier(processes), ctx.Queue()
        procs = [ctx.Process(target=_gpu_worker, args=(r, (teacher, student, batch_size, steps, compile), barrier, queue))
                 for r in range(processes)]
        for proc in procs:
            proc.start()
        done = [queue.get() for _ in procs]
        for proc in procs:
            proc.join()
        aggregate = sum(d[3] for d in done) / (max(d[2] for d in done) - min(d[1] for d in done))
        build_s, size, rate = bench_cache_build(teacher, device, cache_images)
        print(f"{teacher + '->' + student:<24}{single:14,.0f}{aggregate:18,.0f}{peak:14.2f}"
              f"{f'{build_s:.0f}s {size / 1e9:.2f}GB ({cache_images} img)':>22}", flush=True)


def run(args, pairs: list[tuple[str, str]], kdas: tuple[str, str] | None, methods: list[str]) -> int:
    """Every benchmark ``args`` asks for, in order, printed as it is measured."""
    device = torch.device("cuda") if args.gpu else resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}")
    steps = args.steps or (200 if device.type == "cuda" else 10)
    cache_images = args.cache_images or (45000 if device.type == "cuda" else 64)
    if args.gpu:
        bench_gpu(pairs, args.batch_size, steps, args.compile, args.processes, cache_images)
        return 0
    if not args.skip_pipeline:
        data = cifar_shaped(args.pipeline_images)
        ours = bench_device_pipeline(data, device, args.batch_size)
        base = bench_torchvision_pipeline(data, device, args.batch_size, args.workers)
        print(f"pipeline  kdtune on-device crop+flip : {ours:12,.0f} img/s")
        print(f"pipeline  torchvision PIL, {args.workers} workers : {base:12,.0f} img/s")
        print(f"pipeline  speed-up                   : {ours / base:12.1f}x")
    if not args.skip_step:
        bench_steps_side_by_side(pairs, device, args.batch_size, steps, args.compile, methods)
        for teacher, _ in pairs:
            build_s, size, rate = bench_cache_build(teacher, device, cache_images)
            full = 45000 * 162
            print(f"cache     {teacher}: built {cache_images} images x 162 views in {build_s:.1f}s ({rate:,.0f} "
                  f"teacher img/s), {size / 1e6:.1f} MB; CIFAR-100 (45,000 x 162 x 100): "
                  f"{full * 400 / 1e9:.2f} GB fp32 / {full * 200 / 1e9:.2f} GB fp16, about {full / rate / 60:.0f} min "
                  f"at this rate (extrapolated)", flush=True)
    if kdas:
        teacher, student = kdas
        bench_kdas(teacher, student, device, args.batch_size, args.kdas_images, args.kdas_epochs)
    if args.share:
        bench_cache_sharing(args.share, args.share_images)
    if args.quickstart:
        bench_quickstart(args.quickstart_trials, args.quickstart_epochs)
    return 0

