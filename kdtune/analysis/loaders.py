"""Searches as pandas DataFrames: trials, learning curves, and the answers to the usual questions.

Two tidy tables, one name per hyperparameter everywhere (the YAML names; a method's or a sampler's
conditional parameters are empty, NaN, in trials of other methods or samplers):

* trials -- one row per trial: ``search``, ``trial_id``, ``status``, the hyperparameters,
  ``method`` and ``sampler`` (searched or fixed), ``epochs``, ``final_<metric>``,
  ``best_<metric>``, ``wall_s``, ``samples_backprop``, ``cpus_per_trial``, ``gpus_per_trial``
  and the last values of method/sampler metrics (``kdas/ratio``, ...); a search with several
  objectives (``search.objectives``) adds ``final_<metric>`` of each and ``pareto``, whether the
  trial is on the Pareto front;
* curves -- one row per trial and epoch: ``search``, ``trial_id``, ``status``, ``epoch``,
  ``wall_s`` (cumulative) and every metric the engine reported (``val/acc1``, ``train/loss_kd``,
  ``lr``, ``samples/backprop``, ``kdas/ratio``, ``ctkd/temperature``, ``sakd/gate_<spot>``, ...).

Where the data comes from. A search folder (``<storage-path>/<name>``) is read first: the trials
from ``results.csv`` (written by the driver when the search ends), the curves from Ray Tune's
``result.json`` of every trial folder -- plain local files that need no server, hold every
reported value (even those MLflow refuses) and Tune's own ``time_total_s``. When the trial
folders are not on this machine (a remote ``--storage-path``), the curves come from the MLflow
metric histories instead. An MLflow experiment name reads everything from MLflow (params, tags
and histories of the trial runs under the newest search run), so a search can be analysed from
the tracking server alone; there ``wall_s`` is the sum of ``time/epoch_s``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from kdtune.search.records import (NOT_METRICS, OBJECTIVE_METRIC, PARENT_TAG, PARETO_COLUMN, PENALTY, RESULTS_FILE,
                                   STATE_FILE, STATUS_TAG, TRIAL_TAG, is_own_metric, objective_column, pareto_column,
                                   resolve_tracking_uri, run_metrics, sqlite_file)
from kdtune.search.space import parse_space
from kdtune.search.pbt import HISTORY_COLUMN, HISTORY_TAG, METRIC_PREFIX as PBT_PREFIX

logger = logging.getLogger(__name__)

# Trials that ran normally; "diverged" and "failed" trials carry no comparable value.
FINISHED = ("completed", "stopped early")
# The run settings a published accuracy belongs to (besides the method).
PAIR_KEYS = ("dataset", "teacher", "student")


# --------------------------------------------------------------------------- kept: the raw loaders


def load_results(path: str | Path) -> pd.DataFrame:
    """One row per trial, from ``results.csv`` or the search folder that holds it
    (``<storage-path>/<name>``)."""
    path = Path(path)
    csv = path / RESULTS_FILE if path.is_dir() else path
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: no results table (written when a search ends)")
    return pd.read_csv(csv)


def _numeric(column: pd.Series) -> pd.Series:
    """A param no search space declares (MLflow keeps strings): numbers and booleans by their look."""
    if column.isin(["True", "False"]).all():
        return column.map({"True": True, "False": False})
    converted = pd.to_numeric(column, errors="coerce")
    return converted if converted.notna().sum() == column.notna().sum() else column


def _typed(column: pd.Series, param) -> pd.Series:
    """A searched param (MLflow keeps strings) back in the type its search space declares: the
    choice itself for a categorical (``"1"`` stays a string when the choices are strings), a
    number for a range; missing (NaN) in the trials that do not take it."""
    if not param.numeric:
        by_text = {str(choice): choice for choice in param.choices}
        return column.map(lambda text: by_text.get(text, text) if isinstance(text, str) else text)
    return pd.to_numeric(column, errors="coerce")


def load_mlflow(experiment: str, tracking_uri: str | None = None, parent_run_id: str | None = None,
                storage_path: str | Path | None = None, space: Any = None) -> pd.DataFrame:
    """One row per trial run of ``experiment`` (optionally of one search: its parent run id, or
    the ``storage_path`` folder of the search), with params, last metrics and status. Params
    get the types the search's space declares: ``space`` (a :class:`kdtune.search.space.Space`),
    or with ``storage_path`` the search's own; without one, numbers and booleans by their look."""
    from mlflow import MlflowClient

    if parent_run_id is None and storage_path is not None:
        state = _read_state(Path(storage_path) / experiment / STATE_FILE)
        parent_run_id, tracking_uri = state["parent_run_id"], tracking_uri or state["tracking_uri"]
        if space is None:
            space = parse_space(state["spec"]["space"])[0]
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise KeyError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
    filter_string = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else f"tags.`{TRIAL_TAG}` != ''"
    runs = client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=50000)
    rows = []
    for run in runs:
        if run.data.tags.get("kdtune.kind") == "confirm":  # a trial's re-run (kdtune.search.confirm), not a trial
            continue
        row = {"trial_id": run.data.tags.get(TRIAL_TAG), "run_id": run.info.run_id,
               "status": run.data.tags.get(STATUS_TAG), "run_status": run.info.status,
               "method": run.data.tags.get("method")}
        row.update(run.data.metrics)
        # After the metrics: a hyperparameter named like a metric (``lr``, also the scheduled
        # learning rate of the last epoch) keeps the trial's value.
        row.update(run.data.params)
        # PBT (kdtune.search.pbt): the values in force at the last epoch, as the results table holds
        # them (the params are the first ones), and the trial's mutation history
        for key, value in run.data.metrics.items():
            if key.startswith(PBT_PREFIX):
                row[key[len(PBT_PREFIX):]] = value
        if HISTORY_TAG in run.data.tags:  # "none": never copied another trial (an empty cell, as in results.csv)
            row[HISTORY_COLUMN] = None if run.data.tags[HISTORY_TAG] == "none" else run.data.tags[HISTORY_TAG]
        rows.append(row)
    df = pd.DataFrame(rows)
    declared = space.declared() if space is not None else {}
    for name in {k for run in runs for k in run.data.params}:
        df[name] = _typed(df[name], declared[name]) if name in declared else _numeric(df[name])
    return df.sort_values("trial_id", ignore_index=True) if len(df) else df


