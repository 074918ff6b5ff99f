"""What a search checks before it creates anything in MLflow or starts a trial.

* one search per name at a time: an exclusive lock in the search's own folder (``flock``:
  the kernel drops it when the process dies, so a killed search leaves no stale lock);
* the storage folder can be written;
* the tracking store is reachable within seconds, and a new sqlite store is created under a
  lock, so two searches started at once never race in MLflow's schema migration;
* the resources asked for exist (a trial asking for more than the cluster has would wait forever);
* the device and the dataset files (read by the restricted CIFAR reader) are usable.

Every failure is a :class:`PreflightError`: one line, exit status 2, and nothing recorded yet.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from kdtune.checks import device_problem, shorten, writable_dir_problem
from kdtune.search.records import sqlite_file

logger = logging.getLogger(__name__)

LOCK_FILE = ".kdtune_search.lock"  # in the search's own folder, next to kdtune_search.json
TRACKING_TIMEOUT_S = 10  # an unreachable tracking server fails within this (plus connection setup)


class PreflightError(RuntimeError):
    """A search cannot start; the message is one line naming what and why."""


class SearchLock:
    """``flock`` on ``<own>/.kdtune_search.lock``, held for a ``with`` block (or until released)."""

    def __init__(self, own: Path, name: str) -> None:
        self.path = own / LOCK_FILE
        problem = writable_dir_problem(own, "search folder")
        if problem:
            raise PreflightError(problem)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder() if e.errno in (errno.EAGAIN, errno.EACCES) else None
            self.release()
            if holder is None:  # e.g. a filesystem without locks
                raise PreflightError(f"{self.path}: cannot lock the search folder ({e.strerror})") from e
            raise PreflightError(
                f"a search named {name!r} is already running ({holder}; lock {self.path}); wait for it, "
                f"stop it, or start this one with --set name=<new name>") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)

    def _holder(self) -> str:
        # The holder writes its record right after locking; give it a moment.
        for _ in range(20):
            try:
                record = json.loads(os.pread(self._fd, 4096, 0) or b"null")
            except ValueError:
                record = None
            if record:
                return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
            time.sleep(0.05)
        return "by another process"

    def release(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> SearchLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # A lock dropped without release (an error between acquiring it and entering a with block)
    # is released when collected, not held by a forgotten descriptor.
    __del__ = release


def check_storage(storage: str, own: Path) -> None:
    """A local storage path must be a folder we can write (a URI is checked by Ray itself)."""
    if "://" not in storage:
        problem = writable_dir_problem(storage, "--storage-path", create=False)
        if problem:
            raise PreflightError(problem)


@contextlib.contextmanager
def _dir_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a folder itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's REST client retries for about two minutes by default; a preflight wants an answer now."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(TRACKING_TIMEOUT_S)}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking(uri: str) -> None:
    """The tracking store answers (and, for sqlite, exists with MLflow's current schema)."""
    import warnings

    from mlflow import MlflowClient

    where = f"--tracking-uri {shorten(uri)}"
    db = sqlite_file(uri)
    if db is not None:
        if not db.parent.is_dir():
            raise PreflightError(f"{where}: folder {db.parent} does not exist")
        if db.exists() and not db.is_file():
            raise PreflightError(f"{where}: {db} is not a file")
        _check_sqlite_writable(db, where)
        if not db.exists():
            # Created only when the search starts (create_tracking_store): a refused search makes none.
            problem = writable_dir_problem(db.parent, f"{where}: folder", create=False)
            if problem:
                raise PreflightError(problem)
            return
    try:
        with warnings.catch_warnings(), _quick_http():
            warnings.simplefilter("ignore")
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # unknown scheme, refused connection, bad credentials, corrupt database
        raise PreflightError(f"{where}: tracking store not usable: {_first_line(e)}") from e


def create_tracking_store(uri: str) -> None:
    """Create a new sqlite store before the search's first run. MLflow creates and migrates a new
    sqlite store on first use; two searches doing that at once crash in alembic, so the first
    creates it while the other waits."""
    import warnings

    from mlflow import MlflowClient

    db = sqlite_file(uri)
    if db is None:
        return
    with warnings.catch_warnings(), _dir_lock(db.parent):
        warnings.simplefilter("ignore")
        MlflowClient(uri).search_experiments(max_results=1)


def _check_sqlite_writable(db: Path, where: str) -> None:
    import sqlite3

    if not db.exists():
        return  # created below; check_storage-like errors show up there
    try:
        con = sqlite3.connect(db, timeout=TRACKING_TIMEOUT_S, isolation_level=None)
        try:
            # SQLite opens a read-only file read-only without a word and fails at the first write;
            # write something inside a transaction and roll it back.
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE kdtune_write_check (x)")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as e:
        raise PreflightError(f"{where}: cannot write {db}: {e}") from e


def check_device(spec) -> None:
    problem = device_problem(str(spec.fixed.get("device", "auto")))
    if problem:
        raise PreflightError(f"{spec.path}: fixed.{problem}")


def check_local_resources(spec) -> None:
    """A private local Ray instance gets this machine's CPUs and GPUs; a trial asking for more
    would wait forever. (On a cluster, :func:`check_cluster_resources` after connecting.)"""
    import torch

    from kdtune.search.internals import ray_cpu_count

    _check_resources(spec, ray_cpu_count(), float(torch.cuda.device_count()), "this machine (a private local Ray instance)")


def check_cluster_resources(spec, address: str) -> None:
    import ray

    total = ray.cluster_resources()
    _check_resources(spec, float(total.get("CPU", 0)), float(total.get("GPU", 0)), f"the Ray cluster at {address}")


def _check_resources(spec, cpus: float, gpus: float, where: str) -> None:
    asked = [("gpus_per_trial", spec.gpus_per_trial, gpus, "GPUs"), ("cpus_per_trial", spec.cpus_per_trial, cpus, "CPUs")]
    for key, want, have, unit in asked:
        if want > have + 1e-9:
            raise PreflightError(f"resources.{key}: {want:g} asked for, but {where} has {have:g} {unit}; "
                                 f"no trial could ever start")


def check_data(spec):
    """Read the dataset once on the driver (CIFAR files through the restricted reader), so a missing
    or unsafe file fails here with its name instead of in every trial. Returns the data."""
    from kdtune.config import RunConfig
    from kdtune.data import DataError, load_dataset

    fixed = spec.fixed
    try:
        return load_dataset(fixed.get("dataset", RunConfig.dataset), root=fixed.get("data_root"),
                            val_size=fixed.get("val_size"), split_seed=fixed.get("split_seed", 0),
                            download=fixed.get("download", False), options=fixed.get("dataset_options"))
    except (DataError, ValueError) as e:
        raise PreflightError(str(e)) from e


def check_teacher_checkpoint(spec, data) -> None:
    """A teacher file the search names loads (weights only: a pickle that would run code is
    refused) and fits the teacher on ``data``, before anything is made; it is loaded again later."""
    path, teacher = spec.fixed.get("teacher_checkpoint"), spec.fixed.get("teacher")
    if not path or not teacher:
        return
    from kdtune.models import build_model
    from kdtune.teachers import CheckpointError, load_checkpoint

    try:
        load_checkpoint(build_model(teacher, num_classes=data.num_classes, in_channels=data.in_channels), path)
    except CheckpointError as e:
        raise PreflightError(f"fixed.teacher_checkpoint: {e}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def read_state(path: Path) -> dict:
    """A search's ``kdtune_search.json``; a damaged one is named, not a JSON traceback."""
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or "parent_run_id" not in state or "spec" not in state:
            raise ValueError("expected an object with parent_run_id and spec")
        return state
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PreflightError(f"{path}: not a readable kdtune search record ({str(e)[:200]})") from e


# The search's parent run once it exists, so that a failure anywhere later can close it.
_OPEN_PARENT: list = []


def opened_parent(client, run_id: str) -> None:
    _OPEN_PARENT[:] = [(client, run_id)]


def close_parent(status: str) -> None:
    """Mark the search's parent run ``status`` (FAILED, KILLED) if it is still RUNNING."""
    for client, run_id in _OPEN_PARENT:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status=status)
        except Exception as e:  # the store itself may be what failed
            logger.warning(f"could not mark MLflow run {run_id} {status}: {_first_line(e)}")
    _OPEN_PARENT.clear()
