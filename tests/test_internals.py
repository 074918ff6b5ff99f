"""Every private name of Ray and Optuna that kdtune uses (kdtune/search/internals.py) still exists
in the installed versions. A failure names the library version that moved it."""
from __future__ import annotations

import importlib.metadata
from types import SimpleNamespace

import optuna
import pytest

from kdtune.search import internals


def _moved(library: str, what: str) -> str:
    return (f"{library} {importlib.metadata.version(library)}: {what} is gone or changed; kdtune/search/internals.py "
            f"was written against Ray 2.60.0 and Optuna 5.1.0: find its replacement there")


def test_optuna_search_keeps_its_trials_study_and_told_set() -> None:
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space={"x": optuna.distributions.FloatDistribution(0, 1)}, metric="m", mode="max")
    try:
        config = searcher.suggest("t1")
        trials, study, told = (internals.optuna_trials(searcher), internals.optuna_study(searcher),
                               internals.told_trials(searcher))
    except AttributeError as e:
        pytest.fail(_moved("ray", f"OptunaSearch's private fields ({e})"))
    assert isinstance(trials.get("t1"), optuna.Trial) and trials["t1"].params["x"] == config["x"], _moved(
        "ray", "OptunaSearch._ot_trials")
    assert isinstance(study, optuna.Study) and isinstance(told, set), _moved("ray", "OptunaSearch._ot_study/_completed_trials")


def test_optuna_trial_storage_ids_and_study_storage() -> None:
    study = optuna.create_study()
    trial = study.ask()
    try:
        storage, tid = internals.study_storage(study), internals.storage_id(trial)
        storage.set_trial_user_attr(tid, "k", "v")
        frozen = storage.get_trial(tid)
    except AttributeError as e:
        pytest.fail(_moved("optuna", f"Trial._trial_id / Study._storage ({e})"))
    assert frozen.user_attrs == {"k": "v"} and internals.storage_id(frozen) == tid, _moved("optuna", "storage ids")
    ints = optuna.distributions.IntDistribution(1, 5)
    try:
        assert internals.distribution_contains(ints, 3) and not internals.distribution_contains(ints, 9)
    except AttributeError as e:
        pytest.fail(_moved("optuna", f"BaseDistribution._contains ({e})"))


def test_result_grid_keeps_its_experiment_analysis() -> None:
    from ray.tune import ResultGrid

    analysis = SimpleNamespace(trials=[], default_metric=None, default_mode=None)
    try:
        grid = ResultGrid(analysis)
        assert internals.experiment_analysis(grid) is analysis
    except (AttributeError, TypeError, AssertionError) as e:
        pytest.fail(_moved("ray", f"ResultGrid._experiment_analysis ({e!r})"))


def test_ray_core_helpers() -> None:
    import ray._private.ray_constants as ray_constants

    assert internals.ray_cpu_count() >= 1
    from ray._private.utils import get_num_cpus  # the helper itself, not its fallback

    assert callable(get_num_cpus), _moved("ray", "ray._private.utils.get_num_cpus")
    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER"), _moved("ray", "ray_constants.ENABLE_RAY_CLUSTER")
    assert _logger_module_exists(), _moved("ray", f"the module (and logger) {internals.RAY_AUTH_LOGGER}")


def _logger_module_exists() -> bool:
    import importlib.util

    return importlib.util.find_spec(internals.RAY_AUTH_LOGGER) is not None


def test_tune_storage_context_seam() -> None:
    from ray.tune.experiment.experiment import Experiment

    from kdtune.search.staging import ProcessStaging

    before = Experiment.__dict__.get("_storage_context_cls")
    assert before is not None, _moved("ray", "Experiment._storage_context_cls")
    try:
        assert before in (internals.storage_context_class(), ProcessStaging), _moved("ray", "StorageContext")
        assert internals.use_storage_context_class(ProcessStaging), _moved("ray", "Experiment._storage_context_cls")
        assert Experiment._storage_context_cls is ProcessStaging
    finally:
        Experiment._storage_context_cls = before
