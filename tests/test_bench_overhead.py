"""``kdtune bench --overhead``: no-op trials through the real search path, and the checkpoint
cadence that keeps a long search's per-trial cost flat."""
from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from kdtune.search.trainable import KDTrainable
from commands import run_here
from searches import env


def cadence(every_s: float, since_s: float, done: bool = False) -> dict:
    import time

    trial = SimpleNamespace(spec=SimpleNamespace(checkpoint_every_s=every_s), _last_checkpoint=time.monotonic() - since_s)
    return KDTrainable.checkpoint_when_due(trial, {"done": done})


def test_a_trial_asks_for_a_checkpoint_when_its_interval_has_passed_never_after_its_last_epoch() -> None:
    assert cadence(0, 0.0) == {"done": False, "should_checkpoint": True}  # 0: every epoch
    assert cadence(30, 5.0) == {"done": False}
    assert cadence(30, 31.0) == {"done": False, "should_checkpoint": True}
    assert cadence(0, 100.0, done=True) == {"done": True}  # the last epoch ends the trial: nothing to resume


def test_bad_input_exits_2_before_any_search() -> None:
    r = subprocess.run([sys.executable, "-m", "kdtune.bench", "--overhead", "--algorithms", "tpe,bogus"],
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == "error: --algorithms 'tpe,bogus': expected a comma-separated list from tpe, random, grid (unknown: bogus)\n"


@pytest.mark.slow
def test_noop_trials_run_through_the_real_search_path(tmp_path, shared_ray, monkeypatch, capsys) -> None:
    """On the session's Ray instance (--address; a private one per search is the default, which
    the searches of test_search and test_faults start). The command in this process (a new one
    costs seconds of imports; the test above runs it in its own)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("RAY_AUTH_MODE", shared_ray.env["RAY_AUTH_MODE"])
    r = run_here("bench", "--overhead", "--trials", "4", "--algorithms", "random", "--keep", str(tmp_path / "kept"),
                 "--address", shared_ray.address, cwd=tmp_path / "cwd", monkeypatch=monkeypatch, capsys=capsys)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row = re.search(r"^random\s+4\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)", r.stdout, re.M)
    assert row, r.stdout[-2000:]
    wall, startup, epochs, training, overhead = map(float, row.groups())
    assert 0 < startup < wall and 1 <= epochs <= 2 and training < 0.5 and overhead > 0
    # the real path: the search's own MLflow store, Optuna-free random search, results table
    kept = tmp_path / "kept" / "random-4"
    assert (kept / "mlflow.db").is_file()
    assert (kept / "ray" / "overhead-random-4" / "results.csv").is_file()
    # no checkpoint when a trial ends (its no-op epochs never reach checkpoint_every_s): each would
    # make Tune snapshot and copy the whole experiment, a cost that grows with the trials
    trials = list((kept / "ray" / "overhead-random-4").glob("NoopTrainable_*"))
    assert len(trials) == 4 and not [c for t in trials for c in t.glob("checkpoint_*")]
    # its MLflow artifacts beside its store, nothing in the directory it ran from
    assert (kept / "mlruns").is_dir() and not any((tmp_path / "cwd").iterdir())


def test_train_mode_searches_the_quickstart_kd_space_with_real_trials(tmp_path) -> None:
    from kdtune.search.bench_overhead import write_space
    from kdtune.search.spec import load_spec

    spec = load_spec(write_space(tmp_path, "tpe", 48, 2, 2, "none", train="digits"), [])
    assert (spec.fixed["dataset"], spec.fixed["teacher"], spec.fixed["student"], spec.fixed["method"]) == \
        ("digits", "resnet20", "resnet8", "kd")
    assert spec.max_epochs == 2 and spec.num_samples == 48 and spec.scheduler == "none"
    assert set(spec.space.names()) == {"temperature", "kd_weight", "lr"}
