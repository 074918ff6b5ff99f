"""kdtune.analysis (loaders, plots), ``python -m kdtune.report`` and the notebooks in analysis/.

The helpers that only compute on DataFrames are checked on small hand-made tables with known
answers; the loaders, plots, report and notebooks on one real search (digits, method none or
kd, 6 short trials; the ``e2e_search`` fixture, shared with test_search) run once per session.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kdtune import analysis
from kdtune.analysis import plots
from kdtune.cli import main as kdtune
from commands import run_here
from searches import E2E_SPACE, SearchRun, env

ROOT = Path(__file__).resolve().parents[1]
NAME = E2E_SPACE["name"]
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- fast: hand-made tables


def trials_frame() -> pd.DataFrame:
    """Two searches; known best values, baselines and costs."""
    rows = [
        # search, trial, status, method, sampler, logit_stand, best, epochs, wall_s, samples, cpus, gpus
        ("a", "t1", "completed", "kd", "none", False, 90.0, 10, 3600.0, 1000, 2, 0.25),
        ("a", "t2", "stopped early", "kd", "kdas", False, 92.0, 5, 1800.0, 300, 2, 0.25),
        ("a", "t3", "diverged", "kd", "none", False, 99.0, 2, 60.0, 100, 2, 0.25),  # a penalty, not a score
        ("a", "t4", "completed", "none", "none", False, 85.0, 10, 1800.0, 1000, 2, 0.25),
        ("b", "t5", "completed", "kd", "none", True, 95.0, 10, 3600.0, 1000, 1, 0.0),  # LS: not plain KD
        ("b", "t6", "failed", "kd", "none", False, math.nan, 1, 10.0, 50, 1, 0.0),
        ("b", "t7", "completed", "kd", "none", False, 91.0, 10, 3600.0, 1000, 1, 0.0),
    ]
    columns = ["search", "trial_id", "status", "method", "sampler", "logit_stand", "final_val/acc1", "epochs",
               "wall_s", "samples_backprop", "cpus_per_trial", "gpus_per_trial"]
    return pd.DataFrame(rows, columns=columns)


def test_best_trials_skips_diverged_and_failed() -> None:
    trials = trials_frame()
    assert list(analysis.best_trials(trials, 3)["trial_id"]) == ["t5", "t2", "t7"]
    assert list(analysis.best_trials(trials, 1, by="search")["trial_id"]) == ["t5", "t2"]  # best first
    assert list(analysis.best_trials(trials, 2, mode="min")["trial_id"]) == ["t4", "t1"]


def test_baseline_gap_from_trials_then_given_numbers() -> None:
    gap = analysis.baseline_gap(trials_frame()).set_index(["search", "baseline"])
    # none: t4 (85); plain kd: t7 (91) -- t2 uses KDAS, t5 logit standardization, t3 diverged
    assert gap.loc[("a", "none"), "baseline_trial"] == "t4" and gap.loc[("a", "none"), "gap"] == pytest.approx(7.0)
    assert gap.loc[("a", "kd"), "baseline_trial"] == "t7" and gap.loc[("a", "kd"), "gap"] == pytest.approx(1.0)
    assert gap.loc[("b", "kd"), "gap"] == pytest.approx(4.0) and gap.loc[("b", "kd"), "source"] == "trials of b"

    kd_only = trials_frame().query("method == 'kd' and search == 'b'")
    given = analysis.baseline_gap(kd_only, {"none": 93.0, "kd": 1.0, "paper": 96.0}).set_index("baseline")
    assert given.loc["none", "source"] == "given" and given.loc["none", "gap"] == pytest.approx(2.0)
    assert given.loc["kd", "source"] == "trials of b" and given.loc["kd", "baseline_value"] == 91.0  # trials win
    assert given.loc["paper", "gap"] == pytest.approx(-1.0)
    assert len(analysis.baseline_gap(kd_only.assign(method="dkd"))) == 0  # nothing to compare with

    losses = trials_frame().assign(**{"final_val/loss": [0.5, 0.4, 0.1, 0.9, 0.3, math.nan, 0.6]})
    lower = analysis.baseline_gap(losses, metric="val/loss", mode="min").set_index(["search", "baseline"])
    assert lower.loc[("a", "none"), "gap"] == pytest.approx(0.5)  # 0.9 -> 0.4: positive means better


def test_cost_totals_hours_from_wall_time_and_resources() -> None:
    cost = analysis.cost_totals(trials_frame()).set_index("search")
    a = cost.loc["a"]
    assert a["trials"] == 4 and a["completed"] == 2 and a["stopped early"] == 1 and a["diverged"] == 1
    assert a["epochs"] == 27 and a["samples_backprop"] == 2400
    hours = (3600 + 1800 + 60 + 1800) / 3600
    assert a["trial_hours"] == pytest.approx(hours)
    assert a["cpu_hours"] == pytest.approx(2 * hours) and a["gpu_hours"] == pytest.approx(0.25 * hours)
    assert cost.loc["b", "failed"] == 1 and cost.loc["b", "gpu_hours"] == 0


def test_group_summary_per_sampler() -> None:
    summary = analysis.group_summary(trials_frame().query("search == 'a'"), "sampler").set_index("sampler")
    assert summary.loc["kdas", "best"] == 92.0 and summary.loc["none", "best"] == 90.0
    assert summary.loc["none", "trials"] == 3 and summary.loc["none", "finished"] == 2
    assert summary.loc["kdas", "samples_backprop_per_epoch"] == pytest.approx(60.0)


def test_asha_milestones_as_ray_builds_its_rungs() -> None:
    assert analysis.asha_milestones(12, 2, 2) == [2, 4, 8]  # the quickstart
    assert analysis.asha_milestones(4, 1, 2) == [1, 2]
    assert analysis.asha_milestones(240, 30, 3) == [30, 90]


def test_importance_handles_conditional_parameters() -> None:
    space = {"sampler": {"type": "categorical",
                         "choices": {"none": {}, "kdas": {"start_rate": {"type": "float", "low": 0.5, "high": 0.9},
                                                          "sampling_period": {"type": "categorical",
                                                                              "choices": [1, 2, "1,2,3,4"]}}}},
             "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
             "noise": {"type": "int", "low": 0, "high": 9}}
    rng = np.random.default_rng(0)
    n = 40
    sampler = np.where(np.arange(n) % 2 == 0, "none", "kdas")
    lr = np.exp(rng.uniform(np.log(0.001), np.log(0.1), n))
    start_rate = np.where(sampler == "kdas", rng.uniform(0.5, 0.9, n), np.nan)
    # as results.csv gives them back: strings for a mixed categorical, NaN where not applicable
    period = np.where(sampler == "kdas", rng.choice(["1", "2", "1,2,3,4"], n), None)
    value = 100 * np.log10(lr) + np.nan_to_num(50 * start_rate)  # lr drives it, then start_rate
    trials = pd.DataFrame({"trial_id": [f"t{i}" for i in range(n)], "status": "completed", "sampler": sampler,
                           "start_rate": start_rate, "sampling_period": period, "lr": lr,
                           "noise": rng.integers(0, 10, n), "final_val/acc1": value})
    found = analysis.param_importance(trials, space, bootstrap=0)
    scopes = {scope: dict(zip(g["param"], g["importance"])) for scope, g in found.groupby("scope")}
    assert set(scopes) == {"all", "sampler=kdas"}
    assert set(scopes["all"]) == {"sampler", "lr", "noise"}
    assert set(scopes["sampler=kdas"]) == {"start_rate", "sampling_period", "lr", "noise"}
    assert max(scopes["all"], key=scopes["all"].get) == "lr"
    for values in scopes.values():
        assert sum(values.values()) == pytest.approx(1.0)
    assert (found.query("scope == 'sampler=kdas'")["trials"] == n // 2).all()
    ped = analysis.param_importance(trials, space, evaluator="ped_anova", bootstrap=0)
    assert set(ped["param"]) == {"sampler", "lr", "noise", "start_rate", "sampling_period"}
    with pytest.raises(ValueError, match="evaluator"):
        analysis.param_importance(trials, space, evaluator="shap")


def _asha_like(n: int = 24, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials whose value is driven by lr, stopped at rungs 2 and 4 of 8 epochs, as ASHA would."""
    rng = np.random.default_rng(seed)
    lr = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), n))
    noise = rng.integers(0, 10, n)
    last = np.where(np.arange(n) < 12, 2, np.where(np.arange(n) < 20, 4, 8))
    trials = pd.DataFrame({"trial_id": [f"t{i:02d}" for i in range(n)], "lr": lr, "noise": noise,
                           "status": np.where(last == 8, "completed", "stopped early"), "epochs": last})
    # the value grows with the epoch, so comparing trials across budgets would explain epochs, not lr
    curves = pd.DataFrame([{"trial_id": f"t{i:02d}", "epoch": e, "val/acc1": 10 * e + 5 * np.log10(lr[i])}
                           for i in range(n) for e in range(1, last[i] + 1)])
    trials["best_val/acc1"] = trials["trial_id"].map(curves.groupby("trial_id")["val/acc1"].max())
    trials["final_val/acc1"] = trials["trial_id"].map(curves.groupby("trial_id")["val/acc1"].last())  # the objective
    return trials, curves


