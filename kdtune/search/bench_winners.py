"""``kdtune bench --winners-curse``: how much a search's single-run best overstates itself, and
how often it is not the best configuration, with and without the confirmation stage.

What runs: ``--configs`` configurations drawn from a space file's space (the quickstart's by
default, with its seed), each trained ``--seeds`` times on digits with the same teacher (real
runs, the trials' engine, no Ray). From that table of runs, ``--draws`` searches are replayed:

* a search draws one seed per configuration as its trial's run. Its single-run best is the
  configuration with the best value; its overestimate is that value minus the mean of the
  configuration's other seeds (the re-runs a user would get), and it is *wrong* when another
  configuration has a better mean over all seeds;
* the confirmation stage (``--top-k``, ``--confirm-seeds``) re-runs the top-k by drawing
  that many further seeds of each, chooses by the mean over the search's run and those, and is
  measured the same way (its overestimate: the selection mean minus the mean of the seeds it
  did not use).

Replaying searches from one table of real runs, instead of running hundreds of searches, is
what makes the figures affordable on a CPU; each replayed search sees exactly what a real one
with those seeds would see, because a run's value depends only on its configuration and seed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


DESCRIPTION = """kdtune bench --winners-curse: how much a search's single-run best overstates
itself, and how often it is not the best configuration, with and without the
confirmation stage."""
EXAMPLES = """examples:
  kdtune bench --winners-curse
  kdtune bench --winners-curse --configs 8 --seeds 5 --output runs.json
  kdtune bench --winners-curse --replay runs.json --top-k 5"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kdtune bench --winners-curse", description=DESCRIPTION,
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--winners-curse", action="store_true", help=argparse.SUPPRESS)  # names this benchmark (prog)
    p.add_argument("--space", default=str(Path(__file__).resolve().parents[2] / "search_spaces" / "quickstart.yaml"),
                   help="space file whose fixed settings and space are used (default: the quickstart)")
    p.add_argument("--configs", type=int, default=12, help="configurations drawn from the space (a search's trials)")
    p.add_argument("--seeds", type=int, default=6, help="runs per configuration (>= 2 + --confirm-seeds)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the space file's)")
    p.add_argument("--top-k", type=int, default=3, help="trials a confirmation re-runs (default 3)")
    p.add_argument("--confirm-seeds", type=int, default=2,
                   help="more seeds per confirmed trial (default 2)")
    p.add_argument("--draws", type=int, default=2000, help="searches replayed from the table of runs")
    p.add_argument("--output", default=None, help="write every run's value and the figures here (JSON)")
    p.add_argument("--replay", metavar="JSON", default=None,
                   help="replay searches over the runs an earlier --output file holds, training nothing "
                        "(other --top-k / --confirm-seeds on the same runs)")
    args = p.parse_args(argv)
    if args.seeds < args.confirm_seeds + 2 or min(args.configs, args.top_k, args.draws) < 1 or args.confirm_seeds < 1:
        p.error(f"need --seeds >= --confirm-seeds + 2 (a held-out seed), and positive --configs, --top-k, --draws "
                f"and --confirm-seeds; got --seeds {args.seeds}, --confirm-seeds {args.confirm_seeds}")
    return args


