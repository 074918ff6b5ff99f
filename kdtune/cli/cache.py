"""``kdtune cache RUN.yaml``: build (this process's share of) a run's crop cache
(:mod:`kdtune.fkd_cache`) ahead of its trials."""
from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("kdtune.cache")

HELP = "build a run's FKD-style crop cache (teacher_cache: crops) ahead of its trials, one shard set per process"
DESCRIPTION = """kdtune cache RUN.yaml: build (this process's share of) the crop cache of a run
configuration (teacher_cache: crops) and exit. Start it once per GPU, each with its
own CUDA_VISIBLE_DEVICES, on nodes that share cache_dir: each process builds the
shards no other holds, and the trials then read the finished cache."""
# on a machine with several GPUs: one process per GPU, each with its own CUDA_VISIBLE_DEVICES
EXAMPLES = """examples:
  kdtune cache run.yaml
  kdtune cache run.yaml --set teacher_cache_crops=10 --set teacher_cache_topk=20"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a run's YAML file (kdtune train's format) with teacher_cache: crops")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the file, e.g. teacher_cache_topk=20 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from kdtune.config import ConfigError, RunConfig, load_yaml, parse_override

    try:
        values = load_yaml(args.config)
        values.update(parse_override(text) for text in args.overrides)
        cfg = RunConfig.from_dict(values, args.config)
        if cfg.teacher_cache != "crops":
            raise ConfigError([f"{args.config}: teacher_cache: expected 'crops', but got {cfg.teacher_cache!r}"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from kdtune.run import load_data, load_teacher, prepare_cache

    data = load_data(cfg)
    teacher, _ = load_teacher(cfg, data)
    cache = prepare_cache(cfg, data, teacher)
    logger.info(f"[kdtune] crop cache: {cache.describe()}" if cache is not None else "[kdtune] no crop cache for this run")
    return 0
