"""Search algorithms for a SearchSpec: Optuna TPE (default), random and grid.

Lives outside ``kdtune.search`` on purpose: Tune pickles the searcher into its experiment
state, and objects defined in ``__main__`` (``python -m kdtune.search``) could not be
unpickled by a later ``--resume``.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from kdtune.search.internals import optuna_study, optuna_trials, storage_id, study_storage, told_trials
from kdtune.search.spec import SearchSpec

logger = logging.getLogger(__name__)

optuna.logging.set_verbosity(optuna.logging.WARNING)

RAY_TRIAL_ATTR = "ray_trial_id"  # Optuna user attribute: the Tune trial (and results-table row) of a trial
STATUS_ATTR = "kdtune_status"  # Optuna user attribute: kdtune's status of the trial (completed, stopped early, ...)


class KDOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna what happened to each trial.

    * Every epoch's value is reported, including the one that stopped the trial: Tune hands the
      result that ends a trial to ``on_trial_complete`` only, never to ``on_trial_result``, and
      Ray's wrapper drops its value for an early-stopped trial.
    * Final states: a trial ASHA stopped is PRUNED (Optuna then takes its last reported value,
      the stopping epoch's, as its value, which is kdtune's objective), a trial that ran its
      epochs COMPLETE with the last epoch's value, a crashed or diverged one FAIL (Optuna's
      own convention for a trial whose objective is not a number; the user attribute
      ``kdtune_status`` says which).
    * Each Optuna trial carries the Tune trial id (user attribute ``ray_trial_id``), so the
      study opened in optuna-dashboard can be matched with the results table and MLflow.
    * Several objectives (``search.objectives``; ``metric`` and ``mode`` are then lists and the
      study has one direction per objective): a trial that ran its epochs is COMPLETE with each
      metric's last-epoch value. Optuna keeps no intermediate values for a multi-objective
      study (``Trial.report`` refuses), so none are reported.
    """

    def __init__(self, *args: Any, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if trial_id in optuna_trials(self):
            optuna_trials(self)[trial_id].set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return config

    def _stored(self, trial_id: str):
        ot_trial = optuna_trials(self)[trial_id]
        return ot_trial.storage.get_trial(storage_id(ot_trial))

    def _steps(self, trial_id: str) -> set[int]:
        """The epochs reported to the study for this trial. Read from the study's storage once per
        trial and process (the searcher's pickled state can be older than the study, after a
        restore that re-runs a trial), then kept here: one database read per trial, not two per
        reported epoch."""
        steps = self.__dict__.setdefault("_reported", {})
        if trial_id not in steps:
            stored = self._stored(trial_id)
            if stored.state.is_finished():
                told_trials(self).add(trial_id)
            steps[trial_id] = set(stored.intermediate_values)
        return steps[trial_id]

    def save(self, checkpoint_path: str) -> None:
        # not pickled: a restored searcher reads each trial's reported epochs from the study again
        reported = self.__dict__.pop("_reported", None)
        try:
            super().save(checkpoint_path)
        finally:
            if reported is not None:
                self._reported = reported

    def _finished(self, trial_id: str) -> bool:
        """Told already, here or (the searcher's pickled state being older than the study, after a
        restore that re-runs a trial) in the study's storage."""
        if trial_id in told_trials(self) or trial_id not in optuna_trials(self):
            return True
        self._steps(trial_id)  # reads the stored state once
        return trial_id in told_trials(self)

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, list)

    def _values(self, result: dict) -> list[float] | None:
        """Several objectives: the trial's value of each in ``result``; None when one is missing
        or not finite (Optuna would fail the trial on it, with only a warning to say so)."""
        values = [result.get(m) for m in self.metric]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return None
        return [float(v) for v in values]

    def _report(self, trial_id: str, result: dict) -> None:
        if self.multi_objective:
            return  # Optuna keeps no intermediate values for several objectives
        value, step = result.get(self.metric), result.get("training_iteration")
        if value is None or step is None or not math.isfinite(value) or result.get("diverged"):
            return  # a penalised value is no measurement; Optuna would also refuse NaN
        # After a restore Tune reports an epoch again; the first value stays.
        steps = self._steps(trial_id)
        if int(step) not in steps:
            optuna_trials(self)[trial_id].report(float(value), int(step))
            steps.add(int(step))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._finished(trial_id):
            self._report(trial_id, result)
            self.__dict__.setdefault("_last_results", {})[trial_id] = result

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._finished(trial_id):
            return
        ot_trial = optuna_trials(self)[trial_id]
        # Hyperband stops a *paused* trial through Tune's stop_trial, which completes it with no
        # result: its last reported epoch is where it stopped (PRUNED, not FAIL).
        last = self.__dict__.get("_last_results", {}).pop(trial_id, None)
        result = result or ({} if error else last) or {}
        self._report(trial_id, result)  # the stopping (or last) epoch
        diverged = bool(result.get("diverged"))
        epochs = int(result.get("training_iteration", 0) or 0)
        missing = self._values(result) is None if self.multi_objective else self.metric not in result
        if error or diverged or missing:
            state, value, status = TrialState.FAIL, None, "diverged" if diverged else "failed"
        elif epochs < self.max_epochs:
            state, value, status = TrialState.PRUNED, None, "stopped early"
        else:
            state, status = TrialState.COMPLETE, "completed"
            value = self._values(result) if self.multi_objective else float(result[self.metric])
        ot_trial.set_user_attr(STATUS_ATTR, status)
        optuna_study(self).tell(ot_trial, value, state=state)
        told_trials(self).add(trial_id)


