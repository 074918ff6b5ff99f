"""``python -m kdtune.search`` end to end: real Ray, Optuna, ASHA and MLflow on digits.

The searches run in subprocesses, as a user runs them; results are checked through the
results table and ``MlflowClient``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from kdtune.analysis import load_mlflow, load_results, load_search
from kdtune.search.spec import load_spec
import processes
from commands import run_here
from ray_instance import RayInstance, short_tmpdir
from searches import E2E_SPACE, SPACE, env, mlflow_run_count, run_search, search_cmd, search_here, write_space

def child_runs(tmp_path: Path, name: str = "e2e") -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`kdtune.trial_id` != ''")


# ---------------------------------------------------------------------------- fast: no Ray started


def test_invalid_space_exits_2_naming_the_key(tmp_path: Path) -> None:
    space = write_space(tmp_path, search__mode="maximize", space={"temprature": {"type": "float", "low": 1, "high": 8}})
    r = run_search(tmp_path, space, seed=False)
    assert r.returncode == 2, r.stderr
    assert "search.mode" in r.stderr and "maximize" in r.stderr
    assert "temprature" in r.stderr and "temperature" in r.stderr
    assert not (tmp_path / "ray").exists()


def test_dry_run_prints_spec_and_space(tmp_path: Path, capsys) -> None:
    from kdtune.cli import main as kdtune

    # in this process (a dry run starts nothing): the command line's main, as `kdtune search` calls it
    def dry_run(*extra: str) -> tuple[int, str]:
        rc = kdtune(["search", str(write_space(tmp_path, E2E_SPACE)), "--storage-path", str(tmp_path / "ray"),
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--dry-run", *extra])
        return rc, capsys.readouterr().out

    rc, out = dry_run("--num-samples", "3")
    assert rc == 0, out
    assert "num_samples: 3" in out and "temperature" in out and "FloatDistribution" in out
    assert "# a real run would be the search 'e2e'" in out
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
    # with a search of that name stored, the dry run names the new search a real run would start
    (tmp_path / "ray" / "e2e").mkdir(parents=True)
    (tmp_path / "ray" / "e2e" / "kdtune_search.json").write_text("{}")
    rc, out = dry_run()
    assert rc == 0, out
    assert "# a real run would be the search 'e2e-2': a search named 'e2e' exists" in out
    assert sorted(os.listdir(tmp_path / "ray")) == ["e2e"] and not (tmp_path / "mlflow.db").exists()


def test_optuna_is_told_every_epoch_and_the_right_final_state(tmp_path: Path) -> None:
    import optuna

    from kdtune.search.searchers import KDOptunaSearch, optuna_storage
    from kdtune.search.space import Param, Space

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = Space(params={"x": Param("x", "float", 0.0, 1.0)}, methods=None)
    searcher = KDOptunaSearch(space=space.suggest, metric="val/acc1", mode="max", max_epochs=4, study_name="s",
                              sampler=optuna.samplers.RandomSampler(seed=0), storage=optuna_storage(url))
    for tid in ("stopped", "full", "diverged", "crashed", "paused"):
        searcher.suggest(tid)
    # Hyperband stops a paused trial through Tune's stop_trial: on_trial_complete with no result
    searcher.on_trial_result("paused", {"val/acc1": 40.0, "training_iteration": 1})
    searcher.on_trial_complete("paused")
    searcher.on_trial_result("stopped", {"val/acc1": 51.0, "training_iteration": 1})
    # Tune hands the result that stops a trial to on_trial_complete only
    searcher.on_trial_complete("stopped", {"val/acc1": 52.0, "training_iteration": 2})
    for epoch in (1, 2, 3):
        searcher.on_trial_result("full", {"val/acc1": 70.0 + epoch, "training_iteration": epoch})
    searcher.on_trial_complete("full", {"val/acc1": 80.0, "training_iteration": 4})
    searcher.on_trial_complete("diverged", {"val/acc1": -1e6, "training_iteration": 1, "diverged": 1.0})
    searcher.on_trial_result("crashed", {"val/acc1": 10.0, "training_iteration": 1})
    # Tune's searcher checkpoint (pickled) reconnects to the same storage after a restore
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = KDOptunaSearch(space=space.suggest, metric="val/acc1", mode="max", max_epochs=4)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("crashed", None, error=True)

    trials = {t.user_attrs["ray_trial_id"]: t for t in optuna.load_study(study_name="s", storage=url).trials}
    S = optuna.trial.TrialState
    assert {k: t.state for k, t in trials.items()} == {"stopped": S.PRUNED, "full": S.COMPLETE,
                                                      "diverged": S.FAIL, "crashed": S.FAIL, "paused": S.PRUNED}
    assert trials["paused"].value == 40.0
    assert trials["stopped"].intermediate_values == {1: 51.0, 2: 52.0}  # the stopping epoch included
    assert trials["stopped"].value == 52.0 and trials["full"].value == 80.0  # the objective: last epoch
    assert trials["full"].intermediate_values == {1: 71.0, 2: 72.0, 3: 73.0, 4: 80.0}
    assert trials["diverged"].intermediate_values == {}  # a penalty is no measurement
    assert {k: t.user_attrs["kdtune_status"] for k, t in trials.items()} == {
        "stopped": "stopped early", "full": "completed", "diverged": "diverged", "crashed": "failed",
        "paused": "stopped early"}


def test_gp_hyperband_and_median_are_the_libraries_objects(tmp_path: Path) -> None:
    import optuna
    from ray.tune.schedulers import HyperBandScheduler, MedianStoppingRule

    from kdtune.search.schedulers import build_scheduler
    from kdtune.search.searchers import build_searcher

    spec = load_spec(write_space(tmp_path, search__algorithm="gp", search__max_concurrent=None,
                                 scheduler={"type": "hyperband"}))
    searcher, _, _ = build_searcher(spec)
    assert isinstance(searcher._sampler, optuna.samplers.GPSampler)
    hyperband = build_scheduler(spec)
    assert isinstance(hyperband, HyperBandScheduler) and hyperband._max_t_attr == spec.max_epochs
    spec = load_spec(write_space(tmp_path, scheduler={"type": "median", "grace_period": 2}))
    median = build_scheduler(spec)
    assert isinstance(median, MedianStoppingRule) and median._grace_period == 2


class _Trial:
    def __init__(self, trial_id: str, status: str, config: dict, last: dict | None) -> None:
        self.trial_id, self.status, self.config, self.last_result = trial_id, status, config, last
        self.path = f"/ray_results/e2e/KDTrainable_{trial_id}"


def test_progress_lines_count_trials_and_round_floats() -> None:
    import io

    from kdtune.search.progress import Progress

    out = io.StringIO()
    progress = Progress(total=5, max_epochs=4, metric="val/acc1", mode="max", every_s=0.0, stream=out)
    done = _Trial("aaa", "TERMINATED", {"lr": 0.04619905512862269, "temperature": None},
                  {"val/acc1": 91.25, "training_iteration": 4})
    stopped = _Trial("bbb", "TERMINATED", {"lr": 0.2}, {"val/acc1": 40.0, "training_iteration": 1})
    diverged = _Trial("ccc", "TERMINATED", {"lr": 9.0}, {"val/acc1": -1e6, "training_iteration": 1, "diverged": 1.0})
    running = _Trial("ddd", "RUNNING", {"lr": 0.01}, {"val/acc1": 77.123456, "training_iteration": 2})
    trials = [done, stopped, diverged, running]
    progress.on_trial_complete(0, trials, stopped)
    progress.on_step_end(0, trials)
    fresh = _Trial("eee", "RUNNING", {"lr": 0.01, "temperature": 4.0}, {})
    trials.append(fresh)
    progress.on_trial_start(0, trials, fresh)
    # Tune starts a crashed trial again (and a resumed one): no new trial, not counted again
    progress.on_trial_start(0, trials, running)
    fresh.status = "PENDING"
    progress.on_trial_recover(0, trials, fresh)  # crashed before its first epoch
    progress.on_trial_start(0, trials, fresh)
    progress.on_trial_start(0, trials, running)  # a pause ending (Hyperband, PBT): nothing to say
    lines = out.getvalue().splitlines()
    assert lines[0] == ("[kdtune] trial bbb stopped early after epoch 1: val/acc1 40.00 | "
                        "best 91.25 (trial aaa: lr 0.0462)")
    assert lines[2:] == ["[kdtune] trial eee started (5 of 5): lr 0.01, temperature 4",
                         "[kdtune] trial ddd restarted from its checkpoint after epoch 2",
                         f"[kdtune] trial eee crashed; retrying from its last checkpoint (its error: {fresh.path}/error.txt)",
                         "[kdtune] trial eee restarted from its first epoch"]
    status = lines[1]
    assert status.startswith("[kdtune] status ") and "\x1b" not in status and "\r" not in status
    assert "1 running, 1 completed, 1 stopped, 0 failed, 1 diverged of 5" in status
    assert "best 91.25 (trial aaa: lr 0.0462)" in status and "ddd epoch 2 77.12" in status
    assert "ETA" in status and "0.04619905" not in status


def test_each_search_process_stages_its_files_apart(tmp_path: Path, monkeypatch) -> None:
    """Ray names a search's staging folder by its name and start second: two searches of one name
    started in one second on one cluster would share it (kdtune/search/staging.py). The shared
    instance's concurrent searches of one name check the outcome (SearchRun.check)."""
    from ray.tune.experiment.experiment import Experiment

    from kdtune.search.staging import ProcessStaging, use_process_staging

    monkeypatch.setattr(Experiment, "_storage_context_cls", Experiment._storage_context_cls)  # restored after
    use_process_staging()
    assert Experiment._storage_context_cls is ProcessStaging
    context = Experiment._storage_context_cls(storage_path=str(tmp_path), experiment_dir_name="e2e")
    assert context._timestamp.endswith(f"_{os.getpid()}")


