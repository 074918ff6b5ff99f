"""The report's account of the best configuration: no trial compared with itself, ties shown,
costs in a readable unit, the confirmation stage's candidates with every seed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from kdtune import analysis
from kdtune.analysis import selection
from kdtune.analysis.plots import objective_label


def kd_search() -> pd.DataFrame:
    """A plain-KD search (the quickstart's kind): its best trial is plain KD; two trials tie."""
    return pd.DataFrame({"search": "q", "trial_id": ["t1", "t2", "t3", "t4", "t5", "t6", "t7"],
                         "status": ["completed"] * 6 + ["diverged"], "method": "kd", "lr": [.1, .2, .3, .4, .5, .6, .7],
                         "final_val/acc1": [99.33, 99.33, 98.0, 97.0, 96.0, 96.0, 99.9], "epochs": 12,
                         "wall_s": 20.0, "samples_backprop": 1000, "cpus_per_trial": 1, "gpus_per_trial": 0})


def test_a_trial_is_never_its_own_baseline() -> None:
    trials = kd_search()
    gap = analysis.baseline_gap(trials, published=False)
    assert not len(gap[gap["baseline"] == "kd"])  # the kd baseline would be t1 itself: gap 0 against itself
    assert analysis.loaders.own_baselines(trials) == [("q", "kd", "t1")]
    # with a number given, the comparison is against that number
    given = analysis.baseline_gap(trials, {"none": 95.0}, published=False).set_index("baseline")
    assert given.loc["none", "gap"] == 99.33 - 95.0 and "kd" not in given.index
    # a separate plain-KD trial in a search whose best is another method stays a baseline
    other = trials.assign(method=["dkd"] + ["kd"] * 6)
    assert analysis.baseline_gap(other, published=False).set_index("baseline").loc["kd", "baseline_trial"] == "t2"
    assert analysis.loaders.own_baselines(other) == []


def test_the_top_table_shows_ties_and_costs_read_as_durations() -> None:
    top = selection.top_table(kd_search(), "val/acc1", "max", ["lr"], n=5)
    assert list(top["trial_id"]) == ["t1", "t2", "t3", "t4", "t5", "t6"]  # t6 ties with the fifth
    assert list(top["tie"]) == ["t1, t2", "t1, t2", "", "", "t5, t6", "t5, t6"]
    assert [selection.duration(s) for s in (42, 750, 4 * 3600, math.nan)] == ["42 s", "12.5 min", "4.0 h", ""]
    cost = selection.cost_table(analysis.cost_totals(kd_search())).iloc[0]
    assert cost["trial_time"] == "2.3 min" and "trial_hours" not in cost  # 7 trials x 20 s
    assert objective_label("val/acc1") == "val/acc1 at the last epoch trained"


def test_the_confirmation_section_shows_every_seed(tmp_path: Path) -> None:
    from kdtune.search.confirm import select

    trials = kd_search().drop(columns="search")
    chosen = select(trials, {"t1": [(1, 98.0)], "t2": [(1, 99.0)]}, "val/acc1", "max", top_k=1, seeds=1)
    (tmp_path / "best.json").write_text(json.dumps({"trial_id": chosen.chosen, "selection": chosen.record()}))
    search = analysis.Search("q", "q", {}, trials, pd.DataFrame(), folder=tmp_path)
    table, record = selection.confirmation_table(search)
    assert list(table["trial_id"]) == ["t2", "t1"] and list(table["chosen"]) == ["yes", ""]
    assert table.loc[0, "seeds (value)"] == "0: 99.33, 1: 99.00" and table.loc[0, "n_seeds"] == 2
    assert record["single_run_best"] == ["t1", "t2"]