def name_metrics(study: optuna.Study, metrics: list[str]) -> None:
    """Name a multi-objective study's values after their metrics, so that optuna-dashboard labels
    its Pareto-front plot ``val/acc1`` and ``samples/backprop`` instead of "Objective 0" and "1"
    (``set_metric_names`` is experimental in Optuna since 3.2; its warning says only that)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(metrics))


def close_stale_trials(url: str, study_name: str) -> int:
    """Trials still RUNNING in the study once the search has finished (suggested, then lost when
    a search was interrupted before Tune recorded them) become FAIL; returns how many."""
    study = optuna.load_study(study_name=study_name, storage=optuna_storage(url))
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for t in stale:
        study_storage(study).set_trial_user_attr(storage_id(t), STATUS_ATTR, "interrupted")
        study.tell(t.number, state=TrialState.FAIL)
    return len(stale)


def optuna_storage(url: str):
    """An Optuna RDB storage (SQLite file or a shared database); picklable, so Tune can keep the
    searcher in its experiment state and ``--resume`` reconnects to the same study."""
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}}
                                      if url.startswith("sqlite") else None)


OPTUNA_ALGORITHMS = ("tpe", "gp")  # search.algorithm values that an Optuna sampler drives


def optuna_sampler(algorithm: str, seed: int | None, conditional: bool = False) -> optuna.samplers.BaseSampler:
    """The Optuna sampler behind ``search.algorithm`` (also used by the replay benchmark)."""
    if algorithm == "tpe":
        # group=True lets multivariate TPE model conditional (per-method/sampler) sub-spaces jointly.
        # multivariate and group are experimental in Optuna; the warnings say only that, at each start.
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, group=conditional)
    if algorithm == "gp":
        # A Gaussian process with log-EI (torch + scipy). It fits COMPLETE trials only: under ASHA
        # the pruned ones teach it nothing, so it suits full-length trials or a late grace period.
        return optuna.samplers.GPSampler(seed=seed)
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"no Optuna sampler for algorithm {algorithm!r}")


def build_searcher(spec: SearchSpec, storage_url: str | None = None) -> tuple[Searcher | None, dict[str, Any], int]:
    """``(search_alg, param_space, num_samples)`` for ``tune.Tuner``; ``storage_url`` keeps the
    Optuna study in that database (else in memory)."""
    space = spec.space
    if spec.algorithm in OPTUNA_ALGORITHMS:
        sampler = optuna_sampler(spec.algorithm, spec.seed, conditional=bool(space.conditionals))
        # Several objectives: Ray's OptunaSearch takes lists and makes a study with one direction
        # each; TPESampler (MOTPE) and GPSampler (log-EHVI) model them all.
        metric, mode = ([m for m, _ in spec.objectives], [d for _, d in spec.objectives]) if spec.objectives \
            else (spec.metric, spec.mode)
        searcher = KDOptunaSearch(space=space.suggest, metric=metric, mode=mode, sampler=sampler,
                                  study_name=spec.name, max_epochs=spec.max_epochs,
                                  storage=optuna_storage(storage_url) if storage_url else None)
        if spec.objectives:
            name_metrics(optuna_study(searcher), metric)
        if spec.warm_start and not optuna_study(searcher).trials:  # not again on --resume
            from kdtune.search.warm_start import warm_start

            logger.info(warm_start(optuna_study(searcher), spec.warm_start, space))
        return searcher, {}, spec.num_samples
    # Tune's max_concurrent_trials only limits a Searcher (it warns and ignores it for a variant
    # generator), so random and grid searches get the limit here.
    limit = spec.max_concurrent or 0
    if spec.algorithm == "random":
        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=limit), space.to_tune(), spec.num_samples
    points = space.grid()
    # Tune only accepts preset points for keys of param_space; None marks "not set" (a
    # conditional parameter of another method), which the trainable and tracker drop.
    return (BasicVariantGenerator(points_to_evaluate=points, max_concurrent=limit), {n: None for n in space.names()},
            len(points))


def concurrency(searcher, spec: SearchSpec) -> int | None:
    """``TuneConfig.max_concurrent_trials``: the spec's limit for a Searcher (Optuna); None for a
    variant generator, which enforces it itself."""
    return None if isinstance(searcher, BasicVariantGenerator) else spec.max_concurrent
