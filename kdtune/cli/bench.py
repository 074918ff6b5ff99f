"""``kdtune bench``: images per second of the training pipeline and of a KD step (the measurements
are :mod:`kdtune.benchmarks`).

(a) The device-resident pipeline (crop + flip + normalise, batched on the device) against
torchvision's usual DataLoader with PIL RandomCrop + RandomHorizontalFlip (2 workers), both
on CIFAR-shaped data, side by side in one run.
(b) A full training step (teacher forward, student forward/backward, SGD, augmentation),
steady state, through the same Engine the searches use: KD with the teacher live, with the
teacher-output cache, and with cache + torch.compile, side by side per pair; other methods
(``--methods``) as a multiple of KD's step time on the same pair.
(c) The teacher-output cache's build time and size (a real build, extrapolated to CIFAR-100).
(d) KDAS against KD over a shortened schedule, actually run, live and with the cache.
(e) ``--share N``: N trial processes reading one cache, each one's resident and proportional memory.
(f) ``--quickstart``: the quickstart search's mean trial time, cache off and on (subprocesses).
``--winners-curse``: how much a search's single-run best overstates itself (kdtune.search.bench_winners).
``--overhead``: what the search machinery costs a trial beyond its training (kdtune.search.bench_overhead).
``--loader``: the streaming ``imagenet`` loader's images/s (:mod:`kdtune.bench_loader`).
``--gpu``: per pair single-trial and packed (``--processes``) img/s, cache build, peak memory.
``--search``: search strategies' trial-seconds to a target (:mod:`kdtune.search.bench_search`);
with ``--replay TABLE``, whole searches against a recorded learning-curve table in simulated time
(:mod:`kdtune.search.replay`). ``--record-curves OUT``: record that table (:mod:`kdtune.search.curves`).
"""
from __future__ import annotations

import argparse
import sys

HELP = "speed of the data pipeline and the training step (--search, --overhead: of the search itself)"
PAIRS = "resnet32x4:resnet8x4,vgg13:vgg8,resnet56:resnet20,wrn_40_2:wrn_16_2"
DESCRIPTION = """kdtune bench: images per second of the training pipeline and of a KD step
(teacher live, with the teacher-output cache, and with cache + compile), other
methods' step time against KD's, the cache's build time and size, and KDAS
against KD over a shortened schedule. Speed figures only; --search compares
search strategies instead."""
EXAMPLES = """examples:
  kdtune bench --steps 10
  kdtune bench --skip-pipeline --methods kd,ctkd,sakd --pairs resnet32x4:resnet8x4,resnet56:resnet20 --steps 5
  kdtune bench --gpu
  kdtune bench --search --help"""


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
    from kdtune.checks import model_pair

    if problem := model_pair(text, flag):
        raise ValueError(problem)
    teacher, _, student = text.partition(":")
    return teacher, student


# The search layer's benchmarks, each with its own flags: the flag that names it, its module (with
# main(argv)). First match wins: --winners-curse has a --replay of its own, --search --replay is
# the replay benchmark.
MODES = (("--loader", "kdtune.bench_loader"),
         ("--record-curves", "kdtune.search.curves"), ("--overhead", "kdtune.search.bench_overhead"),
         ("--winners-curse", "kdtune.search.bench_winners"), ("--replay", "kdtune.search.replay"),
         ("--search", "kdtune.search.bench_search"))


