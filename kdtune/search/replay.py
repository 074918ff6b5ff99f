"""Whole searches against a recorded learning-curve table, in simulated time.

The approach of Syne Tune's simulator backend: an event loop with a simulated clock and ``k``
simulated workers drives the *real* decision makers, and only the training is replaced by a
table lookup.

* The searcher is kdtune's :class:`~kdtune.search.searchers.KDOptunaSearch` with Optuna's TPE,
  GP or random sampler (:func:`~kdtune.search.searchers.optuna_sampler`), over the continuous
  space the table was recorded for (stored with it, :data:`kdtune.search.curves.SPACE`). A suggestion is
  snapped to the nearest recorded configuration (per parameter, in log space where the space is
  log), so the objective the searcher sees is the table's, piecewise constant.
* The scheduler is Ray Tune's own object (``ASHAScheduler``, ``HyperBandScheduler``,
  ``MedianStoppingRule``, ``FIFOScheduler``), called as Tune's controller calls it
  (``ray/tune/execution/tune_controller.py``, Ray 2.60): ``on_trial_add`` when a trial is
  created, ``choose_trial_to_run`` when a worker is free, ``on_trial_result`` per epoch (the
  trial's last epoch goes to ``on_trial_complete`` only, as Tune does for a result with
  ``done``), and :meth:`SimController.stop_trial` with Tune's semantics for trials a scheduler
  stops while they are paused.
* Each trial's "training" reads its configuration's curve for one of the table's seeds, drawn at
  random per trial, so the noise between repeats is in the search. An epoch takes the recorded
  seconds of that epoch; a paused trial resumes at its next epoch (checkpoint cost not counted).

Nothing here re-implements a scheduler or a sampler: change Ray or Optuna and the replay
follows.
"""
from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from kdtune.search.curves import Curves

METRIC = "val/acc1"
TIME_ATTR = "training_iteration"


@dataclass(eq=False)  # hashed by identity, as Tune's Trial (HyperBand keys dicts by trial)
class SimTrial:
    """What Tune's schedulers read of a ``ray.tune.experiment.Trial``."""

    trial_id: str
    config: dict[str, Any]
    table_config: int
    seed: int
    status: str = "PENDING"
    is_saving: bool = False
    last_result: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # epochs trained

    def __str__(self) -> str:
        return self.trial_id


class SimController:
    """The part of Tune's ``TuneController`` that schedulers call back into."""

    def __init__(self, scheduler: Any, searcher: Any) -> None:
        self.scheduler, self.searcher = scheduler, searcher
        self.trials: list[SimTrial] = []

    def get_trials(self) -> list[SimTrial]:
        return self.trials

    def get_live_trials(self) -> list[SimTrial]:
        return [t for t in self.trials if t.status not in ("TERMINATED", "ERROR")]

    def stop_trial(self, trial: SimTrial) -> None:
        """Tune's ``stop_trial``: a waiting trial is removed from the scheduler and completed with
        no result for the searcher; a running one completes with its last result for both."""
        if trial.status in ("TERMINATED", "ERROR"):
            return
        if trial.status in ("PENDING", "PAUSED"):
            self.scheduler.on_trial_remove(self, trial)
            self.searcher.on_trial_complete(trial.trial_id)
        else:
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
            self.searcher.on_trial_complete(trial.trial_id, result=trial.last_result)
        trial.status = "TERMINATED"


@dataclass
class Event:
    """One epoch's result as the search saw it."""

    spent: float  # trial-seconds spent by all trials so far, this epoch included
    clock: float  # simulated wall time (k workers)
    trial: int  # index of the trial in creation order
    config: int  # the table's configuration
    epoch: int
    value: float
    completed: bool  # the trial's last epoch of a full-length run


