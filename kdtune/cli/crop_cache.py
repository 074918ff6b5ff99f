"""``python -m kdtune.fkd_cache RUN.yaml``: build (this process's share of) a run's crop cache
(:mod:`kdtune.fkd_cache`)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """``python -m kdtune.fkd_cache RUN.yaml [--set KEY=VALUE ...]``: build (this process's share of)
    the crop cache of a run configuration and exit. Start it once per GPU, each with its own
    ``CUDA_VISIBLE_DEVICES``, on nodes that share ``cache_dir``: each builds the shards no other holds."""
    import argparse

    from kdtune.config import ConfigError, RunConfig, load_yaml, parse_override

    p = argparse.ArgumentParser(prog="python -m kdtune.fkd_cache", description=main.__doc__)
    p.add_argument("config", help="a run's YAML file (kdtune train's format) with teacher_cache: crops")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
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
    print(f"[kdtune] crop cache: {cache.describe()}" if cache is not None else "[kdtune] no crop cache for this run")
    return 0
