"""``kdtune train --from-search``: the re-runs of a search's trial distil from the trial's own
teacher, and what they write survives whatever the tracking store does.

The searches here are crafted folders (a state file and a trial's ``run.yaml``, as a search
writes them), so each test runs a 1-epoch digits re-run in a few seconds; the re-run of a real
search is in tests/test_search.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdtune.config import RunConfig
from kdtune.models import build_model
from kdtune.run import teacher_seed
from kdtune.search import final
from kdtune.teachers import TeacherNotCached, resolve_teacher


def test_teacher_seed_is_a_setting_of_its_own_that_defaults_to_the_run_seed() -> None:
    assert teacher_seed(RunConfig.from_dict({"seed": 4})) == 4  # a single run: as it always was
    assert teacher_seed(RunConfig.from_dict({"seed": 4, "teacher_seed": 1})) == 1
    with pytest.raises(ValueError, match="teacher_seed"):
        RunConfig.from_dict({"teacher_seed": -1})


def test_a_teacher_that_may_not_be_trained_is_looked_up_only(digits, cache_dir: Path) -> None:
    with pytest.raises(TeacherNotCached, match="not in the cache") as missing:
        resolve_teacher("resnet8", digits, checkpoint=None, cache_dir=cache_dir, seed=3, epochs=1, train=False)
    assert not missing.value.path.exists() and "seed3" in missing.value.path.name
    _, trained = resolve_teacher("resnet8", digits, checkpoint=None, cache_dir=cache_dir, seed=3, epochs=1,
                                 log=lambda _: None)
    _, found = resolve_teacher("resnet8", digits, checkpoint=None, cache_dir=cache_dir, seed=3, epochs=1,
                               train=False)
    assert trained.path == found.path == str(missing.value.path) and found.source == "cache"


def test_every_rerun_seed_keeps_the_trial_teacher() -> None:
    trial = RunConfig.from_dict({"seed": 2, "method": "kd", "temperature": 3.0}).flat()
    runs = final.run_configs(trial, final=True, seeds=3, overrides=["lr=0.1"], source="run.yaml")
    assert [seed for seed, _ in runs] == [2, 3, 4]
    assert all(cfg.seed == seed and cfg.teacher_seed == 2 and cfg.final and cfg.lr == 0.1
               and cfg.method_params == {"temperature": 3.0} for seed, cfg in runs)
    # a trial that had a teacher seed of its own keeps it
    own = final.run_configs({**trial, "teacher_seed": 7}, final=False, seeds=2, overrides=[], source="run.yaml")
    assert {cfg.teacher_seed for _, cfg in own} == {7}


def crafted_search(root: Path, uri: str, parent_run_id: str = "0" * 32, **config) -> Path:
    """A search folder as a finished search leaves it: its state file, and one trial ``t1`` with
    its run.yaml (digits, 1 epoch, a resnet8 teacher trained for 1 epoch in ``root/cache``)."""
    folder = root / "ray" / "crafted"
    trial = folder / "KDTrainable_t1_00000_0_lr=0.05"
    trial.mkdir(parents=True)
    run = {"dataset": "digits", "teacher": "resnet8", "teacher_epochs": 1, "student": "resnet8", "method": "kd",
           "epochs": 1, "batch_size": 128, "seed": 0, "cache_dir": str(root / "cache"), "temperature": 4.0,
           **config}
    (trial / "run.yaml").write_text(yaml.safe_dump(RunConfig.from_dict(run).flat() | {"lr_decay_epochs": [150]}))
    spec = {"name": "crafted", "search": {"metric": "val/acc1", "mode": "max"}, "resources": {"cpus_per_trial": 1}}
    (folder / "kdtune_search.json").write_text(json.dumps({"parent_run_id": parent_run_id, "tracking_uri": uri,
                                                           "optuna_storage": None, "spec": spec}))
    (folder / "best.json").write_text(json.dumps({"trial_id": "t1"}))
    return folder


def test_a_rerun_whose_teacher_is_gone_trains_nothing_and_says_what_to_do(tmp_path: Path, capsys) -> None:
    folder = crafted_search(tmp_path, "unused")
    code = final.main(str(folder), None, True, 2, str(tmp_path / "out"), [],
                      tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    err = capsys.readouterr().err
    assert code == 2 and "not in the cache" in err and "--train-teacher" in err, err
    assert not (tmp_path / "cache" / "teachers").exists() and not (tmp_path / "out").exists()


def save_teacher(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet8", num_classes=10, in_channels=1).state_dict()}, path)
    return path


@pytest.fixture(autouse=True)
def _in_own_folder(tmp_path: Path, monkeypatch) -> None:
    """The reruns make MLflow stores whose artifacts default to ./mlruns: the test's folder, not
    the checkout pytest runs from."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def threads():
    """final.main sets torch's thread count to the trial's CPUs; the test process gets its own back."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def runs_in(uri: str, experiment: str = "crafted") -> dict[str, list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    found: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id]) if exp else []:
        found.setdefault(run.data.tags["kdtune.kind"], []).append(run)
    return found


def test_a_moved_search_reruns_into_its_own_store_fully_tracked(tmp_path: Path, threads, capsys) -> None:
    from mlflow import MlflowClient

    teacher = save_teacher(tmp_path / "teacher.pth")
    old = tmp_path / "old"
    old.mkdir()
    folder = crafted_search(old, f"sqlite:///{old / 'ray' / 'crafted' / 'mlflow.db'}",
                            teacher_checkpoint=str(teacher))
    state = json.loads((folder / "kdtune_search.json").read_text())
    (folder / "kdtune_search.json").write_text(json.dumps({**state, "folder": str(folder)}))
    MlflowClient(state["tracking_uri"]).search_experiments()  # the store the search made
    moved = tmp_path / "new" / "crafted"
    moved.parent.mkdir()
    folder.rename(moved)

    code = final.main(str(moved), None, True, 2, str(tmp_path / "out"), [])
    out = capsys.readouterr().out
    assert code == 0, out
    uri = f"sqlite:///{moved / 'mlflow.db'}"  # the store inside the folder, where the folder is now
    assert f"MLflow {uri}" in out
    runs = runs_in(uri)
    (summary_run,), seeds = runs["final-summary"], runs["final"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["seed_run_ids"] == summary_run.data.tags["kdtune.seed_runs"].split(",")
    assert sorted(summary["seed_run_ids"]) == sorted(r.info.run_id for r in seeds)
    assert summary_run.data.metrics["test/acc1_mean"] == pytest.approx(summary["mean"])
    assert summary_run.data.metrics["seeds"] == 2
    client = MlflowClient(uri)
    for run in seeds:
        seed = int(run.data.params["seed"])
        result = json.loads((tmp_path / "out" / f"seed{seed}" / "final.json").read_text())
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == summary_run.info.run_id
        # opened before training, closed after it: its duration covers the training's wall time
        assert (run.info.end_time - run.info.start_time) / 1000 >= result["wall_s"]
        history = client.get_metric_history(run.info.run_id, "test/acc1")
        assert [m.step for m in history] == [1] and history[0].value == pytest.approx(result["test/acc1"])
        assert {"student.pth", "final.json", "metrics.jsonl", "run.yaml", "log.txt"} <= {
            a.path for a in client.list_artifacts(run.info.run_id)}
        # the files beside the store, not in ./mlruns of the directory the rerun started from
        assert run.info.artifact_uri.startswith((moved / "mlruns").as_uri() + "/")
        assert run.data.params["teacher_checkpoint"] == str(teacher.resolve())


def test_a_sqlite_stores_experiments_keep_their_files_beside_it(tmp_path: Path, monkeypatch) -> None:
    from kdtune.search.tracking import artifact_location

    monkeypatch.chdir(tmp_path)
    assert artifact_location(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "kd search") == \
        (tmp_path / "a" / "mlruns" / "kd_search").as_uri()
    assert artifact_location("sqlite:///b/mlflow.db?timeout=20", "e2e/2") == (tmp_path / "b" / "mlruns" / "e2e_2").as_uri()
    # elsewhere the store (a server, a file store) decides
    for uri in ("sqlite:///:memory:", "http://127.0.0.1:5000", f"file://{tmp_path}", "postgresql://db/kd"):
        assert artifact_location(uri, "e2e") is None, uri


def test_a_store_that_is_gone_stops_the_rerun_before_it_trains(tmp_path: Path, threads, capsys) -> None:
    folder = crafted_search(tmp_path, f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}")
    code = final.main(str(folder), None, True, 2, str(tmp_path / "out"), [])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no longer exists" in err and "--tracking-uri" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()
    # a store given by the user that cannot be used: the same, before anything is trained
    (tmp_path / "not-a-db").write_text("junk")
    code = final.main(str(folder), None, True, 2, str(tmp_path / "out"), [],
                      tracking_uri=f"sqlite:///{tmp_path / 'not-a-db'}")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not-a-db" in err, err
    assert not (tmp_path / "out").exists()


def test_a_store_that_fails_midway_loses_no_seed(tmp_path: Path, threads, capsys, monkeypatch) -> None:
    from mlflow import MlflowClient

    teacher = save_teacher(tmp_path / "teacher.pth")
    folder = crafted_search(tmp_path, "unused", teacher_checkpoint=str(teacher))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_batch = MlflowClient.log_batch
    calls = []

    def failing(self, run_id, metrics=(), *args, **kwargs):  # the store goes away in seed 1's epoch
        calls.append(run_id)
        if len(calls) == 4:  # params of seed 0, its epoch, params of seed 1, its epoch
            raise OSError("disk I/O error")
        return log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", failing)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = final.main(str(folder), None, True, 3, str(tmp_path / "out"), [])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "disk I/O error" in errors[0], captured.err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and all(v > 0 for v in summary["test/acc1"])
    for seed in (0, 1, 2):
        assert json.loads((tmp_path / "out" / f"seed{seed}" / "final.json").read_text())["status"] == "completed"
    assert len(calls) == 4  # nothing more was sent to the failed store
