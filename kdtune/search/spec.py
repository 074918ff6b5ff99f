"""A search specification: one YAML file (plus ``--set dotted.key=value`` overrides), validated in one pass.

The file says what is fixed (a flat :class:`~kdtune.config.RunConfig` mapping), what is searched
(a :class:`~kdtune.search.space.Space`), how (algorithm, metric, early stopping) and with what
resources. :func:`load_spec` reports every problem at once, each as
``<file or --set KEY=VALUE>: <yaml.path>: <rule>, but got <value>``.
"""
from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtune import config
from kdtune.config import ConfigError, RunConfig, load_yaml, parse_override, validate
from kdtune.data import DATASETS
from kdtune.distillers import METHODS
from kdtune.hparams import Problem, Schema, coerce, did_you_mean, hp, table
from kdtune.plugins import load_plugins
from kdtune.sampling import SAMPLERS
from kdtune.search.records import COST_METRICS
from kdtune.search.space import PARAM, Space, parse_space

# A trial checkpoints when this many seconds have passed since its last checkpoint (0: every
# epoch). Each checkpoint of a trial also makes Tune snapshot the whole experiment (its state of
# every trial), a cost that grows with the search: at one per epoch, a 1,000-trial search of short
# trials spends more time snapshotting than training (kdtune bench --overhead). A crash or
# --resume re-runs at most this much of a trial's training, exactly (seeded), logging nothing twice.
CHECKPOINT_EVERY_S = 30.0
ALGORITHMS = ("tpe", "gp", "random", "grid")
METRICS = ("val/acc1", "val/acc5", "val/loss", "train/loss")
MODES = ("max", "min")
# search.objectives: the metrics above (what a trial learned) and what it cost (records.COST_METRICS)
OBJECTIVE_METRICS = (*METRICS, *COST_METRICS)
# Schedulers that stop trials early by comparing them on one metric; see _check_objectives.
STOPPING_SCHEDULERS = ("asha", "hyperband", "median", "pbt", "pb2")
SCHEDULERS = ("asha", "hyperband", "median", "pbt", "pb2", "none")
POPULATION_SCHEDULERS = ("pbt", "pb2")  # trials copy each other's checkpoints (kdtune.search.pbt)
PBT_KEYS = ("perturbation_interval", "quantile_fraction", "resample_probability", "mutate")

# Every key of a search file's sections, declared once (kdtune.hparams). Numbers' defaults are
# written as the types they resolve to (3.0, not 3): the resolved spec, which --resume compares,
# holds them as they are. A null default is computed from other keys (null_means says how).
SECTIONS: dict[str, Schema] = {
    "search": Schema(
        algorithm=hp("tpe", choices=ALGORITHMS, help="Optuna's TPE or GP sampler, random sampling, or a grid"),
        num_samples=hp(32, ge=1, help="trials to run (a grid runs each of its points once instead)"),
        metric=hp("val/acc1", choices=METRICS, help="the metric trials are ranked by"),
        mode=hp("max", choices=MODES, help="whether the metric is maximised or minimised"),
        seed=hp(0, ge=0, help="seed of the search algorithm"),
        max_concurrent=hp(None, type=int, ge=1, null_means="as many as the resources allow",
                          help="trials running at once"),
        warm_start=hp(None, type=str, path=True, null_means="a study that starts empty",
                      help="an earlier search's folder whose finished trials seed the study (tpe, gp)"),
        objectives=hp(None, type=dict, null_means="one objective: metric and mode",
                      help="two or more {metric: max or min}: the search finds their Pareto front"),
    ),
    "scheduler": Schema(
        type=hp("asha", choices=SCHEDULERS, help="early stopping (asha, hyperband, median), population-based "
                                                 "training (pbt, pb2) or none (none with search.objectives)"),
        grace_period=hp(None, type=int, ge=1, null_means="fixed.epochs // 8, at least 1",
                        help="epochs a trial runs before it can be stopped (asha, median)"),
        reduction_factor=hp(3.0, gt=1, help="ASHA and Hyperband keep 1/reduction_factor of the trials at each rung"),
        perturbation_interval=hp(None, type=int, ge=1, null_means="fixed.epochs // 4, at least 1",
                                 help="epochs between exploits (pbt, pb2)"),
        quantile_fraction=hp(0.25, gt=0, le=0.5, why="the bottom fraction copies the top one",
                             help="the fraction of trials that copy and are copied (pbt, pb2)"),
        resample_probability=hp(0.25, ge=0, le=1, help="chance that a mutation resamples instead of perturbs (pbt)"),
        mutate=hp(None, type=list, null_means="every searched parameter that can change mid-run",
                  help="the searched parameters an exploit may change (pbt, pb2)"),
    ),
    "resources": Schema(
        cpus_per_trial=hp(1.0, gt=0, help="CPUs Ray reserves for each trial"),
        # One process trains on one device, so above 1 only as one GPU per data-parallel worker
        # (_check_resources).
        gpus_per_trial=hp(0.0, ge=0, help="GPUs Ray reserves for each trial (a share: 0.25 runs four per GPU; "
                                          "a whole number N > 1: N data-parallel workers, one GPU each)"),
        workers_per_trial=hp(None, type=int, ge=1, null_means="gpus_per_trial when a whole number above 1, else 1",
                             help="data-parallel processes per trial (Ray Train's TorchTrainer; kdtune.search.ddp)"),
    ),
    # after the search: the top_k trials re-run with `seeds` more seeds each (0: no confirmation)
    "confirm": Schema(
        top_k=hp(0, ge=0, help="best trials re-run with more seeds after the search (0: none)"),
        seeds=hp(3, ge=1, help="more seeds each confirmed trial runs with"),
    ),
}
# The top-level keys with a value of their own (name, fixed and space are read by their own rules).
TOP = Schema(
    max_failures=hp(2, ge=0, help="times a failed trial is retried from its last checkpoint"),
    checkpoint_every_s=hp(CHECKPOINT_EVERY_S, ge=0, why="0: a checkpoint every epoch",
                          help="seconds between a trial's checkpoints (what a crash or --resume re-runs at most)"),
)
# The keys that hold the rest (each read by its own rules).
FILE = Schema(
    name=hp(None, type=str, required=True,
            help="the experiment: MLflow experiment and storage folder (letters, digits, _ . -)"),
    fixed=hp(None, type=dict, required=True, help="the run settings that are not searched (flat keys)"),
    space=hp(None, type=dict, required=True, help="the searched hyperparameters, each name: {type, ...} as below"),
)
TOP_KEYS = (*FILE, *SECTIONS, *TOP)
MARKDOWN_BEGIN = "<!-- search-file keys: generated by kdtune.search.spec.markdown(); tests/test_docs.py checks it -->"
MARKDOWN_END = "<!-- end of generated search-file keys -->"


