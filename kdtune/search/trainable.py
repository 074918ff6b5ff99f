"""Ray Tune adapter: one trial is one Engine, one ``step()`` is one epoch.

Data and teachers are cached per worker process, so with ``reuse_actors`` a worker loads
them once and every later trial it runs starts in well under a second. The engine itself
knows nothing of Ray; MLflow logging happens on the driver (kdtune.search.tracking).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
from ray import tune

from kdtune.config import RunConfig
from kdtune.devices import hide_gpus_from_cpu_trial, limit_trial_memory, read_engine_state
from kdtune.logs import default_handler
from kdtune.run import build_engine, load_data, load_teacher, teacher_seed
from kdtune.search.records import PENALTY
from kdtune.search.spec import SearchSpec

logger = logging.getLogger(__name__)

# Per-process caches: (dataset settings) -> ImageData, (teacher settings) -> frozen teacher.
_DATA: dict[tuple, Any] = {}
_TEACHERS: dict[tuple, Any] = {}


def penalty_value(mode: str) -> float:
    """Reported in place of a metric that is not finite, so that searchers can still learn from
    the trial (Optuna refuses NaN and would leave the trial RUNNING forever)."""
    return -PENALTY if mode == "max" else PENALTY


def _data(cfg: RunConfig):
    key = (cfg.dataset, cfg.data_root, cfg.val_size, cfg.split_seed, repr(sorted(cfg.dataset_options.items())))
    if key not in _DATA:
        _DATA[key] = load_data(cfg)
    return _DATA[key]


def _teacher(cfg: RunConfig, data):
    key = (cfg.teacher, cfg.teacher_checkpoint, teacher_seed(cfg), cfg.teacher_epochs, cfg.cache_dir, id(data),
           cfg.device)
    # A trial of a method without a teacher (none) gets None for the same key: never kept, or
    # the next trial of this worker that needs the teacher would get None too.
    if _TEACHERS.get(key) is None:
        _TEACHERS[key] = load_teacher(cfg, data)[0]
    return _TEACHERS[key]


def epoch_result(engine: Any) -> dict[str, Any]:
    """Train one epoch of ``engine``: its metrics as a trial reports them (one process's trial
    here, a data-parallel trial's in kdtune.search.ddp)."""
    metrics = engine.train_epoch()
    diverged = not math.isfinite(metrics["train/loss"])
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            metrics[key] = penalty_value("min" if "loss" in key else "max")
    metrics["diverged"] = float(diverged)
    # The last epoch ends the trial (without a scheduler nothing else would); a NaN loss
    # never recovers, so it ends the trial at once.
    metrics["done"] = diverged or engine.epoch >= engine.recipe.epochs
    return metrics


class KDTrainable(tune.Trainable):
    """A kdtune trial. ``config`` holds only the sampled hyperparameters; the fixed part of
    the run configuration comes from the search spec (``tune.with_parameters``)."""

    def setup(self, config: dict[str, Any], spec: SearchSpec) -> None:
        self.spec = spec
        default_handler()  # the trial's lines (teacher, cache) in its output; a Ray worker configures no logging
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch
        if not os.environ.get("KDTUNE_VERBOSE"):
            # "Trainable.setup took 15 s ... consider reuse_actors=True": it is on; the time is the
            # first import of torch in a fresh worker.
            logging.getLogger("ray.tune.trainable.trainable").setLevel(logging.ERROR)
        gpus = self.trial_resources.required_resources.get("GPU", 0) if self.trial_resources else 0
        hide_gpus_from_cpu_trial(gpus)  # before anything touches CUDA
        cpus = int(max(1, self.trial_resources.required_resources.get("CPU", 1))) if self.trial_resources else 1
        torch.set_num_threads(cpus)
        # Ray packs fractional trials onto one GPU but enforces no memory limit: cap our share
        # (less this process's own CUDA context, which the cap does not count).
        limit_trial_memory(gpus)
        self._build(config)

    def _build(self, config: dict[str, Any]) -> None:
        self._last_checkpoint = time.monotonic()
        cfg = self.spec.run_config(config)
        data = _data(cfg)
        teacher = _teacher(cfg, data) if cfg.teacher is not None else None
        self.engine = build_engine(cfg, data, teacher, log=logger.info)

    def step(self) -> dict[str, Any]:
        return self.checkpoint_when_due(epoch_result(self.engine))

    def checkpoint_when_due(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Ask Tune for a checkpoint after this epoch when ``checkpoint_every_s`` have passed since
        the last one (every epoch at 0); none after the last epoch, which ends the trial."""
        due = time.monotonic() - self._last_checkpoint >= self.spec.checkpoint_every_s
        if due and not metrics["done"]:
            metrics["should_checkpoint"] = True
        return metrics

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        torch.save(self.engine.state_dict(), os.path.join(checkpoint_dir, "engine.pth"))
        self._last_checkpoint = time.monotonic()

    def load_checkpoint(self, checkpoint: str) -> None:
        # The trial's own hyperparameters (its config) over the checkpoint's: the same values when a
        # trial resumes or retries; under PBT the checkpoint is another trial's, and the config
        # that trial's hyperparameters mutated (kdtune.search.pbt), which must take effect.
        self.engine.load_state_dict(read_engine_state(os.path.join(checkpoint, "engine.pth")),
                                    keep_hyperparameters=True)
        self._last_checkpoint = time.monotonic()

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._build(new_config)
        return True
