"""Build one distillation run (data, teacher, student, method, engine) from a RunConfig.

Shared by ``kdtune train`` and the search trainable, which pass in the data and
teacher they already hold so that they are loaded once, not once per trial.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from kdtune.config import RunConfig
from kdtune.data import DataError, ImageData, TrainLoader, load_dataset
from kdtune.devices import in_fresh_process
from kdtune.distillers import METHODS, build_distiller
from kdtune.distributed import Workers
from kdtune.engine import Engine, resolve_device
from kdtune.fkd_cache import CropCache, open_crop_cache
from kdtune.imagenet import FolderData
from kdtune.models import build_model
from kdtune.sampling import SAMPLERS
from kdtune.teacher_cache import TeacherCache, open_cache, use_cache
from kdtune.teachers import TeacherInfo, resolve_teacher

logger = logging.getLogger(__name__)


def load_data(cfg: RunConfig) -> ImageData | FolderData:
    data = load_dataset(cfg.dataset, root=cfg.data_root, val_size=cfg.val_size,
                        split_seed=cfg.split_seed, download=cfg.download, options=cfg.dataset_options)
    # The one crop-cache setting that needs the data: checked here, before a teacher is loaded.
    if cfg.teacher_cache == "crops" and cfg.teacher_cache_topk >= data.num_classes:
        raise DataError(f"teacher_cache_topk: must be below the {data.num_classes} classes of dataset {cfg.dataset!r} "
                        f"(the rest's mass needs a class outside the top k), but got {cfg.teacher_cache_topk}")
    return data


def teacher_seed(cfg: RunConfig) -> int:
    """The seed of the teacher kdtune trains for ``cfg`` (``teacher_seed``, else the run's seed)."""
    return cfg.seed if cfg.teacher_seed is None else cfg.teacher_seed


def load_teacher(cfg: RunConfig, data: ImageData, log: Callable[[str], None] = logger.info, *, train: bool = True
                 ) -> tuple[nn.Module | None, TeacherInfo | None]:
    """The run's teacher, or ``(None, None)`` for methods that train without one. With
    ``train=False`` a teacher that is neither given nor cached is not trained:
    :class:`kdtune.teachers.TeacherNotCached` says where it was looked for."""
    if not METHODS.get(cfg.method).needs_teacher or cfg.teacher is None:
        return None, None
    # The teacher is trained on the train split even for a final run, so that one cached
    # teacher serves the search and the final re-run alike.
    return resolve_teacher(cfg.teacher, data, checkpoint=cfg.teacher_checkpoint, cache_dir=cfg.cache_dir,
                           seed=teacher_seed(cfg), epochs=cfg.teacher_epochs, device=resolve_device(cfg.device),
                           log=log, train=train)


def use_compile(cfg: RunConfig, device: torch.device, workers: Workers | None = None) -> bool:
    """``compile: auto`` is on for CUDA only: on the CPU the bench measured no gain (docs/performance.md).
    Nor for a data-parallel run: DDP under torch.compile is not measured yet (docs/search-spaces.md)."""
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda" and workers is None)


def planned_epochs(cfg: RunConfig, planned: float | None = None) -> float | None:
    """What a cache build is weighed against (:func:`kdtune.teacher_cache.build_pays`): None
    under ``teacher_cache: on`` (always build), else ``planned`` (a search's trial-epochs in all)
    or the run's own epochs."""
    return None if cfg.teacher_cache == "on" else (cfg.epochs if planned is None else planned)


def prepare_cache(cfg: RunConfig, data: ImageData, teacher: nn.Module | None, device: torch.device | None = None,
                  log: Callable[[str], None] = logger.info, planned: float | None = None) -> TeacherCache | None:
    """Open (building it if needed and, under ``auto``, if the ``planned`` trial-epochs pay for
    it) the teacher-output cache a run of ``cfg`` reads, or None when the run does not use one.
    The loader is set up as the Engine sets up its own (same train split, views, device,
    precision), so the key is the one the run's engine computes."""
    use, _ = use_cache(cfg.teacher_cache, cfg.method, cfg.sampler, cfg.dataset)
    if not use or teacher is None:
        return None
    device = device or resolve_device(cfg.device)
    cuda = device.type == "cuda"
    amp = cuda if cfg.amp is None else cfg.amp
    if cfg.teacher_cache == "crops":
        return open_crops(cfg, data.for_final() if cfg.final else data, teacher.to(device), device, amp, log)
    loader = TrainLoader(data.for_final() if cfg.final else data, batch_size=cfg.batch_size, device=device,
                         seed=0, channels_last=cuda)
    teacher = teacher.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    return open_cache(teacher, loader, cache_dir=cfg.cache_dir, amp=amp,
                      memory_format=torch.channels_last if cuda else torch.contiguous_format,
                      dtype=cfg.teacher_cache_dtype, log=log, planned_epochs=planned_epochs(cfg, planned))


def open_crops(cfg: RunConfig, data: FolderData, teacher: nn.Module, device: torch.device, amp: bool,
               log: Callable[[str], None]) -> CropCache:
    """The FKD-style crop cache of ``cfg`` (built first where shards are missing), for the split the
    run trains on and at the precision its engine runs at."""
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return open_crop_cache(teacher.to(memory_format=memory_format), data, crops=cfg.teacher_cache_crops,
                           k=cfg.teacher_cache_topk, cache_dir=cfg.cache_dir, device=device, amp=amp,
                           memory_format=memory_format, dtype=cfg.teacher_cache_dtype, log=log)


def build_engine(cfg: RunConfig, data: ImageData, teacher: nn.Module | None,
                 log: Callable[[str], None] | None = None) -> Engine:
    """A fresh, seeded engine: the same config and seed give the same run. With a teacher-output
    cache (``teacher_cache``), the engine reads the teacher's logits from it; ``log`` gets the
    line that says whether the teacher runs live or from the cache (default: not printed).
    In a process of a data-parallel run (``torch.distributed`` initialised, several ranks), the
    engine is that rank's (:mod:`kdtune.distributed`)."""
    device = resolve_device(cfg.device)
    workers = Workers.current()
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, num_classes=data.num_classes, in_channels=data.in_channels)
    # Training crops keep the stored size (CIFAR 32x32, digits 8x8), so the stored image shape
    # is the shape the distiller sees; feature distillers size their connectors from it.
    distiller = build_distiller(cfg.method, student, teacher, input_shape=data.image_shape,
                                **cfg.method_params).to(device)
    sampler = SAMPLERS.build(cfg.sampler, **cfg.sampler_params) if cfg.sampler != "none" else None
    engine = Engine(distiller, data, cfg.recipe(), device=device, seed=cfg.seed, final=cfg.final,
                    amp=cfg.amp, sampler=sampler, compile=use_compile(cfg, device, workers), workers=workers)
    use, reason = use_cache(cfg.teacher_cache, cfg.method, cfg.sampler, cfg.dataset)
    quiet = log or (lambda msg: None)
    if use and teacher is not None:
        def opener() -> TeacherCache | CropCache | None:  # at the first epoch: building an engine stays cheap
            if cfg.teacher_cache == "crops":  # the loader samples among the stored crops from now on
                crops = open_crops(cfg, engine.data, teacher, engine.device, engine.amp, quiet)
                engine.loader.use_stored_crops(crops)
                quiet(f"[kdtune] teacher cache: {crops.describe()}")
                return crops
            # A trial weighs a build against its own epochs: when the search's driver found a
            # build not worth it, no trial (planning fewer epochs than the search) builds one.
            cache = open_cache(teacher, engine.loader, cache_dir=cfg.cache_dir, amp=engine.amp,
                               memory_format=engine.memory_format, dtype=cfg.teacher_cache_dtype, log=quiet,
                               planned_epochs=planned_epochs(cfg))
            if cache is not None:
                quiet(f"[kdtune] teacher cache: {cache.describe()}")
            return cache

        engine.teacher_cache_opener = opener
    quiet(f"[kdtune] {reason}")
    return engine