# --------------------------------------------------------------------------- a search


class SearchNotFound(FileNotFoundError):
    """A results argument that is neither a kdtune search folder nor a known MLflow experiment."""


@dataclass
class Search:
    """One search: its resolved spec (the YAML mapping after overrides and defaults), where it was
    read from, and its two tables."""

    name: str  # the spec's name (MLflow experiment, storage folder)
    label: str  # the value of the ``search`` column (the name, made unique among loaded searches)
    spec: dict
    trials: pd.DataFrame
    curves: pd.DataFrame
    folder: Path | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None

    @property
    def space(self):
        return parse_space(self.spec["space"])[0]

    @property
    def metric(self) -> str:
        return self.spec["search"]["metric"]

    @property
    def mode(self) -> str:
        return self.spec["search"]["mode"]

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """``search.objectives`` as ``(metric, mode)`` pairs, the search's metric first; empty for a
        single-objective search. (Read from MLflow, the spec's keys come back sorted: the first
        objective is ``metric``, which the spec keeps.)"""
        return _objectives(self.spec)

    @property
    def max_epochs(self) -> int:
        from kdtune.config import RunConfig

        return int(self.spec["fixed"].get("epochs", RunConfig.epochs))

    @property
    def log_params(self) -> list[str]:
        """The hyperparameters searched on a log scale (plotted on one too)."""
        return [p.name for _, _, p in self.space.entries() if p.log]

    @property
    def milestones(self) -> list[int]:
        """The epochs at which ASHA compared trials and stopped the weaker ones (none without ASHA)."""
        scheduler = self.spec["scheduler"]
        if scheduler["type"] != "asha":
            return []
        return asha_milestones(self.max_epochs, scheduler["grace_period"], scheduler["reduction_factor"])


def _objectives(spec: dict) -> list[tuple[str, str]]:
    given = spec["search"].get("objectives") or {}
    if not given:  # a single-objective spec may be partial (tables made by hand)
        return []
    metric, mode = spec["search"]["metric"], spec["search"]["mode"]
    return [(metric, mode), *((m, d) for m, d in given.items() if m != metric)]


