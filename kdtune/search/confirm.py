"""The confirmation stage: after a search, its best trials re-run with more seeds, and the best
configuration chosen by the mean over all of its seeds.

Why: a search keeps the maximum of many single, noisy runs, so its winner is partly the luckiest
seed (the winner's curse): its re-run mean is lower than its search value, and another
configuration may be better on average. Seed noise on digits and CIFAR is about as large as the
differences between a search's best configurations.

What runs: ``confirm: {top_k: K, seeds: N}`` in the space file (or ``--confirm-top-k K
--confirm-seeds N``). The K best completed trials by the search's objective (more when trials tie
at the K-th place: a tie is never broken silently) are each re-run with seeds ``seed+1 ..
seed+N``, as Tune trials of the same trainable on the same cluster with the same resources, and
with the same teacher (``teacher_seed`` pinned to the trial's). They run in the search's folder
under ``confirm/`` (a Tune experiment of their own, so ``--resume`` continues them and Ctrl-C
loses nothing finished), each as an MLflow run nested under the trial it confirms (tags
``kdtune.kind = confirm``, ``kdtune.confirms = <trial id>``). The chosen configuration is the
candidate with the best mean over its N + 1 seeds, the search's own run included.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from kdtune.search.records import objective_column

logger = logging.getLogger(__name__)

CONFIRM_TAG = "kdtune.confirms"  # on a confirmation run: the trial id it confirms
FOLDER = "confirm"  # in <storage>/<name>: the confirmation trials (a Tune experiment)
RESULTS_COLUMNS = ("mean", "std", "n_seeds")  # added to results.csv, as <column>_<metric>


@dataclass
class Candidate:
    """One configuration's values over seeds (the search's run first)."""

    trial_id: str
    single: float  # the search's run: the objective that ranked it
    values: list[float] = field(default_factory=list)  # every seed's objective, the search's run first
    seeds: list[int] = field(default_factory=list)
    expected: int = 1  # seeds it should have (1 + confirm.seeds)

    @property
    def finite(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]

    @property
    def n(self) -> int:
        return len(self.finite)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.finite) if self.finite else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.finite) if self.n > 1 else math.nan

    @property
    def complete(self) -> bool:
        return self.n == self.expected

    def record(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "single_run": self.single, "mean": self.mean, "std": self.std,
                "n_seeds": self.n, "seeds": self.seeds, "values": self.values}


@dataclass
class Selection:
    """How the best configuration was chosen, and from which candidates (best first)."""

    rule: str
    metric: str
    mode: str
    candidates: list[Candidate]  # best first by the rule
    single_run_ties: list[str]  # the trials that share the best single-run objective (one: no tie)
    confirmed: bool  # whether the candidates were re-run
    # whether a confirmation stage could tell tied trials apart (not with several objectives,
    # where it is refused): the tie line suggests it only then
    confirmable: bool = True

    @property
    def chosen(self) -> str:
        return self.candidates[0].trial_id

    @property
    def mean_ties(self) -> list[str]:
        """The candidates that share the chosen one's mean (one: no tie)."""
        if not self.confirmed:
            return [self.chosen]
        best = self.candidates[0]
        return [c.trial_id for c in self.candidates if c.complete == best.complete and c.mean == best.mean]

    def record(self) -> dict[str, Any]:
        return {"rule": self.rule, "chosen": self.chosen, "confirmed": self.confirmed,
                "single_run_best": self.single_run_ties, "mean_ties": self.mean_ties,
                "candidates": [c.record() for c in self.candidates]}

    def lines(self) -> list[str]:
        """The closing lines: the rule, each candidate's mean ± std over its seeds, the ties."""
        out = []
        if len(self.single_run_ties) > 1:
            out.append(f"tie: trials {', '.join(self.single_run_ties)} share the best single-run {self.metric} "
                       f"({self.candidates_by_id()[self.single_run_ties[0]].single:.2f})"
                       + ("" if self.confirmed else "; the first in the results table is reported"
                          + (", re-run them (confirm: {top_k: K, seeds: N}) to tell them apart"
                             if self.confirmable else "")))
        if not self.confirmed:
            return out
        out.append(f"chosen by: {self.rule}")
        for c in self.candidates:
            spread = f" ± {c.std:.2f}" if c.n > 1 else ""
            mark = "  <- chosen" if c.trial_id == self.chosen else ""
            missing = "" if c.complete else f" (only {c.n} of {c.expected} seeds finished)"
            out.append(f"  trial {c.trial_id}: {self.metric} {c.mean:.2f}{spread} over {c.n} seeds "
                       f"(search run {c.single:.2f}; seeds {', '.join(_num(v) for v in c.values)}){missing}{mark}")
        if len(self.mean_ties) > 1:
            out.append(f"tie: trials {', '.join(self.mean_ties)} share the best mean; the first is reported")
        return out

    def candidates_by_id(self) -> dict[str, Candidate]:
        return {c.trial_id: c for c in self.candidates}

    def add_columns(self, table):
        """``table`` with each candidate's mean, std and number of seeds (NaN for other trials)."""
        table = table.copy()
        by_id = self.candidates_by_id() if self.confirmed else {}
        for column in RESULTS_COLUMNS:
            values = {tid: {"mean": c.mean, "std": c.std, "n_seeds": c.n}[column] for tid, c in by_id.items()}
            table[f"{column}_{self.metric}"] = table["trial_id"].map(values).astype(float)
        return table


