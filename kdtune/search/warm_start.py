"""``search.warm_start: ray_results/OLD``: an earlier search's finished trials seed a new study.

The earlier search's Optuna study (``OLD/optuna.db``, where kdtune keeps it) is read, and each of
its COMPLETE and PRUNED trials is added to the new study with Optuna's ``study.add_trial``,
values, intermediate values and state as they were. TPE and GP then start from what was
learned. A user who widens a range or adds a parameter keeps the earlier trials:

* a parameter the new space no longer has is dropped from the trial;
* a trial whose value for a kept parameter lies outside the new range (or is no longer a choice)
  is left out: the sampler could not place it;
* a parameter the new space adds is simply absent from the old trials (Optuna allows a trial
  with a subset of the parameters).

Each is counted in one note line printed when the search starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kdtune.search.internals import distribution_contains
from kdtune.search.records import OPTUNA_FILE

STATES = ("COMPLETE", "PRUNED")


def study_url(folder: str) -> str:
    return f"sqlite:///{Path(folder) / OPTUNA_FILE}"


def problem(folder: str) -> str | None:
    """Why ``folder`` cannot warm-start a search, or None."""
    path = Path(folder) / OPTUNA_FILE
    if not path.is_file():
        return f"expected an earlier search's folder holding {OPTUNA_FILE} (a tpe or gp search), but got {folder!r}"
    return None


def distributions(space: Any) -> dict[str, Any]:
    """Optuna distributions of every searched name (:meth:`Space.declared`; a name in several
    sub-spaces by its first declaration)."""
    return {name: p.distribution for name, p in space.declared().items()}


def _fits(distribution: Any, value: Any) -> bool:
    try:
        return distribution_contains(distribution, value)
    except (ValueError, TypeError):
        return False


def warm_start(study: Any, folder: str, space: Any) -> str:
    """Add ``folder``'s finished trials to ``study``; a one-line note says what was carried."""
    import optuna
    from optuna.trial import TrialState, create_trial

    distributions_ = distributions(space)
    # kdtune keeps one study per search folder, named after the search
    names = optuna.get_all_study_names(study_url(folder))
    old = optuna.load_study(study_name=names[-1], storage=study_url(folder))
    added, outside, dropped = 0, 0, set()
    for t in old.get_trials(deepcopy=False, states=tuple(getattr(TrialState, s) for s in STATES)):
        params = {k: v for k, v in t.params.items() if k in distributions_}
        dropped.update(k for k in t.params if k not in distributions_)
        if not all(_fits(distributions_[k], v) for k, v in params.items()):
            outside += 1
            continue
        study.add_trial(create_trial(
            params=params, distributions={k: distributions_[k] for k in params},
            value=t.value if t.state == TrialState.COMPLETE else None,
            intermediate_values=t.intermediate_values, state=t.state, user_attrs={"warm_start": folder}))
        added += 1
    note = f"warm start: {added} finished trials from {folder}"
    if outside:
        note += f"; {outside} left out (a value outside the new space)"
    if dropped:
        note += f"; parameters no longer searched dropped: {', '.join(sorted(dropped))}"
    return note

