"""Learning-curve tables: every epoch's val/acc1 and time of a grid of configurations, recorded
once with kdtune's own engine, read back by the replay benchmark (:mod:`kdtune.search.replay`).

``kdtune bench --record-curves OUT.csv.gz`` trains each configuration of :data:`GRID` on one
digits task (resnet20 teacher -> resnet8 student, the CIFAR step recipe scaled to
:data:`TASK`'s epochs) for every seed in ``--seeds``, through the same
``RunConfig -> build_engine -> Engine.train_epoch`` path a search trial takes. Rows go to
``OUT.partial.csv`` as each run ends, so an interrupted recording resumes where it stopped; the
finished table is gzip-compressed to ``OUT`` (temp file, then rename).

The table is tidy CSV, one row per (configuration, seed, epoch)::

    config,logit_stand,temperature,kd_weight,lr,seed,epoch,val_acc1,seconds,diverged

A run whose training loss turned non-finite ends at that epoch with ``diverged=1``, as a search
trial does (:class:`kdtune.search.trainable.KDTrainable`). The first line is a ``#`` comment
with the fixed settings (JSON), so a table says what it measured.
"""
from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# The recorded task: the quickstart's digits pair with the CIFAR step recipe (x0.1 at 150/180/210
# of 240, scaled by the engine: 10/12/14 of 16), long enough for ten epochs at the high rate.
TASK: dict[str, Any] = {"dataset": "digits", "teacher": "resnet20", "teacher_epochs": 30, "student": "resnet8",
                        "method": "kd", "epochs": 16, "batch_size": 64, "schedule": "step"}
# Hyperparameters that matter and interact: logit standardization changes what a temperature and
# a weight mean (LS's base T 2 with weight 9 against vanilla KD's T 4, weight 0.9), and lr spans
# from too slow to diverging. 2 x 4 x 3 x 6 = 144 configurations (what one core records in about
# 45 minutes at two seeds each).
GRID: dict[str, tuple] = {
    "logit_stand": (False, True),
    "temperature": (1.0, 2.0, 4.0, 8.0),
    "kd_weight": (0.1, 0.9, 8.0),
    "lr": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
}
# The space a search of the table samples (the recorded grid's hull; log where the grid is).
SPACE: dict[str, dict[str, Any]] = {
    "logit_stand": {"type": "categorical", "choices": [False, True]},
    "temperature": {"type": "float", "low": 1.0, "high": 8.0, "log": True},
    "kd_weight": {"type": "float", "low": 0.1, "high": 8.0, "log": True},
    "lr": {"type": "float", "low": 0.003, "high": 1.0, "log": True},
}
COLUMNS = ("config", "logit_stand", "temperature", "kd_weight", "lr", "seed", "epoch", "val_acc1", "seconds",
           "diverged")


def grid_configs(grid: dict[str, tuple] = GRID) -> list[dict[str, Any]]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


