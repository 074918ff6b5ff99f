"""Search algorithms for a SearchSpec: Optuna TPE (default), random and grid.

Lives outside ``kdtune.search`` on purpose: Tune pickles the searcher into its experiment
state, and objects defined in ``__main__`` (``python -m kdtune.search``) could not be
unpickled by a later ``--resume``.
"""
from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from kdtune.search.spec import SearchSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


class KDOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about early-stopped trials.

    Ray's wrapper reports a trial that ASHA stopped after a few epochs as COMPLETE with its
    low-fidelity value, so TPE would compare 2-epoch accuracies with 240-epoch ones. Here such
    a trial is told as PRUNED (Optuna then ranks it by its reported per-epoch values); a
    diverged trial is told as COMPLETE with its (finite, penalised) value so TPE learns the
    region is bad.
    """

    def __init__(self, *args: Any, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = (result is not None and not error and not result.get("diverged")
                         and result.get("training_iteration", 0) < self.max_epochs)
        if not stopped_early or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        if value is not None and not math.isfinite(value):
            return  # penalised values are finite; anything else would make Optuna refuse the trial
        # (An epoch re-run after a restore reports its step again: Optuna keeps the first value.)
        super().on_trial_result(trial_id, result)


def build_searcher(spec: SearchSpec) -> tuple[Searcher | None, dict[str, Any], int]:
    """``(search_alg, param_space, num_samples)`` for ``tune.Tuner``."""
    space = spec.space
    if spec.algorithm == "tpe":
        sampler = optuna.samplers.TPESampler(
            seed=spec.seed, multivariate=True, constant_liar=True,
            # group=True lets multivariate TPE model conditional (per-method/sampler) sub-spaces jointly.
            group=bool(space.conditionals))
        searcher = KDOptunaSearch(space=space.suggest, metric=spec.metric, mode=spec.mode, sampler=sampler,
                                  study_name=spec.name, max_epochs=spec.max_epochs)
        return searcher, {}, spec.num_samples
    if spec.algorithm == "random":
        return BasicVariantGenerator(random_state=spec.seed), space.to_tune(), spec.num_samples
    points = space.grid()
    # Tune only accepts preset points for keys of param_space; None marks "not set" (a
    # conditional parameter of another method), which the trainable and tracker drop.
    return BasicVariantGenerator(points_to_evaluate=points), {n: None for n in space.names()}, len(points)
