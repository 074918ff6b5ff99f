"""Several objectives (``search.objectives``): the Pareto front on known values, the searcher that
tells Optuna one value per objective, the front's plot, and one real search end to end (digits,
KD + KDAS, val/acc1 against samples/backprop; the spec's validation is in test_spec)."""
from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from kdtune.search.records import dominates, fmt_config, pareto_column, pareto_front
from kdtune.search.spec import load_spec
from searches import FIXED, SPACE

optuna.logging.set_verbosity(optuna.logging.WARNING)

MODES = ["max", "min"]  # val/acc1 up, samples/backprop down


# ---------------------------------------------------------------------------- the front, on known values


def test_dominates_needs_no_worse_everywhere_and_better_somewhere() -> None:
    assert dominates([95.0, 100.0], [94.0, 100.0], MODES)  # better accuracy, same cost
    assert dominates([95.0, 90.0], [95.0, 100.0], MODES)  # same accuracy, cheaper
    assert not dominates([95.0, 100.0], [95.0, 100.0], MODES)  # equal: neither
    assert not dominates([96.0, 120.0], [95.0, 100.0], MODES)  # a trade-off: neither
    assert not dominates([95.0, 100.0], [96.0, 120.0], MODES)
    assert dominates([1.0, 1.0], [2.0, 2.0], ["min", "min"]) and not dominates([1.0, 1.0], [2.0, 2.0], MODES)


def test_pareto_front_of_known_values() -> None:
    values = [
        [97.0, 5000.0],  # 0: the most accurate                         -> front
        [96.0, 4000.0],  # 1: less accurate, cheaper                    -> front
        [96.0, 4500.0],  # 2: dominated by 1 (same accuracy, dearer)
        [90.0, 3000.0],  # 3: the cheapest                              -> front
        [89.0, 3000.0],  # 4: dominated by 3 (same cost, less accurate)
        [95.0, 6000.0],  # 5: dominated by 0 and 1
        [96.0, 4000.0],  # 6: equal to 1: neither dominates the other   -> front
        [99.0, math.nan],  # 7: no value: never on the front, dominates nothing
        [98.0, math.inf],  # 8: not finite: likewise
    ]
    assert pareto_front(values, MODES) == [True, True, False, True, False, False, True, False, False]
    # the same values against Optuna's own front (a study with these trials, best_trials)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for row in values[:7]:
        study.add_trial(optuna.trial.create_trial(values=row))
    assert sorted(t.number for t in study.best_trials) == [i for i, on in enumerate(pareto_front(values, MODES)) if on]
    # three objectives: a trial can be on the front by one objective alone
    three = [[97.0, 5000.0, 60.0], [97.0, 5000.0, 50.0], [90.0, 3000.0, 70.0]]
    assert pareto_front(three, ["max", "min", "min"]) == [False, True, True]
    assert pareto_front([], MODES) == []


def test_pareto_column_counts_completed_trials_only() -> None:
    table = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e"],
        "status": ["completed", "completed", "stopped early", "diverged", "completed"],
        "final_val/acc1": [95.0, 93.0, 99.0, 99.0, 92.0],
        "final_samples/backprop": [1000.0, 800.0, 100.0, 100.0, 900.0],
    })
    # c and d would dominate everything, but a stopped or diverged trial's values are not comparable
    assert pareto_column(table, [("val/acc1", "max"), ("samples/backprop", "min")]) == [True, True, False, False,
                                                                                         False]


def test_a_tie_on_the_front_suggests_no_confirmation_stage() -> None:
    from kdtune.search.confirm import single_run_selection

    # equal values on every objective: both on the front, tied on the search's metric; the
    # confirmation stage that tells single-objective ties apart is refused with several objectives
    front = pd.DataFrame({"trial_id": ["a", "b"], "status": ["completed"] * 2, "final_val/acc1": [80.0, 80.0]})
    assert single_run_selection(front, "val/acc1", "max", confirmable=False).lines() == [
        "tie: trials a, b share the best single-run val/acc1 (80.00); the first in the results table is reported"]
    assert single_run_selection(front, "val/acc1", "max").lines()[0].endswith(
        "reported, re-run them (confirm: {top_k: K, seeds: N}) to tell them apart")


# ---------------------------------------------------------------------------- the searcher


