"""MLflow tracking of a search, done on the driver: a parent run per search, a child run per trial.

Child runs carry the trial's hyperparameters as params (under their own names, nothing else),
one metric point per epoch (``step`` = epoch), tags for the pair, the method and the final
status. A trial's run is found again by its ``kdtune.trial_id`` tag, so a resumed search
continues each trial's own run instead of opening a duplicate, and epochs already logged are
not logged twice.
"""
from __future__ import annotations

import math
import time
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from ray.tune import Callback

from kdtune.search.records import PARENT_TAG, STATUS_TAG, TRIAL_TAG, run_metrics

STATUSES = ("completed", "stopped early", "diverged", "failed", "interrupted")


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def trial_status(last: dict[str, Any] | None, max_epochs: int, error: bool = False) -> str:
    if error:
        return "failed"
    if last and last.get("diverged"):
        return "diverged"
    if last and last.get("training_iteration", 0) >= max_epochs:
        return "completed"
    return "stopped early"


def run_status(status: str) -> str:
    return {"completed": "FINISHED", "stopped early": "FINISHED", "diverged": "FAILED",
            "failed": "FAILED", "interrupted": "KILLED"}[status]


class TrialTracker(Callback):
    """Tune callback that mirrors every trial into an MLflow child run of ``parent_run_id``."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, tags: dict[str, str],
                 max_epochs: int, metric: str, mode: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.tags = tags
        self.max_epochs = max_epochs
        self.metric, self.mode = metric, mode
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.logged: dict[str, int] = {}  # trial id -> last epoch logged
        self.counts = {s: 0 for s in STATUSES}
        self.best: tuple[float, str] | None = None
        self.log_seconds = 0.0  # time spent logging results, to report tracking overhead
        self.results_logged = 0
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # clients hold connections: recreate after unpickling
        state["_experiment_id"] = None
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = experiment_id(self.client, self.experiment)
        return self._experiment_id

    # ------------------------------------------------------------------ runs

    def run_for(self, trial) -> str:
        """The trial's child run: found by tag (after a resume) or created with its params."""
        tid = trial.trial_id
        if tid in self.runs:
            return self.runs[tid]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{tid}'")
        if found:
            run_id = found[0].info.run_id
            epoch = found[0].data.metrics.get("epoch")
            self.logged[tid] = int(epoch) if epoch is not None else 0
        else:
            params = {k: v for k, v in trial.config.items() if v is not None}
            method = str(params.get("method", self.tags.get("method", "")))
            tags = {**self.tags, "method": method, PARENT_TAG: self.parent_run_id, TRIAL_TAG: tid,
                    STATUS_TAG: "running"}
            run = self.client.create_run(self.experiment_id,
                                         run_name=f"{trial.trial_id}-{method}", tags=tags)
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            self.logged[tid] = 0
        self.runs[tid] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self.run_for(trial)
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, STATUS_TAG, "running")

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        start = time.perf_counter()
        tid = trial.trial_id
        run_id = self.run_for(trial)
        epoch = int(result["training_iteration"])
        if epoch > self.logged.get(tid, 0):
            ts = int(time.time() * 1000)
            metrics = [Metric(k, float(v), ts, epoch) for k, v in run_metrics(result, finite=True).items()]
            metrics.append(Metric("epoch", float(epoch), ts, epoch))
            # Asynchronous: the driver goes straight back to scheduling trials.
            self.client.log_batch(run_id, metrics=metrics, synchronous=False)
            self.logged[tid] = epoch
        value = result.get(self.metric)
        if value is not None and math.isfinite(value) and not result.get("diverged"):
            better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
            if better:
                self.best = (float(value), tid)
        self.log_seconds += time.perf_counter() - start
        self.results_logged += 1

    def _finish(self, trials: list, trial, status: str) -> None:
        run_id = self.run_for(trial)
        self.client.set_tag(run_id, STATUS_TAG, status)
        mlflow.flush_async_logging()  # the epoch metrics must land before the run is closed
        self.client.set_terminated(run_id, status=run_status(status))
        self.counts[status] += 1
        last = trial.last_result or {}
        best = f"{self.best[0]:.2f} (trial {self.best[1]})" if self.best else "-"
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        print(f"[kdtune] trial {trial.trial_id} {status} after epoch {last.get('training_iteration', 0)}: "
              f"{self.metric} {last.get(self.metric, float('nan')):.2f} | running {running}, "
              + ", ".join(f"{k} {v}" for k, v in self.counts.items() if v) + f" | best {best}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trials, trial, trial_status(trial.last_result, self.max_epochs))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trials, trial, "failed")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        print(f"[kdtune] trial {trial.trial_id} crashed; retrying from its last checkpoint", flush=True)

    def get_state(self) -> dict[str, Any]:
        return {"runs": self.runs, "logged": self.logged, "counts": self.counts, "best": self.best}

    def set_state(self, state: dict[str, Any]) -> None:
        self.runs, self.logged = state["runs"], state["logged"]
        self.counts, self.best = state["counts"], state["best"]


def close_dangling_runs(client: MlflowClient, experiment: str, parent_run_id: str) -> int:
    """Mark child runs still RUNNING (their trial was interrupted) as KILLED; returns how many."""
    runs = client.search_runs(
        [experiment_id(client, experiment)],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, STATUS_TAG, "interrupted")
        client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
    return len(runs)