SMALL_SPACE = {"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
               "noise": {"type": "int", "low": 0, "high": 9}}


def test_importance_compares_trials_at_one_budget_with_an_interval() -> None:
    trials, curves = _asha_like()
    assert analysis.common_budget(trials, curves, min_trials=8) == 4  # 12 trials reached epoch 4, 4 reached 8
    assert analysis.common_budget(trials, curves, min_trials=13) == 2
    found = analysis.param_importance(trials, SMALL_SPACE, curves=curves, min_trials=8, bootstrap=10).set_index("param")
    assert (found["budget"] == 4).all() and (found["trials"] == 12).all()
    assert found.loc["lr", "importance"] > 0.8 and found.loc["lr", "low"] > found.loc["noise", "high"]
    assert (found["low"] <= found["high"]).all()
    # across budgets (objectives of trials stopped at 2, 4 and 8 epochs) the epochs dominate: lr explains less
    mixed = analysis.param_importance(trials, SMALL_SPACE, bootstrap=0).set_index("param")
    assert mixed["budget"].isna().all() and len(mixed) == 2


def test_importance_does_not_depend_on_the_order_of_the_trials() -> None:
    trials, curves = _asha_like(seed=1)
    one = analysis.param_importance(trials, SMALL_SPACE, curves=curves, bootstrap=5)
    shuffled = trials.sample(frac=1.0, random_state=3)
    other = analysis.param_importance(shuffled, SMALL_SPACE, curves=curves.sample(frac=1.0, random_state=4),
                                      bootstrap=5)
    pd.testing.assert_frame_equal(one, other)


