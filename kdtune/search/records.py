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
BEST_FILE = "best.json"  # in <storage>/<name> and the parent run: the best trial's full run configuration
OPTUNA_FILE = "optuna.db"  # in <storage>/<name>: the Optuna study (SQLite) unless --optuna-storage says otherwise
RUN_FILE = "run.yaml"  # in each trial's folder and MLflow run: the trial's full resolved RunConfig

# ----------------------------------------------------------------------------- the objective
# A search optimises ONE number per trial, and every place uses it: Optuna (its last reported
# intermediate value is the value of a pruned trial), ASHA (which compares trials at a rung by
# the value of that epoch), the results table, each MLflow child run's summary metric, best.json,
# the report and the final re-run.
#
#   objective = the metric at the LAST EPOCH THE TRIAL TRAINED
#
# (for a completed trial the metric after its last epoch, for a stopped one the metric of the
# epoch that stopped it). Why not the best epoch: the saved checkpoint is the last epoch's, and a
# final run (``train --from-search --final``) trains on train+val with no validation split to
# pick an epoch by, so only the last epoch is a value the final model can be held to.
OBJECTIVE = "the search metric at the last epoch the trial trained"
OBJECTIVE_METRIC = "objective"  # the summary metric of every MLflow child run (one point, step = epochs)


def objective_column(metric: str) -> str:
    """The results-table column that holds each trial's objective."""
    return f"final_{metric}"


def objective_value(history: list[float]) -> float:
    """The objective of a trial from its per-epoch values of the search metric (epoch order)."""
    return float(history[-1]) if len(history) else math.nan


def is_better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a > b if mode == "max" else a < b)


# The engine's own per-epoch metrics (kdtune.engine); every other metric an epoch reports is a
# method's or a sampler's own (their ``epoch_metrics()``: KDAS's ratio, CTKD's temperature,
# SAKD's gate rates, a plugin's), whose last value the results table keeps per trial.
ENGINE_METRIC_PREFIXES = ("train/", "val/", "test/", "time/")
ENGINE_METRICS = {"lr", "samples/epoch", "samples/backprop", OBJECTIVE_METRIC}
# Result keys that are Ray Tune bookkeeping, not metrics of the run.
NOT_METRICS = {"done", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "pid",
               "iterations_since_restore", "time_since_restore", "timesteps_total", "episodes_total",
               "timesteps_since_restore", "diverged", "epoch", "should_checkpoint"}
# Metric names that would collide with a hyperparameter (MLflow shows params and metrics side by
# side, one name must mean one thing): ``lr`` is the searched peak learning rate, the value the
# schedule reached in an epoch is logged as ``train/lr``.
METRIC_RENAMES = {"lr": "train/lr"}


STATUSES = ("completed", "stopped early", "diverged", "failed", "interrupted")


def trial_status(last: dict[str, Any] | None, max_epochs: int, error: bool = False) -> str:
    """kdtune's status of a finished trial from its last result."""
    if error:
        return "failed"
    if last and last.get("diverged"):
        return "diverged"
    if last and last.get("training_iteration", 0) >= max_epochs:
        return "completed"
    return "stopped early"


def fmt(value: Any) -> str:
    """A value as people read it: floats to 4 significant digits (0.04619905512862269 -> 0.0462)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_config(config: dict[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in config.items() if v is not None)


def is_own_metric(key: str) -> bool:
    """Whether a result key is a method's or a sampler's own metric (not the engine's, not Tune's)."""
    return not (key.startswith(ENGINE_METRIC_PREFIXES) or key in ENGINE_METRICS or key in NOT_METRICS)


def run_metrics(result: dict[str, Any], finite: bool = False) -> dict[str, float]:
    """The numeric values of a Tune result that are the run's metrics (booleans excluded);
    ``finite`` drops NaN and infinities too (MLflow refuses them)."""
    return {METRIC_RENAMES.get(k, k): v for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and (not finite or math.isfinite(v))}


def default_tracking_uri(cwd: Path | None = None) -> str:
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(given: str | None = None) -> str:
    """The given URI, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
