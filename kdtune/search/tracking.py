"""MLflow tracking of a search, done on the driver: a parent run per search, a child run per trial.

Child runs carry the trial's hyperparameters as params (under their own names, nothing else),
one metric point per epoch (``step`` = epoch; no metric takes a param's name, so the scheduled
learning rate is ``train/lr``), the trial's full run configuration as ``run.yaml``, tags for the
pair, the method and the final status, and when the trial ends its objective as the metric
``objective`` (see :data:`kdtune.search.records.OBJECTIVE`), the one number to sort runs by. A trial's run is found again by its ``kdtune.trial_id`` tag, so a resumed search
continues each trial's own run instead of opening a duplicate, and epochs already logged are
not logged twice.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from ray.tune import Callback

from kdtune.search.pbt import METRIC_PREFIX as PBT_PREFIX
from kdtune.search.records import (NOT_METRICS, OBJECTIVE_METRIC, PARENT_TAG, RUN_FILE, STATUS_TAG, STATUSES,
                                   TRIAL_TAG, is_better, run_metrics, sqlite_file, trial_status)


# MLflow 3 opens an experiment without this tag on its GenAI view; a search is model development.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, tags=EXPERIMENT_KIND,
                                    artifact_location=artifact_location(client.tracking_uri, name))


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its runs' files (the space file, each trial's ``run.yaml``, the
    results table): beside a SQLite store, in ``<its folder>/mlruns/<experiment>``, so that they
    stay with the store whichever folder a search or a final run started from (MLflow's default
    is ``./mlruns`` of the working directory). None for other stores: a tracking server, or a
    file store, keeps them where it is configured to. Runs live in folders named by their ids, so
    two experiment names that map to one folder name share it harmlessly."""
    db = sqlite_file(tracking_uri)
    return None if db is None else (db.resolve().parent / "mlruns" / re.sub(r"[^\w.-]", "_", experiment)).as_uri()


BEST_SO_FAR_METRIC = "best_objective"  # on a search's parent run: one point per ended trial