def markdown() -> str:
    """The Markdown table of a search file's keys (docs/search-spaces.md holds a copy)."""
    rows = [(f"`{section}`", schema) for section, schema in SECTIONS.items()]
    return table([("top level", FILE), *rows, ("top level", TOP), ("`space.<name>`", PARAM)], what="key")
PATH_KEYS = tuple(k for k, e in config.RUN_KEYS.items() if e.path)
# Run settings a search must not vary, and why (their declarations say so).
NOT_SEARCHABLE = {k: e.not_searchable for k, e in config.RUN_KEYS.items() if e.not_searchable}
RUN_KEYS = tuple(k for k in config.RUN_KEYS if k not in config.NESTED_KEYS)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_MISSING = object()


def sampler_keys() -> set[str]:
    """Sampler hyperparameters (KDAS's start_rate, ...): taken by any method; whether the fixed
    sampler takes them is checked by RunConfig when the bounds are probed."""
    return {p for name in SAMPLERS.names() for p in SAMPLERS.hparams(name)}


@dataclass(frozen=True)
class SearchSpec:
    """A validated search: what is fixed, what is searched, how, and with which resources."""

    path: str  # absolute
    name: str
    fixed: dict
    space: Space
    algorithm: str
    num_samples: int
    metric: str
    mode: str
    seed: int
    max_concurrent: int | None
    warm_start: str | None  # an earlier search's folder whose finished trials seed the study
    scheduler: str
    grace_period: int
    reduction_factor: float
    cpus_per_trial: float
    gpus_per_trial: float  # the trial's: with several workers, one GPU each
    max_failures: int
    resolved: dict  # the whole mapping after overrides and defaults (printed by --dry-run, logged)
    checkpoint_every_s: float = CHECKPOINT_EVERY_S  # see CHECKPOINT_EVERY_S
    confirm_top_k: int = 0  # kdtune.search.confirm: trials re-run after the search (0: none)
    confirm_seeds: int = 0  # more seeds per confirmed trial
    # search.objectives as (metric, mode) pairs, (metric, mode) first; empty: one objective
    objectives: tuple[tuple[str, str], ...] = ()
    # scheduler.type pbt / pb2: epochs between exploits, the fraction copied from and to, PBT's
    # chance to resample instead of perturb, and the searched parameters a trial may change
    perturbation_interval: int = 0
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    mutate: tuple[str, ...] = ()
    workers_per_trial: int = 1  # processes of one data-parallel trial (kdtune.search.ddp)

    @property
    def max_epochs(self) -> int:
        return int(self.fixed.get("epochs", RunConfig.epochs))

    @property
    def trials(self) -> int:
        """How many trials the search runs (a grid runs each of its points once)."""
        return len(self.space.grid()) if self.algorithm == "grid" else self.num_samples

    def planned_trial_epochs(self) -> float:
        """The epochs all trials together are expected to train: what a teacher-output cache
        build is weighed against (``teacher_cache: auto``). Under ASHA, 1/reduction_factor of the
        trials reach each next rung (its idealised count: asynchronous promotion lets a few more
        through, so this errs low, towards running the teacher live)."""
        n, top = float(self.trials), self.max_epochs
        if self.scheduler != "asha":  # pbt and pb2 run every trial to the end, as does none
            return n * top
        total, done, rung = 0.0, 0, self.grace_period
        while rung < top and n >= 1:
            total += n * (rung - done)
            done, n, rung = rung, n / self.reduction_factor, int(rung * self.reduction_factor)
        return total + n * (top - done)

    def run_config(self, trial_config: dict[str, Any]) -> RunConfig:
        """The run of one trial: ``fixed`` plus the trial's values (None marks an inactive one)."""
        values = {**self.fixed, **{k: v for k, v in trial_config.items() if v is not None}}
        return RunConfig.from_dict(values, source=f"{self.path} (trial)")


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SearchSpec:
    """Read, override, validate and resolve a search-space YAML file.

    Args:
        path: the YAML file (see ``search_spaces/``).
        overrides: ``dotted.key=value`` strings, values read as YAML (``fixed.epochs=20``,
            ``space.lr.high=0.2``, ``resources.gpus_per_trial=0.25``).

    Raises:
        ConfigError: listing every problem, each naming its source, YAML path and value.
    """
    load_plugins()
    problems = _Problems(str(path))
    raw = _apply_overrides(copy.deepcopy(load_yaml(path)), list(overrides), problems)
    for key in raw:
        if key not in TOP_KEYS:
            problems.add(str(key), f"unknown key{did_you_mean(key, TOP_KEYS)} "
                                   f"(a search file takes: {', '.join(TOP_KEYS)})")
    name = _name(raw, problems)
    space, found = parse_space(raw["space"]) if "space" in raw else (Space(), [])
    if "space" not in raw:
        problems.add("space", "missing; the hyperparameters to search are required")
    problems.extend(found)
    fixed, epochs = _check_fixed(raw.get("fixed", _MISSING), space, problems)
    _check_space(space, fixed, problems)
    sections = {s: _section(raw, s, problems) for s in SECTIONS}  # as written
    search = _check_search(sections["search"], space, problems)
    multi = search["objectives"] is not None  # given, valid or not: the checks below then apply
    # Several objectives run every trial to its end: no early stopping unless asked for (and refused).
    scheduler = _check_scheduler(sections["scheduler"], epochs, problems, default_type="none" if multi else None)
    resources = _check_resources(sections["resources"], problems)
    _check_combination(search, scheduler, space, problems)
    population = _check_population(search, scheduler, sections["scheduler"], space, epochs, problems)
    _check_data_parallel(resources, search, scheduler, fixed, space, problems)  # after: it sets max_concurrent
    top = _read(TOP, raw, "", problems)
    max_failures, checkpoint_every_s = top["max_failures"], top["checkpoint_every_s"]
    confirm = _check_confirm(sections["confirm"], problems)
    if multi:
        _check_objectives(search["objectives"], scheduler, confirm, fixed, space, problems)
    if scheduler["type"] in POPULATION_SCHEDULERS and isinstance(confirm["top_k"], int) and confirm["top_k"] > 0:
        # A PBT trial's result comes from a schedule of hyperparameters (its mutations) on weights
        # copied across trials; re-running one configuration from scratch does not reproduce it.
        problems.add("confirm.top_k", f"must be 0 with scheduler.type {scheduler['type']} (a trial's result comes "
                                      f"from its mutation history, which re-running one configuration does not "
                                      f"reproduce), but got {confirm['top_k']}")
    if problems:
        raise ConfigError(problems.render())
    objectives = search.pop("objectives") or ()
    # warm_start and objectives only when set: the resolved spec of a search without them (and its
    # --resume check) stays as it was
    if scheduler["type"] in POPULATION_SCHEDULERS:  # their keys only then: other searches' resolved specs stay as they were
        scheduler = {**scheduler, **population}
    resolved = {"name": name, "fixed": fixed, "space": space.to_dict(),
                "search": {k: v for k, v in search.items() if k != "warm_start" or v is not None},
                "scheduler": scheduler, "max_failures": max_failures,
                # workers_per_trial only when above 1: other searches' resolved specs stay as they were
                "resources": {k: v for k, v in resources.items() if k != "workers_per_trial" or v != 1}}
    if objectives:
        resolved["search"]["objectives"] = dict(objectives)
    if confirm["top_k"]:  # only when on: the resolved spec of a search without it stays as it was
        resolved["confirm"] = confirm
    if "checkpoint_every_s" in raw:  # only when set, likewise
        resolved["checkpoint_every_s"] = checkpoint_every_s
    return SearchSpec(
        path=str(Path(path).resolve()), name=name, fixed=fixed, space=space, **search,
        scheduler=scheduler["type"], grace_period=scheduler["grace_period"],
        reduction_factor=scheduler["reduction_factor"], **resources, max_failures=max_failures,
        checkpoint_every_s=checkpoint_every_s, resolved=copy.deepcopy(resolved), confirm_top_k=confirm["top_k"],
        confirm_seeds=confirm["seeds"] if confirm["top_k"] else 0, objectives=tuple(objectives),
        **({k: population[k] for k in ("perturbation_interval", "quantile_fraction", "resample_probability")}
           | {"mutate": tuple(population["mutate"])} if scheduler["type"] in POPULATION_SCHEDULERS else {}))


