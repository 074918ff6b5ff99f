"""Build one distillation run (data, teacher, student, method, engine) from a RunConfig.

Shared by ``python -m kdtune.train`` and the search trainable, which pass in the data and
teacher they already hold so that they are loaded once, not once per trial.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kdtune.config import RunConfig
from kdtune.data import ImageData, load_dataset
from kdtune.distillers import METHODS, build_distiller
from kdtune.engine import Engine, resolve_device
from kdtune.models import build_model
from kdtune.sampling import SAMPLERS
from kdtune.teachers import TeacherInfo, resolve_teacher


def load_data(cfg: RunConfig) -> ImageData:
    return load_dataset(cfg.dataset, root=cfg.data_root, val_size=cfg.val_size,
                        split_seed=cfg.split_seed, download=cfg.download, options=cfg.dataset_options)


def load_teacher(cfg: RunConfig, data: ImageData, log: Callable[[str], None] = print
                 ) -> tuple[nn.Module | None, TeacherInfo | None]:
    """The run's teacher, or ``(None, None)`` for methods that train without one."""
    if not METHODS.get(cfg.method).needs_teacher or cfg.teacher is None:
        return None, None
    # The teacher is trained on the train split even for a final run, so that one cached
    # teacher serves the search and the final re-run alike.
    return resolve_teacher(cfg.teacher, data, checkpoint=cfg.teacher_checkpoint, cache_dir=cfg.cache_dir,
                           seed=cfg.seed, epochs=cfg.teacher_epochs, device=resolve_device(cfg.device),
                           log=log)


def build_engine(cfg: RunConfig, data: ImageData, teacher: nn.Module | None) -> Engine:
    """A fresh, seeded engine: the same config and seed give the same run."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, num_classes=data.num_classes, in_channels=data.in_channels)
    # Training crops keep the stored size (CIFAR 32x32, digits 8x8), so the stored image shape
    # is the shape the distiller sees; feature distillers size their connectors from it.
    distiller = build_distiller(cfg.method, student, teacher, input_shape=data.image_shape,
                                **cfg.method_params).to(device)
    sampler = SAMPLERS.build(cfg.sampler, **cfg.sampler_params) if cfg.sampler != "none" else None
    return Engine(distiller, data, cfg.recipe(), device=device, seed=cfg.seed, final=cfg.final,
                  amp=cfg.amp, sampler=sampler)