def trials_url(client: MlflowClient, experiment: str, parent_run_id: str, mode: str,
               ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's runs table opened on this search's trials only, best objective first
    (MLflow's URL parameters searchFilter, orderByKey and orderByAsc)."""
    from urllib.parse import quote

    query = (f"searchFilter={quote(f'tags.`{PARENT_TAG}` = {chr(39)}{parent_run_id}{chr(39)}', safe='')}"
             f"&orderByKey={quote('metrics.`objective`', safe='')}&orderByAsc={'true' if mode == 'min' else 'false'}")
    return f"{runs_table_url(client, experiment, ui)}?{query}"


def runs_table_url(client: MlflowClient, experiment: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table in the MLflow UI (``mlflow ui`` serves on port 5000 by default;
    a tracking server's own address when the tracking URI is one)."""
    uri = client.tracking_uri
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui
    return f"{base}/#/experiments/{experiment_id(client, experiment)}/runs"


def version_tags() -> dict[str, str]:
    """kdtune's version and, from a git checkout, its commit (MLflow's own tag name for it)."""
    from importlib import metadata

    from kdtune.versions import git_commit

    tags = {}
    try:
        tags["kdtune.version"] = metadata.version("kdtune")
    except metadata.PackageNotFoundError:
        tags["kdtune.version"] = "unknown"
    git = git_commit()
    if git is not None:
        tags["mlflow.source.git.commit"], dirty = git
        tags["kdtune.git_dirty"] = str(dirty).lower()
    return tags


def start_parent_run(client: MlflowClient, spec, tags: dict[str, str], teacher: dict | None,
                     opened=None) -> str:
    """The search's parent run: tags, the fixed configuration as params (the children's params are
    the searched ones), the spec file and the resolved spec, the teacher. ``opened(client, run_id)``
    is called as soon as the run exists (the driver then closes it if anything later fails)."""
    exp = experiment_id(client, spec.name)
    # several objectives: named in a tag of their own (the first is also kdtune.objective, the metric
    # each child run's `objective` holds); the front is tagged when the search ends
    objectives = ({"kdtune.objectives": ", ".join(f"{m} ({d})" for m, d in spec.objectives)}
                  if getattr(spec, "objectives", ()) else {})
    parent = client.create_run(exp, run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={**tags, "kdtune.kind": "search", "kdtune.algorithm": spec.algorithm,
                                     "kdtune.objective": f"{spec.metric} ({spec.mode}) at the last epoch trained",
                                     **objectives, "mlflow.note.content": OBJECTIVE_NOTE.format(metric=spec.metric)})
    parent_id = parent.info.run_id
    if opened is not None:
        opened(client, parent_id)
    client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in spec.fixed.items()])
    client.log_artifact(parent_id, spec.path)
    client.log_dict(parent_id, spec.resolved, "spec.yaml")
    if teacher is not None:
        client.log_dict(parent_id, teacher, "teacher.json")
        # the teacher's accuracy and the teacher-output cache the driver built (kdtune.teacher_cache)
        for key in ("val_acc", "teacher_cache/size_mb", "teacher_cache/build_s"):
            if isinstance(teacher.get(key), (int, float)):
                client.log_metric(parent_id, "teacher/val_acc" if key == "val_acc" else key, float(teacher[key]))
    return parent_id


OBJECTIVE_NOTE = ("kdtune search. Objective of every trial: {metric} at the last epoch it trained; each child "
                  "run's `objective` metric holds it (sort the runs table by it). Params here are the fixed "
                  "configuration, the children's params the searched hyperparameters.")


def run_status(status: str) -> str:
    return {"completed": "FINISHED", "stopped early": "FINISHED", "diverged": "FAILED",
            "failed": "FAILED", "interrupted": "KILLED"}[status]


class TrialTracker(Callback):
    """Tune callback that mirrors every trial into an MLflow child run of ``parent_run_id``."""

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, tags: dict[str, str],
                 max_epochs: int, metric: str, mode: str, run_config=None,
                 objectives: tuple[tuple[str, str], ...] = (), mutate: tuple[str, ...] = ()) -> None:
        self.tracking_uri = tracking_uri
        # scheduler pbt / pb2: the parameters a trial may change mid-run, logged each epoch
        # (pbt/<name>: the value it trained with) and, when it ends, its exploits (a tag)
        self.mutate = tuple(mutate)
        self.objectives = tuple(objectives)  # search.objectives: (metric, mode) pairs; () for one objective
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.tags = tags
        self.max_epochs = max_epochs
        self.metric, self.mode = metric, mode
        self.run_config = run_config  # trial config -> its full resolved run settings (a flat dict)
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.logged: dict[str, int] = {}  # trial id -> last epoch logged
        self.counts = {s: 0 for s in STATUSES}
        self.best: tuple[float, str] | None = None
        self.log_seconds = 0.0  # time spent logging results, to report tracking overhead
        self.results_logged = 0
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        # Made in this process for a new search: a trial it has no run for has none in MLflow
        # either, so none is searched for. An unpickled tracker (a restored search) searches.
        self._fresh = True
        self._created: set[str] = set()  # runs this process created (RUNNING and tagged already)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # clients hold connections: recreate after unpickling
        state["_experiment_id"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a restored search: its runs may exist in MLflow already (and a state pickled by an
        # earlier kdtune may lack these keys)
        self.__dict__.update({"mutate": (), "objectives": (), **state, "_fresh": False, "_created": set()})

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
            if tid not in self.logged:  # restored: MLflow, not the snapshot, knows what was logged
                self.logged[tid] = self.last_logged_epoch(self.runs[tid])
            return self.runs[tid]
        parent = self.parent_for(trial)
        found = [] if self._fresh else self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent}' and tags.`{TRIAL_TAG}` = '{tid}'")
        if found:
            run_id = found[0].info.run_id
            self.logged[tid] = self.last_logged_epoch(run_id)
        else:
            params = {k: v for k, v in trial.config.items() if v is not None}
            method = str(params.get("method", self.tags.get("method", "")))
            tags = {**self.tags, "method": method, PARENT_TAG: parent, TRIAL_TAG: tid,
                    STATUS_TAG: "running", **self.extra_tags(trial)}
            run = self.client.create_run(self.experiment_id,
                                         run_name=f"{trial.trial_id}-{method}", tags=tags)
            run_id = run.info.run_id
            self._created.add(run_id)
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            self.save_run_config(run_id, trial)
            self.logged[tid] = 0
        self.runs[tid] = run_id
        return run_id

    def parent_for(self, trial) -> str:
        """The run a trial's run is nested under: the search's (kdtune.search.confirm nests a
        confirmation under the trial it confirms)."""
        return self.parent_run_id

    def extra_tags(self, trial) -> dict[str, str]:
        return {}

    def last_logged_epoch(self, run_id: str) -> int:
        return max((m.step for m in self.client.get_metric_history(run_id, "train/loss")), default=0)

    def save_run_config(self, run_id: str, trial) -> None:
        """The trial's full run configuration, in its MLflow run and its folder (``run.yaml``):
        what ``kdtune train --from-search`` re-runs."""
        if self.run_config is None:
            return
        import yaml

        flat = self.run_config({k: v for k, v in trial.config.items() if v is not None})
        self.client.log_dict(run_id, flat, RUN_FILE)
        path = getattr(trial, "path", None)
        if path and "://" not in str(path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / RUN_FILE).write_text(yaml.safe_dump(flat, sort_keys=False))

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        known = trial.trial_id in self.runs
        run_id = self.run_for(trial)
        if known or run_id not in self._created:  # a run made now is RUNNING, tagged running
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
            metrics += [Metric(f"{PBT_PREFIX}{name}", float(trial.config[name]), ts, epoch)
                        for name in self.mutate if isinstance(trial.config.get(name), (int, float))]
            # Synchronous, a few ms of SQLite: MLflow's asynchronous logging costs more, because
            # closing a run (set_terminated) joins its logging thread, which polls its queue once a
            # second; that stalled Tune's loop about a second per trial (kdtune bench --overhead).
            self.client.log_batch(run_id, metrics=metrics)
            self.logged[tid] = epoch
        value = result.get(self.metric)
        if value is not None and math.isfinite(value) and not result.get("diverged"):
            if is_better(value, None if self.best is None else self.best[0], self.mode):
                self.best = (float(value), tid)
        self.log_seconds += time.perf_counter() - start
        self.results_logged += 1

    def _finish(self, trials: list, trial, status: str) -> None:
        run_id = self.run_for(trial)
        last = trial.last_result or {}
        value = last.get(self.metric)
        objective = []
        if status not in ("failed", "diverged") and value is not None and math.isfinite(value):
            # the objective: the metric at the last epoch trained (records.OBJECTIVE)
            epochs = int(last.get("training_iteration", 0))
            objective = [Metric(OBJECTIVE_METRIC, float(value), int(time.time() * 1000), epochs)]
            # An objective that is Tune's bookkeeping (time_total_s) is no per-epoch metric of the
            # run: its final value is logged here, under its own name, so MLflow has every objective.
            objective += [Metric(m, float(last[m]), int(time.time() * 1000), epochs)
                          for m, _ in self.objectives if m in NOT_METRICS
                          and isinstance(last.get(m), (int, float)) and math.isfinite(last[m])]
        tags = [RunTag(STATUS_TAG, status)]
        if self.mutate:
            from kdtune.search.pbt import HISTORY_TAG, history_text, original_tags, trial_history

            # MLflow caps a tag's value (5,000 characters in MLflow 2); the results table has it all
            text = history_text(trial_history(trial, original_tags(trials), list(self.mutate)))
            tags.append(RunTag(HISTORY_TAG, (text or "none")[:5000]))
        self.client.log_batch(run_id, metrics=objective, tags=tags)
        self.client.set_terminated(run_id, status=run_status(status))
        self.counts[status] += 1
        if self.best_series:
            self.log_best_so_far(value if status not in ("failed", "diverged") else None)

    # On the parent run: the best objective after each ended trial (step: trials ended), so that
    # its row in the runs table, and its metric chart, tell the search's story unexpanded.
    best_series = True

    def log_best_so_far(self, value: float | None) -> None:
        best = getattr(self, "best_objective", None)
        if value is not None and math.isfinite(value) and is_better(value, best, self.mode):
            best = self.best_objective = float(value)
        if best is not None:
            self.client.log_metric(self.parent_run_id, BEST_SO_FAR_METRIC, best, step=sum(self.counts.values()))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trials, trial, trial_status(trial.last_result, self.max_epochs))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trials, trial, "failed")

    def get_state(self) -> dict[str, Any]:
        return {"runs": self.runs, "logged": self.logged, "counts": self.counts, "best": self.best,
                "best_objective": getattr(self, "best_objective", None)}

    def set_state(self, state: dict[str, Any]) -> None:
        # The snapshot's epoch counts can be behind MLflow (results logged after it was taken,
        # before a crash or Ctrl-C): each restored trial reads its count back from its run.
        self.runs, self.logged = state["runs"], {}
        self.counts, self.best = state["counts"], state["best"]
        self.best_objective = state.get("best_objective")


def child_runs(client: MlflowClient, experiment: str, parent_run_id: str, where: str = "") -> list:
    """The trial runs of one search (``where``: more of MLflow's filter), up to MLflow's 50,000 a query."""
    condition = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" + (f" and {where}" if where else "")
    return client.search_runs([experiment_id(client, experiment)], filter_string=condition, max_results=50000)


def ended_trials(client: MlflowClient, experiment: str, parent_run_id: str) -> set[str]:
    """The trials whose end the tracker recorded (every status but "interrupted"). On Ctrl-C Tune
    marks the trials it stops TERMINATED as well, as if they had ended, without telling the
    callbacks: those trials are not in this set."""
    ended = set(STATUSES) - {"interrupted"}
    return {run.data.tags[TRIAL_TAG] for run in child_runs(client, experiment, parent_run_id)
            if run.data.tags.get(STATUS_TAG) in ended}


def close_dangling_runs(client: MlflowClient, experiment: str, parent_run_id: str) -> int:
    """Mark child runs still RUNNING (their trial was interrupted) as KILLED; returns how many."""
    runs = child_runs(client, experiment, parent_run_id, "attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, STATUS_TAG, "interrupted")
        client.set_terminated(run.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
    return len(runs)