# --------------------------------------------------------------------------- problems

class _Problems:
    """Problems as :class:`~kdtune.hparams.Problem` records (YAML paths), rendered once, each
    with the file -- or the ``--set`` that put the value there -- as its source."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: dict[Problem, None] = {}  # ordered, without repeats
        self.overridden: dict[str, str] = {}  # dotted path -> the override that set it

    def add(self, path: str, message: str, source: str | None = None) -> None:
        self.items[Problem(path, message, source=source)] = None

    def extend(self, found: list[Problem], prefix: str = "") -> None:
        """Add problems found one level down (in parse_space, RunConfig), under ``prefix``."""
        for problem in found:
            self.items[problem.under(prefix) if prefix else problem] = None

    def render(self) -> list[str]:
        return [p.text(self._source(p.path)) for p in self.items]

    def _source(self, path: str) -> str:
        for dotted, text in self.overridden.items():
            if path == dotted or path.startswith((dotted + ".", dotted + "[")):
                return f"--set {text}"
        return self.source

    def __bool__(self) -> bool:
        return bool(self.items)


def _apply_overrides(raw: dict, overrides: list[str], problems: _Problems) -> dict:
    for text in overrides:
        if "=" not in text or not text.partition("=")[0].strip():
            problems.add("", "expected key=value", source=f"--set {text!r}")
            continue
        key, value = parse_override(text)
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if part not in node and depth == 0 and part in SECTIONS:
                node[part] = {}  # a section left to its defaults in the file
            if part not in node:
                where = ".".join(parts[:depth]) or "the top level"
                known = [*node, *(SECTIONS if depth == 0 else ())]
                problems.add("", f"{where} has no key {part!r}{did_you_mean(part, known)}", source=f"--set {text}")
                break
            if not isinstance(node[part], dict):
                problems.add("", f"{'.'.join(parts[:depth + 1])} is not a mapping, but {node[part]!r}",
                             source=f"--set {text}")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
            problems.overridden[key] = text
    return raw


# --------------------------------------------------------------------------- sections


def _name(raw: dict, problems: _Problems) -> str:
    name = raw.get("name", _MISSING)
    if name is _MISSING:
        problems.add("name", "missing; the experiment needs a name (MLflow experiment and storage folder)")
    elif not isinstance(name, str) or not _NAME.match(name) or set(name) == {"."}:
        problems.add("name", f"must be made of letters, digits, '_', '.' and '-', but got {name!r}")
    return name if isinstance(name, str) else ""


def _section(raw: dict, section: str, problems: _Problems) -> dict[str, Any]:
    values = raw.get(section)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.add(section, f"expected a mapping, but got {values!r}")
        values = {}
    known = list(SECTIONS[section])
    for key in values:
        if key not in known:
            problems.add(f"{section}.{key}", f"unknown key{did_you_mean(key, known)} "
                                             f"({section} takes: {', '.join(known)})")
    return values


def _check_search(values: dict, space: Space, problems: _Problems) -> dict[str, Any]:
    # warm_start and objectives: read below, by rules that say more than their types
    out = _read(SECTIONS["search"].without("warm_start", "objectives"), values, "search.", problems)
    if out["algorithm"] == "grid":
        out["num_samples"] = _grid_size(space, problems)  # the grid decides the number of trials
    objectives = _objectives(values.get("objectives"), problems)
    if objectives:
        objectives = _primary_first(objectives, values, problems)
        out["metric"], out["mode"] = objectives[0]
    if objectives is not None and values.get("warm_start") is not None:
        # Warm start copies an earlier study's trials with their values; a multi-objective study
        # takes one value per objective, which a single-objective study's trials do not have.
        problems.add("search.warm_start", f"must be unset with search.objectives (an earlier study's trials carry "
                                          f"one value, this study needs one per objective), but got "
                                          f"{values['warm_start']!r}")
        out["warm_start"] = None
    else:
        out["warm_start"] = _warm_start(values.get("warm_start"), out["algorithm"], problems)
    out["objectives"] = objectives
    return out


def _objectives(value: Any, problems: _Problems) -> tuple[tuple[str, str], ...] | None:
    """``search.objectives`` as ``(metric, mode)`` pairs in the file's order; None when not given,
    ``()`` when given but invalid (its problems added)."""
    if value is None:
        return None
    example = "{val/acc1: max, samples/backprop: min}"
    if not isinstance(value, dict):
        problems.add("search.objectives", f"expected a mapping of metrics to max or min, such as {example}, "
                                          f"but got {value!r}")
        return ()
    if len(value) < 2:
        problems.add("search.objectives", f"needs two or more metrics, each with max or min, such as {example} "
                                          f"(for one, set search.metric and search.mode), but got {value!r}")
        return ()
    ok = True
    for metric, mode in value.items():
        if metric not in OBJECTIVE_METRICS:
            problems.add(f"search.objectives.{metric}", f"unknown metric{did_you_mean(metric, OBJECTIVE_METRICS)} "
                                                        f"(objectives take: {', '.join(OBJECTIVE_METRICS)})")
            ok = False
        elif mode not in MODES:
            problems.add(f"search.objectives.{metric}", f"must be one of {', '.join(MODES)}, but got {mode!r}")
            ok = False
    if ok and not any(metric in METRICS for metric in value):
        problems.add("search.objectives", f"needs one of {', '.join(METRICS)} (what the trial learned, to set "
                                          f"its cost against), but got only {', '.join(map(str, value))}")
        ok = False
    return tuple(value.items()) if ok else ()


def _warm_start(value: Any, algorithm: str, problems: _Problems) -> str | None:
    """An earlier search's folder whose Optuna study seeds this one (kdtune.search.warm_start)."""
    from kdtune.search.warm_start import problem

    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.add("search.warm_start", f"expected an earlier search's folder, but got {value!r}")
        return None
    if algorithm not in ("tpe", "gp"):
        problems.add("search.warm_start", f"needs search.algorithm tpe or gp (an Optuna study), but got {algorithm}")
        return None
    folder = _absolute(os.path.expanduser(value))
    found = problem(folder)
    if found:
        problems.add("search.warm_start", found)
    return folder


