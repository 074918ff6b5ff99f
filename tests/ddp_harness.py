"""Two (or more) gloo processes on this machine running one kdtune engine data-parallel, for the
tests that compare it with a one-process run. Ray Train starts such processes in a search
(kdtune.search.ddp); this starts them with torch.multiprocessing, so that the engine-level tests
need no Ray instance.

Each rank builds the engine from the same RunConfig (``build_engine`` finds the process group),
trains, and writes what it ended with to ``out/<job>-rank<r>.pth``: the per-epoch metrics, the
engine's states (rank 0's is what a checkpoint holds) and its parameters.

``KDTUNE_DDP_DEVICE=cuda`` runs the ranks on GPUs (one each, NCCL) instead: the multi-GPU check
of docs/cuda.md.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

DEVICE = os.environ.get("KDTUNE_DDP_DEVICE", "cpu")  # cpu (gloo) or cuda (NCCL, a GPU per rank)


def teacher_model():
    """The tests' teacher: a fixed random resnet8 (the same in every process)."""
    from kdtune.models import build_model

    torch.manual_seed(123)
    return build_model("resnet8", num_classes=10, in_channels=1)


def train(cfg: dict, out: Path, name: str, epochs: int | None = None, resume: Path | None = None) -> dict[str, Any]:
    """Train ``cfg`` in this process (one rank, or the whole run when no group is set up):
    ``epochs`` of them (default all), after loading the engine state ``resume``; the result
    goes to ``out/<name>-rank<r>.pth`` too."""
    from kdtune.config import RunConfig
    from kdtune.data import load_dataset
    from kdtune.run import build_engine

    run = RunConfig.from_dict({**cfg, "device": DEVICE})
    data = load_dataset("digits", val_size=run.val_size)
    engine = build_engine(run, data, teacher_model() if run.teacher else None)
    if resume is not None:
        engine.load_state_dict(torch.load(resume, weights_only=True), keep_hyperparameters=True)
    metrics, states = [], []
    for m in engine.run():
        metrics.append(m)
        states.append(copy.deepcopy(engine.state_dict()))  # what a checkpoint after this epoch holds
        if epochs is not None and len(metrics) == epochs:
            break
    result = {"metrics": metrics, "state": engine.state_dict(), "states": states,
              "params": {k: v.detach().clone() for k, v in engine.distiller.named_parameters()}}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"{name}-rank{rank}.pth")
    return result


def _rank(rank: int, world: int, store: str, jobs: list[dict], out: Path) -> None:
    torch.set_num_threads(1)  # two processes on a 2-core machine
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)  # the engine's "cuda" is this rank's GPU
    torch.distributed.init_process_group("nccl" if DEVICE == "cuda" else "gloo", init_method=f"file://{store}",
                                         rank=rank, world_size=world)
    try:
        for job in jobs:  # one process group for them all: the processes start once
            resume = job.get("resume")
            if resume is not None:  # what a checkpoint holds: rank 0's state, loaded by every rank
                torch.distributed.barrier()
                earlier, epoch = resume
                state = torch.load(out / f"{earlier}-rank0.pth", weights_only=False)["states"][epoch - 1]
                resume = out / f"{job['name']}-resume-rank{rank}.state"
                torch.save(state, resume)
            train(job["cfg"], out, job["name"], job.get("epochs"), resume)
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(world: int, jobs: list[dict], out: Path) -> dict[str, list[dict[str, Any]]]:
    """``world`` gloo processes running ``jobs`` in order, each ``{"name", "cfg", "epochs"
    (optional), "resume" (optional: ``(an earlier job's name, epoch)``, whose rank-0 state after that epoch
    every rank loads)}``;
    each job's per-rank results (see :func:`train`)."""
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    if store.exists():
        os.unlink(store)
    mp.start_processes(_rank, args=(world, str(store), jobs, out), nprocs=world, start_method="spawn")
    return {job["name"]: [torch.load(out / f"{job['name']}-rank{r}.pth", weights_only=False) for r in range(world)]
            for job in jobs}
