"""What a person watching a search sees: a line when a trial starts and when it ends, and a status
line at a steady pace (counts, best so far with its configuration, each running trial's epoch and
metric, elapsed time and an ETA).

Plain lines only (no cursor movement or colour), so a terminal and a redirected log read the
same. Everything is computed from Tune's trial list, so the lines stay right after ``--resume``.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, TextIO

from ray.tune import Callback

from kdtune.search.records import STATUSES, fmt, fmt_config, fmt_objective, is_better, trial_status

logger = logging.getLogger(__name__)


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress(Callback):
    """Tune callback printing kdtune's progress lines (to stdout by default)."""

    def __init__(self, total: int, max_epochs: int, metric: str, mode: str, every_s: float = 30.0,
                 stream: TextIO | None = None, objectives: tuple[tuple[str, str], ...] = ()) -> None:
        self.total, self.max_epochs = total, max_epochs
        self.metric, self.mode = metric, mode
        # search.objectives: a trial's end line shows every objective; "best" stays the first's
        self.objectives = tuple(objectives)
        self.every_s = every_s
        self.stream = stream
        self.start = time.monotonic()
        self.last_status = self.start
        self.seen: set[str] = set()  # trials started at least once
        # trials whose next start continues from a checkpoint after a crash or a --resume (another
        # start of a seen trial is a scheduler's pause ending, Hyperband's or PBT's: not news)
        self.continuing: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stream": None}  # Tune pickles callbacks into its experiment state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.pop("started", None)  # the count an experiment state saved by an earlier kdtune holds
        self.__dict__.update({"seen": set(), **state})
        self.continuing = set(self.seen)  # unpickled: a resumed search, whose trials continue

    def setup(self, **info: Any) -> None:
        self.start = self.last_status = time.monotonic()  # a resumed search counts from its restart

    def say(self, text: str) -> None:
        if self.stream is not None:  # a stream of its own (tests): the lines as the handler prints them
            print(f"[kdtune] {text}", file=self.stream, flush=True)
        else:
            logger.info(text)

    # ------------------------------------------------------------------ events

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        # Tune starts a trial again after a crash (a retry) and after --resume: that is not a
        # new trial, so it is not counted again.
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        tid = trial.trial_id
        restarted = tid in getattr(self, "continuing", set()) or (epochs and tid not in self.seen)
        paused = tid in self.seen and not restarted
        self.seen.add(tid)
        self.__dict__.setdefault("continuing", set()).discard(tid)
        if paused:
            return
        if restarted:
            self.say(f"trial {trial.trial_id} restarted from its checkpoint after epoch {epochs}" if epochs else
                     f"trial {trial.trial_id} restarted from its first epoch")
            return
        # counted by id: a resumed search's earlier trials (with results) included
        started = len(self.seen | {t.trial_id for t in trials if (t.last_result or {}).get("training_iteration")})
        config = {k: v for k, v in trial.config.items() if v is not None}
        self.say(f"trial {trial.trial_id} started ({started} of {self.total}): {fmt_config(config) or '-'}")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.__dict__.setdefault("continuing", set()).add(trial.trial_id)
        self.say(f"trial {trial.trial_id} crashed; retrying from its last checkpoint "
                 f"(its error: {trial.path}/error.txt)")

    def _ended(self, trials: list, trial, status: str) -> None:
        last = trial.last_result or {}
        value = last.get(self.metric, math.nan)
        shown = "-" if status == "diverged" else f"{value:.2f}"
        for metric, _ in getattr(self, "objectives", ())[1:]:
            other = last.get(metric)
            shown += f", {metric} " + ("-" if status == "diverged" or not isinstance(other, (int, float))
                                       else fmt_objective(metric, other))
        best = self.best(trials, ended=trial)
        self.say(f"trial {trial.trial_id} {status} after epoch {last.get('training_iteration', 0)}: "
                 f"{self.metric} {shown} | best {self._best_text(best)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._ended(trials, trial, trial_status(trial.last_result, self.max_epochs))

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = trial.last_result or {}
        self.say(f"trial {trial.trial_id} failed after epoch {last.get('training_iteration', 0)} | "
                 f"best {self._best_text(self.best(trials))}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self.last_status >= self.every_s:
            self.last_status = now
            self.say(self.status_line(trials, now - self.start))

    # ------------------------------------------------------------------ the status line

    def statuses(self, trials: list) -> dict[str, int]:
        counts = {"running": 0, **{s: 0 for s in STATUSES if s != "interrupted"}}
        for t in trials:
            if t.status == "RUNNING":
                counts["running"] += 1
            elif t.status in ("TERMINATED", "ERROR"):
                counts[trial_status(t.last_result, self.max_epochs, error=t.status == "ERROR")] += 1
        return counts

    def best(self, trials: list, ended=None) -> tuple[float, Any] | None:
        """The best finished trial by the objective (its metric at its last epoch); ``ended`` is a
        trial that has just ended normally (Tune marks it TERMINATED after the callbacks ran)."""
        best = None
        for t in trials:
            if t.status != "TERMINATED" and t is not ended:
                continue
            last = t.last_result or {}
            value = last.get(self.metric)
            if (value is None or last.get("diverged") or not math.isfinite(value)
                    or not is_better(value, None if best is None else best[0], self.mode)):
                continue
            best = (float(value), t)
        return best

    def _best_text(self, best: tuple[float, Any] | None) -> str:
        if best is None:
            return "-"
        value, t = best
        config = {k: v for k, v in t.config.items() if v is not None}
        return f"{value:.2f} (trial {t.trial_id}: {fmt_config(config)})"

    def status_line(self, trials: list, elapsed: float) -> str:
        c = self.statuses(trials)
        done = c["completed"] + c["stopped early"] + c["failed"] + c["diverged"]
        running = [t for t in trials if t.status == "RUNNING"]
        now = ", ".join(f"{t.trial_id} epoch {(t.last_result or {}).get('training_iteration', 0)}"
                        + (f" {fmt(float(t.last_result[self.metric]))}" if self.metric in (t.last_result or {}) else "")
                        for t in running)
        # ETA: the rate so far (finished trials, plus running ones by the share of their epochs done)
        progress = done + sum((t.last_result or {}).get("training_iteration", 0) / self.max_epochs for t in running)
        eta = clock(elapsed * (self.total - progress) / progress) if progress > 0 else "?"
        return (f"status {clock(elapsed)} elapsed | {c['running']} running, {c['completed']} completed, {c['stopped early']} stopped, "
                f"{c['failed']} failed, {c['diverged']} diverged of {self.total} | "
                f"best {self._best_text(self.best(trials))} | "
                f"{'now: ' + now if now else 'none running'} | ETA {eta}")