def asha_milestones(max_epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """ASHA's rungs as Ray Tune builds them (``_Bracket``: grace_period * rf**k below max_t);
    the rung at max_epochs stops nothing, so it is left out."""
    rungs = int(math.log(max_epochs / grace_period) / math.log(reduction_factor) + 1)
    points = [grace_period * reduction_factor ** k for k in range(rungs)]
    return [int(p) for p in points if p < max_epochs]


def load_search(source: str | Path, tracking_uri: str | None = None, label: str | None = None) -> Search:
    """A search from its folder (``<storage-path>/<name>``, holding ``kdtune_search.json``) or
    from MLflow (the experiment ``source`` at ``tracking_uri``, default ``$MLFLOW_TRACKING_URI``
    or ``./mlflow.db``; its newest search run).

    Raises:
        SearchNotFound: naming the path (or experiment) and what was expected there.
    """
    path = Path(source)
    if (path / STATE_FILE).is_file():
        return _from_folder(path, tracking_uri, label)
    name_like = os.sep not in str(source)  # a path with a separator is never an experiment name
    if name_like and _experiment_exists(str(source), tracking_uri):
        return _from_mlflow(str(source), tracking_uri, label)
    uri = resolve_tracking_uri(tracking_uri)
    what = (f"{path} exists but holds no {STATE_FILE}{_searches_below(path)}" if path.exists()
            else f"{path} does not exist")
    raise SearchNotFound(
        f"{source}: not a kdtune search: expected a search folder <storage-path>/<name> holding "
        f"{STATE_FILE} and results.csv (e.g. ray_results/quickstart-digits), or the name of an "
        f"MLflow experiment at {uri}; {what}" + (" and there is no such experiment" if name_like else ""))


def _searches_below(path: Path) -> str:
    """A hint for a storage path given in place of a search folder: the searches inside it."""
    if not path.is_dir():
        return ""
    found = sorted(str(p.parent) for p in [*path.glob(f"*/{STATE_FILE}"), *path.glob(f"*/*/{STATE_FILE}")])
    return f" (searches below it: {', '.join(found[:5])})" if found else ""


def load_searches(sources: Iterable[str | Path], tracking_uri: str | None = None) -> list[Search]:
    """Several searches; their ``search`` labels are made unique (``name``, ``name#2``, ...)."""
    searches: list[Search] = []
    for source in sources:
        search = load_search(source, tracking_uri)
        taken = {s.label for s in searches}
        label, n = search.name, 1
        while label in taken:
            n += 1
            label = f"{search.name}#{n}"
        searches.append(_relabel(search, label))
    return searches


def milestones(searches: list[Search]) -> list[int] | dict[str, list[int]]:
    """ASHA's rungs for :func:`kdtune.analysis.plots.learning_curves`: a list for one search, else per label."""
    return searches[0].milestones if len(searches) == 1 else {s.label: s.milestones for s in searches}


def log_params(searches: Iterable[Search]) -> list[str]:
    """The hyperparameters searched on a log scale in any of ``searches``."""
    return sorted({name for s in searches for name in s.log_params})


def trials_table(searches: Iterable[Search]) -> pd.DataFrame:
    """The trials of several searches, one table (a column absent in a search is NaN there)."""
    return _concat([s.trials for s in searches])


def curves_table(searches: Iterable[Search]) -> pd.DataFrame:
    """The learning curves of several searches, one table."""
    return _concat([s.curves for s in searches])


def load_trials(*sources: str | Path, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per trial of every search named (folders or MLflow experiments)."""
    return trials_table(load_searches(sources, tracking_uri))


def load_curves(*sources: str | Path, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per trial and epoch of every search named (folders or MLflow experiments)."""
    return curves_table(load_searches(sources, tracking_uri))


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f.columns)]
    return pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame()


def _relabel(search: Search, label: str) -> Search:
    search.label = label
    for table in (search.trials, search.curves):
        if len(table.columns):
            table["search"] = label
    return search


# --------------------------------------------------------------------------- reading a folder


def _read_state(path: Path) -> dict:
    """A search's ``kdtune_search.json``; a damaged one raises SearchNotFound naming the file."""
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not {"spec", "parent_run_id"} <= set(state):
            raise ValueError("expected an object with spec and parent_run_id")
        return state
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SearchNotFound(f"{path}: not a readable kdtune search record ({str(e)[:200]})") from e


