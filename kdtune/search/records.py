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
# epoch that stopped it). Why not the best epoch: a final run (``train --from-search --final``)
# trains on train+val with no validation split to pick an epoch by, so only the last epoch is a
# value the final model can be held to.
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


# ----------------------------------------------------------------------------- several objectives
# ``search.objectives: {val/acc1: max, samples/backprop: min}`` makes a search multi-objective: every
# objective is, like the one objective above, its metric at the last epoch the trial trained, and
# the result is the Pareto front of the completed trials rather than one best trial. One of them is
# the search's ``metric`` (search.metric, else the first objective of what a trial learned): what
# Tune, the status lines, each MLflow run's ``objective`` and best.json's trial rank by.
#
# What a trial cost, as metrics that add up over the epochs it trained (so "at the last epoch" is
# the trial's total). Each is reported under this name by every trial and, like every metric,
# keeps it in MLflow and the results table (``final_<name>``).
COST_METRICS = {
    "samples/backprop": "samples that went through a backward pass (the engine's count)",
    "samples/scored": "samples KDAS scored, a student and a teacher forward each (sampler kdas only)",
    "time_total_s": "the trial's wall seconds (Ray Tune's count; noisy: it depends on what else runs)",
}
PARETO_COLUMN = "pareto"  # results table: whether the trial is on the Pareto front
PARETO_TAG = "kdtune.pareto"  # MLflow: "true" on the child run of each trial on the front


def dominates(a: list[float], b: list[float], modes: list[str]) -> bool:
    """Whether values ``a`` dominate ``b``: no worse in every objective, better in one."""
    better = False
    for x, y, mode in zip(a, b, modes):
        if is_better(y, x, mode):  # b is better here: a cannot dominate
            return False
        better = better or is_better(x, y, mode)
    return better


def pareto_front(values: list[list[float]], modes: list[str]) -> list[bool]:
    """For each row of objective values, whether it is on the Pareto front: no other row
    dominates it. A row with a missing or non-finite value is never on the front and dominates
    nothing. Equal rows do not dominate each other, so both stay on the front (as in Optuna's
    ``study.best_trials``). Quadratic in the rows, which is nothing next to training them."""
    ok = [all(isinstance(v, (int, float)) and math.isfinite(v) for v in row) for row in values]
    return [ok[i] and not any(ok[j] and dominates(values[j], values[i], modes) for j in range(len(values)) if j != i)
            for i in range(len(values))]


def pareto_column(table, objectives: list[tuple[str, str]]) -> list[bool]:
    """The results table's ``pareto`` column: the front of its completed trials by their
    ``final_<metric>`` columns (``objectives``: ``(metric, mode)`` pairs). Trials that did not
    complete (stopped, diverged, failed, interrupted) have no comparable values."""
    if not len(table):
        return []
    columns = [objective_column(m) for m, _ in objectives]
    completed = list(table["status"] == "completed")
    rows = [[float(v) for v in row] if done else [math.nan] * len(columns)
            for row, done in zip(table[columns].astype(float).itertuples(index=False), completed)]
    return pareto_front(rows, [mode for _, mode in objectives])


def fmt_objective(metric: str, value: float) -> str:
    """An objective's value as the closing lines print it: counts whole, seconds to a tenth,
    accuracies and losses to two decimals (as the single-objective lines do)."""
    if metric.startswith("samples/"):
        return f"{value:.0f}"
    return f"{value:.1f}" if metric == "time_total_s" else f"{value:.2f}"


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


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite URI (``sqlite:///path``, relative to the working directory
    unless absolute; a query string dropped); None for any other store, and for SQLite in memory."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path not in ("", ":memory:") else None
