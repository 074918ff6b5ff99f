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

# Runs that keep the default cache_dir (teacher-output caches of the tests' random teachers) write
# into a folder of this test session, never into ~/.cache/kdtune; subprocesses inherit it.
_SESSION_CACHE = tempfile.mkdtemp(prefix="kdtune-test-cache-")
os.environ["KDTUNE_CACHE_DIR"] = _SESSION_CACHE
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits with a 200-image validation split (shared by a module's tests)."""
    from kdtune.data import load_dataset

    return load_dataset("digits", val_size=200)


@pytest.fixture(scope="session")
def trained_resnet8(tmp_path_factory):
    """A resnet8 teacher trained for 2 epochs on digits (~88 % val acc), for the tests that show a
    method learns: distilling a random network teaches little."""
    from kdtune.data import load_dataset
    from kdtune.teachers import resolve_teacher

    model, _ = resolve_teacher("resnet8", load_dataset("digits", val_size=200), checkpoint=None,
                               cache_dir=tmp_path_factory.mktemp("trained-teacher"), epochs=2, log=lambda *_: None)
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
    """One Ray instance (own process group, temp dir and ports on 127.0.0.1, 2 CPUs) that the
    searches of the whole session connect to with --address, instead of each starting its own."""
    from ray_instance import RayInstance

    instance = RayInstance.start(num_cpus=2)
    try:
        yield instance
    finally:
        instance.stop()


SEARCH_FIXTURES = {"shared_ray", "searched", "search"}


# tryfirst: xdist's worker reads the xdist_group marks in its own pytest_collection_modifyitems,
# and without it that hook ran before this one, so the marks were never seen and the slow tests
# (and the session's searches, once per worker) were spread over both workers.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Under ``-n 2`` (pytest-xdist, setup.cfg), the slow tests -- real searches, each using both
    cores through its trials, most of them on the session's one shared Ray instance -- and every
    test that reads a session search run in one worker, one after another, while the other worker
    runs the fast tests beside them. A session fixture is made once per worker, so a test that
    used one in the other worker would run its search a second time."""
    for item in items:
        if item.get_closest_marker("slow") or SEARCH_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group("ray"))
