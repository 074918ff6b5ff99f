"""The confirmation stage's choice: by the mean over seeds, ties shown, never broken silently."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from kdtune.config import ConfigError
from kdtune.search.confirm import candidates, select, single_run_selection, single_run_ties
from kdtune.search.spec import load_spec
from searches import SPACE, write_space


def table() -> pd.DataFrame:
    """Six trials: a and b tie for the best single run; e diverged, f was stopped early by ASHA."""
    return pd.DataFrame({"trial_id": list("abcdef"),
                         "status": ["completed"] * 4 + ["diverged", "stopped early"],
                         "final_val/acc1": [99.33, 99.33, 99.0, 98.0, 99.9, 99.1],
                         "lr": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})


def test_the_single_run_best_is_not_the_best_by_mean() -> None:
    t = table()
    assert single_run_ties(t, "val/acc1", "max") == ["a", "b"]  # e diverged: not ranked
    assert candidates(t, "val/acc1", "max", 1) == ["a", "b"]  # a tie at the k-th place is kept
    assert candidates(t, "val/acc1", "max", 3) == ["a", "b", "c"]  # completed trials only (not f)
    # a's search run was lucky: its re-runs are lower; c's search run was unlucky
    runs = {"a": [(1, 98.0), (2, 98.2)], "b": [(2, 98.9), (1, 99.0)], "c": [(1, 99.4), (2, 99.2)]}
    s = select(t, runs, "val/acc1", "max", top_k=3, seeds=2, base_seeds={"a": 0, "b": 0, "c": 0})
    assert [c.trial_id for c in s.candidates] == ["c", "b", "a"] and s.chosen == "c"
    c = s.candidates[0]
    assert c.values == [99.0, 99.4, 99.2] and c.seeds == [0, 1, 2] and c.n == 3
    assert c.mean == pytest.approx(99.2) and c.std == pytest.approx(0.2)
    b = s.candidates_by_id()["b"]
    assert b.values == [99.33, 99.0, 98.9] and b.seeds == [0, 1, 2]  # sorted by seed
    record = s.record()
    assert record["chosen"] == "c" and record["single_run_best"] == ["a", "b"] and record["confirmed"]
    assert "mean" in record["rule"] and "3 seeds" in record["rule"]
    text = "\n".join(s.lines())
    assert "tie: trials a, b share the best single-run val/acc1 (99.33)" in text and "trial c: val/acc1 99.20 ± 0.20 over 3 seeds" in text
    assert "<- chosen" in text.splitlines()[2]
    with_columns = s.add_columns(t).set_index("trial_id")
    assert with_columns.loc["c", "mean_val/acc1"] == pytest.approx(99.2)
    assert with_columns.loc["a", "n_seeds_val/acc1"] == 3 and math.isnan(with_columns.loc["d", "mean_val/acc1"])


def test_a_candidate_missing_seeds_ranks_last_and_equal_means_are_a_tie() -> None:
    t = table()
    runs = {"a": [(1, 99.9), (2, math.nan)], "b": [(1, 99.0), (2, 98.9)], "c": [(1, 99.33), (2, 98.9)]}
    s = select(t, runs, "val/acc1", "max", top_k=3, seeds=2)
    assert s.chosen in ("b", "c") and s.candidates[-1].trial_id == "a" and not s.candidates[-1].complete
    assert s.mean_ties == ["b", "c"]  # the same three values: shown, the single-run order keeps b first
    assert "tie: trials b, c share the best mean" in "\n".join(s.lines())
    # minimised objectives: the lowest mean wins
    loss = t.rename(columns={"final_val/acc1": "final_val/loss"})
    s = select(loss, {"c": [(1, 98.0)], "d": [(1, 97.0)]}, "val/loss", "min", top_k=2, seeds=1)
    assert s.chosen == "d"  # mean 97.5 against c's 98.5


def test_without_confirmation_the_tie_is_said() -> None:
    t = table()
    s = single_run_selection(t, "val/acc1", "max")
    assert s.chosen == "a" and s.single_run_ties == ["a", "b"] and not s.confirmed
    assert "tie: trials a, b share the best single-run val/acc1 (99.33)" in s.lines()[0]


def test_the_confirm_section_is_validated_like_the_others(tmp_path: Path) -> None:
    spec = load_spec(write_space(tmp_path, SPACE, confirm={"top_k": 2, "seeds": 4}))
    assert (spec.confirm_top_k, spec.confirm_seeds) == (2, 4) and spec.resolved["confirm"] == {"top_k": 2, "seeds": 4}
    off = load_spec(write_space(tmp_path, SPACE))
    assert off.confirm_top_k == 0 and "confirm" not in off.resolved  # a search without it: as before
    assert load_spec(off.path, ["confirm.top_k=3"]).confirm_seeds == 3  # the default
    with pytest.raises(ConfigError) as e:
        load_spec(write_space(tmp_path, SPACE, confirm={"top_k": -1, "seeds": "x", "sedes": 2}))
    text = str(e.value)
    assert "confirm.top_k: must be >= 0, but got -1" in text and "confirm.seeds: expected an integer" in text
    assert "confirm.sedes: unknown key; did you mean 'seeds'?" in text, text


def test_the_winners_curse_replay_measures_known_cases() -> None:
    from kdtune.search.bench_winners import replay

    # no seed noise: the single-run best is the best, and its value is its mean
    assert replay([[1.0] * 4, [2.0] * 4], "max", top_k=1, confirm_seeds=1, draws=50) == {
        "single_overestimate_pp": 0.0, "single_not_best": 0.0, "confirm_overestimate_pp": 0.0, "confirm_not_best": 0.0}
    # a is worse on average (2.6 against 3) but has one lucky seed (9): a search that draws it
    # (1 in 5) picks a and overstates it by 9 - 1 = 8; a confirmation over 3 of a's 5 seeds still
    # picks a when the lucky seed is among them (3 in 5), by (9 + 1 + 1) / 3 - 1
    f = replay([[9.0, 1, 1, 1, 1], [3.0] * 5], "max", top_k=2, confirm_seeds=2, draws=20000)
    assert f["single_not_best"] == pytest.approx(0.2, abs=0.02)
    assert f["single_overestimate_pp"] == pytest.approx(8 * 0.2, abs=0.15)
    assert f["confirm_not_best"] == pytest.approx(0.6, abs=0.02)
    assert f["confirm_overestimate_pp"] == pytest.approx(0.6 * (11 / 3 - 1), abs=0.1)
    # minimised: the same run table negated gives the same figures
    g = replay([[-9.0, -1, -1, -1, -1], [-3.0] * 5], "min", top_k=2, confirm_seeds=2, draws=20000)
    assert g == pytest.approx(f)


@pytest.mark.slow
def test_a_search_with_a_confirmation_stage_chooses_by_the_mean(tmp_path: Path, shared_ray, monkeypatch,
                                                                 capsys) -> None:
    import json

    import yaml
    from mlflow import MlflowClient

    from searches import SearchRun, search_here

    space = write_space(tmp_path, SPACE, search__num_samples=2, search__max_concurrent=1, scheduler={"type": "none"},
                        fixed__epochs=2, confirm={"top_k": 1, "seeds": 1})  # one trial process at a time
    here = dict(ray=shared_ray, monkeypatch=monkeypatch, capsys=capsys)
    run = SearchRun.of(tmp_path, search_here(tmp_path, space, **here))
    run.check()
    out = run.result.stdout
    best = json.loads((run.folder / "best.json").read_text())
    chosen = best["selection"]["candidates"][0]
    assert best["selection"]["confirmed"] and best["trial_id"] == chosen["trial_id"] and best["n_seeds"] == 2
    assert chosen["seeds"] == [0, 1] and chosen["mean"] == pytest.approx(sum(chosen["values"]) / 2)
    assert chosen["values"][0] == pytest.approx(best["val/acc1"])  # the search's own run is one of the seeds
    assert "chosen by: highest mean val/acc1" in out and f"trial {best['trial_id']}: val/acc1" in out
    table = pd.read_csv(run.folder / "results.csv").set_index("trial_id")
    assert table.loc[best["trial_id"], "n_seeds_val/acc1"] == 2 and table["mean_val/acc1"].notna().sum() == 1
    # the confirmation run: a Tune trial in confirm/, on the trial's teacher, nested under the trial's run
    (folder,) = (run.folder / "confirm").glob("KDTrainable_*")
    rerun = yaml.safe_load((folder / "run.yaml").read_text())
    assert rerun["seed"] == 1 and rerun["teacher_seed"] == 0 and rerun["lr"] == best["config"]["lr"]
    client = MlflowClient(run.uri)
    exp = client.get_experiment_by_name(SPACE["name"])
    (confirm,) = client.search_runs([exp.experiment_id], "tags.`kdtune.kind` = 'confirm'")
    trial_run = client.get_run(confirm.data.tags["mlflow.parentRunId"])
    assert trial_run.data.tags["kdtune.trial_id"] == confirm.data.tags["kdtune.confirms"] == best["trial_id"]
    assert confirm.info.status == "FINISHED" and confirm.data.metrics["objective"] == pytest.approx(chosen["values"][1])

    # --resume of the finished search runs nothing again: the same confirmation run, the same choice
    again = search_here(tmp_path, space, "--resume", **here)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(list((run.folder / "confirm").glob("KDTrainable_*"))) == 1
    assert len(client.search_runs([exp.experiment_id], "tags.`kdtune.kind` = 'confirm'")) == 1
    assert json.loads((run.folder / "best.json").read_text())["selection"] == best["selection"]