def test_importance_warns_when_too_few_trials_reach_any_budget() -> None:
    trials, curves = _asha_like(n=6)
    with pytest.warns(UserWarning, match="read it as noise"):
        found = analysis.param_importance(trials, SMALL_SPACE, curves=curves, bootstrap=0)
    assert (found["budget"] == 2).all() and (found["trials"] == 6).all()


def test_plots_skip_cleanly_without_their_data(tmp_path: Path) -> None:
    curves = pd.DataFrame({"trial_id": ["a", "a"], "status": "completed", "epoch": [1, 2], "val/acc1": [1.0, 2.0]})
    assert plots.ctkd_curves(curves, tmp_path / "c.png") is None
    assert plots.sakd_gates(curves, tmp_path / "s.png") is None
    assert plots.learning_curves(curves, "val/loss") is None
    assert plots.importance_bars(pd.DataFrame(columns=["scope", "param", "importance", "trials"])) is None
    assert plots.accuracy_vs_params(pd.DataFrame({"status": ["failed"], "epochs": [1]})) is None
    assert plots.accuracy_vs_cost(pd.DataFrame({"status": ["completed"]})) is None
    assert not list(tmp_path.iterdir())


def test_mlflow_params_take_the_types_their_space_declares() -> None:
    """MLflow keeps params as strings; the loader types them from the search space, not by
    their look: "5" stays a string when the choices are strings."""
    from kdtune.analysis.loaders import _numeric, _typed
    from kdtune.search.space import parse_space

    space, problems = parse_space({
        "method": {"type": "categorical", "choices": {"none": {}, "kd": {"temperature": {"type": "float", "low": 1,
                                                                                      "high": 8}}}},
        "sampling_period": {"type": "categorical", "choices": ["5", "10"]},
        "logit_stand": {"type": "categorical", "choices": [True, False]},
        "batch_size": {"type": "int", "low": 32, "high": 128}})
    assert not problems
    declared = space.declared()
    assert _typed(pd.Series(["5", "10"]), declared["sampling_period"]).tolist() == ["5", "10"]
    assert _numeric(pd.Series(["5", "10"])).tolist() == [5, 10]  # what guessing by the look gave
    assert _typed(pd.Series(["True", "False"]), declared["logit_stand"]).tolist() == [True, False]
    assert _typed(pd.Series(["none", "kd"]), declared["method"]).tolist() == ["none", "kd"]
    temperature = _typed(pd.Series([None, "4.0"]), declared["temperature"])
    assert math.isnan(temperature[0]) and temperature[1] == 4.0
    assert _typed(pd.Series(["64"]), declared["batch_size"]).tolist() == [64]