# ---------------------------------------------------------------------------- slow: real searches


NOISE = ("Token authentication", "SearchGenerator", "TensorBoard", "Creating initial MLflow database tables",
         "Started a local Ray instance", "Wrote the latest version", "Trainable.setup took")


def optuna_trials(tmp_path: Path, name: str = "e2e") -> dict:
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'ray' / name / 'optuna.db'}")
    return {t.user_attrs["ray_trial_id"]: t for t in study.trials}


@pytest.mark.slow
def test_search_prints_progress_hints_and_no_library_noise(e2e_search) -> None:
    e2e_search.check()
    tmp_path, r = e2e_search.dir, e2e_search.result
    assert "best configuration" in r.stdout and "results table" in r.stdout
    assert f"[kdtune] final model: kdtune train --from-search {tmp_path / 'ray' / 'e2e'} --final --seeds 3" in r.stdout
    # progress people can watch, and none of Ray's or MLflow's own lines
    for tid in load_results(tmp_path / "ray" / "e2e")["trial_id"]:
        assert f"[kdtune] trial {tid} started" in r.stdout
    assert "[kdtune] status " in r.stdout and " of 6 | best " in r.stdout
    for noise in NOISE:
        assert noise not in r.stdout + r.stderr, noise
    best_line = next(line for line in r.stdout.splitlines() if "best configuration" in line)
    assert not re.search(r"\d\.\d{6,}", best_line), best_line  # floats rounded


