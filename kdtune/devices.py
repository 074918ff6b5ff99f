"""Device details that only matter on a GPU, kept in one place so the CPU tests can reach them.

Nothing here changes what a run computes on the CPU; each helper says which CUDA defect it
prevents (see docs/cuda.md). The module imports torch only, so the GPU checks in
``tests/test_gpu.py`` run on a machine without Ray, Optuna or MLflow.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

# What one process's CUDA context, cuBLAS/cuDNN handles and workspaces take outside the caching
# allocator (so outside set_per_process_memory_fraction's cap): a few hundred MB on current
# drivers with lazy module loading; 1 GiB leaves room for cuDNN's autotuning workspaces.
CONTEXT_BYTES = 1 << 30


def read_engine_state(path: str | Path) -> dict[str, Any]:
    """An engine checkpoint, loaded to the CPU.

    Mapping it to the engine's device would move the saved RNG states onto the GPU, and
    ``torch.set_rng_state``, ``torch.cuda.set_rng_state`` and ``Generator.set_state`` take CPU
    ByteTensors only; every other tensor is copied to its device by the ``load_state_dict`` that
    receives it (parameters, optimizer state) or by the loader (KDAS's cache indices).
    """
    return torch.load(path, map_location="cpu", weights_only=True)


def cpu_rng_state(state: Tensor) -> Tensor:
    """``state`` as the CPU ByteTensor every ``set_rng_state`` wants, wherever it was mapped to."""
    return state if state.device.type == "cpu" and state.dtype == torch.uint8 else state.to("cpu", torch.uint8)


def hide_gpus_from_cpu_trial(gpus: float) -> None:
    """A trial given no GPU sees none: Ray leaves ``CUDA_VISIBLE_DEVICES`` unset for zero-GPU
    workers unless ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO`` is set in *the worker's* environment,
    which a driver can set only for a Ray instance it starts itself, not on an ``--address``
    cluster. Must run before the process first touches CUDA (``torch.cuda.is_available()``
    included), which is why trials call it first thing in ``setup``."""
    if gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def trial_memory_fraction(gpus: float, total_bytes: int, context_bytes: int = CONTEXT_BYTES) -> float:
    """The caching-allocator cap of a trial given a ``gpus`` share of one card.

    ``set_per_process_memory_fraction`` caps only the allocator; the process's own CUDA context
    comes on top. So four trials at 0.25 each capped at 0.25 would overcommit the card by four
    contexts: take the context out of the share (but never below half of it).
    """
    return max(gpus / 2, gpus - context_bytes / total_bytes)


def limit_trial_memory(gpus: float) -> float | None:
    """Apply :func:`trial_memory_fraction` to the current CUDA device for a fractional trial."""
    if not 0 < gpus < 1 or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fraction = trial_memory_fraction(gpus, total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a spawned child process; its result (or exception) comes back.

    The search driver resolves the teacher this way when it is on a GPU: the child's CUDA
    context and cached blocks (0.5 GB and more) go away when it exits, instead of staying on
    the card for the whole search next to the trials. ``fn`` and ``args`` must pickle.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


@contextmanager
def cudnn_autotune(allowed: bool) -> Iterator[None]:
    """Turn ``cudnn.benchmark`` off inside the block unless ``allowed``.

    cuDNN autotunes every convolution again for each new input shape. A sample policy whose
    batch sizes vary (KDAS: an enlarged scoring size that follows the rate schedule, short last
    batches) would pay that for ~80 sizes in a run; with this around the odd sizes, only the
    regular batch size is autotuned and the rest use cuDNN's heuristics. What is trained, and
    how it is weighted, stays exactly the same.
    """
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = saved and allowed
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