def draw_configs(spec, n: int) -> list[dict[str, Any]]:
    """``n`` configurations from the spec's space, by Optuna's random sampler with the spec's seed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        spec.space.suggest(trial)  # define-by-run: the values are the trial's params
        out.append(dict(trial.params))
    return out


def train_table(spec, configs: list[dict[str, Any]], seeds: int, epochs: int | None,
                say=print) -> list[list[float]]:
    """``values[c][s]``: the search metric at the last epoch of configuration c with seed base+s."""
    from kdtune.run import build_engine, load_data, load_teacher

    first = spec.run_config({**configs[0], **({"epochs": epochs} if epochs else {})})
    data = load_data(first)
    teacher = load_teacher(first, data, log=say)[0]
    values = []
    start = time.perf_counter()
    for c, config in enumerate(configs):
        row = []
        for s in range(seeds):
            cfg = spec.run_config({**config, "seed": first.seed + s, "teacher_seed": first.seed,
                                   **({"epochs": epochs} if epochs else {})})
            engine = build_engine(cfg, data, teacher)
            last = {}
            for m in engine.run():
                last = m
            row.append(float(last.get(spec.metric, math.nan)))
        values.append(row)
        say(f"config {c + 1:>2}/{len(configs)}: {spec.metric} {statistics.fmean(row):.2f} ± {statistics.stdev(row):.2f} "
            f"over {seeds} seeds ({', '.join(f'{v:.2f}' for v in row)})  {_short(config)}  "
            f"[{time.perf_counter() - start:.0f}s]")
    return values


def _short(config: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in config.items())


def replay(values: list[list[float]], mode: str, top_k: int, confirm_seeds: int, draws: int,
           seed: int = 0) -> dict[str, float]:
    """The figures over ``draws`` replayed searches (see the module docstring)."""
    rng = random.Random(seed)
    sign = 1 if mode == "max" else -1
    means = [statistics.fmean(row) for row in values]
    best_mean = max(sign * m for m in means)
    single_over, single_wrong, conf_over, conf_wrong = [], 0, [], 0
    for _ in range(draws):
        order = [rng.sample(range(len(row)), len(row)) for row in values]  # each config's seeds, shuffled
        search = [values[c][order[c][0]] for c in range(len(values))]
        b = max(range(len(values)), key=lambda c: sign * search[c])
        rest = [values[b][s] for s in order[b][1:]]
        single_over.append(sign * (search[b] - statistics.fmean(rest)))
        single_wrong += sign * means[b] < best_mean
        top = sorted(range(len(values)), key=lambda c: -sign * search[c])[:top_k]
        used = {c: [values[c][s] for s in order[c][:1 + confirm_seeds]] for c in top}
        chosen = max(top, key=lambda c: sign * statistics.fmean(used[c]))
        held = [values[chosen][s] for s in order[chosen][1 + confirm_seeds:]]
        conf_over.append(sign * (statistics.fmean(used[chosen]) - statistics.fmean(held)))
        conf_wrong += sign * means[chosen] < best_mean
    return {"single_overestimate_pp": statistics.fmean(single_over), "single_not_best": single_wrong / draws,
            "confirm_overestimate_pp": statistics.fmean(conf_over), "confirm_not_best": conf_wrong / draws}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kdtune.config import ConfigError
    from kdtune.search.spec import load_spec

    try:
        spec = load_spec(args.space)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.replay:
        saved = json.loads(Path(args.replay).read_text())
        configs, values = saved["configs"], saved["values"]
        args.configs, args.seeds = len(values), len(values[0])
        if args.seeds < args.confirm_seeds + 2:
            print(f"error: --replay {args.replay}: {args.seeds} seeds per configuration; --confirm-seeds "
                  f"{args.confirm_seeds} needs at least {args.confirm_seeds + 2}", file=sys.stderr)
            return 2
        logger.info(f"winner's curse: replaying {args.replay} ({args.configs} configurations x {args.seeds} seeds)")
    else:
        import torch

        torch.set_num_threads(1)  # as a trial with one CPU trains
        configs = draw_configs(spec, args.configs)
        epochs = args.epochs or spec.max_epochs
        logger.info(f"winner's curse on {spec.fixed.get('dataset')}: {args.configs} configurations of {spec.path} "
                    f"x {args.seeds} seeds, {epochs} epochs each, one teacher")
        values = train_table(spec, configs, args.seeds, args.epochs, say=logger.info)
    figures = replay(values, spec.mode, args.top_k, args.confirm_seeds, args.draws)
    means = [statistics.fmean(r) for r in values]
    stds = [statistics.stdev(r) for r in values]
    took = "replayed" if args.replay else f"in {time.perf_counter() - start:.0f}s"
    print(f"\n[kdtune] {len(values) * args.seeds} runs {took}; seed std per "
          f"configuration: median {statistics.median(stds):.2f} pp; spread of the best 3 means: "
          f"{_spread(means, spec.mode):.2f} pp")
    print(f"[kdtune] over {args.draws} replayed searches of {args.configs} trials:")
    print(f"  single-run best:       overestimates its re-run mean by {figures['single_overestimate_pp']:.2f} pp; "
          f"not the best by mean in {100 * figures['single_not_best']:.0f}% of searches")
    print(f"  confirmation (top {args.top_k}, +{args.confirm_seeds} seeds): overestimates by "
          f"{figures['confirm_overestimate_pp']:.2f} pp; not the best by mean in "
          f"{100 * figures['confirm_not_best']:.0f}% of searches")
    if args.output and not args.replay:
        Path(args.output).write_text(json.dumps({"args": vars(args), "configs": configs, "values": values,
                                                 "figures": figures}, indent=2))
    return 0


def _spread(means: list[float], mode: str) -> float:
    top = sorted(means, reverse=mode == "max")[:3]
    return abs(top[0] - top[-1])