@pytest.mark.slow
def test_search_links_the_mlflow_ui_and_logs_the_best_so_far(e2e_search) -> None:
    e2e_search.check()
    tmp_path, r = e2e_search.dir, e2e_search.result
    # the MLflow UI opened on this search's trials, best objective first; the parent run's best-so-far
    parent = json.loads((tmp_path / "ray" / "e2e" / "kdtune_search.json").read_text())["parent_run_id"]
    assert (f"MLflow: this search's trials, best first: http://127.0.0.1:5000/#/experiments/" in r.stdout
            and f"searchFilter=tags.%60mlflow.parentRunId%60%20%3D%20%27{parent}%27" in r.stdout
            and "orderByKey=metrics.%60objective%60&orderByAsc=false" in r.stdout)
    client = MlflowClient(e2e_search.uri)
    assert client.get_run(parent).data.tags["kdtune.trials_url"] in r.stdout
    series = sorted(client.get_metric_history(parent, "best_objective"), key=lambda m: m.step)
    assert [m.step for m in series] == list(range(1, 7))
    assert [m.value for m in series] == sorted(m.value for m in series)  # best so far: never worse


@pytest.mark.slow
def test_search_results_table_has_every_trial_with_its_status(e2e_search) -> None:
    e2e_search.check()
    table = load_results(e2e_search.dir / "ray" / "e2e")
    assert len(table) == 6 and table["trial_id"].is_unique
    assert set(table["status"]) <= {"completed", "stopped early"}
    assert (table["status"] == "stopped early").any(), "ASHA stopped no trial"
    assert (table["status"] == "completed").any()
    assert (table.loc[table.status == "completed", "epochs"] == 4).all()
    assert set(table["method"]) == {"none", "kd"} and table["lr"].notna().all()
    assert (table["temperature"].isna() == (table["method"] == "none")).all()  # kd's parameter, kd's trials


@pytest.mark.slow
def test_search_objective_agrees_in_optuna_the_table_and_best_json(e2e_search) -> None:
    e2e_search.check()
    tmp_path = e2e_search.dir
    table = load_results(tmp_path / "ray" / "e2e")
    # one objective (the metric at the last epoch trained) in Optuna, the table, MLflow and best.json
    objective = table.set_index("trial_id")["final_val/acc1"]
    studied = optuna_trials(tmp_path)
    assert set(studied) == set(table["trial_id"])
    for row in table.itertuples():
        t = studied[row.trial_id]
        assert t.state.name == {"completed": "COMPLETE", "stopped early": "PRUNED"}[row.status]
        assert max(t.intermediate_values) == row.epochs  # the stopping epoch was told too
        assert t.intermediate_values[row.epochs] == pytest.approx(objective[row.trial_id])
        assert t.value == pytest.approx(objective[row.trial_id])
    best = json.loads((tmp_path / "ray" / "e2e" / "best.json").read_text())
    assert best["trial_id"] == objective.idxmax() and best["objective"]["value"] == pytest.approx(objective.max())
    trial_dir = next((tmp_path / "ray" / "e2e").glob(f"*_{best['trial_id']}_*"))
    assert best["config"] == yaml.safe_load((trial_dir / "run.yaml").read_text())  # the full configuration
    assert best["config"]["epochs"] == 4 and best["config"]["lr"] == pytest.approx(best["params"]["lr"])


@pytest.mark.slow
def test_search_parent_run_holds_the_fixed_values_the_best_and_the_files(e2e_search) -> None:
    e2e_search.check()
    tmp_path = e2e_search.dir
    objective = load_results(tmp_path / "ray" / "e2e")["final_val/acc1"]
    client, runs = child_runs(tmp_path)
    parent_ids = {run.data.tags["mlflow.parentRunId"] for run in runs}
    assert len(parent_ids) == 1
    parent = client.get_run(parent_ids.pop())
    assert parent.info.status == "FINISHED" and "best.lr" in parent.data.tags
    assert parent.data.params == {k: str(v) for k, v in load_spec(tmp_path / "space.yaml").fixed.items()}
    assert parent.data.metrics["objective"] == pytest.approx(objective.max())
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "spec.yaml", "results.csv", "best.json"} <= artifacts


@pytest.mark.slow
def test_search_logs_each_trial_as_one_finished_mlflow_run(e2e_search) -> None:
    e2e_search.check()
    tmp_path = e2e_search.dir
    table = load_results(tmp_path / "ray" / "e2e")
    objective = table.set_index("trial_id")["final_val/acc1"]
    client, runs = child_runs(tmp_path)
    assert len(runs) == 6
    by_trial = {run.data.tags["kdtune.trial_id"]: run for run in runs}
    for row in table.itertuples():
        run = by_trial[row.trial_id]
        # the trial's hyperparameters and nothing else
        assert set(run.data.params) == {"method", "lr"} | ({"temperature"} if row.method == "kd" else set())
        assert not set(run.data.params) & set(run.data.metrics)  # no name is both
        assert "epoch" not in run.data.metrics  # the step says it
        assert run.data.metrics["objective"] == pytest.approx(objective[row.trial_id])
        assert float(run.data.params["lr"]) == pytest.approx(row.lr)
        assert run.data.tags["kdtune.status"] == row.status
        assert run.info.status == "FINISHED"
        for tag in ("method", "teacher", "student", "dataset", "seed", "kdtune.version",
                    "mlflow.source.git.commit"):
            assert run.data.tags[tag]
        history = client.get_metric_history(run.info.run_id, "val/acc1")
        assert sorted(m.step for m in history) == list(range(1, row.epochs + 1))
        assert client.get_metric_history(run.info.run_id, "train/lr")
        assert "run.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}

    df = load_mlflow("e2e", storage_path=tmp_path / "ray")
    assert len(df) == 6 and set(df["status"]) == set(table["status"])
    assert pd.api.types.is_float_dtype(df["temperature"])


def teacher_files(out: Path) -> list[str]:
    """The teacher files a re-run's log (``log.txt`` in its output folder) names."""
    return re.findall(r"^teacher resnet8 \(cache: (\S+)\)", (out / "log.txt").read_text(), re.M)