@dataclass
class Curves:
    """A recorded table: per configuration and seed, the val/acc1 and seconds of each epoch."""

    params: tuple[str, ...]
    configs: list[dict[str, Any]]  # index = config id
    values: dict[tuple[int, int], list[float]]  # (config, seed) -> val/acc1 per epoch
    seconds: dict[tuple[int, int], list[float]]
    diverged: dict[tuple[int, int], bool]
    epochs: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def space(self) -> dict[str, dict[str, Any]]:
        """The space a search of this table samples: the one stored with it, else :data:`SPACE`."""
        return self.meta.get("space") or SPACE

    @property
    def seeds(self) -> list[int]:
        return sorted({s for _, s in self.values})

    def final(self, config: int, seed: int) -> float:
        """A run's objective as kdtune reports it: the value at its last epoch (a diverged run's last)."""
        return self.values[(config, seed)][-1]

    def completed(self, config: int, seed: int) -> bool:
        return len(self.values[(config, seed)]) == self.epochs and not self.diverged[(config, seed)]

    def use_median_seconds(self) -> None:
        """Charge every run the median over all runs of each epoch's seconds.

        The recorded seconds are wall time on a machine shared with other work, so one run's
        epochs can take several times another's for reasons that are not its own; and in this
        table the hyperparameters do not change the work of an epoch (same models, same data,
        the loss terms cost the same). The median per epoch keeps what is real (the first epoch
        opens the teacher-output cache) and drops the contention."""
        longest = max(len(v) for v in self.seconds.values())
        medians = []
        for e in range(longest):
            column = sorted(v[e] for v in self.seconds.values() if len(v) > e)
            medians.append(column[len(column) // 2] if len(column) % 2 else
                           (column[len(column) // 2 - 1] + column[len(column) // 2]) / 2)
        self.seconds = {k: medians[:len(v)] for k, v in self.seconds.items()}

    def mean_full_seconds(self) -> float:
        """The mean trial-seconds of a full-length run: the budget's unit."""
        full = [sum(self.seconds[k]) for k in self.values if self.completed(*k)]
        return sum(full) / len(full)

    def config_means(self) -> list[float]:
        """Each configuration's final value, averaged over the seeds (the truth a search is judged by)."""
        return [sum(self.final(c, s) for s in self.seeds) / len(self.seeds) for c in range(len(self.configs))]

    def best(self) -> float:
        """The target's reference: the best seed-mean final value of a configuration that completes.
        A mean over the seeds, so that one lucky seed does not set an unreachable target."""
        means = self.config_means()
        return max(m for c, m in enumerate(means) if all(self.completed(c, s) for s in self.seeds))


def read_curves(path: str | Path) -> Curves:
    """Read a table written by :func:`record` (gzip or plain CSV)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        first = f.readline()
        meta = json.loads(first[1:]) if first.startswith("#") else {}
        if not first.startswith("#"):
            f.seek(0)
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing columns {', '.join(missing)} (expected {', '.join(COLUMNS)})")
    params = tuple(c for c in COLUMNS[1:5])
    configs: dict[int, dict[str, Any]] = {}
    values: dict[tuple[int, int], list[float]] = {}
    seconds: dict[tuple[int, int], list[float]] = {}
    diverged: dict[tuple[int, int], bool] = {}
    seen: set[tuple[int, int, int]] = set()
    for r in sorted(rows, key=lambda r: (int(r["config"]), int(r["seed"]), int(r["epoch"]))):
        c, s = int(r["config"]), int(r["seed"])
        if (c, s, int(r["epoch"])) in seen:
            raise ValueError(f"{path}: config {c} seed {s} epoch {r['epoch']} appears twice")
        seen.add((c, s, int(r["epoch"])))
        configs[c] = {"logit_stand": r["logit_stand"] == "True", "temperature": float(r["temperature"]),
                      "kd_weight": float(r["kd_weight"]), "lr": float(r["lr"])}
        values.setdefault((c, s), []).append(float(r["val_acc1"]))
        seconds.setdefault((c, s), []).append(float(r["seconds"]))
        diverged[(c, s)] = diverged.get((c, s), False) or r["diverged"] == "1"
    if sorted(configs) != list(range(len(configs))):
        raise ValueError(f"{path}: config ids must be 0..{len(configs) - 1}")
    epochs = int(meta.get("epochs") or max(len(v) for v in values.values()))
    return Curves(params, [configs[c] for c in range(len(configs))], values, seconds, diverged, epochs, meta)


def record_run(cfg_values: dict[str, Any], data: Any, teacher: Any) -> list[dict[str, Any]]:
    """One run through kdtune's engine; its epochs as (epoch, val_acc1, seconds, diverged) rows."""
    from kdtune.config import RunConfig
    from kdtune.run import build_engine

    cfg = RunConfig.from_dict(cfg_values, source="curves")
    engine = build_engine(cfg, data, teacher)
    rows = []
    for m in engine.run():
        diverged = not math.isfinite(m["train/loss"])
        value = m["val/acc1"] if math.isfinite(m["val/acc1"]) else 0.0
        rows.append({"epoch": int(m["epoch"]), "val_acc1": round(value, 4),
                     "seconds": round(m["time/epoch_s"], 4), "diverged": int(diverged)})
        if diverged:  # as KDTrainable: a NaN loss never recovers, the trial ends
            break
    return rows


def record(out: Path, seeds: list[int], cache_dir: str, limit: int | None = None,
           log: Callable[[str], None] = print, time_limit: float | None = None) -> Path:
    """Record :data:`GRID` x ``seeds`` into ``out`` (gzip CSV), resuming ``out.partial.csv``.

    Configurations are recorded in a fixed shuffled order, every seed of one before the next, so
    that a recording stopped by ``time_limit`` (seconds) still spans the whole grid: the table
    then holds the configurations whose seeds all finished, renumbered 0..n-1."""
    import torch

    from kdtune.config import RunConfig
    from kdtune.run import load_data, load_teacher

    torch.set_num_threads(1)  # one core, as one trial of a search gets
    configs = grid_configs()[:limit]
    partial = out.with_name(out.name.removesuffix(".gz").removesuffix(".csv") + ".partial.csv")
    done: set[tuple[int, int]] = set()
    if partial.exists():
        with open(partial, newline="") as f:
            for r in csv.DictReader(f):
                done.add((int(r["config"]), int(r["seed"])))
    else:
        with open(partial, "w", newline="") as f:
            csv.DictWriter(f, COLUMNS).writeheader()
    base = {**TASK, "seed": 0, "cache_dir": cache_dir}
    cfg = RunConfig.from_dict(base, source="curves")
    data = load_data(cfg)
    # One teacher for every run (seed 0): the seeds vary the student's initialisation and batch
    # order only, which is the noise a search sees between repeats of one configuration.
    teacher, _ = load_teacher(cfg, data, log=log)
    start = time.perf_counter()
    order = list(range(len(configs)))
    random.Random(0).shuffle(order)
    todo = [(c, s) for c in order for s in seeds if (c, s) not in done]
    for n, (c, s) in enumerate(todo, 1):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            log(f"[curves] time limit: stopping after {n - 1} of {len(todo)} runs")
            break
        rows = record_run({**base, **configs[c], "seed": s}, data, teacher)
        with open(partial, "a", newline="") as f:  # one run's rows at a time: a kill loses one run at most
            w = csv.DictWriter(f, COLUMNS)
            for r in rows:
                w.writerow({"config": c, **configs[c], "seed": s, **r})
        elapsed = time.perf_counter() - start
        log(f"[curves] {n}/{len(todo)} config {c} seed {s}: final {rows[-1]['val_acc1']:.2f} "
            f"({len(rows)} epochs), {elapsed:.0f} s elapsed, ~{elapsed / n * (len(todo) - n):.0f} s left")
    with open(partial, newline="") as f:
        # one row per (configuration, seed, epoch): a run recorded twice (two recorders resuming
        # the same partial file) keeps its first recording
        rows = list({(r["config"], r["seed"], r["epoch"]): r for r in reversed(list(csv.DictReader(f)))}.values())
    runs = {(int(r["config"]), int(r["seed"])) for r in rows}
    complete = [c for c in range(len(configs)) if all((c, s) in runs for s in seeds)]
    renumber = {c: i for i, c in enumerate(complete)}
    rows = [{**r, "config": renumber[int(r["config"])]} for r in rows
            if int(r["config"]) in renumber and int(r["seed"]) in seeds]
    meta = {**TASK, "space": SPACE, "grid": {k: list(v) for k, v in GRID.items()}, "seeds": seeds,
            "configs": len(complete), "of_grid": len(grid_configs()), "teacher_seed": 0, "torch_threads": 1,
            "recorded_with": "kdtune bench --record-curves",
            # the epochs' own seconds, summed: the recording's cost without start-up and contention gaps
            "epoch_seconds_total": round(sum(float(r["seconds"]) for r in rows), 1)}
    write_table(out, rows, meta)
    if len(complete) == len(configs):
        partial.unlink()
    return out



def write_table(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """A gzip CSV table (``COLUMNS``, the ``meta`` comment first), written to a temp file and renamed."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    rows = sorted(rows, key=lambda r: (int(r["config"]), int(r["seed"]), int(r["epoch"])))
    # mtime 0: the same rows give the same bytes (a re-recorded table diffs only where it differs)
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        text = io.TextIOWrapper(gz, newline="", encoding="utf-8")
        text.write("# " + json.dumps(meta) + "\n")
        w = csv.DictWriter(text, COLUMNS)
        w.writeheader()
        w.writerows(rows)
        text.flush()
        text.detach()
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="kdtune bench --record-curves",
                                description="kdtune bench --record-curves OUT: record the learning-curve table "
                                "that kdtune bench --search --replay reads",
                                epilog="examples:\n  kdtune bench --record-curves curves.csv.gz\n"
                                "  kdtune bench --record-curves quick.csv.gz --limit 4 --seeds 0",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record-curves", metavar="OUT", required=True, help="the table to write (.csv.gz)")
    p.add_argument("--seeds", default="0,1", help="student seeds per configuration (default 0,1)")
    p.add_argument("--cache-dir", default=os.environ.get("KDTUNE_CACHE_DIR", "~/.cache/kdtune"),
                   help="teacher cache (the teacher is trained once, 30 epochs, when missing)")
    p.add_argument("--limit", type=int, default=None, help="only the first N configurations (a quick check)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop starting runs after this long and write the configurations finished so far")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    out = Path(args.record_curves)
    if not seeds or not out.name.endswith(".csv.gz") or (args.limit is not None and args.limit < 1):
        print(f"error: --record-curves {args.record_curves!r} must end in .csv.gz, --seeds {args.seeds!r} "
              "must list integers, --limit must be >= 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    record(out, seeds, os.path.expanduser(args.cache_dir), args.limit, log=lambda m: print(m, flush=True),
           time_limit=args.time_limit)
    print(f"[curves] wrote {out} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0
