"""``kdtune bench --search``: how much trial time each search strategy needs.

Strategies: TPE + ASHA (kdtune's default), random + ASHA, and random search without early
stopping, each run once per search seed on one digits task where the hyperparameters matter (a
small student, few epochs, a learning rate over three decades). For every strategy it prints

* the trial-seconds (sum of the epochs' training times over all trials, in the order the
  results came in) until the search first holds a *completed* trial within ``--tolerance``
  (0.5 pp) of the best completed value that any strategy found with any seed, and
* the final gap: that best value minus the strategy's own best completed value at the end.

With ``--replay TABLE`` the searches run against a recorded learning-curve table instead, in
simulated time and over many seeds (:mod:`kdtune.search.replay`); this live mode stays as a sanity
check of the replay on a few seeds.

Completed trials only, because the goal is a configuration for a full-length final run: a trial
ASHA stopped after one epoch has no full-budget value. The objective of a trial is kdtune's (the
metric at its last epoch). No MLflow, no Optuna storage: only the search itself is timed.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

STRATEGIES = {"tpe+asha": ("tpe", "asha"), "random+asha": ("random", "asha"), "random": ("random", "none")}

TASK = {  # digits: resnet20 teacher, resnet8 student, 6 epochs; lr spans 1e-3 .. 1 (30 % to 98 %)
    "fixed": {"dataset": "digits", "teacher": "resnet20", "teacher_epochs": 30, "student": "resnet8",
              "method": "kd", "epochs": 6, "batch_size": 64, "schedule": "cosine", "seed": 0},
    "space": {"temperature": {"type": "float", "low": 1, "high": 8, "log": True},
              "kd_weight": {"type": "float", "low": 0.1, "high": 2.0},
              "lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True}},
}


def write_spec(folder: Path, strategy: str, seed: int, num_samples: int, epochs: int, concurrent: int,
               cache_dir: str, teacher: str, teacher_epochs: int) -> Path:
    algorithm, scheduler = STRATEGIES[strategy]
    spec = {"name": f"bench-{strategy.replace('+', '-')}-s{seed}",
            "fixed": {**TASK["fixed"], "epochs": epochs, "cache_dir": cache_dir, "teacher": teacher,
                      "teacher_epochs": teacher_epochs},
            "space": TASK["space"],
            "search": {"algorithm": algorithm, "num_samples": num_samples, "metric": "val/acc1", "mode": "max",
                       "seed": seed, "max_concurrent": concurrent},
            "scheduler": {"type": scheduler, "grace_period": 1, "reduction_factor": 3} if scheduler == "asha"
            else {"type": "none"},
            "resources": {"cpus_per_trial": 1}}
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_one(spec, storage: str) -> list[dict[str, Any]]:
    """One search; its results as (timestamp, trial, epoch, seconds, value, done) rows."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from kdtune.search.searchers import build_searcher, concurrency
    from kdtune.search.trainable import KDTrainable

    searcher, param_space, num_samples = build_searcher(spec)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=spec.max_epochs, grace_period=spec.grace_period,
                               reduction_factor=spec.reduction_factor) if spec.scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(KDTrainable, spec=spec), {"cpu": spec.cpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=num_samples, max_concurrent_trials=concurrency(searcher, spec),
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, verbose=0))
    grid = tuner.fit()
    rows = []
    for result in grid:  # public: each trial's per-epoch results
        df = result.metrics_dataframe
        if df is None:
            continue
        trial_id = result.metrics.get("trial_id")
        for r in df.to_dict("records"):
            rows.append({"timestamp": r["timestamp"], "trial": trial_id, "epoch": int(r["training_iteration"]),
                         "seconds": float(r["time_this_iter_s"]), "value": float(r[spec.metric]),
                         "completed": int(r["training_iteration"]) >= spec.max_epochs and not r.get("diverged")})
    return sorted(rows, key=lambda r: (r["timestamp"], r["trial"], r["epoch"]))


def time_to_target(rows: list[dict[str, Any]], target: float) -> float:
    """Trial-seconds spent until a completed trial reached ``target`` (inf: never)."""
    spent = 0.0
    for r in rows:
        spent += r["seconds"]
        if r["completed"] and r["value"] >= target:
            return spent
    return math.inf


def best_completed(rows: list[dict[str, Any]]) -> float:
    return max((r["value"] for r in rows if r["completed"]), default=-math.inf)


