"""``kdtune search SPACE.yaml``: search distillation hyperparameters.

Ray Tune runs the trials (one engine epoch per step, several small trials per GPU with
fractional ``--gpus-per-trial``), Optuna's TPE proposes configurations, ASHA stops weak trials
early, and every trial becomes an MLflow run nested under one run for the search. The file is
validated before anything starts (exit status 2 on any problem).

Every place ranks trials by one objective, the metric at the last epoch a trial trained
(:data:`kdtune.search.records.OBJECTIVE`). Running a file whose search already exists starts a
new search NAME-2 (then -3, ...); ``--resume`` continues the latest one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from kdtune.search import preflight
from kdtune.search.preflight import PreflightError
from kdtune.search.records import (BEST_FILE, OBJECTIVE, OBJECTIVE_METRIC, OPTUNA_FILE, PARETO_COLUMN, PARETO_TAG,
                                   RESULTS_FILE, RUN_FILE, STATE_FILE, fmt_config, fmt_objective, is_own_metric,
                                   objective_column, objective_value, pareto_column, resolve_tracking_uri)
from kdtune.search import instance, internals
from kdtune.search.spec import SearchSpec, load_spec

logger = logging.getLogger(__name__)

def resolve_storage(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def local_dir(storage: str, name: str) -> Path:
    """Where kdtune keeps its own files of a search (results table, parent run id)."""
    return Path(storage) / name if "://" not in storage else Path.cwd() / "kdtune_searches" / name


# The command's flags that are shorthands for spec overrides (kdtune.cli.search declares them).
FLAG_OVERRIDES = {"num_samples": "search.num_samples", "max_concurrent": "search.max_concurrent",
                  "gpus_per_trial": "resources.gpus_per_trial", "cpus_per_trial": "resources.cpus_per_trial",
                  "confirm_top_k": "confirm.top_k", "confirm_seeds": "confirm.seeds"}


def execute(args, trainable: type | None = None) -> tuple[int, Path | None]:
    """Run (or dry-run) the search ``args`` describe (the command's options: the fields of
    :mod:`kdtune.cli.search`); ``(exit status, the search's folder)``: 0 done, 130
    interrupted. Bad input raises :class:`ConfigError` or :class:`PreflightError` before anything
    is made. ``trainable``: a subclass of :class:`~kdtune.search.trainable.KDTrainable` to run the
    trials (the overhead benchmark's no-op trials); default KDTrainable."""
    overrides = [f"{path}={getattr(args, flag)}" for flag, path in FLAG_OVERRIDES.items()
                 if getattr(args, flag) is not None] + list(args.overrides)
    spec = load_spec(args.space, overrides)
    storage = resolve_storage(args.storage_path)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not args.dry_run:
        quiet_libraries(args.verbose)
    # Everything that can refuse the search is checked before it is named or anything is made
    # (no folder, no store, no run): a refused search, or a --dry-run, leaves no trace.
    name, note = search_name(spec, storage, args.resume)
    spec = renamed(spec, name)
    own = local_dir(storage, spec.name)
    if is_running(storage, spec.name):  # refused at once, naming the running search (its lock says who)
        preflight.SearchLock(own, spec.name).release()  # (released at once if that search just ended)
    preflight.check_storage(storage, own)
    stored = preflight.read_state(own / STATE_FILE) if args.resume and (own / STATE_FILE).is_file() else None
    if stored is not None and stored["spec"] != spec.resolved:
        raise PreflightError(f"--resume: {spec.path} (with its overrides) differs from the search stored in "
                             f"{own}; resume with the same file and --set values")
    # the Optuna study: where the search put it (on --resume), else --optuna-storage or beside the results
    optuna_url = (stored or {}).get("optuna_storage") or args.optuna_storage or f"sqlite:///{own / OPTUNA_FILE}"
    if not args.resume and spec.algorithm in ("tpe", "gp") and args.optuna_storage and study_exists(optuna_url, spec.name):
        raise PreflightError(f"--optuna-storage {args.optuna_storage}: a study named {spec.name!r} exists there "
                             f"already; start this search under another name (--set name=...)")
    preflight.check_device(spec)
    preflight.check_tracking(tracking_uri)
    if not address:
        preflight.check_local_resources(spec)
        return checked_search(spec, args, storage, tracking_uri, own, optuna_url, note, trainable)
    init_ray(address, args.verbose)  # cheap on a running cluster, and the only way to see its resources
    try:
        preflight.check_cluster_resources(spec, address)
        return checked_search(spec, args, storage, tracking_uri, own, optuna_url, note, trainable)
    finally:
        # the search disconnects at its end (run_search); a refused search and a dry run do here,
        # so that a program's next search (kdtune.search.run) connects to its own cluster
        import ray

        ray.shutdown()


def checked_search(spec: SearchSpec, args, storage: str, tracking_uri: str, own: Path, optuna_url: str,
                   note: str | None, trainable: type | None) -> tuple[int, Path | None]:
    """:func:`execute` after its resource checks: the data and teacher checks, then the search (or
    the dry run's report)."""
    preflight.check_teacher_checkpoint(spec, preflight.check_data(spec))
    if args.dry_run:
        print_dry_run(spec, storage, tracking_uri)
        print(f"# a real run would be the search {spec.name!r}" + (f": {note}" if note else ""))
        return 0, None
    if note:
        logger.info(note)
    for line in instance.end_leftovers(storage):
        logger.info(line)
    made = not own.exists()
    # Held until the search ends: makes the existence checks below and the creation of the
    # search atomic (a second search of this name stops here, before MLflow).
    with preflight.SearchLock(own, spec.name):
        try:
            return locked_search(spec, args, storage, tracking_uri, own, optuna_url, trainable), own
        finally:
            # Refused (or stopped) before it was recorded: the folder this search made goes, so
            # that nothing is left of it (only the holder of the lock may remove it).
            if made and not (own / STATE_FILE).exists():
                shutil.rmtree(own, ignore_errors=True)


def locked_search(spec: SearchSpec, args, storage: str, tracking_uri: str, own: Path, optuna_url: str,
                  trainable: type | None = None) -> int:
    from kdtune.data import DataError
    from kdtune.teacher_cache import CacheError
    from kdtune.teachers import CheckpointError

    state_path = own / STATE_FILE
    if args.resume and not state_path.is_file():
        raise PreflightError(f"--resume: no search named {spec.name!r} to resume under {storage}")
    if not args.resume and state_path.is_file():
        raise PreflightError(f"a search named {spec.name!r} already exists under {storage}: continue it with "
                             f"--resume, or start a new one with --set name=<new name>")
    try:
        teacher = prepare_teacher(spec)
    except (DataError, CheckpointError, CacheError) as e:  # each message names its file
        raise PreflightError(str(e)) from e
    try:
        return run_search(spec, storage, tracking_uri, args.address, args.resume, own, teacher,
                          optuna_url if spec.algorithm in ("tpe", "gp") else None, args.verbose, args.status_every,
                          trainable)
    except KeyboardInterrupt:
        preflight.close_parent("KILLED")
        logger.warning(f"\ninterrupted; continue with: kdtune search {spec.path} --resume "
                       f"--storage-path {storage}")
        return 130
    except BaseException:
        preflight.close_parent("FAILED")  # never leave the search's run RUNNING
        raise


def search_name(spec: SearchSpec, storage: str, resume: bool) -> tuple[str, str | None]:
    """The name this run uses, and a note to print when it is not the file's own; nothing is made.
    With ``--resume``: the latest search started from the file's name. Else the name itself, or
    NAME-<n> when a finished or interrupted search of that name exists (what Ray Tune and W&B
    users expect of running a file again; one still running keeps its name, so its lock refuses
    this run)."""
    taken = existing_names(storage, spec.name)
    if resume and not taken:
        raise PreflightError(f"--resume: no search named {spec.name!r} to resume under {storage}")
    if resume:
        return taken[-1], None
    if not taken:
        return spec.name, None
    if is_running(storage, taken[-1]):
        return taken[-1], None  # still running: refused by its lock, with its holder named
    number = max(1 if n == spec.name else int(n.rsplit("-", 1)[1]) for n in taken) + 1
    new = f"{spec.name}-{number}"
    while local_dir(storage, new).exists():  # a folder that is not a search (no state file) is not reused
        new += "-new"
    return new, (f"a search named {spec.name!r} exists under {storage}; starting a new search {new!r} "
                 f"(continue the last one with --resume)")


def is_running(storage: str, name: str) -> bool:
    """Whether a search of this name holds its lock now (see preflight.SearchLock)."""
    import fcntl

    path = local_dir(storage, name) / preflight.LOCK_FILE
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # drops the probe's own lock


def existing_names(storage: str, name: str) -> list[str]:
    """The searches started from ``name`` under ``storage``, oldest first: NAME, NAME-2, NAME-3, ..."""
    found = [(1, name)] if (local_dir(storage, name) / STATE_FILE).is_file() else []
    parent = local_dir(storage, name).parent
    if parent.is_dir():
        for d in parent.glob(f"{name}-*"):
            suffix = d.name[len(name) + 1:]
            if suffix.isdigit() and (d / STATE_FILE).is_file():
                found.append((int(suffix), d.name))
    return [n for _, n in sorted(found)]


def renamed(spec: SearchSpec, name: str) -> SearchSpec:
    return dataclasses.replace(spec, name=name, resolved={**spec.resolved, "name": name})


def study_exists(url: str, name: str) -> bool:
    import optuna

    try:
        return any(s.study_name == name for s in optuna.study.get_all_study_summaries(url))
    except Exception:  # unreachable or empty database: creating the study will say what is wrong
        return False


def quiet_libraries(verbose: bool) -> None:
    """Ray's and MLflow's own lines (token-auth notice, Ray banner, experiment box, TensorBoard
    pointer, MLflow table creation, Tune's timing line) say nothing a kdtune user acts on; they
    come back with --verbose. Warnings and errors still show."""
    if verbose:
        os.environ["KDTUNE_VERBOSE"] = "1"  # read by the trainable in Ray's workers
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's legacy output: silent at verbose=0
    import mlflow  # noqa: F401  (its import sets its loggers' levels: set ours after it)

    for name in ("mlflow", "alembic", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # a notice about Ray's default, logged as a warning at every start
    logging.getLogger(internals.RAY_AUTH_LOGGER).setLevel(logging.ERROR)
    logging.getLogger("ray.tune.execution.experiment_state").addFilter(_vanished_staging_file)


def _vanished_staging_file(record: logging.LogRecord) -> bool:
    """False for Tune's error (with a traceback) when a file vanished from its staging folder
    while it uploaded the experiment state: the upload runs in a thread while the next snapshot
    writes its files under temporary names there, and a temporary file renamed mid-copy fails
    that upload. Nothing is lost: each snapshot uploads the whole folder again, and the last one,
    which Tune waits for, has no writer beside it. Seen on a loaded 2-core machine."""
    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, FileNotFoundError) and "-tmp-" in str(error))


def prepare_teacher(spec: SearchSpec) -> dict[str, Any] | None:
    """Resolve (train and cache, if needed) the teacher once, before any trial starts, and build
    the teacher-output cache the trials will read (once here, not once per trial). On a GPU both
    run in a child process, so the driver keeps no CUDA memory during the search."""
    from kdtune.run import resolve_teacher_records
    from kdtune.distillers import METHODS
    from kdtune.teacher_cache import use_cache

    methods = list(spec.space.methods) if spec.space.methods else [spec.fixed.get("method", "kd")]
    needing = [m for m in methods if METHODS.get(m).needs_teacher]
    if not needing:
        return None
    cfg = spec.run_config({"method": needing[0]} if spec.space.methods else {})
    decisions = {m: use_cache(cfg.teacher_cache, m, cfg.sampler, cfg.dataset) for m in needing}  # (reads it, why)
    cached = [m for m, (on, _) in decisions.items() if on]
    cache_cfg = spec.run_config({"method": cached[0]} if spec.space.methods else {}) if cached else None
    # Build for the device the trials use: CPU-only trials on a GPU host see no GPU.
    cache_device = "cpu" if spec.gpus_per_trial == 0 and cfg.device == "auto" else cfg.device
    record = resolve_teacher_records(cfg, cache_cfg, cache_device, spec.planned_trial_epochs())
    logger.info(f"teacher {record['model']} ({record['source']}: {record['path']}) val acc "
                f"{record['val_acc']:.2f}")
    if "cache_description" in record:
        logger.info(f"teacher cache for {', '.join(cached)}: {record.pop('cache_description')}")
    # the trials say the same in their own output (their folders); said here, it is seen
    for reason in dict.fromkeys(why for on, why in decisions.values() if not on):
        logger.info(reason)
    return record


# kdtune's environment variables that the trials read: plugins to import, --verbose
FORWARDED_ENV = ("KDTUNE_PLUGINS", "KDTUNE_VERBOSE")


def init_ray(address: str | None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():  # connected early, to check a cluster's resources
        return

    # A CPU-only trial on a GPU host would otherwise see every GPU (Ray leaves
    # CUDA_VISIBLE_DEVICES unset for zero-GPU trials).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")
    # A trial that checkpoints every epoch (checkpoint_every_s 0) forces a snapshot per epoch;
    # on a local disk that takes milliseconds, so Tune's warning about it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    # Without --verbose: no banner ("Started a local Ray instance"), and the trials' own output
    # stays in their folders (stdout, stderr; see new_tuner) instead of reaching this terminal
    # as Ray forwards it: prefixed, coloured, deduplicated, and with a worker's shutdown noise.
    quiet = {} if verbose else {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        # The workers of a running cluster have the environment they were started with, not
        # ours: kdtune's own variables reach the trials through the job's runtime environment
        # (a plugin module must be importable there: Ray puts this directory on the workers'
        # path on this machine; on other nodes, install it).
        forwarded = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        ray.init(address=address, **quiet, **({"runtime_env": {"env_vars": forwarded}} if forwarded else {}))
        logger.info(f"connected to the Ray cluster at {address}")
    else:
        # "local" never attaches to a cluster that happens to be running (or a stale one).
        # Loopback only: with the node IP 127.0.0.1 Ray 2.60 binds its GCS, raylet, object manager
        # and worker servers to loopback (otherwise to every interface, "::"); Ray turns a
        # _node_ip_address of 127.0.0.1 into the host's address unless clustering is switched off.
        # The environment variable reaches the processes Ray starts.
        internals.disable_ray_clustering()
        # Ray starts an idle worker per CPU for the first driver, for tasks that may come; a
        # search's trials are actors that Tune places one by one in workers of their own, so those
        # idle workers only imported Ray (about 0.7 s of CPU each) and waited, unused.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        ray.init(address="local", include_dashboard=False, object_store_memory=256 * 1024**2,
                 _node_ip_address="127.0.0.1", **quiet)
        logger.info("started a private local Ray instance")


def run_search(spec: SearchSpec, storage: str, tracking_uri: str, address: str | None, resume: bool,
               own: Path, teacher: dict[str, Any] | None, optuna_url: str | None = None, verbose: bool = False,
               status_every: float = 30.0, trainable_class: type | None = None) -> int:
    import functools

    import ray
    from mlflow import MlflowClient
    from ray import tune

    from kdtune.search.final import flat_run_config
    from kdtune.search.progress import Progress
    from kdtune.search.staging import use_process_staging
    from kdtune.search.tracking import (TrialTracker, close_dangling_runs, ended_trials, start_parent_run,
                                        trials_url, version_tags)
    from kdtune.search.trainable import KDTrainable

    preflight.create_tracking_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    tags = {k: str(spec.fixed.get(k, "")) for k in ("method", "teacher", "student", "dataset", "seed")}
    tags.update(version_tags())
    if resume:
        parent_id = preflight.read_state(own / STATE_FILE)["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        preflight.opened_parent(client, parent_id)
    else:
        parent_id = start_parent_run(client, spec, tags, teacher, opened=preflight.opened_parent)
        own.mkdir(parents=True, exist_ok=True)
        # "folder": where this search was, so that a moved copy finds its own files (search/final.py)
        (own / STATE_FILE).write_text(json.dumps({"parent_run_id": parent_id, "tracking_uri": tracking_uri,
                                                  "folder": str(own),
                                                  "optuna_storage": optuna_url, "spec": spec.resolved}, indent=2))
    if spec.objectives:
        logger.info(f"search {spec.name}: objectives {', '.join(f'{m} ({d})' for m, d in spec.objectives)}, "
                    f"each at the last epoch the trial trained; the result is their Pareto front")
    else:
        logger.info(f"search {spec.name}: objective {spec.metric} ({spec.mode}), {OBJECTIVE}")
    trials = trials_url(client, spec.name, parent_id, spec.mode)
    client.set_tag(parent_id, "kdtune.trials_url", trials)
    logger.info(f"MLflow: this search's trials, best first: {trials} (after: mlflow ui --backend-store-uri "
                f"{tracking_uri})")
    if optuna_url:
        logger.info(f"Optuna study {spec.name!r}: optuna-dashboard {optuna_url}")

    experiment_path = f"{storage.rstrip('/')}/{spec.name}"
    if spec.workers_per_trial > 1:  # each trial a TorchTrainer of several workers
        from kdtune.search.ddp import data_parallel_trainable

        trainable = data_parallel_trainable(spec, experiment_path)
    else:
        trainable = tune.with_resources(tune.with_parameters(trainable_class or KDTrainable, spec=spec),
                                        {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})
    # On --resume the tracker, progress, searcher and scheduler come back from the experiment state.
    callbacks = None if resume else [
        TrialTracker(tracking_uri, spec.name, parent_id, tags, spec.max_epochs, spec.metric, spec.mode,
                     run_config=functools.partial(flat_run_config, spec), objectives=spec.objectives,
                     mutate=spec.mutate),
        Progress(spec.num_samples, spec.max_epochs, spec.metric, spec.mode, every_s=status_every,
                 objectives=spec.objectives)]
    tracker = None if resume else callbacks[0]
    init_ray(address, verbose)
    # what a later search ends if this driver is killed
    recorder = None if address or os.environ.get("RAY_ADDRESS") else instance.Recorder(own)
    use_process_staging()
    start = time.perf_counter()
    try:
        results = fit(spec, experiment_path, trainable,
                      None if resume else functools.partial(new_tuner, spec, storage, trainable, callbacks, optuna_url))
        table = results_table(results, spec, ended_trials(client, spec.name, parent_id))
        expected = spec.trials
        selection, confirm_ended = None, True
        if spec.confirm_top_k and len(table) >= expected and not (table["status"] == "interrupted").any():
            from kdtune.search.confirm import run_confirmation

            selection, confirm_ended = run_confirmation(spec, table, storage, own, client, parent_id, tags, trainable,
                                                        resume, status_every)
    finally:
        ray.shutdown()
        if recorder is not None:
            recorder.forget()
        close_dangling_runs(client, spec.name, parent_id)
    if optuna_url and len(table) >= expected and not (table["status"] == "interrupted").any():
        from kdtune.search.searchers import close_stale_trials

        close_stale_trials(optuna_url, spec.name)
    wall = time.perf_counter() - start
    if verbose and tracker is not None and tracker.results_logged:
        logger.info(f"MLflow logging on the driver: {1000 * tracker.log_seconds / tracker.results_logged:.1f} ms "
                    f"per reported epoch ({tracker.results_logged} results)")
    return report(spec, table, expected, client, parent_id, own, tracking_uri, experiment_path, wall, selection,
                  confirm_ended)


def fit(spec: SearchSpec, experiment_path: str, trainable, make_tuner=None):
    """Run the search to its end: a new tuner from ``make_tuner``, or, with None, the experiment
    at ``experiment_path`` restored (``--resume``).

    Tune counts a lost trial actor (``RayActorError``) as that trial's failure and retries it
    from its checkpoint. One escaped Tune's handling once, under load (``ActorUnavailableError:
    Socket closed``, raised out of ``Tuner.fit``), and ended the whole search. Such an error now
    restores the experiment from its saved state, as ``--resume`` would (unfinished and errored
    trials go on from their last checkpoints), at most ``max_failures`` times.
    """
    from ray import tune

    def restored():
        # "Failed to fetch metrics for N trial(s)": trials that had not written results yet;
        # they are restored all the same.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True)

    tuner = make_tuner() if make_tuner is not None else restored()
    for attempt in range(1, spec.max_failures + 2):
        try:
            return tuner.fit()
        except Exception as e:
            lost = lost_worker(e)
            if lost is None or attempt > spec.max_failures:
                raise
            reason = (str(lost).strip().splitlines() or [""])[0][:200]
            logger.warning(f"Ray lost a worker outside a trial ({type(lost).__name__}: {reason}); restoring the "
                           f"search from its saved state ({attempt} of {spec.max_failures})")
            tuner = restored()


def lost_worker(error: BaseException) -> BaseException | None:
    """The ``RayActorError`` in ``error``'s chain (Tune wraps some in a TuneError), or None."""
    from ray.exceptions import RayActorError

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, RayActorError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def new_tuner(spec: SearchSpec, storage: str, trainable, callbacks, optuna_url: str | None = None):
    from ray import tune

    from kdtune.search.schedulers import build_scheduler
    from kdtune.search.searchers import build_searcher, concurrency

    searcher, param_space, num_samples = build_searcher(spec, optuna_url)
    scheduler = build_scheduler(spec)
    # Tune takes one metric (its scheduler and ResultGrid rank by it): with several objectives the
    # search's metric, the first of spec.objectives; the searcher has them all (searchers.py), and
    # Tune never passes its metric to a searcher built with its own space.
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=num_samples, max_concurrent_trials=concurrency(searcher, spec),
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage, callbacks=callbacks, verbose=0,
            # Tune's default reporter in a notebook (JupyterNotebookReporter) clears the cell's
            # output when it is made, even at verbose 0: kdtune's lines before the trials (the
            # teacher, the MLflow link) would vanish from a kdtune.search.run cell.
            progress_reporter=tune.CLIReporter(),
            # each trial's stdout and stderr, in its folder: written in Ray's staging folder and
            # copied after every epoch (in the background; Ray's default is every 5 minutes and
            # at a checkpoint, and a trial may not checkpoint at all: checkpoint_every_s)
            log_to_file=True, sync_config=tune.SyncConfig(sync_artifacts=True, sync_period=0),
            # Trials ask for their checkpoints (checkpoint_every_s, KDTrainable.checkpoint_when_due):
            # crashed trials retry from the last one and --resume continues from it.
            # PBT copies a top trial's latest checkpoint into a weak one, which restores it later:
            # with one kept, the top trial's next checkpoint could delete it first (Tune warns
            # below 3).
            # No checkpoint when a trial ends (Tune's default for a class trainable): an ended trial
            # is never restored, and with num_to_keep set Tune snapshots the whole experiment and
            # copies its folder (files of every trial so far) after each checkpoint, which made
            # every trial's end cost time linear in the trials (kdtune bench --overhead).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=3 if spec.scheduler in ("pbt", "pb2") else 1,
                                                    checkpoint_at_end=False),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures)))