@pytest.mark.slow
def test_from_search_reruns_a_trial_exactly_and_the_best_one_on_test(e2e_search, monkeypatch, capsys) -> None:
    e2e_search.check()
    tmp_path = e2e_search.dir
    folder = tmp_path / "ray" / "e2e"
    table = load_results(folder).set_index("trial_id")
    trial = table.index[table["status"] == "completed"][0]
    run_yaml = yaml.safe_load(next(folder.glob(f"*_{trial}_*/run.yaml")).read_text())

    # the chosen trial again, as train runs it: the same configuration, the same values (the
    # command in this process: tests/commands.py)
    train = ["train", "--from-search", str(folder)]
    again = run_here(*train, "--trial", trial, "--output-dir", str(tmp_path / "again"), cwd=tmp_path,
                     monkeypatch=monkeypatch, capsys=capsys)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # (the teacher pinned: the seed it was trained with, the trial's)
    assert yaml.safe_load((tmp_path / "again" / "seed0" / "config.yaml").read_text()) == {**run_yaml,
                                                                                           "teacher_seed": 0}
    rerun = json.loads((tmp_path / "again" / "seed0" / "final.json").read_text())
    assert rerun["val/acc1"] == pytest.approx(table.loc[trial, "final_val/acc1"])

    # the best trial on train+val, tested, two seeds, logged under the search's experiment
    final = run_here(*train, "--final", "--seeds", "2", "--output-dir", str(tmp_path / "final"), cwd=tmp_path,
                     monkeypatch=monkeypatch, capsys=capsys)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    best = json.loads((folder / "best.json").read_text())
    assert f"trial {best['trial_id']}: test/acc1" in final.stdout and "±" in final.stdout
    teachers = set(teacher_files(tmp_path / "again" / "seed0"))
    assert len(teachers) == (run_yaml["method"] != "none")  # the student-alone baseline has none
    for seed in (0, 1):
        cfg = yaml.safe_load((tmp_path / "final" / f"seed{seed}" / "config.yaml").read_text())
        # every seed distils from the search's teacher (trained with the trial's seed, 0)
        assert cfg == {**best["config"], "final": True, "seed": seed, "teacher_seed": 0}
        named = teacher_files(tmp_path / "final" / f"seed{seed}")
        assert len(named) == (best["config"]["method"] != "none")  # the student-alone baseline has none
        teachers |= set(named)
    assert len(teachers) <= 1 and all("-seed0-" in path for path in teachers)  # one file, the trials' teacher
    assert "(trained:" not in final.stdout + again.stdout and "training it" not in final.stdout + again.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    finals = client.search_runs([exp.experiment_id], filter_string="tags.`kdtune.kind` = 'final'")
    assert len(finals) == 2 and {r.data.tags["kdtune.final_of"] for r in finals} == {best["trial_id"]}
    assert all("test/acc1" in r.data.metrics and r.info.status == "FINISHED" for r in finals)
    assert len(load_mlflow("e2e", storage_path=tmp_path / "ray")) == 6  # final runs are not trials


@pytest.mark.slow
def test_a_second_run_of_the_same_file_starts_a_new_search(e2e_search, shared_ray, monkeypatch, capsys) -> None:
    e2e_search.check()
    tmp_path = e2e_search.dir
    second = search_here(tmp_path, tmp_path / "space.yaml", "--num-samples", "1", ray=shared_ray,
                         monkeypatch=monkeypatch, capsys=capsys)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "starting a new search 'e2e-2'" in second.stdout
    assert len(load_results(tmp_path / "ray" / "e2e-2")) == 1
    assert len(load_results(tmp_path / "ray" / "e2e")) == 6  # the first one untouched
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment_by_name("e2e-2") is not None
    assert len(optuna_trials(tmp_path, "e2e-2")) == 1 and len(optuna_trials(tmp_path)) == 6


def test_resume_picks_the_latest_search_of_a_name(tmp_path: Path) -> None:
    from kdtune.search.driver import existing_names

    storage = str(tmp_path)
    assert existing_names(storage, "e2e") == []
    for name in ("e2e", "e2e-2", "e2e-10", "e2e-x", "e2e-3"):
        (tmp_path / name).mkdir()
        if name != "e2e-3":  # a folder without a search's state file is no search
            (tmp_path / name / "kdtune_search.json").write_text("{}")
    assert existing_names(storage, "e2e") == ["e2e", "e2e-2", "e2e-10"]  # oldest first: --resume takes the last
    assert existing_names(storage, "e2e-2") == ["e2e-2"]


GATE_PLUGIN = '''
"""KD whose trials after the first three wait at their first epoch until gate/open exists next to
this file: a search that cannot end before the test lets it."""
import os
import time
from pathlib import Path

from kdtune.distillers import METHODS
from kdtune.distillers.kd import KD


@METHODS.register("gated_kd")
class GatedKD(KD):
    def on_epoch_start(self, epoch, num_epochs):
        super().on_epoch_start(epoch, num_epochs)
        if epoch == 1:
            folder = Path(__file__).parent / "gate"
            (folder / f"started-{os.getpid()}-{time.monotonic_ns()}").touch()
            if len(list(folder.glob("started-*"))) > 3:
                while not (folder / "open").exists():
                    time.sleep(0.1)
'''