def _from_folder(folder: Path, tracking_uri: str | None, label: str | None) -> Search:
    state = _read_state(folder / STATE_FILE)
    spec, uri = state["spec"], tracking_uri or state.get("tracking_uri")
    label = label or spec["name"]
    if not (folder / RESULTS_FILE).is_file():
        raise SearchNotFound(f"{folder}: no results.csv yet (the driver writes it when the search ends "
                             f"or is interrupted); analyse a running search from MLflow: "
                             f"load_search({spec['name']!r}, tracking_uri={uri!r})")
    try:
        raw = pd.read_csv(folder / RESULTS_FILE)
    except pd.errors.EmptyDataError:  # a search that ended before its first trial
        raw = pd.DataFrame(columns=["trial_id", "status"])
    curves = _curves_from_ray(folder)
    if curves is None:  # trial folders elsewhere (remote storage): MLflow has the same histories
        from mlflow import MlflowClient

        runs = load_mlflow(spec["name"], uri, parent_run_id=state["parent_run_id"],
                           space=parse_space(spec["space"])[0])
        curves = _curves_from_mlflow(MlflowClient(uri), runs)
    trials = _tidy_trials(raw, spec, label)
    return Search(spec["name"], label, spec, trials, _tidy_curves(curves, trials, label), folder, uri,
                  state["parent_run_id"])


def _curves_from_ray(folder: Path) -> pd.DataFrame | None:
    """Every trial's ``result.json`` (one JSON line per reported epoch), or None if there is none."""
    files = sorted(folder.glob("*/result.json"))
    if not files:
        return None
    rows = []
    for file in files:
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                result = json.loads(line)
            except ValueError:  # e.g. the last line of a trial killed mid-write
                logger.warning(f"{file}: line {number} is not JSON; skipped")
                continue
            row = run_metrics(result)
            row.update(trial_id=result["trial_id"], epoch=int(result["training_iteration"]),
                       wall_s=result.get("time_total_s", math.nan))
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- reading MLflow


def _experiment_exists(name: str, tracking_uri: str | None) -> bool:
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if (db := sqlite_file(uri)) is not None and not db.is_file():
        return False  # MlflowClient would create an empty database just to look
    try:
        return MlflowClient(uri).get_experiment_by_name(name) is not None
    except Exception:  # an unreachable server: not an experiment we can read
        return False