def results_table(results, spec: SearchSpec, ended: set[str]):
    """One row per trial: hyperparameters, the objective (``final_<metric>``: the metric at the last
    epoch trained), the best epoch's value (for reference only), epochs, status, wall time, samples.
    ``ended``: the trials whose end was recorded (tracking.ended_trials); another TERMINATED trial
    was stopped by Ctrl-C, not by the scheduler, and is "interrupted"."""
    import pandas as pd

    from kdtune.search.records import trial_status

    # ResultGrid's public Result has no trial status, and Tune uses one TERMINATED for both
    # "finished" and "stopped by ASHA"; the analysis object behind it has both.
    analysis = internals.experiment_analysis(results)
    names = spec.space.names()
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        history = analysis.trial_dataframes.get(trial.trial_id)
        series = history[spec.metric] if history is not None and spec.metric in history else pd.Series(dtype=float)
        if trial.status == "ERROR" or (trial.status == "TERMINATED" and trial.trial_id in ended):
            status = trial_status(last, spec.max_epochs, error=trial.status == "ERROR")
        else:
            status = "interrupted"
        row = {"trial_id": trial.trial_id}
        row.update({n: trial.config.get(n) for n in names})
        best = (series.max() if spec.mode == "max" else series.min()) if len(series) else math.nan
        row.update({"status": status, "epochs": last.get("training_iteration", 0),
                    objective_column(spec.metric): objective_value(list(series)) if len(series)
                    else last.get(spec.metric, math.nan)})
        for metric, _ in spec.objectives[1:]:  # each further objective, as the first: its last epoch's value
            values = history[metric] if history is not None and metric in history else pd.Series(dtype=float)
            row[objective_column(metric)] = objective_value(list(values)) if len(values) else last.get(metric, math.nan)
        row.update({f"best_{spec.metric}": best,
                    "wall_s": last.get("time_total_s", math.nan),
                    "samples_backprop": last.get("samples/backprop", math.nan)})
        # method- and sampler-specific values of the last epoch (KDAS's ratio, CTKD's temperature,
        # SAKD's gate rates, samples scored, a plugin's own metrics)
        row.update({k: v for k, v in last.items() if is_own_metric(k) and k not in row
                    and isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows.append(row)
    table = pd.DataFrame(rows)
    if spec.mutate and len(table):  # pbt / pb2: each trial's exploits, read from Tune's policy files
        from kdtune.search.pbt import HISTORY_COLUMN, history_text, original_tags, trial_history

        tags = original_tags(analysis.trials)
        table[HISTORY_COLUMN] = [history_text(trial_history(t, tags, list(spec.mutate))) for t in analysis.trials]
    if spec.objectives and len(table):  # after the objectives it is computed from
        table.insert(table.columns.get_loc(f"best_{spec.metric}"), PARETO_COLUMN,
                     pareto_column(table, spec.objectives))
    return table


def report(spec: SearchSpec, table, expected: int, client, parent_id: str, own: Path, tracking_uri: str,
           experiment_path: str, wall: float, selection=None, confirm_ended: bool = True) -> int:
    from mlflow.entities import Metric, RunTag

    from kdtune.search.confirm import single_run_selection
    from kdtune.search.final import flat_run_config, trial_folder

    csv = own / RESULTS_FILE
    own.mkdir(parents=True, exist_ok=True)
    column = objective_column(spec.metric)
    ranked = table[~table["status"].isin(["diverged", "failed"])].dropna(subset=[column]) if len(table) else table
    if spec.objectives and len(table):
        # Several objectives: best.json's trial (what --from-search re-runs without --trial) is the
        # front's best by the first objective, never a trial the front dominates.
        ranked = ranked[ranked[PARETO_COLUMN]]
    if selection is None and len(ranked):
        selection = (single_run_selection(table[table[PARETO_COLUMN]], spec.metric, spec.mode, confirmable=False)
                     if spec.objectives else single_run_selection(table, spec.metric, spec.mode))
    if selection is not None and selection.confirmed:
        table = selection.add_columns(table)  # each candidate's mean, std and number of seeds
    table.to_csv(csv, index=False)
    client.log_artifact(parent_id, str(csv))
    interrupted = len(table) < expected or (table["status"] == "interrupted").any() or not confirm_ended
    counts = ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items()) if len(table) else "no trials"
    logger.info(f"\nsearch {spec.name}: {len(table)} trials ({counts}) in {wall:.0f}s")
    front = pareto_records(spec, table) if spec.objectives else []
    if spec.objectives:
        for line in pareto_lines(spec, table, front):
            logger.info(line)
        mark_pareto_runs(client, spec.name, parent_id, front)
    if len(ranked):
        best = table.set_index("trial_id", drop=False).loc[selection.chosen]
        for line in selection.lines():
            logger.info(line)
        config = _plain({n: best[n] for n in spec.space.names() if n in best and not _missing(best[n])})
        value = float(best[column])
        chosen = selection.candidates[0]
        by_mean = (f"; mean {chosen.mean:.2f}" + (f" ± {chosen.std:.2f}" if chosen.n > 1 else "")
                   + f" over {chosen.n} seeds" if selection.confirmed else "")
        logger.info(f"best trial {best['trial_id']}: {spec.metric} {value:.2f} at its last epoch "
                    f"({int(best['epochs'])} of {spec.max_epochs}){by_mean}")
        logger.info(f"best configuration: {fmt_config(config)}")
        folder = trial_folder(own, best["trial_id"])
        # the trial's own run.yaml (written when it started) is the exact configuration
        full = (yaml.safe_load((folder / RUN_FILE).read_text()) if folder is not None and (folder / RUN_FILE).is_file()
                else flat_run_config(spec, config))
        record = {"trial_id": best["trial_id"], "objective": {"metric": spec.metric, "mode": spec.mode,
                                                              "definition": OBJECTIVE, "value": value},
                  spec.metric: value, "epochs": int(best["epochs"]), "status": best["status"],
                  "params": config, "config": full, "selection": selection.record()}
        if selection.confirmed:
            record.update(mean=chosen.mean, std=chosen.std, n_seeds=chosen.n)
        if spec.objectives:
            record.update(objectives=[{"metric": m, "mode": d} for m, d in spec.objectives], pareto_front=front)
        (own / BEST_FILE).write_text(json.dumps(record, indent=2))
        ts = int(time.time() * 1000)
        # Tags, not params: MLflow params are immutable, and a resumed search may find a better trial.
        means = ([Metric(f"{OBJECTIVE_METRIC}_mean", chosen.mean, ts, 0)]
                 if selection.confirmed and math.isfinite(chosen.mean) else [])
        client.log_batch(parent_id, metrics=[Metric(OBJECTIVE_METRIC, value, ts, 0), *means],
                         tags=[RunTag(f"best.{k}", str(v)) for k, v in config.items()]
                         + [RunTag("kdtune.best_trial", str(best["trial_id"])),
                            RunTag("kdtune.selection_rule", selection.rule)])
        client.log_artifact(parent_id, str(own / BEST_FILE))
        if folder is not None:
            logger.info(f"final model: kdtune train --from-search {own} --final --seeds 3")
            if spec.objectives and len(front) > 1:
                logger.info(f"another trial of the front: add --trial ID (the best {spec.metric} is the default)")
    client.set_terminated(parent_id, status="KILLED" if interrupted else "FINISHED")
    logger.info(f"results table: {csv}")
    logger.info(f"MLflow: experiment {spec.name!r} at {tracking_uri} "
                f"(browse: mlflow ui --backend-store-uri {tracking_uri})")
    if interrupted:
        logger.warning(f"the search was interrupted; continue it with: kdtune search {spec.path} "
                       f"--resume --storage-path {experiment_path.rsplit('/', 1)[0]}")
        return 130
    return 0


def pareto_records(spec: SearchSpec, table) -> list[dict[str, Any]]:
    """The Pareto front's trials as best.json lists them: id, objective values, epochs and
    hyperparameters; best first by the first objective (then by the others, in order)."""
    if not len(table):
        return []
    front = table[table[PARETO_COLUMN]]
    signs = [-1.0 if d == "max" else 1.0 for _, d in spec.objectives]
    records = []
    for _, row in front.iterrows():
        records.append({"trial_id": str(row["trial_id"]),
                        "values": {m: float(row[objective_column(m)]) for m, _ in spec.objectives},
                        "epochs": int(row["epochs"]),
                        "params": _plain({n: row[n] for n in spec.space.names() if n in row and not _missing(row[n])})})
    return sorted(records, key=lambda r: [s * r["values"][m] for s, (m, _) in zip(signs, spec.objectives)])


def pareto_lines(spec: SearchSpec, table, front: list[dict[str, Any]]) -> list[str]:
    """The closing lines of a multi-objective search: the front, one trial a line."""
    completed = int((table["status"] == "completed").sum()) if len(table) else 0
    what = ", ".join(f"{m} ({d})" for m, d in spec.objectives)
    if not front:
        return [f"Pareto front of {what}: no completed trial"]
    lines = [f"Pareto front of {what}: {len(front)} of {completed} completed trials, best {spec.metric} first"]
    for r in front:
        values = ", ".join(f"{m} {fmt_objective(m, v)}" for m, v in r["values"].items())
        lines.append(f"  trial {r['trial_id']}: {values} | {fmt_config(r['params']) or '-'}")
    return lines


def mark_pareto_runs(client, experiment: str, parent_id: str, front: list[dict[str, Any]]) -> None:
    """The front in MLflow: the parent run's tag ``kdtune.pareto_front`` (the trial ids) and the tag
    ``kdtune.pareto`` = true on each front trial's run, so that the runs table filters to the front
    (``tags.`kdtune.pareto` = 'true'``). A run tagged by an earlier end of this search (before a
    --resume added trials) that is no longer on the front loses its tag."""
    from kdtune.search.records import TRIAL_TAG
    from kdtune.search.tracking import child_runs

    ids = [r["trial_id"] for r in front]
    text = ", ".join(ids)
    # MLflow caps a tag's value (5,000 characters in MLflow 2); best.json always has the whole front
    client.set_tag(parent_id, "kdtune.pareto_front", "none" if not ids else text if len(text) <= 5000
                   else f"{len(ids)} trials: see best.json")
    runs = {run.data.tags.get(TRIAL_TAG): run for run in child_runs(client, experiment, parent_id)}
    for tid, run in runs.items():
        on_front, tagged = tid in ids, run.data.tags.get(PARETO_TAG) == "true"
        if on_front and not tagged:
            client.set_tag(run.info.run_id, PARETO_TAG, "true")
        elif tagged and not on_front:
            client.delete_tag(run.info.run_id, PARETO_TAG)


def print_dry_run(spec: SearchSpec, storage: str, tracking_uri: str) -> None:
    from kdtune.search.searchers import build_searcher

    print(f"# resolved search spec ({spec.path})")
    print(yaml.safe_dump(spec.resolved, sort_keys=False))
    searcher, param_space, num_samples = build_searcher(spec)
    print(f"# translated space: {spec.algorithm}, {num_samples} trials")
    if spec.algorithm in ("tpe", "gp"):
        import optuna

        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        trial = study.ask()
        spec.space.suggest(trial)
        print(f"# Optuna define-by-run (one draw): {trial.distributions}")
    elif spec.algorithm == "random":
        print(f"# Ray Tune domains: {param_space}")
    else:
        print(f"# grid points: {searcher._points_to_evaluate}")
    print(f"# storage {storage}/{spec.name}; MLflow {tracking_uri}")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v.item() if hasattr(v, "item") else v for k, v in d.items()}