@pytest.mark.slow
def test_interrupted_search_resumes_without_duplicates_or_reruns(tmp_path: Path, shared_ray, monkeypatch,
                                                                 capsys) -> None:
    """A private search: while it runs, every port its processes listen on is on loopback and a
    second search of its name is refused; Ctrl-C stops it cleanly; --resume finishes it."""
    # Its trials after the third wait for a gate the test opens only before --resume: Ctrl-C
    # always lands on a running search, however fast its trials (a race the suite once lost).
    (tmp_path / "gate_plugin.py").write_text(GATE_PLUGIN)
    (tmp_path / "gate").mkdir()
    plugin_env = {"KDTUNE_PLUGINS": "gate_plugin",
                  "PYTHONPATH": os.pathsep.join([str(tmp_path), env()["PYTHONPATH"]])}
    space = write_space(tmp_path, fixed={**SPACE["fixed"], "method": "gated_kd"}, search__num_samples=6,
                        search__max_concurrent=1)  # one trial process per run of the search
    # its own process group and RAY_TMPDIR: the checks below look at this search's processes only
    ray_tmp = short_tmpdir()
    e = {**env(), **plugin_env, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen(search_cmd(tmp_path, space), cwd=tmp_path, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 400
    checked = False
    # wait until two trials have ended, then press Ctrl-C
    while time.time() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        if not checked and "[kdtune] trial" in line and " started " in line:
            checked = True
            # the trial's worker takes its name (ray::KDTrainable, or Tune's wrapper's name,
            # ray::ResourceTrainable, while it trains) and opens its servers a moment after
            # "started": seconds under the full suite's load (the gated trials keep it running)
            wait_until = time.time() + 90
            while True:
                time.sleep(1)
                mine = processes.with_env(f"RAY_TMPDIR={ray_tmp}")  # the driver, Ray's daemons, the workers
                trial = [pid for pid in set(processes.naming("KDTrainable")) | set(processes.naming("ResourceTrainable"))
                         if pid in mine]
                if trial or time.time() > wait_until:
                    break
            sockets = processes.listening(mine)
            assert trial and len({pid for pid, _, _ in sockets}) >= 3, sockets  # GCS, raylet, workers, ...
            exposed = [(processes.describe(pid), address, port) for pid, address, port in sockets
                       if address not in processes.LOOPBACK]
            assert not exposed, f"listening beyond loopback: {exposed}"
            # a second search of the same name while this one runs (the command in this process):
            # refused before anything is recorded (the first one's trials add runs meanwhile: count
            # searches)
            second = search_here(tmp_path, space, env_extra=plugin_env, monkeypatch=monkeypatch, capsys=capsys)
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
            assert re.search(rf"a search named 'e2e' is already running \(pid {proc.pid} ", second.stderr)
            assert mlflow_run_count(tmp_path, kind="search") == 1
        if sum("[kdtune] trial" in ln and ("completed" in ln or "stopped early" in ln) for ln in lines) >= 2:
            break
    assert checked, "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    lines.append(out)
    assert proc.returncode == 130, "".join(lines)[-3000:]
    assert re.search(r"continue (it )?with: kdtune search \S+ --resume", out), out[-2000:]  # the hint, spelled as users type it
    assert "Traceback" not in "".join(lines)
    for _ in range(40):  # Ctrl-C leaves none of this search's Ray processes behind
        left = set(processes.in_group(proc.pid)) | set(processes.with_env(f"RAY_TMPDIR={ray_tmp}"))
        if not left:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"processes of the search are still running after Ctrl-C: "
                    f"{[processes.describe(pid) for pid in left]}")
    shutil.rmtree(ray_tmp, ignore_errors=True)
    _, before = child_runs(tmp_path)
    assert all(run.info.status != "RUNNING" for run in before)  # nothing left dangling
    # the table written at the interruption agrees with MLflow: a trial Tune stopped on Ctrl-C is
    # "interrupted" in both (Tune marks it TERMINATED, like one that ASHA stopped)
    recorded = {run.data.tags["kdtune.trial_id"]: run.data.tags["kdtune.status"] for run in before}
    table = load_results(tmp_path / "ray" / "e2e")
    assert {t: recorded.get(t, "interrupted") for t in table["trial_id"]} == dict(zip(table["trial_id"],
                                                                                       table["status"]))
    ended = {run.data.tags["kdtune.trial_id"]: len(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
                                                    .get_metric_history(run.info.run_id, "val/acc1"))
             for run in before if run.data.tags["kdtune.status"] in ("completed", "stopped early")}
    assert len(ended) >= 2

    (tmp_path / "gate" / "open").touch()
    # resuming on another cluster works too (the search forwards its plugin to the cluster's workers)
    r = search_here(tmp_path, space, "--resume", ray=shared_ray, env_extra=plugin_env, monkeypatch=monkeypatch,
                    capsys=capsys)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client, after = child_runs(tmp_path)
    trial_ids = [run.data.tags["kdtune.trial_id"] for run in after]
    assert len(trial_ids) == len(set(trial_ids)) == 6  # no duplicate runs
    assert all(run.info.status == "FINISHED" for run in after), [
        (run.data.tags["kdtune.trial_id"], run.info.status, run.data.tags["kdtune.status"]) for run in after]
    for run in after:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")]
        assert len(steps) == len(set(steps)), "an epoch was logged twice"
        tid = run.data.tags["kdtune.trial_id"]
        if tid in ended:
            assert len(steps) == ended[tid]  # finished trials were not re-run
    table = load_results(tmp_path / "ray" / "e2e")
    assert len(table) == 6
    # the Optuna study lives in its storage and went on across the restart: one trial per Tune trial
    studied = optuna_trials(tmp_path)
    assert set(studied) == set(table["trial_id"])
    for trial_id, status, epochs, value in zip(table["trial_id"], table["status"], table["epochs"],
                                               table["final_val/acc1"]):
        t = studied[trial_id]
        assert t.state.name == {"completed": "COMPLETE", "stopped early": "PRUNED"}[status]
        assert t.intermediate_values[epochs] == pytest.approx(value) == t.value
    parents = {run.data.tags["mlflow.parentRunId"] for run in after}
    assert len(parents) == 1 and client.get_run(parents.pop()).info.status == "FINISHED"


BARRIER_PLUGIN = '''
"""KD whose trials wait at their first epoch until BARRIER_COUNT trial processes are there."""
import os
import time
from pathlib import Path

from kdtune.distillers import METHODS
from kdtune.distillers.kd import KD


@METHODS.register("barrier_kd")
class BarrierKD(KD):
    def on_epoch_start(self, epoch, num_epochs):
        super().on_epoch_start(epoch, num_epochs)
        if epoch == 1:
            folder = Path(os.environ["BARRIER_DIR"])
            (folder / str(os.getpid())).touch()
            deadline = time.monotonic() + 120
            while len(list(folder.iterdir())) < int(os.environ["BARRIER_COUNT"]):
                if time.monotonic() > deadline:
                    raise RuntimeError("the trials did not all run at once")
                time.sleep(0.1)
'''


@pytest.mark.slow
def test_quarter_gpu_trials_pack_four_at_once_on_a_cluster_that_declares_one_gpu(tmp_path: Path, monkeypatch,
                                                                                 capsys) -> None:
    """``--gpus-per-trial 0.25`` on a cluster with one GPU runs four trials at the same time. The
    GPU is only declared (``ray start --num-gpus 1`` on this GPU-less machine): each trial gets a
    quarter of it from Ray, finds no CUDA and trains on the CPU. The trials wait for each other
    at their first epoch (a plugin method), so they complete only if all four ran at once."""
    (tmp_path / "barrier_plugin.py").write_text(BARRIER_PLUGIN)
    (tmp_path / "barrier").mkdir()
    space = write_space(tmp_path, fixed={**SPACE["fixed"], "method": "barrier_kd", "epochs": 2}, max_failures=0,
                        search__num_samples=4, search__max_concurrent=4, search__algorithm="random",
                        scheduler={"type": "none"}, resources__cpus_per_trial=0.5, resources__gpus_per_trial=0.25)
    plugin_env = {"KDTUNE_PLUGINS": "barrier_plugin", "BARRIER_DIR": str(tmp_path / "barrier"), "BARRIER_COUNT": "4",
                  "PYTHONPATH": os.pathsep.join([str(tmp_path), env()["PYTHONPATH"]])}
    cluster = RayInstance.start(num_cpus=2, num_gpus=1, env_extra=plugin_env)  # its workers load the plugin
    try:
        r = search_here(tmp_path, space, ray=cluster, monkeypatch=monkeypatch, capsys=capsys)
    finally:
        cluster.stop()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"connected to the Ray cluster at {cluster.address}" in r.stdout
    table = load_results(tmp_path / "ray" / "e2e")
    assert len(table) == 4 and (table["status"] == "completed").all(), table
    assert len(list((tmp_path / "barrier").iterdir())) == 4  # four trial processes met
    assert (load_search(tmp_path / "ray" / "e2e").trials["gpus_per_trial"] == 0.25).all()


@pytest.mark.slow
def test_crashed_trial_is_retried_from_its_checkpoint_then_failed(fault_searches) -> None:
    fault_searches["crashed"].check()
    tmp_path, r = fault_searches["crashed"].dir, fault_searches["crashed"].result
    trial_dirs = {json.loads((d / "params.json").read_text())["crash_always"]: d
                  for d in (tmp_path / "ray" / "e2e").glob("KDTrainable_*")}
    assert f"crashed; retrying from its last checkpoint (its error: {trial_dirs[False]}/error.txt)" in r.stdout
    assert "restarted from its checkpoint after epoch 1" in r.stdout
    assert re.findall(r"started \((\d) of 2\)", r.stdout) == ["1", "2"]  # a retry is no new trial
    # the trials' own output is in their folders, not forwarded to the terminal
    assert "flaky_kd epoch 2" in (trial_dirs[False] / "stdout").read_text()
    assert "flaky_kd epoch" not in r.stdout + r.stderr and "(KDTrainable pid=" not in r.stdout + r.stderr
    table = load_results(tmp_path / "ray" / "e2e").set_index("crash_always")
    assert table.loc[False, "status"] == "completed" and table.loc[False, "epochs"] == 3
    assert table.loc[True, "status"] == "failed"
    client, runs = child_runs(tmp_path)
    assert len(runs) == 2
    by_value = {run.data.params["crash_always"]: run for run in runs}
    recovered = by_value["False"]
    steps = [m.step for m in client.get_metric_history(recovered.info.run_id, "val/acc1")]
    assert sorted(steps) == [1, 2, 3]
    # Tune's own log of the trial: epoch 1 once, then 2 and 3 after the restore (not 1 again)
    iterations = [json.loads(line)["training_iteration"] for line in (trial_dirs[False] / "result.json").open()]
    assert iterations == [1, 2, 3]
    assert recovered.info.status == "FINISHED"
    assert by_value["True"].info.status == "FAILED" and by_value["True"].data.tags["kdtune.status"] == "failed"


@pytest.mark.slow
def test_a_worker_lost_outside_a_trial_restores_the_search(fault_searches) -> None:
    fault_searches["lost"].check()
    tmp_path, r = fault_searches["lost"].dir, fault_searches["lost"].result
    assert (tmp_path / "lost").exists()
    assert re.search(r"\[kdtune\] Ray lost a worker outside a trial \(ActorUnavailableError: [^\n]*Socket closed "
                     r"\(simulated\)[^\n]*\); restoring the search from its saved state \(1 of 2\)", r.stderr), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    table = load_results(tmp_path / "ray" / "e2e")
    assert len(table) == 3 and (table["status"] == "completed").all() and (table["epochs"] == 4).all()
    client, runs = child_runs(tmp_path)
    assert sorted(run.data.tags["kdtune.trial_id"] for run in runs) == sorted(table["trial_id"])  # no duplicates
    for run in runs:
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")) == [1, 2, 3, 4]
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_diverging_trial_ends_clearly_and_search_goes_on(short_searches, shared_ray) -> None:
    tmp_path, r = short_searches["diverging"].dir, short_searches["diverging"].result
    assert f"connected to the Ray cluster at {shared_ray.address}" in r.stdout  # an existing cluster
    assert load_search(tmp_path / "ray" / "e2e").spec["scheduler"]["type"] == "hyperband"
    table = load_results(tmp_path / "ray" / "e2e").set_index("lr")
    assert table.loc[1e12, "status"] == "diverged" and table.loc[1e12, "epochs"] < 4
    assert table.loc[0.05, "status"] == "completed"
    _, runs = child_runs(tmp_path)
    statuses = {run.data.params["lr"]: (run.data.tags["kdtune.status"], run.info.status) for run in runs}
    assert statuses["1000000000000.0"] == ("diverged", "FAILED")
    assert statuses["0.05"] == ("completed", "FINISHED")


@pytest.mark.slow
def test_pbt_trials_copy_and_mutate_in_a_real_search(short_searches) -> None:
    tmp_path = short_searches["pbt"].dir
    table = load_results(tmp_path / "ray" / "e2e").set_index("trial_id")
    assert len(table) == 2 and (table["status"] == "completed").all() and (table["epochs"] == 4).all()
    client, runs = child_runs(tmp_path)
    runs = {run.data.tags["kdtune.trial_id"]: run for run in runs}
    mutated = table[table["mutations"].fillna("") != ""]
    assert len(mutated) == 1, table["mutations"]  # the bottom half (one trial) copied the top half at epoch 2
    for tid, row in table.iterrows():
        run = runs[tid]
        history = row["mutations"] if isinstance(row["mutations"], str) else ""
        assert run.data.tags["kdtune.mutations"] == (history or "none")
        lrs = sorted(client.get_metric_history(run.info.run_id, "pbt/lr"), key=lambda m: m.step)
        temps = sorted(client.get_metric_history(run.info.run_id, "pbt/temperature"), key=lambda m: m.step)
        assert [m.step for m in lrs] == [m.step for m in temps] == [1, 2, 3, 4]
        # the table holds the values in force at the last epoch; the run's params the first ones
        assert lrs[-1].value == pytest.approx(row["lr"]) and temps[-1].value == pytest.approx(row["temperature"])
        assert lrs[0].value == pytest.approx(float(run.data.params["lr"]))
        if history:
            # "epoch E from <trial>: lr a -> b, temperature c -> d": copied from a trial of this search,
            # within the space's ranges
            assert re.match(r"epoch 2 from \S+: (lr|temperature) ", history), history
            assert set(re.findall(r"from (\S+):", history)) <= set(table.index), history
            assert 0.01 <= row["lr"] <= 0.2 and 1.0 <= row["temperature"] <= 8.0
        else:
            assert {m.value for m in lrs} == {float(run.data.params["lr"])}  # never changed
    # read back from MLflow: the same final values and histories as the search's folder
    from_mlflow = load_search("e2e", tracking_uri=short_searches["pbt"].uri).trials.set_index("trial_id")
    text = lambda value: value if isinstance(value, str) else ""  # noqa: E731 (NaN, None: no history)
    for tid, row in table.iterrows():
        assert from_mlflow.loc[tid, ["lr", "temperature"]].tolist() == pytest.approx([row["lr"], row["temperature"]])
        assert text(from_mlflow.loc[tid, "mutations"]) == text(row["mutations"])


@pytest.mark.slow
def test_pb2_trials_in_a_real_search(short_searches) -> None:
    tmp_path = short_searches["pb2"].dir
    assert load_search(tmp_path / "ray" / "e2e").spec["scheduler"]["type"] == "pb2"
    table = load_results(tmp_path / "ray" / "e2e")
    assert len(table) == 2 and (table["status"] == "completed").all() and "mutations" in table
    assert table["lr"].between(0.01, 0.2).all()
    client, runs = child_runs(tmp_path)
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "pbt/lr")] == [1, 2, 3]