def _grid_size(space: Space, problems: _Problems) -> int:
    floats = [(path, p) for path, _, p in space.entries() if not p.enumerable]
    for path, _ in floats:
        problems.add(path, "grid search needs values to enumerate, but got a float range "
                           "(use type: categorical with choices, type: int, or a step)")
    if floats:
        return 0
    try:
        return len(space.grid())
    except ValueError as e:
        problems.add("space", f"{e} (search.algorithm: grid)")
        return 0


def _primary_first(objectives: tuple[tuple[str, str], ...], values: dict,
                   problems: _Problems) -> tuple[tuple[str, str], ...]:
    """Valid objectives with the search's metric first: ``search.metric`` when given, else the
    first objective of what the trial learned (``METRICS``; not a cost), which stays the first even
    when a program writes the file with its keys sorted. That metric is what Tune, the status
    lines' best and best.json's trial rank by; ``search.mode``, when given, must be its direction."""
    given = dict(objectives)
    metric = values.get("metric")
    if metric is None or metric not in METRICS:  # an invalid metric is reported by _check_search already
        metric = next(m for m, _ in objectives if m in METRICS)
    elif metric not in given:
        problems.add("search.metric", f"must be one of the metrics of search.objectives ({', '.join(given)}), or "
                                      f"left out, but got {metric!r}")
        return objectives
    mode = values.get("mode")
    if mode in MODES and mode != given[metric]:
        problems.add("search.mode", f"must be left out with search.objectives, or be {metric}'s direction there "
                                    f"({given[metric]}), but got {mode!r}")
    return ((metric, given[metric]), *((m, d) for m, d in objectives if m != metric))