def _num(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else "failed"


def ranked(table, metric: str, mode: str):
    """The trials that can be ranked by the objective (not diverged or failed), best first; ties
    keep the table's order."""
    column = objective_column(metric)
    ok = table[~table["status"].isin(["diverged", "failed"])].dropna(subset=[column])
    return ok.sort_values(column, ascending=mode == "min", kind="stable")


def single_run_ties(table, metric: str, mode: str) -> list[str]:
    order = ranked(table, metric, mode)
    if not len(order):
        return []
    column = objective_column(metric)
    best = order[column].iloc[0]
    return [str(t) for t in order.loc[order[column] == best, "trial_id"]]


def candidates(table, metric: str, mode: str, top_k: int) -> list[str]:
    """The ``top_k`` best completed trials, plus any that tie with the k-th (a trial stopped early
    by ASHA has a value of fewer epochs and is not a candidate)."""
    order = ranked(table, metric, mode)
    order = order[order["status"] == "completed"]
    if len(order) <= top_k:
        return [str(t) for t in order["trial_id"]]
    column = objective_column(metric)
    cutoff = order[column].iloc[top_k - 1]
    keep = order[column] >= cutoff if mode == "max" else order[column] <= cutoff
    return [str(t) for t in order.loc[keep, "trial_id"]]


def rule_text(metric: str, mode: str, top_k: int, seeds: int) -> str:
    best = "highest" if mode == "max" else "lowest"
    return (f"{best} mean {metric} (at the last epoch) over {seeds + 1} seeds, the search's run and {seeds} "
            f"confirmation runs with the same teacher, among the top {top_k} completed trials")


def select(table, runs: dict[str, list[tuple[int, float]]], metric: str, mode: str, top_k: int, seeds: int,
           base_seeds: dict[str, int] | None = None) -> Selection:
    """The selection by mean over seeds. ``runs``: per candidate trial id, its confirmation runs'
    ``(seed, objective)`` (NaN for a run that diverged or failed). A candidate missing seeds
    ranks after every complete one; among the rest the best mean wins, and equal means keep the
    single-run order (and are shown as a tie)."""
    column = objective_column(metric)
    single = ranked(table, metric, mode).set_index("trial_id")[column]
    found = []
    for tid, extra in runs.items():
        base = (base_seeds or {}).get(tid, 0)
        extra = sorted(extra)
        found.append(Candidate(tid, float(single[tid]), [float(single[tid])] + [v for _, v in extra],
                               [base] + [s for s, _ in extra], expected=seeds + 1))
    sign = -1 if mode == "max" else 1
    order = sorted(found, key=lambda c: (not c.complete, sign * c.mean if math.isfinite(c.mean) else math.inf))
    return Selection(rule_text(metric, mode, top_k, seeds), metric, mode, order, single_run_ties(table, metric, mode),
                     confirmed=True)


def single_run_selection(table, metric: str, mode: str, confirmable: bool = True) -> Selection:
    """Without a confirmation stage: the best single run (ties shown, the table's first reported;
    ``confirmable``: whether the tie line may suggest a confirmation stage)."""
    column = objective_column(metric)
    order = ranked(table, metric, mode)
    cands = [Candidate(str(r["trial_id"]), float(r[column]), [float(r[column])], expected=1)
             for _, r in order.head(1).iterrows()]
    best = "highest" if mode == "max" else "lowest"
    return Selection(f"{best} {metric} at the last epoch of one run (no confirmation stage)", metric, mode, cands,
                     single_run_ties(table, metric, mode), confirmed=False, confirmable=confirmable)


# --------------------------------------------------------------------------- running it


def point_key(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if v is not None}, sort_keys=True, default=str)


