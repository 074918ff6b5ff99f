"""The replay benchmark (``kdtune bench --search --replay``): whole searches against a small table
written here, with Ray Tune's real schedulers and kdtune's real Optuna searcher. No Ray cluster
starts; each search takes well under a second."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from kdtune.search import replay
from kdtune.search.curves import SPACE, read_curves, write_table
from commands import run_here

EPOCHS = 6
LRS = (0.01, 0.1, 1.0)
# final values: logit_stand x lr; the best (99.0) is logit_stand with lr 0.1
FINAL = {(False, 0.01): 90.0, (False, 0.1): 97.0, (False, 1.0): 80.0,
         (True, 0.01): 92.0, (True, 0.1): 99.0, (True, 1.0): 85.0}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """Six configurations, two seeds, six epochs of one second each; each curve rises to its final
    value (seed 1 lies 1 pp lower), and lr 1.0 leads for the first two epochs, then falls behind."""
    rows = []
    for c, ((ls, lr), final) in enumerate(FINAL.items()):
        for seed in (0, 1):
            for e in range(1, EPOCHS + 1):
                value = final - 30.0 * (1 / e - 1 / EPOCHS) - seed + (25.0 if lr == 1.0 and e <= 2 else 0.0)
                rows.append({"config": c, "logit_stand": ls, "temperature": 4.0, "kd_weight": 0.9, "lr": lr,
                             "seed": seed, "epoch": e, "val_acc1": value, "seconds": 1.0, "diverged": 0})
    path = tmp_path_factory.mktemp("replay") / "curves.csv.gz"
    write_table(path, rows, {"epochs": EPOCHS, "space": SPACE})
    return path


def search(table: Path, strategy: str, seed: int = 0, budget: float = 30.0, workers: int = 2):
    curves = read_curves(table)
    sampler, kind = replay.STRATEGIES[strategy]
    searcher = replay.make_searcher(curves.space, sampler, seed, curves.epochs, f"test-{strategy}-{seed}")
    scheduler = replay.make_scheduler(kind, curves.epochs, grace_period=1, reduction_factor=3)
    trials: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        events = replay.simulate(curves, searcher, scheduler, budget, workers, seed,
                                 max_concurrent=None if kind == "hyperband" else workers, trials=trials)
    search.cut = {i for i, t in enumerate(trials) if t.status == "RUNNING"}  # still running when the budget ran out
    return curves, searcher, events


def epochs_by_trial(events) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for ev in events:
        out.setdefault(ev.trial, []).append(ev.epoch)
    return out


def test_the_table_round_trips_and_its_best_is_the_seed_mean(table: Path) -> None:
    curves = read_curves(table)
    assert len(curves.configs) == 6 and curves.seeds == [0, 1] and curves.epochs == EPOCHS
    assert curves.best() == pytest.approx(99.0 - 0.5)  # (99 + 98) / 2
    assert curves.mean_full_seconds() == pytest.approx(6.0)
    # a suggestion snaps to the nearest recorded configuration, in log(lr), same logit_stand
    near = replay.nearest_config(curves, {"logit_stand": True, "temperature": 3.0, "kd_weight": 1.0, "lr": 0.2})
    assert curves.configs[near] == {"logit_stand": True, "temperature": 4.0, "kd_weight": 0.9, "lr": 0.1}


@pytest.mark.parametrize("strategy", ["random", "tpe"])
def test_without_early_stopping_every_trial_runs_its_full_budget(table: Path, strategy: str) -> None:
    curves, searcher, events = search(table, strategy)
    runs = epochs_by_trial(events)
    last = events[-1]
    assert all(epochs == list(range(1, EPOCHS + 1)) for t, epochs in runs.items() if t not in search.cut)
    assert last.spent == pytest.approx(len(events) * 1.0)  # every epoch of the table is one second
    assert last.spent >= 30.0  # the budget is spent
    states = {t.state.name for t in searcher._ot_study.get_trials(deepcopy=False)}
    assert "PRUNED" not in states and "COMPLETE" in states


def test_asha_stops_trials_early_and_the_searcher_hears_pruned(table: Path) -> None:
    curves, searcher, events = search(table, "random+asha", budget=40.0)
    runs = epochs_by_trial(events)
    stopped = [t for t, epochs in runs.items() if len(epochs) < EPOCHS and t not in search.cut]
    assert stopped, runs
    assert any(len(epochs) == EPOCHS for epochs in runs.values())  # some trials go the distance
    # grace period 1, reduction factor 3: rungs at epochs 1 and 3, so stops happen only there
    assert {len(runs[t]) for t in stopped} <= {1, 3}
    states = [t.state.name for t in searcher._ot_study.get_trials(deepcopy=False)]
    assert states.count("PRUNED") >= len(stopped) - 1


def test_hyperband_pauses_and_resumes_trials(table: Path) -> None:
    curves, searcher, events = search(table, "hyperband", budget=60.0)
    order = [ev.trial for ev in events]
    # a paused trial reports again after other trials have run: its epochs are not one block
    resumed = [t for t in set(order) if order.index(t) + len(epochs_by_trial(events)[t]) - 1
               != len(order) - 1 - order[::-1].index(t)]
    assert resumed
    assert all(epochs == sorted(epochs) and epochs == list(range(1, len(epochs) + 1))
               for epochs in epochs_by_trial(events).values())  # resumed at the next epoch, never repeated
    failed = [t for t in searcher._ot_study.get_trials(deepcopy=False) if t.state.name == "FAIL"]
    assert not failed  # a paused trial Hyperband stops is PRUNED at its last epoch, not FAIL


def test_a_seed_reproduces_a_search_and_another_seed_differs(table: Path) -> None:
    def trace(seed):
        return [(e.trial, e.config, e.epoch, e.value) for e in search(table, "tpe+asha", seed=seed)[2]]

    assert trace(3) == trace(3)
    assert trace(3) != trace(4)


def test_score_reads_the_incumbent_by_its_configurations_seed_mean(table: Path) -> None:
    curves = read_curves(table)
    ev = replay.Event
    best = [c for c, cfg in enumerate(curves.configs) if cfg["logit_stand"] and cfg["lr"] == 0.1][0]
    good = [c for c, cfg in enumerate(curves.configs) if not cfg["logit_stand"] and cfg["lr"] == 0.1][0]
    events = [ev(6.0, 6.0, 0, good, 6, 97.0, True),  # 96.5 on average: 2 pp from the best
              ev(7.0, 7.0, 1, best, 1, 50.0, False),  # not completed: never the incumbent
              ev(13.0, 12.0, 1, best, 6, 98.0, True)]  # the best configuration's weaker seed
    out = replay.score(curves, events, target_gap=0.5, budget=16.0)
    assert out.time_to_target == 13.0 and out.regret == pytest.approx(0.0)
    assert out.trials == 2 and out.completed == 2
    # after 2 and 4 s nothing has completed; after 8 s the 96.5 one leads; after 16 s the best
    assert out.anytime == [math.inf, math.inf, pytest.approx(2.0), pytest.approx(0.0)]
    out = replay.score(curves, events[:1], target_gap=0.5, budget=16.0)
    assert math.isinf(out.time_to_target) and out.regret == pytest.approx(2.0)


def test_bootstrap_interval_holds_the_median_and_counts_never_as_infinite() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    lo, hi = replay.bootstrap(values)
    assert lo <= replay.median(values) == 3.0 <= hi
    assert replay.median([1.0, math.inf]) == math.inf
    ratio, lo, hi = replay.ratio_interval([1.0, 1.0, 1.0], [3.0, 3.0, 3.0])
    assert ratio == pytest.approx(1 / 3) and lo == hi == pytest.approx(1 / 3)


def test_the_command_prints_every_strategy_and_refuses_bad_input(table: Path, tmp_path, monkeypatch, capsys) -> None:
    """In this process (test_bench_search runs the command in its own)."""
    args = ("bench", "--search", "--replay", str(table), "--seeds", "3", "--budget", "4")
    r = run_here(*args, "--strategies", "random,tpe+asha,hyperband", cwd=tmp_path, monkeypatch=monkeypatch,
                 capsys=capsys)
    assert r.returncode == 0, r.stderr
    for s in ("| random |", "| tpe+asha |", "| hyperband |", "tpe+asha / random"):
        assert s in r.stdout
    r = run_here(*args, "--strategies", "tpe,bogus", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert r.returncode == 2 and "bogus" in r.stderr and "Traceback" not in r.stderr


def test_spearman_matches_known_values_and_handles_ties() -> None:
    assert replay.ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]
    assert replay.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert replay.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # scipy.stats.spearmanr([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) = 0.8
    assert replay.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


def test_rung_fidelity_sees_the_early_leader_fall_behind(table: Path) -> None:
    curves = read_curves(table)
    rows = replay.rung_fidelity(curves, top=2)
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)) and rows[0]["runs"] == 12
    # lr 1.0 leads at epochs 1-2 and ends last: the early ranks are inverted, the late ones exact
    assert rows[0]["rho"] < 0 < rows[2]["rho"] and rows[-1]["rho"] == pytest.approx(1.0)
    assert replay.decay_epochs(curves) == [4, 4, 5]  # 150/180/210 of 240, scaled to 6 epochs
    assert [r["phase"] for r in rows] == ["before"] * 4 + ["after"] * 2
    assert rows[-1]["kept"] == 2 and rows[0]["kept"] == 0  # the 2 best at the end, cut at epoch 1