def nearest_config(curves: Curves, config: dict[str, Any]) -> int:
    """The recorded configuration closest to a suggestion: the same categorical choices, then the
    least squared distance over the numeric parameters, each scaled to [0, 1] over the space's range
    (in log where the space is log). On a full grid this is the nearest grid value per parameter."""
    def coord(name: str, value: Any) -> float:
        p = curves.space[name]
        f = math.log if p.get("log") else float
        return (f(value) - f(p["low"])) / (f(p["high"]) - f(p["low"]))

    best, best_d = 0, math.inf
    for i, c in enumerate(curves.configs):
        d = 0.0
        for name in curves.params:
            if curves.space[name]["type"] == "categorical":
                d += 0.0 if c[name] == config[name] else 1e6
            else:
                d += (coord(name, c[name]) - coord(name, config[name])) ** 2
        if d < best_d:
            best, best_d = i, d
    return best


def simulate(curves: Curves, searcher: Any, scheduler: Any, budget: float, workers: int, seed: int,
             max_concurrent: int | None = None, max_trials: int | None = None,
             trials: list[SimTrial] | None = None) -> list[Event]:
    """Run one search until ``budget`` trial-seconds are spent (or no trial is left to run).

    ``max_concurrent`` is Tune's ``max_concurrent_trials`` (a ``ConcurrencyLimiter``): at most that
    many live trials, paused ones included, and as many created ahead of a free worker; without
    it Tune keeps one trial created ahead (``_get_max_pending_trials``), which is what lets
    Hyperband fill a bracket while its trials run. ``trials``, when given, receives the trials
    (their ``status`` at the end: RUNNING ones were cut by the budget)."""
    rng = random.Random(seed)
    ctrl = SimController(scheduler, searcher)
    if trials is not None:
        ctrl.trials = trials
    running: list[tuple[float, int, SimTrial]] = []  # heap of (epoch end on the clock, seq, trial)
    events: list[Event] = []
    spent = clock = 0.0
    seq = 0
    searcher_done = False
    index = {}
    max_pending = max_concurrent or 1

    def start(trial: SimTrial, now: float) -> None:
        nonlocal seq
        trial.status = "RUNNING"
        seconds = curves.seconds[(trial.table_config, trial.seed)][trial.epoch]
        seq += 1
        heapq.heappush(running, (now + seconds, seq, trial))

    def add_trials() -> None:
        nonlocal searcher_done
        while not searcher_done and spent < budget and (max_trials is None or len(ctrl.trials) < max_trials):
            live = ctrl.get_live_trials()
            if sum(t.status == "PENDING" for t in live) >= max_pending or (
                    max_concurrent is not None and len(live) >= max_concurrent):
                return
            trial_id = f"t{len(ctrl.trials):04d}"
            config = searcher.suggest(trial_id)
            if config is None:  # a finished searcher gives None
                searcher_done = searcher.is_finished()
                return
            trial = SimTrial(trial_id, config, nearest_config(curves, config), rng.choice(curves.seeds))
            index[trial_id] = len(ctrl.trials)
            ctrl.trials.append(trial)
            scheduler.on_trial_add(ctrl, trial)

    def fill(now: float) -> None:
        # Tune's step: create trials up to the pending limit, then start what the scheduler
        # chooses while workers are free; starting one frees a pending slot, so repeat.
        while True:
            add_trials()
            if len(running) >= workers:
                return
            trial = scheduler.choose_trial_to_run(ctrl)
            if trial is None:
                return
            start(trial, now)

    fill(0.0)
    while running and spent < budget:
        clock, _, trial = heapq.heappop(running)
        key = (trial.table_config, trial.seed)
        e = trial.epoch
        trial.epoch += 1
        spent += curves.seconds[key][e]
        diverged = curves.diverged[key] and trial.epoch == len(curves.values[key])
        done = diverged or trial.epoch >= curves.epochs
        result = {METRIC: curves.values[key][e], TIME_ATTR: trial.epoch, "time_this_iter_s": curves.seconds[key][e],
                  "diverged": float(diverged), "done": done, "trial_id": trial.trial_id}
        events.append(Event(spent, clock, index[trial.trial_id], trial.table_config, trial.epoch, result[METRIC],
                            done and not diverged))
        # Tune: a result with done=True stops the trial without asking the scheduler; otherwise
        # the scheduler decides, and the searcher hears the result unless it is a STOP.
        decision = "STOP" if done else scheduler.on_trial_result(ctrl, trial, result)
        if decision != "STOP":
            searcher.on_trial_result(trial.trial_id, result)
        trial.last_result = result
        if decision == "STOP":
            ctrl.stop_trial(trial)
        elif decision == "PAUSE":
            trial.status = "PAUSED"
        else:
            start(trial, clock)
        fill(clock)
    return events


