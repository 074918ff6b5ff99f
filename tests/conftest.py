from __future__ import annotations

import atexit
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import processes
from kdtune.logs import configure

# In-process tests call library functions and command mains directly and read their lines as
# the command prints them: kdtune's handler, at INFO, as `kdtune` installs it.
configure()

# Whatever a test starts stays this process's descendant, even when it daemonizes (Ray's
# daemons): tests find what they left among their own processes (tests/processes.py).
processes.become_subreaper()

# Runs that keep the default cache_dir (teacher-output caches of the tests' random teachers) write
# into a folder of this test session, never into ~/.cache/kdtune; subprocesses inherit it. The
# first process of the session (pytest itself, or xdist's controller) makes it and removes it at
# exit; xdist's workers inherit its name and share it, so the teachers the searches train, their
# output caches and the MLflow template store are made once per session, not once per worker
# (two processes that train one teacher at once each save the same file atomically).
if "KDTUNE_TEST_SESSION_CACHE" not in os.environ:
    os.environ["KDTUNE_TEST_SESSION_CACHE"] = tempfile.mkdtemp(prefix="kdtune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["KDTUNE_TEST_SESSION_CACHE"], ignore_errors=True)
os.environ["KDTUNE_CACHE_DIR"] = os.environ["KDTUNE_TEST_SESSION_CACHE"]
# Ray's default temp dir (/tmp/ray) is the machine's: a search that starts its own Ray instance
# puts it in this session's instead (short: Ray's socket paths must stay under 108 bytes).
_SESSION_RAY_TMP = tempfile.mkdtemp(prefix="kdt", dir="/tmp")
os.environ["RAY_TMPDIR"] = _SESSION_RAY_TMP
atexit.register(shutil.rmtree, _SESSION_RAY_TMP, ignore_errors=True)


def pytest_configure(config) -> None:
    """In an xdist worker: one share of the cores, for its own torch and (OMP_NUM_THREADS) for the
    CLI runs and search drivers it starts. torch's default, every core in every process, put 4
    busy threads on 2 cores with `-n 2`: OpenMP's waiting threads spin, and the same tests took
    twice the CPU time (104 s against 52 s for four training-heavy modules). Trials set their own
    thread count (cpus_per_trial). A value the caller set is kept."""
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        config.pluginmanager.register(_GroupNodeIds(), "kdtune-xdist-groups")
    if worker is None or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // int(worker["workercount"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits with a 200-image validation split (shared by a module's tests)."""
    from kdtune.data import load_dataset

    return load_dataset("digits", val_size=200)


@pytest.fixture(scope="session")
def trained_resnet8():
    """A resnet8 teacher trained for 2 epochs on digits (~88 % val acc), for the tests that show a
    method learns: distilling a random network teaches little."""
    from kdtune.data import load_dataset
    from kdtune.teachers import resolve_teacher

    model, _ = resolve_teacher("resnet8", load_dataset("digits", val_size=200), checkpoint=None,
                               cache_dir=Path(os.environ["KDTUNE_CACHE_DIR"]) / "teacher-cache", epochs=2,
                               log=lambda *_: None)  # trained once per session (the workers share the folder)
    return model


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def write_cifar(root: Path, kind: str, n_train: int = 60, n_test: int = 20) -> None:
    """Write a tiny dataset in torchvision's CIFAR on-disk (pickle) format."""
    rng = np.random.default_rng(0)
    if kind == "cifar100":
        folder, files, key, classes = root / "cifar-100-python", ["train"], b"fine_labels", 100
        test_name = "test"
    else:
        folder, key, classes = root / "cifar-10-batches-py", b"labels", 10
        files, test_name = [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
    folder.mkdir(parents=True, exist_ok=True)
    per_file = n_train // len(files)
    for name, n in [*[(f, per_file) for f in files], (test_name, n_test)]:
        blob = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                key: rng.integers(0, classes, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(blob, f)


@pytest.fixture(scope="session")
def shared_ray():
    """One Ray instance (own process group, temp dir and ports on 127.0.0.1) that the
    searches of the whole session connect to with --address, instead of each starting its own."""
    from ray_instance import RayInstance

    # 2 logical CPUs, as the machine has: 4 (to overlap trials' start-ups) cost more CPU time
    # than they saved (the suite's user time rose from 11 to 14 min).
    instance = RayInstance.start(num_cpus=2)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def e2e_search(tmp_path_factory, shared_ray):
    """The end-to-end search (6 TPE trials over method none/kd, temperature and lr; ASHA; 4
    epochs) that test_search and test_analysis read; the tests that add to its folder or store
    (a second search, final runs) add what the readers do not count."""
    from searches import e2e_search

    return e2e_search(tmp_path_factory.mktemp("e2e"), shared_ray)


@pytest.fixture(scope="session")
def short_searches(tmp_path_factory, shared_ray):
    """The short searches, the multi-objective one and the faulty ones, run at once on the
    session's shared Ray instance (tests/searches.py: SHORT_SEARCHES, MO_SPACE, FAULTS)."""
    import searches

    return searches.short_searches(tmp_path_factory, shared_ray)


@pytest.fixture(scope="session")
def fault_searches(short_searches):
    """The searches with a fault ("crashed", "lost"): part of the short searches' batch."""
    return short_searches


# A session fixture is made once per xdist worker: the tests that read one shared search run in
# one worker (an xdist group named after the fixture), or the search would run once per worker.
SHARED_SEARCHES = ("e2e_search", "short_searches", "fault_searches")


# tryfirst: xdist's worker reads the xdist_group marks in its own pytest_collection_modifyitems;
# without it that hook ran first and never saw them.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Under ``-n 2`` (pytest-xdist, setup.cfg), one unit of work per xdist group: the tests of
    one shared search, else the tests of one module. A module's tests then share its
    module-scoped fixtures in one worker: spread over both, each worker built them (the two-process
    DDP runs of test_distributed twice, 25 s of CPU). The longest units first (setup.cfg turns
    xdist's own reordering, by test count, off), so that the two workers end together instead
    of one running the long searches alone at the end."""
    for item in items:
        group = next((name for name in SHARED_SEARCHES if name in getattr(item, "fixturenames", ())),
                     item.path.stem)
        item.add_marker(pytest.mark.xdist_group(group))
    slow_groups = {_group(item) for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        group = _group(item)
        return 0 if group == "e2e_search" else 1 if group in SHARED_SEARCHES else 2 if group in slow_groups else 3

    items.sort(key=rank)


def _group(item) -> str:
    return str(item.get_closest_marker("xdist_group").args[0])


class _GroupNodeIds:
    """pytest-xdist 3.8 marks a grouped test by appending ``@group`` to its node id (the controller
    schedules by that suffix) through ``item._nodeid``, which pytest 9.2 no longer reads: every
    test ran ungrouped, and each worker ran every shared search itself. Where xdist's suffix did
    not take, it is set here, after xdist's hook."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items) -> None:
        if not getattr(config.option, "loadgroup", False):
            return
        for item in items:
            groups = sorted({str(mark.args[0]) for mark in item.iter_markers("xdist_group") if mark.args})
            if groups and "@" not in item.nodeid:
                from _pytest.nodes import NodeId  # pytest >= 9.2: the node id is a NodeId

                item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")
