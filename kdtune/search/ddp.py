"""A data-parallel trial: Ray Train's ``TorchTrainer`` inside a Tune trial (``workers_per_trial > 1``).

This is Ray Train V2's way (the default in Ray 2.60; passing a trainer to ``Tuner`` is the
deprecated V1 way): the Tune trial is a function that starts a ``TorchTrainer`` and waits for it.
Its workers (one per GPU, or CPU processes with gloo) each run the same kdtune engine as a
one-process trial, as one rank (:mod:`kdtune.distributed`): the engine's metrics are already
reduced over the ranks, and ``TuneReportCallback`` hands rank 0's to Tune, whose callbacks log
them to MLflow and whose scheduler stops the trial.

Checkpoints are Ray Train's: rank 0 writes the engine state (one state for all ranks), every
rank loads it. A trial that Tune restarts (a retry, ``--resume``) starts a ``TorchTrainer`` of
the same name in the same folder, and Ray Train goes on from that run's latest checkpoint; its
results carry their epoch as ``training_iteration``, which Tune would otherwise count from 1 again.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import torch
from ray import tune

from kdtune.devices import hide_gpus_from_cpu_trial, read_engine_state
from kdtune.run import build_engine
from kdtune.search.spec import SearchSpec
from kdtune.search.trainable import _data, _teacher, epoch_result

# The trial function itself only waits for its TorchTrainer: its workers reserve the trial's CPUs
# and GPUs through Ray Train, outside Tune's placement group. Tune wants a non-empty bundle, and
# any share of a CPU here would leave the workers short of whole CPUs (a 2-CPU machine could not
# start two 1-CPU workers): one byte of memory is the reservation that takes nothing from them.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}


def data_parallel_trainable(spec: SearchSpec, experiment_path: str):
    """The Tune trainable of a search with ``workers_per_trial > 1``. Ray Train keeps each
    trial's runs and checkpoints under ``<experiment>/train/<trial id>``."""
    return tune.with_resources(tune.with_parameters(data_parallel_trial, spec=spec,
                                                    storage=f"{experiment_path.rstrip('/')}/train"),
                               TRIAL_RESOURCES)


def worker_resources(spec: SearchSpec) -> dict[str, float]:
    """One worker's share: the trial's CPUs split evenly, one GPU each (or none)."""
    workers = spec.workers_per_trial
    return {"CPU": spec.cpus_per_trial / workers, "GPU": 1.0 if spec.gpus_per_trial else 0.0}


def data_parallel_trial(config: dict[str, Any], spec: SearchSpec, storage: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    resources = worker_resources(spec)
    trainer = TorchTrainer(
        train_worker, train_loop_config={"config": config, "spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers_per_trial, use_gpu=resources["GPU"] > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=storage, callbacks=[TuneReportCallback()],
            # a failed worker fails the trial: Tune retries it (max_failures), from the latest checkpoint
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    trainer.fit()


def train_worker(loop_config: dict[str, Any]) -> None:
    """One rank of a data-parallel trial: the one-process trial's loop, with Ray Train's report."""
    import ray.train

    spec: SearchSpec = loop_config["spec"]
    hide_gpus_from_cpu_trial(spec.gpus_per_trial)  # before anything touches CUDA
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, int(spec.cpus_per_trial / spec.workers_per_trial)))
    cfg = spec.run_config(loop_config["config"])
    data = _data(cfg)
    teacher = _teacher(cfg, data) if cfg.teacher is not None else None
    engine = build_engine(cfg, data, teacher, log=lambda msg: print(msg, flush=True))
    if engine.workers is None:
        raise RuntimeError(f"a data-parallel trial's worker found no process group of {spec.workers_per_trial} ranks")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            # the trial's own hyperparameters, as a one-process trial restores (KDTrainable.load_checkpoint)
            engine.load_state_dict(read_engine_state(os.path.join(folder, "engine.pth")), keep_hyperparameters=True)
    last_checkpoint = time.monotonic()
    rank0 = ray.train.get_context().get_world_rank() == 0
    while engine.epoch < engine.recipe.epochs:
        metrics = epoch_result(engine)
        # Tune numbers a trial's results itself, from 1 in each start of the trial function, and keeps
        # a value the result brings: a retried trial, which Ray Train resumed from its checkpoint of
        # epoch k, reports epoch k + 1, not 1 (the schedulers' time, MLflow's step, the results table)
        metrics["training_iteration"] = engine.epoch
        due = time.monotonic() - last_checkpoint >= spec.checkpoint_every_s and not metrics["done"]
        # every rank decides alike: rank 0's clock decides for all (a checkpoint is a collective report)
        due = bool(engine.workers.sum([torch.tensor(float(due and rank0), device=engine.device)])[0].item())
        if due:
            with tempfile.TemporaryDirectory() as folder:
                if rank0:  # one state: every rank holds the same
                    torch.save(engine.state_dict(), os.path.join(folder, "engine.pth"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank0 else None)
            last_checkpoint = time.monotonic()
        else:
            ray.train.report(metrics)
        if metrics["done"]:
            break