def teacher_records(cfg: RunConfig, cache_cfg: RunConfig | None = None, cache_device: str | None = None,
                    planned: float | None = None) -> dict[str, Any]:
    """What the search driver records of the teacher: its ``TeacherInfo`` fields and, with
    ``cache_cfg``, those of the teacher-output cache built (or found) for the runs of ``cache_cfg``
    on ``cache_device``: built once here, so that no trial builds it, and under ``auto`` only
    when the search's ``planned`` trial-epochs pay for the build."""
    data = load_data(cfg)
    teacher, info = load_teacher(cfg, data)
    record = dict(info.__dict__)
    if cache_cfg is not None:
        cache = prepare_cache(cache_cfg, data, teacher, resolve_device(cache_device or cache_cfg.device),
                              planned=planned)
        if cache is not None:
            record.update(cache_path=str(cache.path), cache_description=cache.describe(), **cache.records())
    return record


def resolve_teacher_records(cfg: RunConfig, cache_cfg: RunConfig | None = None, cache_device: str | None = None,
                            planned: float | None = None) -> dict[str, Any]:
    """:func:`teacher_records`, in a child process when the teacher or its cache would use a GPU,
    so that the driver holds no CUDA context or cached blocks during the search."""
    devices = [cfg.device] + ([cache_device or cache_cfg.device] if cache_cfg is not None else [])
    if any(resolve_device(d).type == "cuda" for d in devices):
        return in_fresh_process(teacher_records, cfg, cache_cfg, cache_device, planned)
    return teacher_records(cfg, cache_cfg, cache_device, planned)