def mode(argv: list[str]):
    """The ``main(argv)`` of the search-layer benchmark ``argv`` names, or None for the pipeline
    and step benchmarks of ``kdtune bench`` itself."""
    import importlib

    given = {a.split("=")[0] for a in argv}
    for flag, module in MODES:
        if flag in given and (flag != "--replay" or "--search" in given):
            return importlib.import_module(module).main
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The benchmarks of the search layer: listed here for --help; kdtune.cli.main hands their arguments
    # to their own parsers (mode()) before this one parses.
    p.add_argument("--overhead", action="store_true",
                   help="the search machinery's cost per trial beyond training (no-op trials through the real "
                        "search path); kdtune bench --overhead --help lists its flags")
    p.add_argument("--loader", action="store_true",
                   help="the streaming imagenet loader's images/s (and a step's on a GPU); "
                        "kdtune bench --loader --help lists its flags")
    p.add_argument("--search", action="store_true",
                   help="compare search strategies (TPE+ASHA, random+ASHA, random) instead; "
                        "kdtune bench --search --help lists its flags")
    p.add_argument("--winners-curse", action="store_true",
                   help="how much a search's single-run best overstates itself, and what confirming the top "
                        "trials with more seeds recovers; kdtune bench --winners-curse --help lists its flags")
    p.add_argument("--record-curves", metavar="OUT",
                   help="record the learning-curve table that kdtune bench --search --replay replays; "
                        "kdtune bench --record-curves x --help lists its flags")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per step (default 64)")
    p.add_argument("--pipeline-images", type=_positive, default=10000,
                   help="CIFAR-shaped images the pipeline comparison reads (default 10000)")
    p.add_argument("--workers", type=_nonnegative, default=2, help="DataLoader workers for the torchvision baseline (default 2)")
    p.add_argument("--pairs", default=PAIRS, metavar="TEACHER:STUDENT,...",
                   help=f"teacher-student pairs of the step timings (default {PAIRS})")
    p.add_argument("--steps", type=_positive, default=None, help="steps per timed epoch (default 10 CPU, 200 CUDA)")
    p.add_argument("--methods", default="kd", help="methods to time per pair, e.g. kd,ctkd,sakd (KD is the reference)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the cache+compile column (compiling takes minutes on a CPU)")
    p.add_argument("--skip-pipeline", action="store_true", help="skip the pipeline comparison")
    p.add_argument("--skip-step", action="store_true", help="skip the step timings and the cache build")
    p.add_argument("--cache-images", type=_positive, default=None,
                   help="images (x 162 views) of the timed cache build (default 64 CPU, 45000 CUDA: CIFAR-100's train split)")
    p.add_argument("--kdas", default="resnet32x4:resnet8x4", metavar="TEACHER:STUDENT",
                   help="time KDAS against KD over a shortened schedule for this pair ('' to skip)")
    p.add_argument("--kdas-images", type=_positive, default=512, help="training images of the KDAS timing (default 512)")
    p.add_argument("--kdas-epochs", type=_positive, default=8, help="epochs of the KDAS timing (default 8)")
    p.add_argument("--share", type=_nonnegative, default=0, metavar="N",
                   help="N trial processes read one teacher-output cache: each one's resident and proportional "
                   "memory of it (Linux)")
    p.add_argument("--share-images", type=_positive, default=1000, help="images (x 162 views) of the --share cache (default 1000)")
    p.add_argument("--quickstart", action="store_true",
                   help="also time the quickstart search's trials with the cache off and on (runs Ray in subprocesses)")
    p.add_argument("--quickstart-trials", type=_positive, default=4, help="trials of each --quickstart search (default 4)")
    p.add_argument("--quickstart-epochs", type=_positive, default=4, help="epochs of each --quickstart trial (default 4)")
    p.add_argument("--gpu", action="store_true", help="the GPU figures: per pair single-trial and packed img/s, "
                   "cache build, peak memory (torch only)")
    p.add_argument("--processes", type=_positive, default=4, help="trial processes sharing the GPU in --gpu mode (default 4)")


def run(args: argparse.Namespace) -> int:
    # kdtune's modules import torch (seconds): only now that the arguments parsed.
    from kdtune.checks import device_problem
    from kdtune.distillers import METHODS

    # Every name is checked before the first benchmark runs (minutes on a CPU).
    try:
        pairs = [_pair(pair, "--pairs") for pair in args.pairs.split(",")] if not args.skip_step or args.gpu else []
        kdas = _pair(args.kdas, "--kdas") if args.kdas else None
        methods = list(dict.fromkeys(["kd", *args.methods.split(",")]))
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"--methods: {METHODS.unknown_message(unknown[0])}")
        problem = device_problem("cuda" if args.gpu else args.device)
        if problem:
            raise ValueError(f"--{'gpu: ' if args.gpu else ''}{problem}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from kdtune.benchmarks import run as measure

    return measure(args, pairs, kdas, methods)