@pytest.mark.slow
def test_kdas_trials_in_a_real_search(short_searches) -> None:
    import optuna

    # the search with two objectives (tests/searches.py: MO_SPACE) is the KDAS search too
    tmp_path = short_searches["objectives"].dir
    assert load_search(tmp_path / "ray" / "e2e").spec["search"]["algorithm"] == "gp"
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'ray' / 'e2e' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4  # the GP search's study, stored
    table = load_results(tmp_path / "ray" / "e2e")
    assert len(table) == 4 and (table["status"] == "completed").all()
    assert (table["end_rate"] <= table["start_rate"]).all()
    n = 1138  # digits train split
    assert (table["samples_backprop"] < 4 * n).all() and (table["samples/scored"] == 2 * n).all()
    client, runs = child_runs(tmp_path)
    for run in runs:
        ratios = client.get_metric_history(run.info.run_id, "kdas/ratio")
        assert sorted(m.step for m in ratios) == [1, 2, 3, 4]
        assert {"kdas/scoring_epoch", "kdas/cache_size", "kdas/mean_weight", "samples/scored"} <= set(run.data.metrics)


@pytest.mark.slow
def test_ctkd_trials_in_a_real_search(fault_searches) -> None:
    fault_searches["lost"].check()  # CTKD's search is the one whose driver loses a worker
    tmp_path = fault_searches["lost"].dir
    # the median rule needs 3 other trials past an epoch before it stops one: here all complete
    assert load_search(tmp_path / "ray" / "e2e").spec["scheduler"]["type"] == "median"
    table = load_results(tmp_path / "ray" / "e2e")
    assert len(table) == 3 and (table["status"] == "completed").all()
    assert (table["ctkd/lambda"] == table["lambda_max"]).all()  # the curriculum ended at lambda_max
    assert ((table["ctkd/temperature_min"] > 1) & (table["ctkd/temperature_max"] < 21)).all()
    client, runs = child_runs(tmp_path)
    for run in runs:
        assert run.data.tags["method"] == "ctkd"
        lambdas = sorted(client.get_metric_history(run.info.run_id, "ctkd/lambda"), key=lambda m: m.step)
        lam = float(run.data.params["lambda_max"])
        assert [m.step for m in lambdas] == [1, 2, 3, 4]
        assert [m.value for m in lambdas] == pytest.approx([lam / 2, lam, lam, lam])
        assert "ctkd/temperature" in run.data.metrics