def points(spec, table, ids: list[str], own) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, int]]:
    """The confirmation trials' configs (the trial's sampled values, a new seed, its teacher
    pinned), which trial each confirms (by :func:`point_key`), and each trial's own seed."""
    import yaml

    from kdtune.search.final import pin_teacher, trial_folder
    from kdtune.search.records import RUN_FILE

    rows = table.set_index("trial_id")
    out, confirms, base = [], {}, {}
    for tid in ids:
        row = rows.loc[tid]
        params = {n: _plain(row[n]) for n in spec.space.names() if n in row and not _missing(row[n])}
        folder = trial_folder(own, tid)
        run = (yaml.safe_load((folder / RUN_FILE).read_text()) if folder is not None and (folder / RUN_FILE).is_file()
               else spec.run_config(params).flat())
        pinned = pin_teacher(run)
        base[tid] = int(run["seed"])
        for i in range(1, spec.confirm_seeds + 1):
            point = {**params, "seed": base[tid] + i, "teacher_seed": pinned["teacher_seed"]}
            out.append(point)
            confirms[point_key(point)] = tid
    return out, confirms, base


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def make_tracker(base_cls):
    """The search's MLflow callback, nesting each confirmation run under the trial it confirms."""

    class ConfirmTracker(base_cls):
        best_series = False  # the parent's best-so-far series counts the search's trials only

        def __init__(self, *args, confirms: dict[str, str], trial_runs: dict[str, str], **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.confirms, self.trial_runs = confirms, trial_runs

        def parent_for(self, trial) -> str:
            return self.trial_runs.get(self.confirms.get(point_key(trial.config), ""), self.parent_run_id)

        def extra_tags(self, trial) -> dict[str, str]:
            return {"kdtune.kind": "confirm", CONFIRM_TAG: self.confirms.get(point_key(trial.config), ""),
                    "kdtune.search_run": self.parent_run_id, "kdtune.seed": str(trial.config.get("seed"))}

    return ConfirmTracker


def run_confirmation(spec, table, storage: str, own, client, parent_id: str, tags: dict[str, str], trainable,
                     resume: bool, status_every: float = 30.0) -> tuple[Selection | None, bool]:
    """Run (or, on --resume, continue) the confirmation trials; returns the selection (None when
    no trial completed) and whether every confirmation run ended (False: interrupted)."""
    import functools

    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from kdtune.search.final import flat_run_config
    from kdtune.search.progress import Progress
    from kdtune.search.records import TRIAL_TAG, objective_value
    from kdtune.search.tracking import TrialTracker, child_runs

    ids = candidates(table, spec.metric, spec.mode, spec.confirm_top_k)
    if not ids:
        return None, True
    configs, confirms, base = points(spec, table, ids, own)
    path = f"{storage.rstrip('/')}/{spec.name}/{FOLDER}"
    logger.info(f"confirmation: trials {', '.join(ids)} re-run with {spec.confirm_seeds} more seeds each "
                f"({len(configs)} runs, the same teacher and resources)")
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        trial_runs = {r.data.tags[TRIAL_TAG]: r.info.run_id for r in child_runs(client, spec.name, parent_id)}
        tracker = make_tracker(TrialTracker)(
            client.tracking_uri, spec.name, parent_id, tags, spec.max_epochs, spec.metric, spec.mode,
            run_config=functools.partial(flat_run_config, spec), confirms=confirms, trial_runs=trial_runs)
        # Tune takes preset points only for keys of its space: every key, null where a point has none
        # (a conditional hyperparameter of another method; the trainable ignores nulls).
        tuner = tune.Tuner(
            trainable, param_space={k: None for k in sorted(set().union(*configs))},
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=len(configs),
                                        search_alg=BasicVariantGenerator(points_to_evaluate=configs,
                                                                         max_concurrent=spec.max_concurrent or 0),
                                        reuse_actors=True),
            run_config=tune.RunConfig(
                name=FOLDER, storage_path=f"{storage.rstrip('/')}/{spec.name}", verbose=0, log_to_file=True,
                callbacks=[tracker, Progress(len(configs), spec.max_epochs, spec.metric, spec.mode,
                                             every_s=status_every)],
                sync_config=tune.SyncConfig(sync_artifacts=True, sync_period=0),
                # none at a run's end: see driver.new_tuner
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_at_end=False),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures)))
    try:
        results = tuner.fit()
    finally:
        close_confirm_runs(client, spec.name, parent_id)
    runs: dict[str, list[tuple[int, float]]] = {tid: [] for tid in ids}
    ended = True
    for result in results:
        config = result.config or {}
        tid = confirms.get(point_key(config))
        if tid is None:
            continue
        history = result.metrics_dataframe
        series = list(history[spec.metric]) if history is not None and spec.metric in history else []
        last = result.metrics or {}
        if result.error is None and last.get("training_iteration", 0) < spec.max_epochs and not last.get("diverged"):
            ended = False  # stopped by Ctrl-C: --resume continues it
            continue
        bad = result.error is not None or bool(last.get("diverged"))
        runs[tid].append((int(config["seed"]), math.nan if bad else objective_value(series)))
    return select(table, runs, spec.metric, spec.mode, spec.confirm_top_k, spec.confirm_seeds, base), ended


def close_confirm_runs(client, experiment: str, parent_id: str) -> None:
    """Mark this search's confirmation runs still RUNNING (Ctrl-C, a failure) KILLED: none stays
    RUNNING; ``--resume`` reopens those it continues."""
    from kdtune.search.records import STATUS_TAG
    from kdtune.search.tracking import experiment_id

    exp = experiment_id(client, experiment)
    for run in client.search_runs([exp], filter_string=f"tags.`kdtune.search_run` = '{parent_id}' and "
                                                       f"tags.`kdtune.kind` = 'confirm' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, STATUS_TAG, "interrupted")
        client.set_terminated(run.info.run_id, status="KILLED")