def _spec(tmp_path: Path, algorithm: str = "tpe"):
    space = {**SPACE, "fixed": {**FIXED, "sampler": "kdas", "epochs": 2},
             "space": {"start_rate": {"type": "float", "low": 0.4, "high": 1.0}},
             "search": {"algorithm": algorithm, "num_samples": 4, "seed": 0,
                        "objectives": {"val/acc1": "max", "samples/backprop": "min"}},
             "scheduler": {"type": "none"}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return load_spec(path)


@pytest.mark.parametrize("algorithm", ["tpe", "gp"])
def test_the_searcher_tells_optuna_one_value_per_objective(tmp_path: Path, algorithm: str) -> None:
    from kdtune.search.internals import optuna_study
    from kdtune.search.searchers import build_searcher

    spec = _spec(tmp_path, algorithm)
    searcher, _, n = build_searcher(spec, f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna_study(searcher)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.metric_names == ["val/acc1", "samples/backprop"] and n == 4
    epoch = {"val/acc1": 90.0, "samples/backprop": 1500, "training_iteration": 1, "diverged": 0.0}
    last = {**epoch, "val/acc1": 95.5, "samples/backprop": 2100, "training_iteration": 2}
    for tid in ("t0", "t1", "t2"):
        assert 0.4 <= searcher.suggest(tid)["start_rate"] <= 1.0
        searcher.on_trial_result(tid, epoch)  # no intermediate value: Optuna refuses them here
    searcher.on_trial_complete("t0", last)
    searcher.on_trial_complete("t1", {**last, "diverged": 1.0, "val/acc1": -1e6})
    searcher.on_trial_complete("t2", error=True)
    trials = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    assert (trials["t0"].state, trials["t0"].values, trials["t0"].user_attrs["kdtune_status"]) == (
        TrialState.COMPLETE, [95.5, 2100.0], "completed")
    assert trials["t0"].intermediate_values == {}
    assert (trials["t1"].state, trials["t1"].user_attrs["kdtune_status"]) == (TrialState.FAIL, "diverged")
    assert (trials["t2"].state, trials["t2"].user_attrs["kdtune_status"]) == (TrialState.FAIL, "failed")
    assert [t.number for t in study.best_trials] == [trials["t0"].number]


# ---------------------------------------------------------------------------- the plot and the report's table


def test_the_front_plot_rings_the_front_and_draws_its_staircase(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from kdtune.analysis import plots

    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "status": ["completed"] * 3 + ["failed"],
        "final_val/acc1": [97.0, 96.0, 90.0, math.nan], "final_samples/backprop": [5000.0, 4000.0, 3000.0, 10.0],
        "pareto": [True, True, True, False],
    })
    objectives = [("val/acc1", "max"), ("samples/backprop", "min")]
    fig = plots.pareto_front(trials, objectives, path=tmp_path / "front.png")
    assert fig is not None and (tmp_path / "front.png").read_bytes().startswith(b"\x89PNG")
    ax = fig.axes[0]
    staircase = ax.lines[0].get_xydata().tolist()
    # sorted by cost; between neighbours the corner of the worse cost and the worse accuracy
    assert staircase == [[3000, 90], [4000, 90], [4000, 96], [5000, 96], [5000, 97]]
    assert plots.pareto_front(trials, None) is None and plots.pareto_front(trials.drop(columns="pareto"),
                                                                          objectives) is None


def test_the_reports_front_table_puts_the_search_metric_first() -> None:
    from kdtune.analysis import Search, selection

    # as MLflow's spec.yaml gives it back: the objectives' keys sorted, the search's metric kept
    spec = {"search": {"metric": "val/acc1", "mode": "max", "objectives": {"samples/backprop": "min",
                                                                            "val/acc1": "max"}},
            "space": {"start_rate": {"type": "float", "low": 0.4, "high": 1.0}}, "fixed": {}}
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c"], "status": ["completed"] * 3, "start_rate": [0.5, 0.9, 0.7], "epochs": [2] * 3,
        "final_val/acc1": [90.0, 97.0, 95.0], "final_samples/backprop": [1000.0, 2000.0, 2100.0],
        "pareto": [True, True, False]})
    search = Search("s", "s", spec, trials, pd.DataFrame())
    assert search.objectives == [("val/acc1", "max"), ("samples/backprop", "min")]
    front = selection.pareto_table(search)
    assert front.to_dict("list") == {"trial_id": ["b", "a"], "start_rate": [0.9, 0.5], "epochs": [2, 2],
                                     "final_val/acc1": [97.0, 90.0], "final_samples/backprop": [2000.0, 1000.0]}
    single = Search("s", "s", {**spec, "search": {"metric": "val/acc1", "mode": "max"}}, trials, pd.DataFrame())
    assert single.objectives == [] and selection.pareto_table(single) is None