# ------------------------------------------------------------------ strategies

# name -> (sampler, scheduler): the six, and the median-stopping rule beside them.
STRATEGIES: dict[str, tuple[str, str]] = {
    "random": ("random", "fifo"),
    "random+asha": ("random", "asha"),
    "tpe+asha": ("tpe", "asha"),
    "gp+asha": ("gp", "asha"),
    "hyperband": ("random", "hyperband"),
    "tpe": ("tpe", "fifo"),
    "tpe+median": ("tpe", "median"),
    "gp": ("gp", "fifo"),
}
DEFAULT_STRATEGIES = ("random", "random+asha", "tpe+asha", "gp+asha", "hyperband", "tpe")


def make_searcher(space_dict: dict[str, Any], sampler: str, seed: int, max_epochs: int, name: str) -> Any:
    from kdtune.search.searchers import KDOptunaSearch, optuna_sampler
    from kdtune.search.space import parse_space

    space, problems = parse_space(space_dict)
    assert not problems, problems
    return KDOptunaSearch(space=space.suggest, metric=METRIC, mode="max", sampler=optuna_sampler(sampler, seed),
                          study_name=name, max_epochs=max_epochs)


def make_scheduler(kind: str, max_epochs: int, grace_period: int, reduction_factor: int) -> Any:
    from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, HyperBandScheduler,
                                     MedianStoppingRule)

    common = {"time_attr": TIME_ATTR, "metric": METRIC, "mode": "max"}
    if kind == "asha":
        return ASHAScheduler(max_t=max_epochs, grace_period=grace_period, reduction_factor=reduction_factor,
                             **common)
    if kind == "hyperband":
        return HyperBandScheduler(max_t=max_epochs, reduction_factor=reduction_factor, **common)
    if kind == "median":
        return MedianStoppingRule(grace_period=grace_period, **common)
    return FIFOScheduler()


@dataclass
class Outcome:
    time_to_target: float  # trial-seconds until the incumbent's configuration is within tolerance
    regret: float  # the table's best minus the seed-mean final value of the final incumbent's configuration
    trials: int
    completed: int
    spent: float
    anytime: list[float]  # regret of the incumbent after each budget fraction in FRACTIONS


FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def score(curves: Curves, events: list[Event], target_gap: float, budget: float) -> Outcome:
    """What a user would get from the search: its incumbent is the completed trial with the best
    observed value (one seed's), judged by its configuration's mean over the table's seeds."""
    best = curves.best()
    means = curves.config_means()
    incumbent, observed = None, -math.inf
    reached = math.inf
    anytime = [math.inf] * len(FRACTIONS)
    for ev in events:
        if ev.completed and ev.value > observed:
            incumbent, observed = ev.config, ev.value
            if math.isinf(reached) and best - means[incumbent] <= target_gap + 1e-9:
                reached = ev.spent
        if incumbent is not None:
            for i, frac in enumerate(FRACTIONS):
                if ev.spent <= frac * budget + 1e-9:
                    anytime[i] = best - means[incumbent]
    # after the last event, fractions beyond the spend hold the final incumbent
    final = best - means[incumbent] if incumbent is not None else math.inf
    for i, frac in enumerate(FRACTIONS):
        if events and events[-1].spent <= frac * budget:
            anytime[i] = final
    trials = len({ev.trial for ev in events})
    completed = sum(ev.completed for ev in events)
    return Outcome(reached, final, trials, completed, events[-1].spent if events else 0.0, anytime)


