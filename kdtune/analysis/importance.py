"""Which searched hyperparameters explain the objective: Optuna's importance evaluators over the
trials of a search at one common budget, each conditional parameter assessed where it exists, with a
bootstrap interval.

Why a common budget: under ASHA most trials stop early, and a trial stopped at epoch 2 and one that
ran 12 epochs are not comparable; an importance fitted across budgets mostly explains which trials
ran longer. So the trials are compared at one epoch: every completed trial when enough completed,
else the highest ASHA rung that enough trials reached, each trial's value taken at that epoch.
Why an interval: fANOVA over a dozen trials is noisy; the interval says how noisy.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import numpy as np
import pandas as pd

from kdtune.analysis.loaders import FINISHED, Search, _concat, _finished, _objective

MIN_TRIALS = 8  # fewer trials than this at the chosen budget: the report warns that importance is noise
BOOTSTRAP = 30  # resamples behind the interval
COLUMNS = ["scope", "param", "importance", "low", "high", "trials", "budget"]


def param_importance(trials: pd.DataFrame, space, metric: str = "val/acc1", mode: str = "max",
                     evaluator: str | Any = "fanova", target: str | None = None, seed: int = 0,
                     curves: pd.DataFrame | None = None, min_trials: int = MIN_TRIALS,
                     bootstrap: int = BOOTSTRAP) -> pd.DataFrame:
    """How much each searched hyperparameter explains the objective, by Optuna's
    ``get_param_importances``, at one common budget, with a bootstrap interval.

    ``space``: the search's :class:`~kdtune.search.space.Space`, its YAML mapping, or a :class:`Search`
    (whose curves are then used). ``curves`` (one row per trial and epoch, as
    :func:`~kdtune.analysis.load_curves` gives): each trial's ``metric`` is read at the budget chosen by
    :func:`common_budget`. Without curves, the ``target`` column (default ``best_<metric>``) of the
    finished trials is used as it is, and ``budget`` is NaN.
    ``evaluator``: ``"fanova"`` (Optuna's default), ``"ped_anova"`` or an evaluator object.
    Conditional parameters exist only in some trials, so each is assessed where it exists: scope
    ``all`` covers the parameters every trial has (``method``/``sampler`` when searched, the shared
    ones); scope ``sampler=kdas`` (say) adds KDAS's own parameters, over the KDAS trials only.

    Returns rows of scope, param, importance (summing to 1 within a scope), low and high (the 5-95 %
    bootstrap interval over ``bootstrap`` resamples of the trials; NaN with ``bootstrap=0``), trials
    and budget (the epoch compared). Trials are ordered by ``trial_id`` first, so the result does not
    depend on the order of the table. A scope with fewer than two trials is skipped, and one with
    fewer than ``min_trials`` warned about.
    """
    if isinstance(space, Search) and curves is None and target is None:
        curves = space.curves
    space = _as_space(space)
    if curves is not None and target is None:
        done, budget = values_at_budget(trials, curves, metric, min_trials)
        column = metric
    else:
        column = target or _objective(metric)
        done, budget = _finished(trials, column), math.nan
    done = done.sort_values("trial_id", kind="stable").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    rows = []
    for scope, subset, params in _importance_scopes(space, done):
        if len(subset) < 2:
            warnings.warn(f"parameter importance: scope {scope!r} has {len(subset)} trial(s) at the common "
                          f"budget; at least 2 are needed", stacklevel=2)
            continue
        if len(subset) < min_trials:
            warnings.warn(f"parameter importance: scope {scope!r} has only {len(subset)} trials at the common "
                          f"budget (fewer than {min_trials}): read it as noise", stacklevel=2)
        point = _importances(subset, params, column, mode, evaluator, seed)
        resamples = (subset.iloc[rng.integers(0, len(subset), len(subset))] for _ in range(bootstrap))
        draws = [_importances(r, params, column, mode, evaluator, seed) for r in resamples if _informative(r, column)]
        for name, value in point.items():
            spread = [d.get(name, 0.0) for d in draws]
            low, high = (np.percentile(spread, [5, 95]) if spread else (math.nan, math.nan))
            rows.append({"scope": scope, "param": name, "importance": value, "low": float(low),
                         "high": float(high), "trials": len(subset), "budget": budget})
    return pd.DataFrame(rows, columns=COLUMNS)


def common_budget(trials: pd.DataFrame, curves: pd.DataFrame, metric: str = "val/acc1",
                  min_trials: int = MIN_TRIALS) -> int | None:
    """The epoch at which trials are compared: the last epoch of the completed trials when at least
    ``min_trials`` completed, else the highest epoch that at least ``min_trials`` finished trials
    reached (an ASHA rung), else the epoch that most trials reached. None without any value."""
    finished = set(trials.loc[trials["status"].isin(FINISHED), "trial_id"])
    rows = curves[curves["trial_id"].isin(finished)].dropna(subset=[metric])
    if not len(rows):
        return None
    completed = set(trials.loc[trials["status"] == "completed", "trial_id"])
    last = rows[rows["trial_id"].isin(completed)].groupby("trial_id")["epoch"].max()
    if len(last) >= min_trials and last.nunique() == 1:
        return int(last.iloc[0])
    reached = rows.groupby("epoch")["trial_id"].nunique().sort_index()
    enough = reached[reached >= min_trials]
    if len(enough):
        return int(enough.index.max())
    # too few trials anywhere: the highest of the most populated epochs (the caller warns)
    return int(reached[reached == reached.max()].index.max())


def values_at_budget(trials: pd.DataFrame, curves: pd.DataFrame, metric: str = "val/acc1",
                     min_trials: int = MIN_TRIALS) -> tuple[pd.DataFrame, int | None]:
    """The finished trials that reached the common budget, with ``metric`` replaced by its value at
    that epoch; and the budget."""
    budget = common_budget(trials, curves, metric, min_trials)
    if budget is None:
        return trials.iloc[:0].assign(**{metric: []}), None
    at = curves[(curves["epoch"] == budget)].dropna(subset=[metric]).drop_duplicates("trial_id", keep="last")
    values = at.set_index("trial_id")[metric]
    finished = trials[trials["status"].isin(FINISHED) & trials["trial_id"].isin(values.index)]
    return finished.assign(**{metric: finished["trial_id"].map(values).to_numpy()}), budget


def _importances(subset: pd.DataFrame, params: dict[str, Any], column: str, mode: str, evaluator: str | Any,
                 seed: int) -> dict[str, float]:
    import optuna

    study = _study("maximize" if mode == "max" else "minimize")
    study.add_trials([_optuna_trial(row, params, row[column]) for _, row in subset.iterrows()])
    return optuna.importance.get_param_importances(
        study, evaluator=_evaluator(evaluator, seed), params=list(params), normalize=True)


def _informative(resample: pd.DataFrame, column: str) -> bool:
    """A resample whose objective varies: one that repeats a single value has nothing to explain."""
    return resample[column].nunique() > 1


def importance_table(searches: Iterable[Search], evaluator: str | Any = "fanova", seed: int = 0,
                     bootstrap: int = BOOTSTRAP) -> pd.DataFrame:
    """:func:`param_importance` of every search (each over its own space and budget), with a ``search`` column."""
    frames = []
    for search in searches:
        found = param_importance(search.trials, search, search.metric, search.mode, evaluator, seed=seed,
                                 bootstrap=bootstrap)
        frames.append(found.assign(search=search.label)[["search", *found.columns]])
    return _concat(frames) if frames else pd.DataFrame(columns=["search", *COLUMNS])


def _study(direction: str):
    """An in-memory study, without Optuna's "A new study created" line in every report."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _as_space(space):
    from kdtune.search.space import Space, parse_space

    if isinstance(space, Search):
        return space.space
    if isinstance(space, Space):
        return space
    parsed, problems = parse_space(space)
    if problems:
        raise ValueError("invalid space: " + "; ".join(problems))
    return parsed


def _importance_scopes(space, trials: pd.DataFrame):
    """(scope, trials, {name: Param or choices}) for the shared parameters and each sub-space."""
    shared: dict[str, Any] = {key: tuple(choices) for key, choices in space.conditionals.items()}
    shared.update(space.params)
    yield "all", trials, shared
    for key, choices in space.conditionals.items():
        for choice, sub in choices.items():
            if sub:
                mine = trials[trials[key].astype(str) == str(choice)]
                others = {k: v for k, v in shared.items() if k != key}  # constant within the scope
                yield f"{key}={choice}", mine, {**others, **sub}


def _distribution(param):
    """The Optuna distribution of a Param (or of a conditional key's choices, a tuple)."""
    from optuna.distributions import CategoricalDistribution

    return CategoricalDistribution(list(param)) if isinstance(param, tuple) else param.distribution


def _optuna_trial(row: pd.Series, params: dict[str, Any], value: float):
    import optuna

    distributions = {name: _distribution(p) for name, p in params.items()}
    values = {name: _as_optuna_value(row[name], dist) for name, dist in distributions.items()}
    return optuna.trial.create_trial(params=values, distributions=distributions, value=float(value))


def _as_optuna_value(value: Any, distribution) -> Any:
    """A table value in its distribution: a CSV gives categorical choices back as strings or
    numbers ("1,2,3,4", 2 for 2), so a choice is matched by its text too."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        for choice in distribution.choices:
            if choice == value or str(choice) == str(value) or _same_number(choice, value):
                return choice
        raise ValueError(f"{value!r} is none of the choices {list(distribution.choices)}")
    value = float(value) if isinstance(distribution.low, float) else int(value)
    return min(max(value, distribution.low), distribution.high)  # CSV round-off at a bound


def _same_number(a: Any, b: Any) -> bool:
    try:
        return not isinstance(a, bool) and float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _evaluator(evaluator: str | Any, seed: int):
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    if evaluator == "fanova":
        return FanovaImportanceEvaluator(seed=seed)
    if evaluator == "ped_anova":
        return PedAnovaImportanceEvaluator()
    if isinstance(evaluator, str):
        raise ValueError(f"evaluator must be 'fanova', 'ped_anova' or an Optuna evaluator, but got {evaluator!r}")
    return evaluator
