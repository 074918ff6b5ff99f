"""``kdtune bench --overhead``: what the search machinery costs a trial, beyond its training.

Each trial's training is replaced by a fixed sleep (``--step-s``, default 0: a no-op) in a
trainable that subclasses kdtune's (:class:`NoopTrainable`); everything else is the real
``kdtune search`` path: a private Ray instance, Tune with ``reuse_actors``, the searcher with its
Optuna study stored in SQLite, ASHA or no scheduler, the MLflow tracker, a checkpoint per epoch,
the progress lines, the results table. Per algorithm and number of trials it prints

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

from kdtune.search.trainable import KDTrainable

ALGORITHMS = ("tpe", "random", "grid")
WINDOW = 50  # trials per window for the first/last comparison


class NoopTrainable(KDTrainable):
    """A trial whose epoch is ``step_s`` seconds of sleep: no data, no model, no teacher. Its
    checkpoint is the size of a resnet8's weights and momentum (what a digits trial saves), so the
    per-epoch checkpoint costs what it costs in a real search."""

    step_s = 0.0

    def _build(self, config: dict[str, Any]) -> None:
        import torch

        self._last_checkpoint = time.monotonic()
        self.config_values = dict(config)
        self.epoch = 0
        self.max_epochs = self.spec.max_epochs
        self.state = torch.zeros(2 * 78_000)  # resnet8: 78k parameters, plus SGD momentum

    def _accuracy(self) -> float:
        lr = float(self.config_values.get("lr") or 0.1)
        wd = float(self.config_values.get("weight_decay") or 5e-4)
        # best near lr 0.1, weight decay 5e-4; approaches its final value epoch by epoch
        final = 95.0 - 12.0 * (math.log10(lr) + 1.0) ** 2 - 4.0 * (math.log10(wd) + 3.3) ** 2
        return max(final, 10.0) * (1.0 - 0.5 ** self.epoch)

    def step(self) -> dict[str, Any]:
        if self.step_s > 0:
            time.sleep(self.step_s)
        self.epoch += 1
        acc = self._accuracy()
        return self.checkpoint_when_due({"val/acc1": acc, "train/loss": 2.3 * (1.0 - acc / 100.0), "train/lr": 0.1,
                                         "diverged": 0.0, "samples/backprop": 0,
                                         "done": self.epoch >= self.max_epochs})

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        import torch

        torch.save({"epoch": self.epoch, "state": self.state}, os.path.join(checkpoint_dir, "noop.pth"))
        self._last_checkpoint = time.monotonic()

    def load_checkpoint(self, checkpoint: str) -> None:
        import torch

        saved = torch.load(os.path.join(checkpoint, "noop.pth"), weights_only=True)
        self.epoch, self.state = saved["epoch"], saved["state"]


def sleeping(step_s: float) -> type[NoopTrainable]:
    """NoopTrainable with this epoch time (a class attribute: Tune pickles the class by reference)."""
    if step_s <= 0:
        return NoopTrainable
    return type(f"NoopTrainable{int(step_s * 1000)}ms", (NoopTrainable,), {"step_s": step_s,
                                                                            "__module__": __name__})


def write_space(folder: Path, algorithm: str, trials: int, epochs: int, concurrent: int, scheduler: str) -> Path:
    if algorithm == "grid":  # one grid point per trial
        space = {"lr": {"type": "categorical", "choices": [round(10 ** (-3 + 3 * i / max(1, trials - 1)), 8)
                                                          for i in range(trials)]}}
    else:
        space = {"lr": {"type": "float", "low": 0.001, "high": 1.0, "log": True},
                 "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}}
    doc = {"name": f"overhead-{algorithm}-{trials}",
           "fixed": {"dataset": "digits", "student": "resnet8", "method": "none", "epochs": epochs, "seed": 0},
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
            step_s: float) -> dict[str, Any]:
    """One search through ``kdtune.search.driver.execute``; its timings."""
    from mlflow import MlflowClient

    from kdtune.search.api import options
    from kdtune.search.driver import execute
    from kdtune.search.records import RESULTS_FILE
    from kdtune.search.tracking import child_runs

    import pandas as pd

    space = write_space(folder, algorithm, trials, epochs, concurrent, scheduler)
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    args = options(space, storage_path=str(folder / "ray"), tracking_uri=tracking, status_every=3600.0)
    start = time.time()
    code, own = execute(args, trainable=sleeping(step_s))
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
training. Trials whose epochs are a sleep (--step-s; 0: no-op) run through the
real kdtune search path (private Ray instance, Tune, the Optuna study in SQLite,
ASHA, MLflow tracking, a checkpoint per epoch); per algorithm and number of
trials it prints the slot-seconds each trial cost beyond its training, overall
and over the first and the last 50 trials to end."""
EXAMPLES = """examples:
  kdtune bench --overhead
  kdtune bench --overhead --trials 50,1000 --algorithms tpe,random,grid
  kdtune bench --overhead --trials 48 --step-s 0.25 --scheduler none"""


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
    p.add_argument("--keep", default=None, help="keep the searches' folders here (default: a temporary folder)")
    args = p.parse_args(argv)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    try:
        counts = [int(t) for t in args.trials.split(",") if t.strip()]
    except ValueError:
        counts = []
    bad = [a for a in algorithms if a not in ALGORITHMS]
    if bad or not algorithms or not counts or min(counts) < 2 or args.epochs < 1 or args.step_s < 0 \
            or args.max_concurrent < 1:
        print(f"error: --algorithms takes {', '.join(ALGORITHMS)} (got {args.algorithms!r}); --trials integers >= 2 "
              f"(got {args.trials!r}); --epochs and --max-concurrent >= 1; --step-s >= 0", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < args.max_concurrent:
        print(f"error: --max-concurrent {args.max_concurrent}: this machine has {os.cpu_count()} CPUs",
              file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdtune-bench-overhead-") as tmp:
        root = Path(args.keep).expanduser() if args.keep else Path(tmp)
        for trials in counts:
            for algorithm in algorithms:
                folder = root / f"{algorithm}-{trials}"
                folder.mkdir(parents=True, exist_ok=True)
                row = measure(folder, algorithm, trials, args.epochs, args.max_concurrent, args.scheduler,
                              args.step_s)
                rows.append(row)
                print(f"[bench] {algorithm} {trials} trials: {row['wall_s']:.1f} s wall, "
                      f"{row['per_trial_s']:.2f} slot-s per trial beyond training", flush=True)
    print(f"\nsearch overhead: {args.epochs} epochs of {args.step_s:g} s per trial, scheduler {args.scheduler}, "
          f"{args.max_concurrent} trials at once, {os.cpu_count()} CPUs")
    print(f"{'algorithm':<9} {'trials':>6} {'wall s':>8} {'start-up s':>10} {'epochs/trial':>12} "
          f"{'training s':>10} {'overhead slot-s/trial':>21} {'first 50':>9} {'last 50':>8}")
    for r in rows:
        print(f"{r['algorithm']:<9} {r['trials']:>6} {r['wall_s']:>8.1f} {r['startup_s']:>10.1f} {r['epochs']:>12.2f} "
              f"{r['training_s']:>10.2f} {r['per_trial_s']:>21.2f} {r['first_s']:>9.2f} {r['last_s']:>8.2f}")
    by = {(r["algorithm"], r["trials"]): r for r in rows}
    for trials in counts:
        if ("tpe", trials) in by and ("random", trials) in by:
            print(f"{trials} trials: TPE / random wall time {by[('tpe', trials)]['wall_s'] / by[('random', trials)]['wall_s']:.2f}")
    if len(counts) > 1:
        small, large = min(counts), max(counts)
        for a in algorithms:
            if (a, small) in by and (a, large) in by and by[(a, small)]["per_trial_s"] > 0:
                print(f"{a}: overhead per trial at {large} / at {small} trials: "
                      f"{by[(a, large)]['last_s'] / by[(a, small)]['per_trial_s']:.2f} (last 50 of {large})")
    return 0