def _from_mlflow(experiment: str, tracking_uri: str | None, label: str | None) -> Search:
    import yaml
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`kdtune.kind` = 'search'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise SearchNotFound(f"MLflow experiment {experiment!r} at {uri} holds no kdtune search run "
                             f"(a run tagged kdtune.kind=search)")
    parent = parents[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp, _quiet_mlflow_downloads():
        spec = yaml.safe_load(Path(client.download_artifacts(parent, "spec.yaml", tmp)).read_text())
    runs = load_mlflow(experiment, uri, parent_run_id=parent, space=parse_space(spec["space"])[0])
    label = label or spec["name"]
    curves = _curves_from_mlflow(client, runs)
    trials = _tidy_trials(_trials_from_mlflow(runs, curves, spec), spec, label)
    return Search(spec["name"], label, spec, trials, _tidy_curves(curves, trials, label), None, uri, parent)


@contextlib.contextmanager
def _quiet_mlflow_downloads():
    """No progress bar for a one-file download (it would land in every report and notebook)."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


def _curves_from_mlflow(client, runs: pd.DataFrame) -> pd.DataFrame:
    """The metric histories (``step`` = epoch) of the trial runs, one row per trial and epoch."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    metric_names = [c for c in runs.columns if "/" in c or c == "lr"]
    for _, run in runs.iterrows():
        for name in metric_names:
            if pd.isna(run.get(name)):
                continue
            for point in client.get_metric_history(run["run_id"], name):
                row = rows.setdefault((run["trial_id"], point.step), {"trial_id": run["trial_id"], "epoch": point.step})
                row[name] = point.value
    curves = pd.DataFrame(list(rows.values()))
    if len(curves) and "time/epoch_s" in curves:
        curves = curves.sort_values(["trial_id", "epoch"])
        curves["wall_s"] = curves.groupby("trial_id")["time/epoch_s"].cumsum()
    return curves


def _trials_from_mlflow(runs: pd.DataFrame, curves: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """The MLflow runs in the shape of ``results.csv``."""
    metric, mode = spec["search"]["metric"], spec["search"]["mode"]
    params = set(parse_space(spec["space"])[0].names())
    # last metric values under their metric names: only the method/sampler ones stay, as in results.csv
    drop = [c for c in runs.columns if c not in params and
            (("/" in c and not is_own_metric(c)) or c in ("lr", "epoch", OBJECTIVE_METRIC) or c in NOT_METRICS)]
    out = runs.copy()
    last = curves.sort_values("epoch").groupby("trial_id").last() if len(curves) else pd.DataFrame()
    history = curves.groupby("trial_id")[metric] if metric in curves else None
    out["epochs"] = out["trial_id"].map(last["epoch"]) if len(last) else 0
    out[f"final_{metric}"] = out.get(metric, math.nan)
    best = (history.max() if mode == "max" else history.min()) if history is not None else pd.Series(dtype=float)
    out[f"best_{metric}"] = out["trial_id"].map(best)
    out["wall_s"] = out["trial_id"].map(last["wall_s"]) if "wall_s" in last else math.nan
    out["samples_backprop"] = out.get("samples/backprop", math.nan)
    objectives = _objectives(spec)
    for other, _ in objectives[1:]:  # each run's last value (time_total_s: logged once, when the trial ended)
        out[f"final_{other}"] = out.get(other, math.nan)
    if objectives and len(out):
        out[PARETO_COLUMN] = pareto_column(out, objectives)
    return out.drop(columns=drop)


# --------------------------------------------------------------------------- tidying


def _tidy_trials(raw: pd.DataFrame, spec: dict, label: str) -> pd.DataFrame:
    """Columns in one order for every source; ``method`` and ``sampler`` present even when fixed."""
    from kdtune.config import RunConfig
    from kdtune.search.space import CONDITIONAL_KEYS

    trials = raw.copy()
    names = parse_space(spec["space"])[0].names()
    defaults = {key: getattr(RunConfig, key) for key in CONDITIONAL_KEYS}  # "kd", "none"
    for key, default in defaults.items():
        if key not in names or key not in trials:
            trials[key] = spec["fixed"].get(key, default)
    for key in PAIR_KEYS:  # what a published number is looked up by (kdtune.analysis.published)
        if key not in trials:
            trials[key] = spec["fixed"].get(key, getattr(RunConfig, key))
    trials["search"] = label
    trials["cpus_per_trial"] = spec["resources"]["cpus_per_trial"]
    trials["gpus_per_trial"] = spec["resources"]["gpus_per_trial"]
    metric = spec["search"]["metric"]
    # several objectives: each one's column after the first's, then whether the trial is on the front
    others = [f"final_{m}" for m, _ in _objectives(spec)[1:]] + ([PARETO_COLUMN] if _objectives(spec) else [])
    first = ["search", "trial_id", "status", *names, *[k for k in defaults if k not in names],
             "epochs", f"final_{metric}", *others, f"best_{metric}", "wall_s", "samples_backprop",
             "cpus_per_trial", "gpus_per_trial"]
    first = [c for c in first if c in trials]
    return trials[first + [c for c in trials.columns if c not in first]].reset_index(drop=True)


def _tidy_curves(curves: pd.DataFrame, trials: pd.DataFrame, label: str) -> pd.DataFrame:
    if curves is None or not len(curves):
        return pd.DataFrame(columns=["search", "trial_id", "status", "epoch", "wall_s"])
    # One row per epoch even if a retried trial reported an epoch twice: the later one counts.
    curves = curves.drop_duplicates(["trial_id", "epoch"], keep="last").copy()
    metrics = [c for c in curves.columns if c not in ("trial_id", "epoch", "wall_s")]
    # A diverged trial reports +-PENALTY in place of NaN/inf (searchers need a number); on a
    # plot it would flatten every other curve, so it is missing again here.
    curves[metrics] = curves[metrics].mask(curves[metrics].abs() >= PENALTY)
    curves["search"] = label
    curves["status"] = curves["trial_id"].map(trials.set_index("trial_id")["status"])
    first = ["search", "trial_id", "status", "epoch", "wall_s"]
    first = [c for c in first if c in curves]
    rest = sorted(c for c in curves.columns if c not in first)
    return curves[first + rest].sort_values(["trial_id", "epoch"], ignore_index=True)


# --------------------------------------------------------------------------- the usual questions


def _objective(metric: str) -> str:
    """The column every ranking uses: the search's one objective (records.OBJECTIVE)."""
    return objective_column(metric)


def _finished(trials: pd.DataFrame, column: str) -> pd.DataFrame:
    """Trials that ran normally and have a value: diverged/failed ones carry a penalty, not a score."""
    return trials[trials["status"].isin(FINISHED)].dropna(subset=[column])


def best_trials(trials: pd.DataFrame, n: int = 5, metric: str = "val/acc1", mode: str = "max",
                by: str | None = None) -> pd.DataFrame:
    """The ``n`` best finished trials by the objective, ``final_<metric>`` (of each ``by`` group, e.g. ``"search"``
    or ``"sampler"``, when given)."""
    column = _objective(metric)
    ranked = _finished(trials, column).sort_values(column, ascending=mode == "min", kind="stable")
    if by is not None:
        return ranked.groupby(by, sort=False, dropna=False).head(n).reset_index(drop=True)
    return ranked.head(n).reset_index(drop=True)


# The two reference points a distillation result is read against.
BASELINES = {
    "none": "the student alone (method: none)",
    "kd": "plain KD (method: kd, no sampler, no logit standardization)",
}


def _baseline_trials(trials: pd.DataFrame, name: str) -> pd.DataFrame:
    method = trials["method"] if "method" in trials else pd.Series("kd", index=trials.index)
    if name == "none":
        return trials[method == "none"]
    plain = method == "kd"
    if "sampler" in trials:
        plain &= trials["sampler"].fillna("none") == "none"
    if "logit_stand" in trials:
        plain &= ~trials["logit_stand"].fillna(False).astype(bool)
    return trials[plain]


def baseline_gap(trials: pd.DataFrame, baselines: dict[str, float] | None = None, metric: str = "val/acc1",
                 mode: str = "max", published: bool = True) -> pd.DataFrame:
    """How far each search's best trial is from the baselines (positive: better than the baseline).

    The baselines ``none`` (the student alone) and ``kd`` (plain KD) come from the finished trials
    of all the searches in ``trials`` when such trials exist; otherwise from ``baselines``
    (``{"none": 93.1, "kd": 95.4}``), which may also name further references (``{"paper": 96.0}``).
    With ``published`` and a top-1 metric, the numbers the references publish for the best trial's
    pair (``dataset``, ``teacher``, ``student`` columns) are added too: for its own method, for KD
    and for the student alone (baseline ``published <method>``, source naming the publication).
    Those are test-set accuracies; a search's are not (see :mod:`kdtune.analysis.published`).
    One row per search and baseline: search, best_trial, best, baseline, baseline_value,
    baseline_trial, source, gap.
    """
    column = _objective(metric)
    done = _finished(trials, column)
    if "search" not in done:
        done = done.assign(search="search")
    sign = 1.0 if mode == "max" else -1.0
    references: dict[str, tuple[float, str | None, str]] = {}
    refs_search: dict[str, str] = {}
    for name in BASELINES:
        found = best_trials(_baseline_trials(done, name), 1, metric, mode)
        if len(found):
            row = found.iloc[0]
            references[name] = (float(row[column]), row["trial_id"], f"trials of {row['search']}")
            refs_search[name] = row["search"]
    for name, value in (baselines or {}).items():
        references.setdefault(name, (float(value), None, "given"))
    rows = []
    for search, group in done.groupby("search", sort=False):
        top = best_trials(group, 1, metric, mode).iloc[0]
        for name, (value, trial_id, source) in references.items():
            if trial_id is not None and (refs_search.get(name), trial_id) == (search, top["trial_id"]):
                continue  # a trial is never its own baseline (see own_baselines)
            rows.append({"search": search, "best_trial": top["trial_id"], "best": float(top[column]),
                         "baseline": name, "baseline_value": value, "baseline_trial": trial_id,
                         "source": source, "gap": sign * (float(top[column]) - value)})
        if published and metric.endswith("acc1"):
            for name, value, source in _published_baselines(top):
                rows.append({"search": search, "best_trial": top["trial_id"], "best": float(top[column]),
                             "baseline": f"published {name}", "baseline_value": value, "baseline_trial": None,
                             "source": source, "gap": sign * (float(top[column]) - value)})
    columns = ["search", "best_trial", "best", "baseline", "baseline_value", "baseline_trial", "source", "gap"]
    return pd.DataFrame(rows, columns=columns)


def own_baselines(trials: pd.DataFrame, metric: str = "val/acc1", mode: str = "max") -> list[tuple[str, str, str]]:
    """``(search, baseline, trial_id)`` where a search's best trial would be its own baseline (the
    best of a plain-KD search is plain KD): :func:`baseline_gap` leaves those out, and the report
    says that the search has no separate baseline of that name."""
    column = _objective(metric)
    done = _finished(trials, column)
    if "search" not in done:
        done = done.assign(search="search")
    out = []
    for name in BASELINES:
        found = best_trials(_baseline_trials(done, name), 1, metric, mode)
        if not len(found):
            continue
        row = found.iloc[0]
        top = best_trials(done[done["search"] == row["search"]], 1, metric, mode).iloc[0]
        if top["trial_id"] == row["trial_id"]:
            out.append((row["search"], name, row["trial_id"]))
    return out


def _published_baselines(top: pd.Series) -> list[tuple[str, float, str]]:
    """(method, accuracy, source) published for the best trial's pair: its own method, KD, the student alone."""
    from kdtune.analysis.published import published_for, variant

    if any(key not in top or not isinstance(top[key], str) for key in ("dataset", "student")):
        return []
    own = variant(top.get("method", "kd"), top.get("logit_stand"), top.get("sampler", "none"))
    found = []
    for name in dict.fromkeys((own, "kd", "none")):
        for row in published_for(top.get("teacher"), top["student"], name, top["dataset"]).itertuples():
            found.append((name, row.acc1, f"{row.name}, test set"))
    return found


def group_summary(trials: pd.DataFrame, by: str, metric: str = "val/acc1", mode: str = "max") -> pd.DataFrame:
    """Trials side by side per ``by`` group (``"search"``, ``"sampler"``, ``"method"``): how many
    finished, the best and median ``best_<metric>``, and the mean cost of a trial (wall time,
    epochs, samples back-propagated) -- e.g. what KDAS buys against training on every sample."""
    column = _objective(metric)
    rows = []
    for group, frame in trials.groupby(by, sort=False, dropna=False):
        done = _finished(frame, column)
        best = (done[column].max() if mode == "max" else done[column].min()) if len(done) else math.nan
        rows.append({by: group, "trials": len(frame), "finished": len(done), "best": best,
                     "median": done[column].median(), "mean_epochs": frame["epochs"].mean(),
                     "mean_wall_s": frame["wall_s"].mean(), "mean_samples_backprop": frame["samples_backprop"].mean(),
                     "wall_s_per_epoch": frame["wall_s"].sum() / max(frame["epochs"].sum(), 1),
                     "samples_backprop_per_epoch": frame["samples_backprop"].sum() / max(frame["epochs"].sum(), 1)})
    return pd.DataFrame(rows)


def cost_totals(trials: pd.DataFrame) -> pd.DataFrame:
    """What each search cost: trials (and how they ended), epochs, wall/CPU/GPU hours (wall time
    of every trial times its ``cpus_per_trial`` / ``gpus_per_trial``), samples back-propagated."""
    if "search" not in trials:
        trials = trials.assign(search="search")
    rows = []
    for search, group in trials.groupby("search", sort=False):
        wall_h = group["wall_s"].fillna(0) / 3600
        row = {"search": search, "trials": len(group)}
        row.update({status: int((group["status"] == status).sum())
                    for status in ("completed", "stopped early", "diverged", "failed", "interrupted")})
        row.update({"epochs": int(group["epochs"].fillna(0).sum()), "trial_hours": wall_h.sum(),
                    "cpu_hours": (wall_h * group.get("cpus_per_trial", 1)).sum(),
                    "gpu_hours": (wall_h * group.get("gpus_per_trial", 0)).sum(),
                    "samples_backprop": int(group["samples_backprop"].fillna(0).sum())})
        rows.append(row)
    return pd.DataFrame(rows)