def run_strategy(curves: Curves, strategy: str, seed: int, budget: float, workers: int, grace_period: int,
                 reduction_factor: int, target_gap: float) -> Outcome:
    import numpy as np

    sampler, kind = STRATEGIES[strategy]
    # ASHA with several brackets draws one with numpy's global generator: seed it per search.
    np.random.seed(seed)
    searcher = make_searcher(curves.space, sampler, seed, curves.epochs, f"replay-{strategy}-{seed}")
    scheduler = make_scheduler(kind, curves.epochs, grace_period, reduction_factor)
    # kdtune's searches cap live trials at the workers (max_concurrent_trials); Hyperband pauses
    # trials, which stay live, so its brackets could never fill under that cap (see the driver).
    events = simulate(curves, searcher, scheduler, budget, workers, seed,
                      max_concurrent=None if kind == "hyperband" else workers)
    return score(curves, events, target_gap, budget)


# ------------------------------------------------------------------ statistics

def median(values: list[float]) -> float:
    """The median, counting ``inf`` (never reached) as larger than anything."""
    s = sorted(values)
    n = len(s)
    if n % 2:
        return s[n // 2]
    lo, hi = s[n // 2 - 1], s[n // 2]
    return hi if math.isinf(hi) else (lo + hi) / 2


def bootstrap(values: list[float], stat: Callable[[list[float]], float] = median, n: int = 2000,
              level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (nearest rank, so inf is fine)."""
    rng = random.Random(seed)
    stats = sorted(stat([rng.choice(values) for _ in values]) for _ in range(n))
    lo = stats[int(math.floor((1 - level) / 2 * (n - 1)))]
    hi = stats[int(math.ceil((1 + level) / 2 * (n - 1)))]
    return lo, hi


def ratio_interval(a: list[float], b: list[float], n: int = 2000, level: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
    """median(a) / median(b) and its percentile bootstrap interval (a and b resampled apart)."""
    rng = random.Random(seed)

    def ratio(x: list[float], y: list[float]) -> float:
        mx, my = median(x), median(y)
        return math.inf if math.isinf(mx) or my == 0 else (0.0 if math.isinf(my) else mx / my)

    stats = sorted(ratio([rng.choice(a) for _ in a], [rng.choice(b) for _ in b]) for _ in range(n))
    lo = stats[int(math.floor((1 - level) / 2 * (n - 1)))]
    hi = stats[int(math.ceil((1 + level) / 2 * (n - 1)))]
    return ratio(a, b), lo, hi


# ------------------------------------------------------------------ rung fidelity

def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else math.nan


def decay_epochs(curves: Curves) -> list[int]:
    """The epochs after which the step schedule decays (the engine's scaling of 150/180/210 of 240)."""
    from kdtune.engine import Recipe

    if curves.meta.get("schedule", "step") != "step":
        return []
    return [round(m * curves.epochs / 240) for m in Recipe.lr_decay_epochs]


def rung_fidelity(curves: Curves, top: int = 10, keep: float = 1 / 3) -> list[dict[str, Any]]:
    """Per epoch: Spearman's rho of the runs' values at that epoch against their final values, and
    how many of the ``top`` runs at the end survive a cut to the best ``keep`` share at that epoch
    (what ASHA with reduction factor 3 does at a rung). Runs = (configuration, seed) pairs that
    completed; each seed is a run of its own, as a trial is."""
    runs = [k for k in curves.values if curves.completed(*k)]
    final = [curves.values[k][-1] for k in runs]
    best_end = set(sorted(range(len(runs)), key=lambda i: -final[i])[:top])
    first = min(decay_epochs(curves), default=curves.epochs)
    out = []
    for e in range(1, curves.epochs + 1):
        at = [curves.values[k][e - 1] for k in runs]
        kept = set(sorted(range(len(runs)), key=lambda i: -at[i])[:max(1, round(keep * len(runs)))])
        out.append({"epoch": e, "phase": "before" if e <= first else "after", "rho": spearman(at, final),
                    "kept": len(best_end & kept), "top": len(best_end), "runs": len(runs)})
    return out


def fidelity_report(curves: Curves, top: int = 10) -> str:
    rows = rung_fidelity(curves, top)
    decays = decay_epochs(curves)
    lines = [f"rung fidelity: {rows[0]['runs']} completed runs, step decays after epochs "
             f"{', '.join(map(str, decays)) or 'none'} of {curves.epochs}",
             f"| epoch | phase | Spearman rho vs final | top {top} at the end kept by a top-third cut |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['phase']} the first decay | {r['rho']:.2f} | {r['kept']}/{r['top']} |")
    for phase in ("before", "after"):
        rhos = [r["rho"] for r in rows if r["phase"] == phase and r["epoch"] < curves.epochs]
        if rhos:
            lines.append(f"mean rho {phase} the first decay (final epoch excluded): {sum(rhos) / len(rhos):.2f} "
                         f"over {len(rhos)} epochs")
    return "\n".join(lines)


# ------------------------------------------------------------------ command

def main(argv: list[str] | None = None) -> int:
    """``kdtune bench --search --replay TABLE``."""
    import argparse
    import sys
    import time
    import warnings

    p = argparse.ArgumentParser(prog="kdtune bench --search --replay",
                                description="kdtune bench --search --replay: whole searches against a recorded "
                                "learning-curve table, in simulated time, with Ray Tune's schedulers and kdtune's "
                                "Optuna searchers",
                                epilog="examples:\n  kdtune bench --search --replay digits\n"
                                "  kdtune bench --search --replay digits --strategies tpe+asha,random --seeds 5\n"
                                "  kdtune bench --search --replay curves.csv.gz --fidelity",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--search", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--replay", metavar="TABLE", required=True,
                   help="a table from `kdtune bench --record-curves` ('digits': the one shipped with kdtune)")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help=f"comma-separated, from {', '.join(STRATEGIES)} (default: {','.join(DEFAULT_STRATEGIES)})")
    p.add_argument("--seeds", type=int, default=20, help="searches per strategy (default 20)")
    p.add_argument("--budget", type=float, default=16.0,
                   help="trial-seconds per search, in full-length trials of the table's mean duration (default 16)")
    p.add_argument("--workers", type=int, default=4, help="simulated concurrent trials (default 4)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA's and the median rule's (default 1)")
    p.add_argument("--reduction-factor", type=int, default=3, help="ASHA's and Hyperband's (default 3)")
    p.add_argument("--tolerance", type=float, default=0.5, help="pp below the table's best that counts as reached")
    p.add_argument("--seconds", choices=("median", "recorded"), default="median",
                   help="what an epoch costs: the median over the table's runs of that epoch's seconds (default; "
                   "robust to a shared machine's contention), or each run's own recorded seconds")
    p.add_argument("--jobs", type=int, default=1,
                   help="searches run at once, in processes (default 1; GP's suggestions cost seconds each)")
    p.add_argument("--fidelity", action="store_true",
                   help="print only the rung fidelity: Spearman rho of each epoch's values against the final ones")
    args = p.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    problems = []
    if unknown:
        problems.append(f"--strategies: unknown {', '.join(unknown)} (expected some of {', '.join(STRATEGIES)})")
    for flag, value, low in (("--seeds", args.seeds, 1), ("--workers", args.workers, 1), ("--jobs", args.jobs, 1),
                             ("--grace-period", args.grace_period, 1),
                             ("--reduction-factor", args.reduction_factor, 2)):
        if value < low:
            problems.append(f"{flag}: expected an integer >= {low}, but got {value}")
    if not args.budget > 0 or not args.tolerance >= 0:
        problems.append("--budget must be > 0 and --tolerance >= 0")
    table = shipped_table() if args.replay == "digits" else args.replay
    from kdtune.search.curves import read_curves
    try:
        curves = read_curves(table)
    except (OSError, ValueError, KeyError) as e:
        problems.append(f"--replay {args.replay}: {e}")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    # Optuna's samplers run inside the define-by-run space, and Tune warns when that takes > 1 s
    # (GP's acquisition optimisation does); here it is the point of the exercise.
    if args.fidelity:
        print(fidelity_report(curves))
        return 0
    if args.seconds == "median":
        curves.use_median_seconds()
    warnings.filterwarnings("ignore", message="Define-by-run function passed")
    full = curves.mean_full_seconds()
    budget = args.budget * full
    best = curves.best()
    print(f"replay of {table}: {len(curves.configs)} configurations x {len(curves.seeds)} seeds, "
          f"{curves.epochs} epochs; best seed-mean final val/acc1 {best:.2f}, target >= {best - args.tolerance:.2f} "
          f"({sum(m >= best - args.tolerance - 1e-9 for m in curves.config_means())} configurations reach it)")
    print(f"budget {args.budget:g} full trials = {budget:.0f} trial-s per search ({full:.1f} s per full trial, "
          f"{args.seconds} epoch seconds), "
          f"{args.workers} workers, ASHA grace {args.grace_period} rf {args.reduction_factor}, {args.seeds} seeds\n",
          flush=True)
    outcomes: dict[str, list[Outcome]] = {}
    settings = (table, args.seconds, budget, args.workers, args.grace_period, args.reduction_factor, args.tolerance)
    pool = None
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.jobs, initializer=_job_init, initargs=settings[:2])
    try:
        for s in strategies:
            start = time.perf_counter()
            if pool is None:
                outcomes[s] = [run_strategy(curves, s, seed, *settings[2:]) for seed in range(args.seeds)]
            else:
                outcomes[s] = list(pool.map(_job, [(s, seed, *settings[2:]) for seed in range(args.seeds)]))
            print(f"[replay] {s}: {args.seeds} searches in {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    print()
    print(report(outcomes, full, args.tolerance))
    return 0


_CURVES: Curves | None = None  # a job process's table, read once


def _job_init(table: str, seconds: str) -> None:
    global _CURVES
    import warnings

    from kdtune.search.curves import read_curves

    warnings.filterwarnings("ignore", message="Define-by-run function passed")
    _CURVES = read_curves(table)
    if seconds == "median":
        _CURVES.use_median_seconds()


def _job(task: tuple) -> Outcome:
    return run_strategy(_CURVES, *task)


def report(outcomes: dict[str, list[Outcome]], full: float, tolerance: float) -> str:
    """The results as a Markdown table (pasted into docs/search-efficiency.md as printed)."""
    lines = ["| strategy | reached | trial-s to target, median [95% CI] | in full trials | final regret pp, median "
             "[95% CI] | regret at 1/8, 1/4, 1/2 budget (median) | trials | completed |",
             "|---|---|---|---|---|---|---|---|"]
    for s, outs in outcomes.items():
        times = [o.time_to_target for o in outs]
        regrets = [o.regret for o in outs]
        t, (tlo, thi) = median(times), bootstrap(times)
        r, (rlo, rhi) = median(regrets), bootstrap(regrets)
        anytime = ", ".join(f"{median([o.anytime[i] for o in outs]):.2f}" for i in range(len(FRACTIONS) - 1))
        lines.append(f"| {s} | {sum(math.isfinite(x) for x in times)}/{len(times)} | {_num(t)} [{_num(tlo)}, "
                     f"{_num(thi)}] | {_num(t / full, 1)} | {r:.2f} [{rlo:.2f}, {rhi:.2f}] | {anytime} | "
                     f"{median([o.trials for o in outs]):.0f} | {median([o.completed for o in outs]):.0f} |")
    lines.append(f"\n(target: within {tolerance:g} pp of the table's best; a search that never reached it counts as "
                 "infinite; intervals: percentile bootstrap of the median, 2000 resamples)")
    base = outcomes.get("random")
    if base:
        for s, outs in outcomes.items():
            if s == "random":
                continue
            ratio, lo, hi = ratio_interval([o.time_to_target for o in outs], [o.time_to_target for o in base])
            goal = " (goal <= 0.33)" if s == "tpe+asha" else ""
            lines.append(f"{s} / random, median trial-s to target: {_num(ratio, 2)} [{_num(lo, 2)}, {_num(hi, 2)}]"
                         f"{goal}")
    return "\n".join(lines)


def _num(x: float, digits: int = 0) -> str:
    return "never" if math.isinf(x) else f"{x:.{digits}f}"


def shipped_table() -> str:
    """The digits table recorded with kdtune and shipped in the package."""
    from pathlib import Path

    return str(Path(__file__).parent / "data" / "curves_digits.csv.gz")
