"""The analysis layer: searches as pandas DataFrames (:mod:`~kdtune.analysis.loaders`), parameter
importance (:mod:`~kdtune.analysis.importance`), plots (:mod:`~kdtune.analysis.plots`) and the
HTML report (``kdtune report``, :mod:`~kdtune.analysis.report`).

Loading a search folder imports neither Ray nor MLflow; reading an MLflow experiment imports
MLflow only then, and importance imports Optuna only then.
"""
from kdtune.analysis.importance import common_budget, importance_table, param_importance, values_at_budget
from kdtune.analysis.loaders import (
    BASELINES,
    FINISHED,
    Search,
    SearchNotFound,
    asha_milestones,
    baseline_gap,
    best_trials,
    cost_totals,
    curves_table,
    group_summary,
    load_curves,
    load_mlflow,
    load_results,
    load_search,
    load_searches,
    load_trials,
    log_params,
    milestones,
    trials_table,
)
from kdtune.analysis.published import published_for, published_results

__all__ = [
    "BASELINES", "FINISHED", "Search", "SearchNotFound", "asha_milestones", "baseline_gap", "best_trials", "common_budget",
    "cost_totals", "curves_table", "group_summary", "importance_table", "load_curves", "load_mlflow",
    "load_results", "load_search", "load_searches", "load_trials", "log_params", "milestones",
    "param_importance", "published_for", "published_results", "trials_table", "values_at_budget",
]