@pytest.mark.slow
def test_sakd_trials_in_a_real_search(short_searches) -> None:
    tmp_path, r = short_searches["sakd"].dir, short_searches["sakd"].result
    # the search says why this method runs its teacher live; each trial says it in its own output
    reason = "teacher cache: not used (method 'sakd' reads the teacher's features, not only its logits)"
    assert f"[kdtune] {reason}" in r.stdout
    assert all(reason in (d / "stdout").read_text() for d in (tmp_path / "ray" / "e2e").glob("KDTrainable_*"))
    table = load_results(tmp_path / "ray" / "e2e")
    assert len(table) == 2 and (table["status"] == "completed").all()
    stages = ["sakd/gate_stage1", "sakd/gate_stage2", "sakd/gate_stage3"]
    spots = [*stages, "sakd/gate_logits"]
    assert table[spots].notna().all().all()
    client, runs = child_runs(tmp_path)
    first_epoch = {}
    for run in runs:
        assert run.data.tags["method"] == "sakd"
        for name in spots + ["train/loss_route", "train/loss_feat"]:
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == [1, 2, 3]
        first_epoch[float(run.data.params["gate_bias"])] = {
            name: next(m.value for m in client.get_metric_history(run.info.run_id, name) if m.step == 1)
            for name in spots}
    # the searched gate_bias reaches the trial's router: +10 on "distil" starts every spot on,
    # -10 starts the feature spots off (the logits spot has the half-batch hinge pulling it on)
    assert min(first_epoch[10.0].values()) > 0.8, first_epoch
    assert max(first_epoch[-10.0][name] for name in stages) < 0.2, first_epoch


