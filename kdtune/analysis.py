"""Searches as pandas DataFrames: from a search's results table or from its MLflow runs.

Columns use the hyperparameters' own names (``temperature``, ``lr``, ...); a method's
conditional parameters are empty (NaN) for trials of other methods.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kdtune.tracking import PARENT_TAG, STATUS_TAG, TRIAL_TAG, default_tracking_uri


def load_results(path: str | Path) -> pd.DataFrame:
    """One row per trial, from ``results.csv`` or the search folder that holds it
    (``<storage-path>/<name>``)."""
    path = Path(path)
    csv = path / "results.csv" if path.is_dir() else path
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: no results table (written when a search ends)")
    return pd.read_csv(csv)


def _numeric(column: pd.Series) -> pd.Series:
    """MLflow stores params as strings: give numbers and booleans back their type."""
    if column.isin(["True", "False"]).all():
        return column.map({"True": True, "False": False})
    converted = pd.to_numeric(column, errors="coerce")
    return converted if converted.notna().sum() == column.notna().sum() else column


def load_mlflow(experiment: str, tracking_uri: str | None = None, parent_run_id: str | None = None,
                storage_path: str | Path | None = None) -> pd.DataFrame:
    """One row per trial run of ``experiment`` (optionally of one search: its parent run id, or
    the ``storage_path`` folder of the search), with params, last metrics and status."""
    from mlflow import MlflowClient

    if parent_run_id is None and storage_path is not None:
        state = json.loads((Path(storage_path) / experiment / "kdtune_search.json").read_text())
        parent_run_id, tracking_uri = state["parent_run_id"], tracking_uri or state["tracking_uri"]
    client = MlflowClient(tracking_uri or default_tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise KeyError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
    filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else f"tags.`{TRIAL_TAG}` != ''"
    runs = client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=50000)
    rows = []
    for run in runs:
        row = {"trial_id": run.data.tags.get(TRIAL_TAG), "run_id": run.info.run_id,
               "status": run.data.tags.get(STATUS_TAG), "run_status": run.info.status,
               "method": run.data.tags.get("method")}
        row.update(run.data.params)
        row.update(run.data.metrics)
        rows.append(row)
    df = pd.DataFrame(rows)
    params = {k for run in runs for k in run.data.params}
    for name in params:
        df[name] = _numeric(df[name])
    return df.sort_values("trial_id", ignore_index=True) if len(df) else df