def _check_scheduler(values: dict, epochs: int | None, problems: _Problems,
                     default_type: str | None = None) -> dict[str, Any]:
    schema = SECTIONS["scheduler"].only("type", "grace_period", "reduction_factor")
    out = _read(schema, {"type": default_type, **values} if default_type and "type" not in values else values,
                "scheduler.", problems)
    if out["grace_period"] is None:
        out["grace_period"] = max(1, (epochs or RunConfig.epochs) // 8)
    kind, grace = out["type"], out["grace_period"]
    if kind in ("asha", "median") and epochs is not None and isinstance(grace, int) and grace > epochs:
        problems.add("scheduler.grace_period", f"must be <= fixed.epochs ({epochs}), but got {grace}")
    return out


def _check_combination(search: dict, scheduler: dict, space: Space, problems: _Problems) -> None:
    """Settings that are valid alone but not together."""
    if search["algorithm"] == "gp" and space.conditionals:
        # GPSampler models one fixed set of parameters; in a conditional space it would sample
        # every parameter independently (at random) and say so only in a warning.
        problems.add("search.algorithm", f"gp needs one fixed set of parameters, but the space searches "
                                         f"{', '.join(space.conditionals)} with sub-spaces; use tpe")
    if scheduler["type"] == "hyperband" and search["max_concurrent"] is not None:
        # Hyperband pauses trials until their bracket is full; paused trials count against Tune's
        # max_concurrent_trials, so a cap below a bracket's size would leave every trial waiting.
        problems.add("search.max_concurrent", f"must be unset with scheduler.type hyperband (paused trials count "
                                              f"against it), but got {search['max_concurrent']}; the resources "
                                              "per trial limit how many run at once")


def _check_population(search: dict, scheduler: dict, values: dict, space: Space, epochs: int | None,
                      problems: _Problems) -> dict[str, Any]:
    """scheduler.type pbt / pb2: their settings (``values``: the scheduler section as written), and
    what they cannot go with. Their keys given with another scheduler are refused (they would do
    nothing)."""
    from kdtune.search.pbt import mutable

    kind = scheduler["type"]
    if kind not in POPULATION_SCHEDULERS:
        for key in PBT_KEYS:
            if key in values:
                problems.add(f"scheduler.{key}", f"applies to scheduler.type pbt and pb2 only, but the type is "
                                                 f"{kind!r}")
        return {}
    top = epochs or RunConfig.epochs
    read = _read(SECTIONS["scheduler"].only("perturbation_interval", "quantile_fraction", "resample_probability"),
                 values, "scheduler.", problems)
    interval, fraction, resample = read["perturbation_interval"], read["quantile_fraction"], read["resample_probability"]
    if interval is None:
        interval = max(1, top // 4)
    if isinstance(interval, int) and interval >= top:
        problems.add("scheduler.perturbation_interval", f"must be < fixed.epochs ({top}): a trial is exploited "
                                                        f"between epochs, but got {interval}")
    if kind == "pb2" and "resample_probability" in values:
        problems.add("scheduler.resample_probability", "applies to pbt only (PB2 picks new values with its "
                                                        "Gaussian-process bandit)")
    if search["algorithm"] != "random":
        # Tune refuses a searcher beside PBT (its population starts random, then evolves); a grid
        # is a fixed set of points that exploits would overwrite.
        problems.add("search.algorithm", f"must be random with scheduler.type {kind} (the population starts at "
                                         f"random and then evolves by copying and mutating), but got "
                                         f"{search['algorithm']!r}")
    if search["max_concurrent"] is not None:
        # The population waits for its slowest trial at every perturbation epoch (synchronous PBT,
        # kdtune.search.pbt.build); paused trials count against the limit, so a cap below the
        # population would leave every trial waiting.
        problems.add("search.max_concurrent", f"must be unset with scheduler.type {kind} (paused trials count "
                                              f"against it), but got {search['max_concurrent']}; the resources "
                                              "per trial limit how many run at once")
    if space.conditionals:
        problems.add("space", f"scheduler.type {kind} needs one fixed set of parameters (a trial copies another's "
                              f"checkpoint, which must be of the same method and sampler), but the space searches "
                              f"{', '.join(space.conditionals)} with sub-spaces")
        return {}
    names = values.get("mutate")
    candidates = {n: p for n, p in space.params.items() if mutable(n, p) is None}
    if names is None:
        names = list(candidates)
        if not names:
            problems.add("scheduler.mutate", f"scheduler.type {kind} needs a searched parameter that can change "
                                             f"mid-run, but none of {', '.join(space.params) or 'the space'} can: "
                                             + "; ".join(f"{n}: {mutable(n, p)}" for n, p in space.params.items()))
    elif not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        problems.add("scheduler.mutate", f"expected a list of searched parameters, such as [lr, temperature], "
                                         f"but got {names!r}")
        names = []
    else:
        for n in names:
            if n not in space.params:
                problems.add("scheduler.mutate", f"{n!r} is not searched{did_you_mean(n, list(space.params))} "
                                                 f"(searched: {', '.join(space.params)})")
            elif mutable(n, space.params[n]) is not None:
                problems.add("scheduler.mutate", f"{n!r} cannot change mid-run: {mutable(n, space.params[n])}")
    return {"perturbation_interval": interval, "quantile_fraction": fraction,
            "resample_probability": resample if kind == "pbt" else None, "mutate": list(names)}


def _check_objectives(objectives: tuple[tuple[str, str], ...], scheduler: dict, confirm: dict, fixed: dict,
                      space: Space, problems: _Problems) -> None:
    """What cannot go with several objectives. Any algorithm can: tpe and gp are Optuna samplers
    that model several objectives (MOTPE; GP with log-EHVI), random and grid learn from no value,
    and the front is computed from the results table either way."""
    if scheduler["type"] in STOPPING_SCHEDULERS:
        # ASHA, Hyperband and the median rule compare trials on one metric, so they would stop the
        # cheap, slightly less accurate trials the front is for; and a stopped trial's cost is that
        # of fewer epochs, which would look like a cheap trial on the front. PBT and PB2 rank on
        # one metric too, and replace the weak trials' weights with the strong ones'.
        why = ("PBT ranks trials by one metric and copies the strong ones' weights over the weak ones'"
               if scheduler["type"] in POPULATION_SCHEDULERS else
               "early stopping ranks trials by one metric, and a stopped trial's cost counts fewer epochs")
        problems.add("scheduler.type", f"must be none with search.objectives ({why}), but got "
                                       f"{scheduler['type']!r}")
    if isinstance(confirm["top_k"], int) and confirm["top_k"] > 0:
        # The top k of a front is not defined: its trials are each best at some trade-off.
        problems.add("confirm.top_k", f"must be 0 with search.objectives (a Pareto front has no top k; re-run a "
                                      f"front trial with kdtune train --from-search FOLDER --trial ID --seeds N), "
                                      f"but got {confirm['top_k']}")
    if any(metric == "samples/scored" for metric, _ in objectives):
        samplers = list(space.samplers) if space.samplers is not None else [fixed.get("sampler", RunConfig.sampler)]
        others = [s for s in samplers if s != "kdas"]
        if others:
            problems.add("search.objectives.samples/scored", f"needs sampler kdas in every trial (only KDAS scores "
                                                             f"samples), but got sampler {others[0]!r}")


def _check_resources(values: dict, problems: _Problems) -> dict[str, Any]:
    out = _read(SECTIONS["resources"], values, "resources.", problems)
    gpus, workers = out["gpus_per_trial"], out["workers_per_trial"]
    if workers is None:  # gpus_per_trial: 4 alone means four workers, one GPU each
        workers = int(gpus) if gpus is not None and gpus > 1 and float(gpus).is_integer() else 1
    if isinstance(workers, int) and workers > 1:
        if gpus is not None and gpus not in (0, workers):
            # DDP runs one process per device; NCCL refuses two ranks on one GPU
            problems.add("resources.gpus_per_trial", f"must be 0 or workers_per_trial ({workers}) in a data-parallel "
                                                     f"trial (each worker drives one GPU), but got {gpus!r}")
    elif gpus is not None and gpus > 1:
        # One process trains on one device: more than 1 would reserve GPUs it never uses.
        problems.add("resources.gpus_per_trial", f"must be in [0, 1] (a share of one GPU), or a whole number "
                                                 f"above 1 for a data-parallel trial with one worker per GPU, but "
                                                 f"got {gpus!r}")
    return {**out, "workers_per_trial": workers}



def _check_data_parallel(resources: dict, search: dict, scheduler: dict, fixed: dict, space: Space,
                         problems: _Problems) -> None:
    """What a data-parallel trial (workers_per_trial > 1) cannot do, refused before any work."""
    workers = resources["workers_per_trial"]
    if not isinstance(workers, int) or workers < 2:
        return
    if scheduler["type"] in (*POPULATION_SCHEDULERS, "hyperband"):
        # Ray Train checkpoints the trial, not Tune: there is nothing for PBT to copy or for
        # HyperBand to pause and resume from
        problems.add("scheduler.type", f"must not be {scheduler['type']} with workers_per_trial {workers} (a "
                                       f"data-parallel trial has no Tune checkpoint to copy or resume); use asha, "
                                       f"median or none")
    methods = list(space.methods) if space.methods else [fixed.get("method", RunConfig.method)]
    for method in methods:
        cls = METHODS.get(method) if method in METHODS else None
        if cls is not None and (cls.needs_indices or cls.strong_view is not None):
            problems.add("resources.workers_per_trial", f"must be 1 with method {method} (its per-process state, a "
                                                        f"memory over the training set or a strong view's random "
                                                        f"stream, would differ between workers), but got {workers}")
    dataset = fixed.get("dataset", RunConfig.dataset)
    if getattr(DATASETS.get(dataset) if dataset in DATASETS else None, "streaming", False):
        # The streaming loader draws whole batches in its DataLoader workers and has no shard per
        # rank yet, so each rank would train on the full batch (the engine refuses it too).
        problems.add("resources.workers_per_trial", f"must be 1 with dataset {dataset} (a streaming dataset has no "
                                                    f"per-worker shard yet; several workers need cifar100, cifar10 "
                                                    f"or digits), but got {workers}")
    if search["max_concurrent"] is None:
        # Ray Train reserves a trial's workers itself, outside Tune's accounting: Tune alone would
        # start every trial at once, each waiting for workers the cluster does not have
        search["max_concurrent"] = 1


def _check_confirm(values: dict, problems: _Problems) -> dict[str, Any]:
    return _read(SECTIONS["confirm"], values, "confirm.", problems)


def _read(schema: Schema, values: dict, prefix: str, problems: _Problems) -> dict[str, Any]:
    """Each of ``schema``'s keys: its value in ``values`` checked by its declaration (problems at
    ``<prefix><key>``), or its default. A value of the wrong type reads as None, which the rules
    across keys skip (one mistake, one problem); one outside its range or choices is kept as given."""
    out = schema.defaults()
    for key, entry in schema.items():
        if key in values:
            out[key], found = entry.validate(values[key], path=f"{prefix}{key}")
            problems.extend(found)
            if any(p.rule.startswith("expected ") for p in found):
                out[key] = None
    return out


# --------------------------------------------------------------------------- fixed and space vs RunConfig

def _check_fixed(raw: Any, space: Space, problems: _Problems) -> tuple[dict[str, Any], int | None]:
    """Validate ``fixed`` as a RunConfig (per method when the method is searched).

    Returns the fixed values (numbers converted, relative paths made absolute) and the epoch
    budget (None when invalid).
    """
    if raw is _MISSING or not isinstance(raw, dict):
        problems.add("fixed", "missing; the run settings that are not searched are required"
                     if raw is _MISSING else f"expected a mapping of run settings, but got {raw!r}")
        return {}, None
    fixed = {k: _absolute(v) if k in PATH_KEYS else v for k, v in raw.items()}
    if "method_params" in fixed:
        problems.add("fixed.method_params", "write method hyperparameters as flat keys "
                                            "(temperature: 4, not method_params: {temperature: 4})")
        fixed.pop("method_params")
    for key in space.conditionals:
        if key in fixed:
            problems.add(f"fixed.{key}", f"must be left out when space.{key} searches it, "
                                         f"but got {fixed[key]!r}")
            fixed.pop(key)
    coerced: dict[str, Any] = {}
    for combo in _combos(space, fixed):
        found = _run_problems({**fixed, **combo})
        for problem in found:
            if problem.path in combo:  # a pairing of searched choices that cannot run (kdas without a teacher's method)
                pairing = " with ".join(f"{k} {v!r}" for k, v in combo.items())
                problems.add(f"space.{problem.path}", f"{problem.message} (in trials of {pairing})")
            else:
                problems.extend([problem], prefix="fixed")
        if not found and not coerced:
            flat = RunConfig.from_dict({**fixed, **combo}).flat()
            coerced = {k: list(flat[k]) if isinstance(flat[k], tuple) else flat[k] for k in fixed}
    epochs, ok = coerce(fixed.get("epochs", RunConfig.epochs), (int,))
    return coerced or fixed, epochs if ok and epochs >= 1 else None


def _check_space(space: Space, fixed: dict[str, Any], problems: _Problems) -> None:
    """Names each method (sampler) takes, no name both fixed and searched, and values that pass
    RunConfig in every pairing of the searched method and sampler they appear in."""
    for key, choices in space.conditionals.items():
        for choice in choices:
            if not _known(key, choice):
                problems.add(f"space.{key}.choices.{choice}", _REGISTRIES[key].unknown_message(choice))
    combos = _combos(space, fixed)
    base = {_frozen(c): set(_run_problems({**fixed, **c})) for c in combos}
    for path, parent, param in space.entries():
        if param.name in NOT_SEARCHABLE:
            problems.add(path, f"cannot be searched: {NOT_SEARCHABLE[param.name]}")
            continue
        if param.name in fixed:
            problems.add(path, f"also set under fixed ({param.name}: {fixed[param.name]!r}); "
                               f"a hyperparameter is either fixed or searched")
            continue
        mine = [c for c in combos if parent is None or c.get(parent[0], fixed.get(parent[0])) == parent[1]]
        if parent is not None and parent[0] == "sampler":
            if _known("sampler", parent[1]) and not _sampler_takes(parent[1], param.name):
                problems.add(path, _unknown_sampler_param(param.name, parent[1]))
                continue
        elif parent is None and space.samplers is not None and param.name in sampler_keys():
            lacking = [c for c in space.samplers if _known("sampler", c) and not _sampler_takes(c, param.name)]
            if lacking:
                problems.add(path, f"searched for every sampler, but sampler{'s' if len(lacking) > 1 else ''} "
                                   f"{', '.join(repr(c) for c in lacking)} take{'' if len(lacking) > 1 else 's'} "
                                   f"no {param.name}; search it under space.sampler.choices.<sampler> "
                                   f"for the samplers that take it")
                continue
        if parent is None or parent[0] == "method":
            owners = [parent[1]] if parent else list(dict.fromkeys(_method_of(c, fixed) for c in combos))
            missing = [m for m in owners if _known("method", m) and not _takes(m, param.name)]
            if missing:
                shared = parent is None and space.methods is not None
                problems.add(path, _unknown_param(param.name, missing, shared))
                continue
        for combo in mine:
            for label, value in param.probes():
                found = _run_problems({**fixed, **combo, param.name: value})
                for p in found:
                    if p not in base[_frozen(combo)]:
                        problems.add(f"{path}.{label}", str(p))


def _combos(space: Space, fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """The pairings a fixed part must work with: every known searched method times every known
    searched sampler (a key not searched is left to ``fixed``: ``{}`` when neither is)."""
    axes = [[(key, c) for c in choices if _known(key, c)] for key, choices in space.conditionals.items()]
    return [dict(pairs) for pairs in itertools.product(*axes)]


def _frozen(combo: dict[str, Any]) -> tuple:
    return tuple(combo.items())


def _method_of(combo: dict[str, Any], fixed: dict[str, Any]) -> Any:
    return combo.get("method", fixed.get("method", RunConfig.method))


_REGISTRIES = {"method": METHODS, "sampler": SAMPLERS}


def _known(key: str, name: Any) -> bool:
    return isinstance(name, str) and name in _REGISTRIES[key]


def _known_method(method: Any) -> bool:
    return _known("method", method)


def _takes(method: Any, name: str) -> bool:
    if name in RUN_KEYS or name in sampler_keys():
        return True
    return _known_method(method) and name in METHODS.hparams(method)


def _sampler_takes(sampler: str, name: str) -> bool:
    return name in RUN_KEYS or name in SAMPLERS.hparams(sampler)


def _unknown_sampler_param(name: str, sampler: str) -> str:
    takes = list(SAMPLERS.hparams(sampler))
    hint = did_you_mean(name, [*RUN_KEYS, *takes])
    elsewhere = [m for m in METHODS.names() if name in METHODS.hparams(m)]
    where = (f"; it is a hyperparameter of method{'s' if len(elsewhere) > 1 else ''} "
             f"{', '.join(repr(m) for m in elsewhere)}: search it at space.{name} or under space.method.choices"
             if elsewhere and not hint else "")
    return (f"unknown hyperparameter for sampler {sampler!r}{hint} ({sampler} takes: "
            f"{', '.join(takes) or 'nothing'}; or a run setting such as lr){where}")


def _unknown_param(name: str, methods: list[str], shared: bool) -> str:
    takes = {m: list(METHODS.hparams(m)) for m in methods}
    hint = did_you_mean(name, [*RUN_KEYS, *(n for names in takes.values() for n in names)])
    lists = "; ".join(f"{m} takes: {', '.join(names) or 'nothing'}" for m, names in takes.items())
    where = ("; search it under space.method.choices.<method> for the methods that take it"
             if shared and not hint else "")
    return (f"unknown hyperparameter for method{'s' if len(methods) > 1 else ''} "
            f"{', '.join(repr(m) for m in methods)}{hint} ({lists}; or a run setting such as lr){where}")


def _run_problems(values: dict[str, Any]) -> list[Problem]:
    """RunConfig's problems with ``values`` (paths: the keys)."""
    return validate(values)[1]


def _absolute(value: Any) -> Any:
    # Trials run in their own working directories: a relative path must not depend on it.
    if isinstance(value, str) and value and not value.startswith("~") and "://" not in value:
        return os.path.abspath(value)
    return value