def test_the_python_api_refuses_bad_input_with_exceptions_and_makes_nothing(tmp_path: Path) -> None:
    import kdtune.search
    from kdtune.config import ConfigError
    from kdtune.search.preflight import PreflightError

    bad = write_space(tmp_path, space={"temprature": {"type": "float", "low": 1, "high": 8}})
    with pytest.raises(ConfigError, match="temprature"):
        kdtune.search.run(bad, storage_path=str(tmp_path / "ray"), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(PreflightError, match=r"resources\.gpus_per_trial: 1 asked for"):
        kdtune.search.run(write_space(tmp_path), gpus_per_trial=1, storage_path=str(tmp_path / "ray"),
                          tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "ray").exists() and not (tmp_path / "m.db").exists()


def test_the_python_apis_result_is_the_searchs_best_and_table(e2e_search) -> None:
    """What kdtune.search.run returns, read from the session's end-to-end search's folder."""
    from kdtune.search.api import SearchResult

    result = SearchResult.of(e2e_search.folder, 0)
    best = json.loads((e2e_search.folder / "best.json").read_text())
    assert result.name == "e2e" and result.folder == e2e_search.folder and not result.interrupted
    assert result.best_config == best["params"] and result.best_value == best["objective"]["value"]
    assert len(result.table) == 6 and result.objective_column == "final_val/acc1"
    assert best["trial_id"] in set(result.table["trial_id"])
    assert SearchResult.of(e2e_search.folder, 130).interrupted


def test_warm_start_carries_an_earlier_studys_finished_trials(tmp_path: Path, capsys) -> None:
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from kdtune.search.internals import optuna_study
    from kdtune.search.searchers import build_searcher

    old = tmp_path / "ray" / "old"
    old.mkdir(parents=True)
    study = optuna.create_study(study_name="old", direction="maximize", storage=f"sqlite:///{old / 'optuna.db'}")
    dist = {"lr": FloatDistribution(0.01, 0.2, log=True), "temperature": FloatDistribution(1, 20, log=True)}
    for lr, t, value, state in ((0.05, 2.0, 90.0, TrialState.COMPLETE), (0.1, 4.0, 95.0, TrialState.COMPLETE),
                                (0.02, 8.0, None, TrialState.PRUNED), (0.05, 16.0, 80.0, TrialState.COMPLETE),
                                (0.05, 3.0, None, TrialState.FAIL)):
        study.add_trial(create_trial(params={"lr": lr, "temperature": t}, distributions=dist, value=value,
                                     intermediate_values={1: 50.0}, state=state))
    # the new search: lr no longer searched, temperature over 1..10, kd_weight added
    space = write_space(tmp_path, search__max_concurrent=None, search__warm_start=str(old),
                        space={"temperature": {"type": "float", "low": 1, "high": 10, "log": True},
                               "kd_weight": {"type": "float", "low": 0.5, "high": 2.0}})
    searcher, _, _ = build_searcher(load_spec(space))
    trials = optuna_study(searcher).get_trials(deepcopy=False)
    assert [(t.state.name, t.params, t.value) for t in trials] == [
        ("COMPLETE", {"temperature": 2.0}, 90.0), ("COMPLETE", {"temperature": 4.0}, 95.0),
        ("PRUNED", {"temperature": 8.0}, None)]  # temperature 16 is outside the new range; FAIL is not carried
    assert ("[kdtune] warm start: 3 finished trials from " + str(old) + "; 1 left out (a value outside the new "
            "space); parameters no longer searched dropped: lr") in capsys.readouterr().out
    config = searcher.suggest("t1")  # the sampler goes on from there
    assert set(config) == {"temperature", "kd_weight"}
    from kdtune.config import ConfigError

    with pytest.raises(ConfigError, match="search.warm_start: expected an earlier search's folder holding optuna.db"):
        load_spec(write_space(tmp_path, search__warm_start=str(tmp_path / "nowhere")))


def test_tunes_error_for_a_staging_file_that_vanished_mid_upload_is_dropped() -> None:
    import logging
    import sys

    from kdtune.search.driver import _vanished_staging_file

    def record(error: BaseException) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            return logging.LogRecord("ray.tune.execution.experiment_state", logging.ERROR, __file__, 1,
                                     "Saving experiment state to storage failed", None, sys.exc_info())

    vanished = FileNotFoundError(2, "Failed to open local file '/r/driver_artifacts/.ab-tmp-searcher-state-x.pkl'")
    assert not _vanished_staging_file(record(vanished))
    assert _vanished_staging_file(record(FileNotFoundError(2, "Failed to open local file '/r/results.csv'")))
    assert _vanished_staging_file(record(PermissionError(13, "denied")))
