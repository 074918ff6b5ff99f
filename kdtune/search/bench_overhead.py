"""``kdtune bench --overhead``: what the search machinery costs a trial, beyond its training.

Each trial's training is replaced by a fixed sleep (``--step-s``, default 0: a no-op) in a
trainable that subclasses kdtune's (:class:`kdtune.search.noop_trainable.NoopTrainable`); everything else is the real
``kdtune search`` path: a private Ray instance, Tune with ``reuse_actors``, the searcher with its
Optuna study stored in SQLite, ASHA or no scheduler, the MLflow tracker, checkpoints every
``checkpoint_every_s``, the progress lines, the results table. With ``--train digits`` the trials
train for real instead (KD on digits, resnet20 -> resnet8, the quickstart's space; the teacher and
its output cache are built before the clock starts). Per algorithm and number of trials it prints

* the wall time of the search, from the call to the results table;
* start-up: until the first trial's MLflow run opened;
* **slot-seconds per trial beyond training**: ``(wall - start-up) x slots / trials - training``
  (``slots``: trials at once), the issue's measure of what a trial costs besides its own epochs;
* the same, over the first and over the last 50 trials to end (from the MLflow runs' end times):
  a cost that grows with the study shows as last > first.

The reported value is a smooth function of the configuration and the epoch, so TPE has something
to model and ASHA stops trials as it would in a real search.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ALGORITHMS = ("tpe", "random", "grid")
WINDOW = 50  # trials per window for the first/last comparison
TRAIN = ("digits",)  # datasets of --train

# --train: the quickstart's KD search (search_spaces/quickstart.yaml) at a given length.
TRAIN_FIXED = {"teacher": "resnet20", "teacher_epochs": 30, "student": "resnet8", "method": "kd", "batch_size": 64,
               "schedule": "cosine", "seed": 0}
TRAIN_SPACE = {"temperature": {"type": "float", "low": 1, "high": 8, "log": True},
               "kd_weight": {"type": "float", "low": 0.1, "high": 2.0},
               "lr": {"type": "float", "low": 0.003, "high": 0.3, "log": True}}


def write_space(folder: Path, algorithm: str, trials: int, epochs: int, concurrent: int, scheduler: str,
                train: str | None = None) -> Path:
    if train:
        space = TRAIN_SPACE
    elif algorithm == "grid":  # one grid point per trial
        space = {"lr": {"type": "categorical", "choices": [round(10 ** (-3 + 3 * i / max(1, trials - 1)), 8)
                                                          for i in range(trials)]}}
    else:
        space = {"lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True},
                 "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}}
    fixed = ({"dataset": train, **TRAIN_FIXED, "epochs": epochs} if train else
             {"dataset": "digits", "student": "resnet8", "method": "none", "epochs": epochs, "seed": 0})
    doc = {"name": f"overhead-{algorithm}-{trials}" + (f"-{train}" if train else ""),
           "fixed": fixed,
           "space": space,
           "search": {"algorithm": algorithm, "num_samples": trials, "metric": "val/acc1", "mode": "max", "seed": 0,
                      "max_concurrent": concurrent},
           "scheduler": ({"type": "asha", "grace_period": 1, "reduction_factor": 2} if scheduler == "asha"
                         else {"type": "none"}),
           "resources": {"cpus_per_trial": 1}}
    path = folder / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def measure(folder: Path, algorithm: str, trials: int, epochs: int, concurrent: int, scheduler: str,
            step_s: float, train: str | None = None, address: str | None = None) -> dict[str, Any]:
    """One search through ``kdtune.search.driver.execute``; its timings. ``train``: real trials on
    that dataset (kdtune's own trainable) instead of no-op ones. ``address``: a running Ray
    cluster (``kdtune search --address``), else a private local instance, as a search starts."""
    from mlflow import MlflowClient

    from kdtune.search.api import options
    from kdtune.search.driver import execute
    from kdtune.search.preflight import create_tracking_store
    from kdtune.search.records import RESULTS_FILE
    from kdtune.search.tracking import child_runs

    import pandas as pd

    from kdtune.search.noop_trainable import sleeping

    space = write_space(folder, algorithm, trials, epochs, concurrent, scheduler, train)
    tracking = f"sqlite:///{folder / 'mlflow.db'}"  # its artifacts go beside it (tracking.artifact_location)
    create_tracking_store(tracking)  # MLflow's schema migrations: seconds, not the search's overhead
    args = options(space, storage_path=str(folder / "ray"), tracking_uri=tracking, status_every=3600.0,
                   address=address)
    if train:  # the setting: the teacher and its output cache exist before the search starts
        from kdtune.search.driver import prepare_teacher
        from kdtune.search.spec import load_spec

        prepare_teacher(load_spec(space, []))
    start = time.time()
    code, own = execute(args, trainable=None if train else sleeping(step_s))
    wall = time.time() - start
    if code != 0:
        raise RuntimeError(f"the {algorithm} search of {trials} trials ended with exit status {code}")
    table = pd.read_csv(own / RESULTS_FILE)
    runs = child_runs(MlflowClient(tracking), own.name, _parent(own))
    starts = sorted(r.info.start_time / 1000 for r in runs)
    ends = sorted(r.info.end_time / 1000 for r in runs if r.info.end_time)
    training = float(table["wall_s"].fillna(0).mean())  # Tune's time_total_s: the trial's own steps
    startup = starts[0] - start
    per_trial = (wall - startup) * concurrent / trials - training

    def window(times: list[float]) -> float:
        if len(times) < 2:
            return math.nan
        return (times[-1] - times[0]) * concurrent / (len(times) - 1) - training

    return {"algorithm": algorithm, "trials": trials, "wall_s": wall, "startup_s": startup,
            "training_s": training, "per_trial_s": per_trial,
            "first_s": window(ends[:WINDOW + 1]), "last_s": window(ends[-(WINDOW + 1):]),
            "epochs": float(table["epochs"].mean())}


def _parent(own: Path) -> str:
    import json

    from kdtune.search.records import STATE_FILE

    return json.loads((own / STATE_FILE).read_text())["parent_run_id"]


DESCRIPTION = """kdtune bench --overhead: what the search machinery costs each trial beyond its
training. Trials whose epochs are a sleep (--step-s; 0: no-op), or with --train
real KD trials (digits, resnet20 -> resnet8), run through the real kdtune search
path (private Ray instance, Tune, the Optuna study in SQLite, ASHA, MLflow
tracking, checkpoints); per algorithm and number of trials it prints the
slot-seconds each trial cost beyond its training, overall and over the first
and the last 50 trials to end."""
EXAMPLES = """examples:
  kdtune bench --overhead
  kdtune bench --overhead --trials 50,1000 --algorithms tpe,random,grid
  kdtune bench --overhead --trials 48 --step-s 0.25 --scheduler none
  kdtune bench --overhead --train digits --trials 48 --scheduler none --algorithms tpe,random --repeat 2"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kdtune bench --overhead", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overhead", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trials", default="50", help="comma-separated numbers of trials per search (default 50)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help=f"from {', '.join(ALGORITHMS)} (default: all)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of a trial that is not stopped (default 2)")
    p.add_argument("--step-s", type=float, default=0.0, help="seconds of sleep per epoch (default 0: a no-op)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once, one CPU each (default 2)")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha", help="default asha, as kdtune's")
    p.add_argument("--train", choices=TRAIN, default=None,
                   help="real trials on this dataset (KD, resnet20 -> resnet8, the quickstart's space) instead "
                        "of no-op ones; the teacher and its cache are built before the clock starts")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the searches this many times, the algorithms interleaved (tpe, random, tpe, "
                        "random, ...) so that the machine's load falls on each alike (default 1)")
    p.add_argument("--keep", default=None, help="keep the searches' folders here (default: a temporary folder)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster's address, as for kdtune search (default: each search starts a "
                        "private local instance, whose start-up is in the figures)")
    args = p.parse_args(argv)
    # checked before anything heavy is imported: a mistyped flag costs a second, not a search
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    try:
        counts = [int(t) for t in args.trials.split(",") if t.strip()]
    except ValueError:
        counts = []
    problems = []
    bad = [a for a in algorithms if a not in ALGORITHMS]
    if bad or not algorithms:
        problems.append(f"--algorithms {args.algorithms!r}: expected a comma-separated list from "
                        f"{', '.join(ALGORITHMS)}" + (f" (unknown: {', '.join(bad)})" if bad else ""))
    if args.train and "grid" in algorithms:  # the quickstart's space is continuous: no grid to run
        problems.append("--train: with tpe and random only (its space has no grid)")
    if not counts or min(counts) < 2:
        problems.append(f"--trials {args.trials!r}: expected comma-separated integers >= 2")
    for flag, value, low in (("--epochs", args.epochs, 1), ("--max-concurrent", args.max_concurrent, 1),
                             ("--step-s", args.step_s, 0), ("--repeat", args.repeat, 1)):
        if value < low:
            problems.append(f"{flag} {value!r}: expected a number >= {low}")
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < args.max_concurrent:
        print(f"error: --max-concurrent {args.max_concurrent}: this machine has {os.cpu_count()} CPUs",
              file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdtune-bench-overhead-") as tmp:
        root = Path(args.keep).expanduser() if args.keep else Path(tmp)
        for trials in counts:
            for run in range(1, args.repeat + 1):
                for algorithm in algorithms:
                    folder = root / (f"{algorithm}-{trials}" + (f"-{run}" if args.repeat > 1 else ""))
                    folder.mkdir(parents=True, exist_ok=True)
                    row = measure(folder, algorithm, trials, args.epochs, args.max_concurrent, args.scheduler,
                                  args.step_s, args.train, args.address)
                    row["run"] = run
                    rows.append(row)
                    print(f"[bench] {algorithm} {trials} trials: {row['wall_s']:.1f} s wall, "
                          f"{row['per_trial_s']:.2f} slot-s per trial beyond training "
                          f"(load average {os.getloadavg()[0]:.2f})", flush=True)
    what = (f"{args.train} KD trials of {args.epochs} epochs" if args.train
            else f"{args.epochs} epochs of {args.step_s:g} s per trial")
    print(f"\nsearch overhead: {what}, scheduler {args.scheduler}, "
          f"{args.max_concurrent} trials at once, {os.cpu_count()} CPUs")
    print(f"{'algorithm':<9} {'trials':>6} {'wall s':>8} {'start-up s':>10} {'epochs/trial':>12} "
          f"{'training s':>10} {'overhead slot-s/trial':>21} {'first 50':>9} {'last 50':>8}")
    for r in rows:
        print(f"{r['algorithm']:<9} {r['trials']:>6} {r['wall_s']:>8.1f} {r['startup_s']:>10.1f} {r['epochs']:>12.2f} "
              f"{r['training_s']:>10.2f} {r['per_trial_s']:>21.2f} {r['first_s']:>9.2f} {r['last_s']:>8.2f}")
    by = {(r["algorithm"], r["trials"], r["run"]): r for r in rows}
    for trials in counts:
        for run in range(1, args.repeat + 1):
            if ("tpe", trials, run) in by and ("random", trials, run) in by:
                print(f"{trials} trials: TPE / random wall time {by[('tpe', trials, run)]['wall_s'] / by[('random', trials, run)]['wall_s']:.2f}"
                      + (f" (run {run})" if args.repeat > 1 else ""))
    by = {(r["algorithm"], r["trials"]): r for r in rows if r["run"] == 1}
    if len(counts) > 1:
        small, large = min(counts), max(counts)
        for a in algorithms:
            if (a, small) in by and (a, large) in by and by[(a, small)]["per_trial_s"] > 0:
                print(f"{a}: overhead per trial at {large} / at {small} trials: "
                      f"{by[(a, large)]['last_s'] / by[(a, small)]['per_trial_s']:.2f} (last 50 of {large})")
    return 0
