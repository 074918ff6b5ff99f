"""The private names of Ray and Optuna that kdtune uses, all here.

Each has no public equivalent in the version named beside it (Ray 2.60.0, Optuna 5.1.0, the
versions of ``constraints.txt``). ``tests/test_internals.py`` touches every one against the
installed libraries and fails naming the library's version if one has gone, so a release that
moves one fails the suite, not a user's search. The dependency ranges in ``setup.cfg`` stop at
the next release line that could move them (Ray's next minor version, Optuna's next major).
"""
from __future__ import annotations

import os
from typing import Any


# -- Ray Tune's OptunaSearch (ray/tune/search/optuna/optuna_search.py, Ray 2.60.0) --------------
# KDOptunaSearch tells Optuna each trial's real final state (PRUNED for a trial ASHA stopped);
# the wrapper keeps its Optuna trials, its study and the trials it has told in private fields.

def optuna_trials(searcher: Any) -> dict:
    """Tune trial id -> its live ``optuna.Trial``."""
    return searcher._ot_trials


def optuna_study(searcher: Any) -> Any:
    return searcher._ot_study


def told_trials(searcher: Any) -> set:
    """The Tune trial ids whose end the searcher has told Optuna."""
    return searcher._completed_trials


# -- Optuna (optuna/trial/_trial.py, optuna/study/study.py, Optuna 5.1.0) -----------------------
# A trial's row in the storage is addressed by its storage id, which Optuna keeps private; kdtune
# reads a trial back (a restored searcher's state can be older than the study) and sets a user
# attribute on a trial it then fails (the public Trial needs the live trial object).

def storage_id(trial: Any) -> int:
    """The storage id of an ``optuna.Trial`` or ``FrozenTrial``."""
    return trial._trial_id


def study_storage(study: Any) -> Any:
    return study._storage


def distribution_contains(distribution: Any, value: Any) -> bool:
    """Whether ``value`` lies in an Optuna distribution (its private ``_contains`` of the internal
    representation: the check Optuna's own ``add_trial`` makes); for a warm start's old trials."""
    return distribution._contains(distribution.to_internal_repr(value))


# -- Ray Tune's ResultGrid (ray/tune/result_grid.py, Ray 2.60.0) ---------------------------------
# The public Result has no trial status, and the results table needs ERROR, TERMINATED and the
# statuses of trials that never ended (interrupted); the ExperimentAnalysis behind it has them.

def experiment_analysis(results: Any) -> Any:
    return results._experiment_analysis


# -- Ray core (Ray 2.60.0) --------------------------------------------------------------------

def ray_cpu_count() -> float:
    """The CPUs a private local Ray instance will count (cgroup quotas included), or, if Ray's
    helper has moved, this process's affinity mask."""
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    except (ImportError, AttributeError):
        return float(len(os.sched_getaffinity(0)))


def disable_ray_clustering() -> None:
    """A private instance binds to loopback only: with the node IP 127.0.0.1 Ray 2.60 binds its
    GCS, raylet, object manager and worker servers to loopback, but only once clustering is off
    (``ray_constants.ENABLE_RAY_CLUSTER``; the environment variable reaches the processes Ray
    starts, the constant this one)."""
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


# Ray 2.60.0's Train/Tune storage: Tune builds a search's storage context from
# ``Experiment._storage_context_cls`` (the seam Ray's own tests use), by default Train's private
# ``StorageContext``. kdtune.search.staging subclasses it to stage each search process apart.

def storage_context_class() -> type:
    from ray.train._internal.storage import StorageContext

    return StorageContext


def use_storage_context_class(cls: type) -> bool:
    """Make Tune build storage contexts from ``cls``; False (nothing done) if the seam moved."""
    from ray.tune.experiment.experiment import Experiment

    if getattr(Experiment, "_storage_context_cls", None) is not storage_context_class():
        return getattr(Experiment, "_storage_context_cls", None) is cls
    Experiment._storage_context_cls = cls
    return True


# A logger Ray 2.60.0 names by its private module: its token-auth notice at every start.
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
