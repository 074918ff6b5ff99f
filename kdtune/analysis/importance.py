"""Which searched hyperparameters explain the objective: Optuna's importance evaluators over the
finished trials of a search, each conditional parameter assessed where it exists."""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import pandas as pd

from kdtune.analysis.loaders import Search, _concat, _finished, _objective


def param_importance(trials: pd.DataFrame, space, metric: str = "val/acc1", mode: str = "max",
                     evaluator: str | Any = "fanova", target: str | None = None, seed: int = 0) -> pd.DataFrame:
    """How much each searched hyperparameter explains ``best_<metric>`` (or the ``target`` column),
    by Optuna's ``get_param_importances`` over the finished trials of one search.

    ``space``: the search's :class:`~kdtune.search.space.Space`, its YAML mapping, or a :class:`Search`.
    ``evaluator``: ``"fanova"`` (Optuna's default), ``"ped_anova"`` or an evaluator object.
    Conditional parameters exist only in some trials, so each is assessed where it exists: scope
    ``all`` covers the parameters every trial has (``method``/``sampler`` when searched, the shared
    ones); scope ``sampler=kdas`` (say) adds KDAS's own parameters, over the KDAS trials only.
    Returns rows of scope, param, importance (summing to 1 within a scope), trials; a scope with
    fewer than two trials is skipped with a warning.
    """
    import optuna

    space = _as_space(space)
    column = target or _objective(metric)
    done = _finished(trials, column)
    direction = "maximize" if mode == "max" else "minimize"
    rows = []
    for scope, subset, params in _importance_scopes(space, done):
        if len(subset) < 2:
            warnings.warn(f"parameter importance: scope {scope!r} has {len(subset)} finished trial(s); "
                          f"at least 2 are needed", stacklevel=2)
            continue
        study = _study(direction)
        study.add_trials([_optuna_trial(row, params, row[column]) for _, row in subset.iterrows()])
        values = optuna.importance.get_param_importances(
            study, evaluator=_evaluator(evaluator, seed), params=list(params), normalize=True)
        rows += [{"scope": scope, "param": name, "importance": value, "trials": len(subset)}
                 for name, value in values.items()]
    return pd.DataFrame(rows, columns=["scope", "param", "importance", "trials"])


def importance_table(searches: Iterable[Search], evaluator: str | Any = "fanova", seed: int = 0) -> pd.DataFrame:
    """:func:`param_importance` of every search (each over its own space), with a ``search`` column."""
    frames = []
    for search in searches:
        found = param_importance(search.trials, search, search.metric, search.mode, evaluator, seed=seed)
        frames.append(found.assign(search=search.label)[["search", *found.columns]])
    return _concat(frames)


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
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(param, tuple):
        return CategoricalDistribution(list(param))
    if param.kind == "float":
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if param.kind == "int":
        return IntDistribution(param.low, param.high, log=param.log, step=param.step or 1)
    return CategoricalDistribution(list(param.choices))


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