DESCRIPTION = """kdtune bench --search: how much trial time each search strategy needs
(TPE+ASHA, random+ASHA, random search without early stopping) on a digits task:
per strategy, the trial-seconds until a completed trial comes within
--tolerance of the best completed value any strategy found, and the final gap
to that value."""
EXAMPLES = """examples:
  kdtune bench --search
  kdtune bench --search --seeds 2 --num-samples 12 --epochs 3
  kdtune bench --search --strategies tpe+asha,random --cache-dir ~/.cache/kdtune"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kdtune bench --search", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--search", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, from {', '.join(STRATEGIES)} (default: all)")
    p.add_argument("--seeds", type=int, default=5, help="search seeds per strategy (default 5)")
    # Optuna's TPE draws its first 10 trials at random (n_startup_trials): fewer trials compare
    # random search with random search.
    p.add_argument("--num-samples", type=int, default=32, help="trials per search (default 32)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of a completed trial (default 6)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once (default 2)")
    p.add_argument("--tolerance", type=float, default=0.5, help="pp below the best value found (default 0.5)")
    p.add_argument("--teacher", default=TASK["fixed"]["teacher"], help="teacher model (default resnet20, the quickstart's)")
    p.add_argument("--teacher-epochs", type=int, default=TASK["fixed"]["teacher_epochs"],
                   help="epochs to train the teacher when it is not cached (default 30)")
    p.add_argument("--cache-dir", default=None, help="teacher cache (default: a temporary folder)")
    args = p.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or args.seeds < 1 or args.num_samples < 1 or args.epochs < 2:
        print(f"error: --strategies takes {', '.join(STRATEGIES)} (got {', '.join(unknown) or 'ok'}); "
              f"--seeds and --num-samples >= 1, --epochs >= 2", file=__import__("sys").stderr)
        return 2

    import ray

    from kdtune.search.driver import prepare_teacher, quiet_libraries
    from kdtune.search.spec import load_spec

    quiet_libraries(verbose=False)
    with tempfile.TemporaryDirectory(prefix="kdtune-bench-search-") as tmp:
        folder = Path(tmp)
        cache = args.cache_dir or str(folder / "cache")
        specs = {(s, seed): load_spec(write_spec(folder, s, seed, args.num_samples, args.epochs,
                                                 args.max_concurrent, cache, args.teacher, args.teacher_epochs))
                 for s in strategies for seed in range(args.seeds)}
        prepare_teacher(next(iter(specs.values())))  # once, cached for every trial
        ray.init(address="local", include_dashboard=False, num_cpus=args.max_concurrent,
                 object_store_memory=256 * 1024**2, logging_level="WARNING")
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        try:
            for (s, seed), spec in specs.items():
                start = time.perf_counter()
                runs[(s, seed)] = rows = run_one(spec, str(folder / "ray"))
                print(f"[bench] {s} seed {seed}: best completed {best_completed(rows):.2f}, "
                      f"{sum(r['seconds'] for r in rows):.0f} trial-s, {time.perf_counter() - start:.0f} s wall",
                      flush=True)
        finally:
            ray.shutdown()
    best = max(best_completed(rows) for rows in runs.values())
    target = best - args.tolerance
    print(f"\nsearch efficiency on digits ({args.teacher} ({args.teacher_epochs} epochs) -> resnet8, {args.epochs} epochs, {args.num_samples} trials, "
          f"{args.seeds} seeds): best completed val/acc1 over all runs {best:.2f}; target {target:.2f}")
    print(f"{'strategy':<13} {'reached':>8} {'trial-s to target (median)':>27} {'mean':>8} "
          f"{'total trial-s':>14} {'final gap pp (mean ± std)':>26}")
    medians = {}
    for s in strategies:
        mine = [runs[(s, seed)] for seed in range(args.seeds)]
        times = [time_to_target(rows, target) for rows in mine]
        gaps = [best - best_completed(rows) for rows in mine]
        reached = [t for t in times if math.isfinite(t)]
        medians[s] = statistics.median(times) if times else math.inf
        total = statistics.fmean(sum(r["seconds"] for r in rows) for rows in mine)
        std = statistics.stdev(gaps) if len(gaps) > 1 else math.nan
        print(f"{s:<13} {len(reached):>4}/{len(times):<3} {medians[s]:>27.0f} "
              f"{(statistics.fmean(reached) if reached else math.inf):>8.0f} {total:>14.0f} "
              f"{statistics.fmean(gaps):>13.2f} ± {std:.2f}")
    if "tpe+asha" in medians and "random" in medians and math.isfinite(medians["random"]):
        print(f"TPE+ASHA / random (median trial-seconds to target): {medians['tpe+asha'] / medians['random']:.2f} "
              f"(goal <= 0.33)")
    print("(median counts a run that never reached the target as infinite)")
    return 0