# ---------------------------------------------------------------------------- a real search


TRAIN_IMAGES = 1138  # digits' training split: its 1,797 images less the test split (20 %) and 300 for validation


def _mlflow_tags(db: Path, key: str) -> list[tuple[str, str]]:
    """(run id, value) of every run with tag ``key``, read with sqlite (no MLflow import)."""
    con = sqlite3.connect(db)
    try:
        return con.execute("select run_uuid, value from tags where key = ?", (key,)).fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_a_search_with_two_objectives_reports_its_pareto_front(short_searches) -> None:
    # MO_SPACE: 4 trials of KD + KDAS on digits, 4 epochs each, Optuna's GP (tests/searches.py)
    r = short_searches["objectives"]
    tmp_path = r.dir
    table = pd.read_csv(r.folder / "results.csv")
    columns = list(table.columns)
    # each objective's column, then the front's, after the first objective (and before best_<metric>)
    assert columns[columns.index("final_val/acc1"):columns.index("best_val/acc1")] == [
        "final_val/acc1", "final_samples/backprop", "pareto"]
    assert len(table) == 4 and set(table["status"]) == {"completed"} and (table["epochs"] == 4).all()
    assert table["pareto"].dtype == bool
    # real counts: KDAS trains on a share of the 1,138 training images each epoch, never all of them
    assert ((0 < table["final_samples/backprop"]) & (table["final_samples/backprop"] < 4 * TRAIN_IMAGES)).all()
    assert (table["final_samples/backprop"] == table["samples_backprop"]).all()
    values = table[["final_val/acc1", "final_samples/backprop"]].values.tolist()
    front_ids = set(table.loc[table["pareto"], "trial_id"])
    assert front_ids and front_ids == {t for t, on in zip(table["trial_id"], pareto_front(values, MODES)) if on}

    best = json.loads((r.folder / "best.json").read_text())
    assert best["objectives"] == [{"metric": "val/acc1", "mode": "max"}, {"metric": "samples/backprop", "mode": "min"}]
    front = best["pareto_front"]
    assert {f["trial_id"] for f in front} == front_ids
    by_id = table.set_index("trial_id")
    for f in front:
        row = by_id.loc[f["trial_id"]]
        assert f["values"] == {"val/acc1": row["final_val/acc1"], "samples/backprop": row["final_samples/backprop"]}
        assert f["params"] == {"start_rate": row["start_rate"], "end_rate": row["end_rate"]} and f["epochs"] == 4
    assert [f["values"]["val/acc1"] for f in front] == sorted((f["values"]["val/acc1"] for f in front), reverse=True)
    # best.json's trial (what --from-search re-runs by default): the front's most accurate
    assert best["trial_id"] == front[0]["trial_id"] and best["objective"]["value"] == front[0]["values"]["val/acc1"]

    out = r.result.stdout
    assert (f"[kdtune] Pareto front of val/acc1 (max), samples/backprop (min): {len(front)} of 4 completed trials, "
            f"best val/acc1 first") in out
    lines = re.findall(r"^\[kdtune\]   trial (\w+): val/acc1 ([\d.]+), samples/backprop (\d+) \| (.*)$", out, re.M)
    assert [(t, float(a), int(s)) for t, a, s, _ in lines] == [
        (f["trial_id"], round(f["values"]["val/acc1"], 2), int(f["values"]["samples/backprop"])) for f in front]
    assert [p for *_, p in lines] == [fmt_config(f["params"]) for f in front]
    assert f"[kdtune] best trial {front[0]['trial_id']}: val/acc1" in out

    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{r.folder / 'optuna.db'}")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert study.metric_names == ["val/acc1", "samples/backprop"]
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        row = by_id.loc[t.user_attrs["ray_trial_id"]]
        assert t.values == [row["final_val/acc1"], row["final_samples/backprop"]]
    assert {t.user_attrs["ray_trial_id"] for t in study.best_trials} == front_ids  # Optuna's own front

    db = tmp_path / "mlflow.db"
    assert [v for _, v in _mlflow_tags(db, "kdtune.objectives")] == ["val/acc1 (max), samples/backprop (min)"]
    assert [v for _, v in _mlflow_tags(db, "kdtune.pareto_front")] == [", ".join(f["trial_id"] for f in front)]
    tagged = {run for run, v in _mlflow_tags(db, "kdtune.pareto") if v == "true"}
    assert {v for run, v in _mlflow_tags(db, "kdtune.trial_id") if run in tagged} == front_ids