def test_bad_results_path_is_named_and_exits_2(tmp_path: Path, capsys) -> None:
    assert kdtune(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "does not exist" in err and "kdtune_search.json" in err
    # a storage path in place of a search folder: the searches below it are named
    (tmp_path / "ray" / "x").mkdir(parents=True)
    (tmp_path / "ray" / "x" / "kdtune_search.json").write_text(json.dumps({"spec": {"name": "x"},
                                                                          "parent_run_id": "0"}))
    assert kdtune(["report", str(tmp_path / "ray")]) == 2
    assert str(tmp_path / "ray" / "x") in capsys.readouterr().err
    # a search that has not ended: no results.csv yet
    assert kdtune(["report", str(tmp_path / "ray" / "x")]) == 2
    assert "no results.csv" in capsys.readouterr().err
    assert kdtune(["report", str(tmp_path / "ray" / "x"), "--baseline", "none"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- slow: one real search


def mlflow_runs(e2e_search: SearchRun) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(e2e_search.uri)
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`kdtune.trial_id` != ''")
    return client, {run.data.tags["kdtune.trial_id"]: run for run in runs}


@pytest.mark.slow
def test_trials_from_the_folder_and_from_mlflow_agree(e2e_search: SearchRun) -> None:
    found = analysis.load_search(e2e_search.folder)
    trials = found.trials
    assert len(trials) == 6 and trials["trial_id"].is_unique and (trials["search"] == NAME).all()
    assert list(trials.columns[:6]) == ["search", "trial_id", "status", "method", "temperature", "lr"]
    for column in ("sampler", "epochs", "final_val/acc1", "best_val/acc1", "wall_s", "samples_backprop",
                   "cpus_per_trial", "gpus_per_trial"):
        assert column in trials
    assert set(trials["method"]) == {"none", "kd"}  # the seeded search draws both
    # a conditional parameter is NaN exactly where its method does not take it
    assert (trials["temperature"].isna() == (trials["method"] == "none")).all()
    assert (trials["best_val/acc1"] >= trials["final_val/acc1"]).all()
    assert found.milestones == [1, 2] and found.log_params == ["temperature", "lr"]

    client, runs = mlflow_runs(e2e_search)
    assert set(runs) == set(trials["trial_id"])
    for row in trials.itertuples():
        run = runs[row.trial_id]
        assert run.data.tags["kdtune.status"] == row.status
        assert run.data.metrics["samples/backprop"] == row.samples_backprop
        assert float(run.data.params["lr"]) == pytest.approx(row.lr)

    from_mlflow = analysis.load_search(NAME, tracking_uri=e2e_search.uri).trials.set_index("trial_id")
    by_id = trials.set_index("trial_id").loc[from_mlflow.index]
    for column in ("status", "method", "epochs"):
        assert (from_mlflow[column] == by_id[column]).all(), column
    for column in ("lr", "temperature", "best_val/acc1", "final_val/acc1", "samples_backprop"):
        assert np.allclose(from_mlflow[column], by_id[column], equal_nan=True), column
    assert np.allclose(from_mlflow["wall_s"], by_id["wall_s"], rtol=0.2)  # epoch times vs Tune's total

    both = analysis.load_trials(e2e_search.folder, e2e_search.folder)
    assert len(both) == 12 and set(both["search"]) == {NAME, f"{NAME}#2"}


@pytest.mark.slow
def test_loading_a_search_folder_starts_neither_ray_nor_mlflow(e2e_search: SearchRun) -> None:
    code = (f"import sys\nfrom kdtune import analysis\nfound = analysis.load_search({str(e2e_search.folder)!r})\n"
            "assert len(found.trials) == 6 and len(found.curves) > 6\n"
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_curves_one_row_per_trial_and_epoch(e2e_search: SearchRun) -> None:
    found = analysis.load_search(e2e_search.folder)
    curves, trials = found.curves, found.trials.set_index("trial_id")
    assert len(curves) == trials["epochs"].sum()
    for tid, trial in curves.groupby("trial_id"):
        assert list(trial["epoch"]) == list(range(1, trials.loc[tid, "epochs"] + 1))
        assert trial["wall_s"].is_monotonic_increasing
        assert (trial["status"] == trials.loc[tid, "status"]).all()
    for column in ("val/acc1", "val/loss", "train/loss", "train/loss_ce", "train/lr", "samples/backprop", "time/epoch_s"):
        assert curves[column].notna().all(), column
    assert curves.loc[curves["trial_id"].map(trials["method"]) == "kd", "train/loss_kd"].notna().all()

    client, runs = mlflow_runs(e2e_search)
    for tid, run in runs.items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/acc1")}
        mine = curves[curves["trial_id"] == tid].set_index("epoch")["val/acc1"].to_dict()
        assert mine == pytest.approx(history)
    from_mlflow = analysis.load_search(NAME, tracking_uri=e2e_search.uri).curves
    assert len(from_mlflow) == len(curves) and set(from_mlflow.columns) >= {"val/acc1", "train/loss", "wall_s"}


@pytest.mark.slow
def test_importance_of_the_searched_parameters(e2e_search: SearchRun) -> None:
    found = analysis.load_search(e2e_search.folder)
    # a few resamples: the interval itself is tested on made trials (and the report's default, 30,
    # by the report command and the notebooks)
    importance = analysis.param_importance(found.trials, found, bootstrap=3)
    scopes = {scope: set(g["param"]) for scope, g in importance.groupby("scope")}
    assert scopes["all"] == {"method", "lr"}
    assert scopes["method=kd"] == {"temperature", "lr"}
    assert importance["importance"].between(0, 1).all()
    assert len(analysis.importance_table([found])) == len(importance)


@pytest.mark.slow
def test_every_plot_writes_a_png(e2e_search: SearchRun, tmp_path: Path) -> None:
    found = analysis.load_search(e2e_search.folder)
    trials, curves = found.trials, found.curves
    # CTKD and SAKD metrics are not in this search: add some, the way the engine names them
    extra = curves.assign(**{"ctkd/temperature": curves["epoch"] + 1.0, "ctkd/temperature_min": 1.0,
                             "ctkd/temperature_max": curves["epoch"] + 3.0, "ctkd/lambda": curves["epoch"] / 4,
                             "sakd/gate_logits": 0.5, "sakd/gate_stage3": curves["epoch"] / 8})
    importance = analysis.param_importance(trials, found, bootstrap=3)
    made = {
        "learning_curves": plots.learning_curves(curves, found.metric, found.milestones, tmp_path / "lc.png"),
        "accuracy_vs_params": plots.accuracy_vs_params(trials, log=found.log_params, path=tmp_path / "ap.png"),
        "importance": plots.importance_bars(importance, tmp_path / "im.png"),
        "accuracy_vs_cost": plots.accuracy_vs_cost(trials, path=tmp_path / "ac.png"),
        "ctkd": plots.ctkd_curves(extra, tmp_path / "ct.png"),
        "sakd": plots.sakd_gates(extra, tmp_path / "sa.png"),
    }
    assert all(fig is not None for fig in made.values()), made
    # a panel per spot the engine reports, titled by the spot
    assert [ax.get_title() for ax in made["sakd"].axes if ax.get_title()] == ["logits", "stage3"]
    for name in ("lc", "ap", "im", "ac", "ct", "sa"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert plots.ctkd_curves(curves) is None and plots.sakd_gates(curves) is None
    written = plots.plot_all(trials, curves, importance, tmp_path / "all", found.metric, found.milestones)
    assert set(written) == {"learning_curves", "accuracy_vs_params", "importance", "accuracy_vs_cost"}


@pytest.mark.slow
def test_report_command(e2e_search: SearchRun, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "report"
    r = run_here("report", str(e2e_search.folder), "--out", str(out), "--bootstrap", "3", cwd=tmp_path,
                 monkeypatch=monkeypatch, capsys=capsys)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    best = analysis.best_trials(analysis.load_search(e2e_search.folder).trials, 1).iloc[0]
    for text in ("## Best configuration", "## Gap to baselines", "## Parameter importance", "## Cost",
                 best["trial_id"], "learning_curves.png"):
        assert text in md, text
    assert page.count("data:image/png;base64,") == 4 and best["trial_id"] in page
    for name in ("learning_curves", "accuracy_vs_params", "importance", "accuracy_vs_cost"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG)


def test_report_refuses_a_missing_search_and_a_bad_bootstrap(tmp_path: Path, capsys) -> None:
    assert kdtune(["report", str(tmp_path / "no-such-search")]) == 2
    assert str(tmp_path / "no-such-search") in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        kdtune(["report", str(tmp_path), "--bootstrap", "-1"])
    assert e.value.code == 2 and "--bootstrap: expected a whole number >= 0, got '-1'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("notebook", ["overview", "compare"])
def test_notebook_runs_headless(e2e_search: SearchRun, notebook: str, monkeypatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    # compare: the search folder against the same search read back from MLflow
    results = str(e2e_search.folder) if notebook == "overview" else os.pathsep.join([str(e2e_search.folder), NAME])
    # 3 resamples per importance interval, not 30: the interval is there, at a tenth of the fits
    for key, value in env(KDTUNE_RESULTS=results, MLFLOW_TRACKING_URI=e2e_search.uri, KDTUNE_BOOTSTRAP="3").items():
        monkeypatch.setenv(key, value)  # the kernel inherits them
    nb = nbformat.read(ROOT / "analysis" / f"{notebook}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit without outputs"
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "analysis")}}).execute()  # raises on a cell error
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4



@pytest.mark.slow
def test_python_api_notebook_runs_a_search_and_reads_it_back(short_searches) -> None:
    """analysis/python_api.ipynb ran one of the session's short searches (SAKD's, see
    tests/searches.py: NOTEBOOK_SEARCHES) through kdtune.search.run in its kernel, then opened it with
    kdtune.analysis; test_search checks the search itself."""
    import nbformat

    run = short_searches["sakd"]
    nb = nbformat.read(run.dir / "python_api.ipynb", as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    best = json.loads((run.folder / "best.json").read_text())
    assert f"{run.folder}\n" in text and f"best: {best['objective']['value']} {best['params']}" in text
    # the lines before the trials too (Tune's notebook reporter used to clear them when it started)
    assert "[kdtune] teacher resnet8" in text and "[kdtune] MLflow: this search's trials, best first" in text
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any(best["trial_id"] in html for html in tables)  # the results table, best first
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the learning curves
    assert (run.dir / "mlruns").is_dir()  # its MLflow artifacts in its own folder, not in the checkout
