"""What a search records and where: shared by the search driver, its MLflow callback and the
analysis loaders. Kept free of Ray and MLflow imports, so a bad config still exits at once."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

STATE_FILE = "kdtune_search.json"  # in <storage>/<name>: the parent run id and tracking URI
# MLflow tags kdtune sets on a search's runs.
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "kdtune.trial_id"
STATUS_TAG = "kdtune.status"
# What a diverged trial reports in place of NaN/inf (searchers need a number).
PENALTY = 1e6
RESULTS_FILE = "results.csv"  # in <storage>/<name>: one row per trial, written when a search ends
# Metrics whose last value the results table keeps per trial: a method's or a sampler's own.
LAST_VALUE_PREFIXES = ("kdas/", "ctkd/", "sakd/", "samples/scored")
# Result keys that are Ray Tune bookkeeping, not metrics of the run.
NOT_METRICS = {"done", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "pid",
               "iterations_since_restore", "time_since_restore", "timesteps_total", "episodes_total",
               "timesteps_since_restore", "diverged", "epoch"}


def run_metrics(result: dict[str, Any], finite: bool = False) -> dict[str, float]:
    """The numeric values of a Tune result that are the run's metrics (booleans excluded);
    ``finite`` drops NaN and infinities too (MLflow refuses them)."""
    return {k: v for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and (not finite or math.isfinite(v))}


def default_tracking_uri(cwd: Path | None = None) -> str:
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(given: str | None = None) -> str:
    """The given URI, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
