"""What the report says about the choice of a best configuration: the top trials with their
ties, the confirmation stage's candidates (``best.json``), and the final re-runs of a search's
trial (``kdtune train --from-search``, found in the search's MLflow store)."""
from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from kdtune.analysis.loaders import _objective, best_trials


def top_table(trials: pd.DataFrame, metric: str, mode: str, params: list[str], n: int = 5) -> pd.DataFrame:
    """The ``n`` best trials of each search by the objective (more when trials tie with the n-th),
    with a ``tie`` column naming the trials that share a value."""
    column = _objective(metric)
    ranked = best_trials(trials, len(trials), metric, mode, by="search" if "search" in trials else None)
    if "search" not in ranked:
        ranked = ranked.assign(search="search")
    rows = []
    for _, group in ranked.groupby("search", sort=False):
        cutoff = group[column].iloc[min(n, len(group)) - 1]
        keep = group[group[column] >= cutoff] if mode == "max" else group[group[column] <= cutoff]
        shared = keep.groupby(column)["trial_id"].transform(lambda ids: ", ".join(ids) if len(ids) > 1 else "")
        rows.append(keep.assign(tie=shared))
    table = pd.concat(rows) if rows else ranked.assign(tie="")
    shown = ["search", "trial_id", *[p for p in params if p in table], "status", "epochs", column, "tie"]
    return table[[c for c in shown if c in table]].reset_index(drop=True)


def pareto_table(search) -> pd.DataFrame | None:
    """A multi-objective search's Pareto front, one row per trial: its id, hyperparameters and
    every objective's value, best first by the first objective; None for a single-objective search."""
    objectives = search.objectives
    trials = search.trials
    if not objectives or "pareto" not in trials:
        return None
    front = trials[trials["pareto"].astype(bool)]
    columns = [_objective(m) for m, _ in objectives]
    front = front.sort_values(columns, ascending=[d == "min" for _, d in objectives], kind="stable")
    params = [p for p in search.space.names() if p in front and front[p].notna().any()]
    return front[["trial_id", *params, "epochs", *columns]].reset_index(drop=True)


def duration(seconds: float) -> str:
    """Seconds as people read them: ``42 s``, ``12.5 min``, ``3.2 h``."""
    if not math.isfinite(seconds):
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def cost_table(costs: pd.DataFrame) -> pd.DataFrame:
    """:func:`kdtune.analysis.cost_totals` with its hours in the unit that fits each value."""
    out = costs.copy()
    for column in ("trial_hours", "cpu_hours", "gpu_hours"):
        if column in out:
            out[column.replace("_hours", "_time")] = (out.pop(column) * 3600).map(duration)
    return out


def confirmation_table(search) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """The confirmation stage's candidates (one row per candidate, every seed's value), and the
    selection record; None when the search had no confirmation stage or kept no best.json."""
    from kdtune.search.records import BEST_FILE

    if search.folder is None or not (search.folder / BEST_FILE).is_file():
        return None
    record = json.loads((search.folder / BEST_FILE).read_text()).get("selection") or {}
    if not record.get("confirmed"):
        return None
    rows = [{"search": search.label, "trial_id": c["trial_id"], "chosen": "yes" if c["trial_id"] == record["chosen"] else "",
             "search_run": c["single_run"], "mean": c["mean"], "std": c["std"], "n_seeds": c["n_seeds"],
             "seeds (value)": ", ".join(f"{s}: {v:.2f}" if isinstance(v, float) and math.isfinite(v) else f"{s}: failed"
                                        for s, v in zip(c["seeds"], c["values"]))}
            for c in record["candidates"]]
    return pd.DataFrame(rows), record


def final_runs_table(search) -> pd.DataFrame | None:
    """The final re-runs of the search's trials logged to its MLflow store (summary runs tagged
    ``kdtune.kind = final-summary``): one row per summary, every seed's value. None when the store
    cannot be read or holds none."""
    if not search.tracking_uri or not search.parent_run_id:
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(search.tracking_uri)
        exp = client.get_experiment_by_name(search.name)
        if exp is None:
            return None
        summaries = client.search_runs([exp.experiment_id], filter_string=(
            f"tags.`kdtune.kind` = 'final-summary' and tags.`kdtune.search_run` = '{search.parent_run_id}'"))
        rows = []
        for run in summaries:
            ids = [i for i in run.data.tags.get("kdtune.seed_runs", "").split(",") if i]
            seeds = []
            for rid in ids:
                seed_run = client.get_run(rid)
                metrics = seed_run.data.metrics
                value = metrics.get("test/acc1", metrics.get("val/acc1", math.nan))
                seeds.append(f"{seed_run.data.params.get('seed', '?')}: {value:.2f}")
            split = "test" if any(k.startswith("test/") for k in run.data.metrics) else "val"
            rows.append({"search": search.label, "trial_id": run.data.tags.get("kdtune.final_of", ""),
                         "split": split, "mean": run.data.metrics.get(f"{split}/acc1_mean", math.nan),
                         "std": run.data.metrics.get(f"{split}/acc1_std", math.nan), "n_seeds": len(ids),
                         "seeds (value)": ", ".join(seeds), "status": run.info.status})
        return pd.DataFrame(rows) if rows else None
    except Exception:  # an unreachable store: the report goes on without this section
        return None
