"""MLflow records of a search trial's re-runs (``kdtune train --from-search``).

One summary run per command (``final-<trial>`` or ``rerun-<trial>``, tag ``kdtune.kind =
final-summary``) with a child run per seed (``kdtune.kind = final``, or ``rerun`` without
``--final``). Each seed's run is opened before it trains and closed after it (so its duration is
the training's), carries the full configuration as params and ``run.yaml``, one point per epoch
of every metric, and ``student.pth``, ``final.json``, ``metrics.jsonl`` and the seed's log. The
summary run holds the mean and standard deviation over the seeds, ``summary.json``, and the ids
of the seed runs (tag ``kdtune.seed_runs``; they are also nested under it in the UI).

The files in the output folder are the record: a failing store never stops a seed. The first
failure is said on one line, and nothing more is sent to that store by this command.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from kdtune.search.records import PARENT_TAG, RUN_FILE, run_metrics

logger = logging.getLogger(__name__)

FINAL_TAG = "kdtune.final_of"  # on a re-run: the trial id it re-runs
SEARCH_TAG = "kdtune.search_run"  # on a re-run: the search's parent run id
SEED_RUNS_TAG = "kdtune.seed_runs"  # on the summary run: its seed runs' ids, comma-separated
ARTIFACTS = ("final.json", "metrics.jsonl", "student.pth", "log.txt")


class FinalTracker:
    """The MLflow side of one ``--from-search`` command (see the module docstring)."""

    def __init__(self, uri: str, experiment: str, search_run_id: str, trial_id: str, final: bool,
                 tags: dict[str, str] | None = None) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
        self.experiment = experiment
        self.kind = "final" if final else "rerun"
        self.tags = {SEARCH_TAG: search_run_id, FINAL_TAG: trial_id, **(tags or {})}
        self.trial_id = trial_id
        self.failed: str | None = None
        self.summary_id: str | None = None
        self.seed_runs: list[str] = []
        self.open: set[str] = set()

    def _do(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # any store error: the files stay the record
            from kdtune.search.preflight import _first_line, shorten

            self.failed = f"{what}: {type(e).__name__}: {_first_line(e)}"
            logger.error(f"error: MLflow logging to {shorten(self.uri)} failed ({self.failed}); every seed's results "
                         f"are still written to its folder, and this command logs nothing more to MLflow")
            return None

    def start(self) -> str | None:
        """The summary run, opened before seed 0."""
        from kdtune.search.tracking import experiment_id

        def create() -> str:
            exp = experiment_id(self.client, self.experiment)
            run = self.client.create_run(exp, run_name=f"{self.kind}-{self.trial_id}",
                                         tags={**self.tags, "kdtune.kind": "final-summary"})
            return run.info.run_id

        self.summary_id = self._do("opening the summary run", create)
        if self.summary_id:
            self.open.add(self.summary_id)
        return self.summary_id

    def start_seed(self, seed: int, config: dict[str, Any]) -> str | None:
        from mlflow.entities import Param

        if self.summary_id is None:
            return None

        def create() -> str:
            exp = self.client.get_run(self.summary_id).info.experiment_id
            run = self.client.create_run(exp, run_name=f"{self.kind}-{self.trial_id}-seed{seed}",
                                         tags={**self.tags, "kdtune.kind": self.kind, PARENT_TAG: self.summary_id})
            rid = run.info.run_id
            self.open.add(rid)
            self.client.log_batch(rid, params=[Param(k, str(v)) for k, v in config.items()])
            self.client.log_dict(rid, config, RUN_FILE)
            return rid

        rid = self._do(f"opening the run of seed {seed}", create)
        if rid:
            self.seed_runs.append(rid)
        return rid

    def epoch(self, rid: str | None, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if rid is None:
            return
        ts, step = int(time.time() * 1000), int(metrics.get("epoch", 0))
        batch = [Metric(k, float(v), ts, step) for k, v in run_metrics(metrics, finite=True).items()]
        self._do(f"logging epoch {step}", self.client.log_batch, rid, metrics=batch)

    def end_seed(self, rid: str | None, out: Path, status: str) -> None:
        """Artifacts, then the run's end (``status``: FINISHED, FAILED or KILLED)."""
        if rid is None:
            return

        def close() -> None:
            for name in ARTIFACTS:
                if (out / name).is_file():
                    self.client.log_artifact(rid, str(out / name))
            self.client.set_terminated(rid, status=status)
            self.open.discard(rid)

        self._do("closing a seed's run", close)

    def end(self, summary: dict[str, Any] | None, summary_file: Path | None, status: str) -> None:
        """The summary run's mean ± std and links, then its end."""
        from mlflow.entities import Metric, RunTag

        if self.summary_id is None:
            return
        rid = self.summary_id

        def close() -> None:
            ts = int(time.time() * 1000)
            metrics = []
            if summary is not None:
                split = summary["split"]
                values = {f"{split}/acc1_mean": summary["mean"], f"{split}/acc1_std": summary["std"],
                          "seeds": float(len(summary["seeds"]))}
                metrics = [Metric(k, float(v), ts, 0) for k, v in values.items() if math.isfinite(v)]
            self.client.log_batch(rid, metrics=metrics, tags=[RunTag(SEED_RUNS_TAG, ",".join(self.seed_runs))])
            if summary_file is not None and summary_file.is_file():
                self.client.log_artifact(rid, str(summary_file))
            self.client.set_terminated(rid, status=status)
            self.open.discard(rid)

        self._do("closing the summary run", close)

    def abandon(self, status: str = "KILLED") -> None:
        """Close every run still open (Ctrl-C, an unexpected error): none stays RUNNING."""
        for rid in list(self.open):
            self._do("closing an interrupted run", self.client.set_terminated, rid, status=status)
            self.open.discard(rid)
