"""One run's configuration: a flat mapping of names to values, validated in one pass.

The same flat names are used in YAML files, on the command line (``--set key=value``), in
search spaces, MLflow params and result tables: ``lr`` is ``lr`` everywhere, and a method's
hyperparameters (``temperature``, ``beta``, ...) sit beside the recipe's.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from kdtune.data import DATASETS
from kdtune import imagenet  # noqa: F401  registers the streaming dataset (it builds on kdtune.data)
from kdtune.distillers import METHODS
from kdtune.engine import RECIPE, Recipe
from kdtune.hparams import Problem, Schema, as_problems, coerce, declare, did_you_mean, render
from kdtune.models import MODELS
from kdtune.plugins import load_plugins
from kdtune.registry import Registry
from kdtune.sampling import SAMPLERS

__all__ = ["ConfigError", "RunConfig", "coerce", "load_yaml", "parse_override", "validate"]


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line (``problems``: the lines)."""

    def __init__(self, problems: list[str]) -> None:
        # Problems quote the values they are about; a huge value must not make a huge message.
        problems = [p if len(p) <= 1000 else f"{p[:800]}... [{len(p)} characters] ...{p[-100:]}" for p in problems]
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


def _device(value: str) -> None:
    if value != "auto":
        try:
            torch.device(value)
        except RuntimeError as e:  # torch's message lists its device types
            raise ValueError(f"must be auto or a torch device such as cpu, cuda or cuda:1, but got {value!r}") from e


def _recipe(name: str) -> Any:
    """RunConfig's field for a recipe key: its declaration is :class:`kdtune.engine.Recipe`'s."""
    entry = RECIPE[name]
    return field(default=entry.default, metadata={"hp": entry})


@dataclass(frozen=True)
class RunConfig:
    """Everything one distillation run needs. Method and sampler hyperparameters live in
    ``method_params`` and ``sampler_params`` (flat in files: see :meth:`from_dict`).

    Every field is declared once, with its type, default, rule and help (:func:`declare`;
    :data:`RUN_KEYS` reads them): :func:`validate`, ``kdtune train --list`` and the docs' table
    all read that declaration. The names of models, datasets, methods and samplers are checked
    against their registries (plugins add to them) by :func:`validate`."""

    # what is distilled
    dataset: str = declare("digits", help="the dataset: a registered one (kdtune.data; plugins add more)")
    data_root: str | None = declare(None, type=str, path=True, null_means="no folder (digits, synthetic)",
                                    help="folder of the dataset's files (CIFAR: needed; download fetches them there)")
    download: bool = declare(False, help="download the dataset when data_root lacks it")
    val_size: int | None = declare(None, type=int, ge=0, null_means="the dataset's default",
                                   help="training images moved to the validation split")
    split_seed: int = declare(0, ge=0, help="seed of the train/validation split")
    dataset_options: dict = declare({}, help="keyword arguments of the dataset's builder (synthetic, plugins)",
                                    not_searchable="it is a mapping of builder options; set it under fixed")
    teacher: str | None = declare("resnet20", type=str, null_means="no teacher (method none)",
                                  help="the teacher: a registered model (kdtune.models; plugins add more)")
    teacher_checkpoint: str | None = declare(None, type=str, path=True,
                                             null_means="kdtune trains the teacher and caches it",
                                             help="the teacher's weights: a file written by kdtune train")
    teacher_epochs: int = declare(240, ge=1, help="recipe length when kdtune trains the teacher itself")
    # A setting of its own so that re-running a configuration with other seeds (train
    # --from-search --seeds N) distils from the same teacher, not from one trained per seed.
    teacher_seed: int | None = declare(None, type=int, ge=0, null_means="the run's seed",
                                       help="seed of the teacher kdtune trains itself (no teacher_checkpoint)")
    student: str = declare("resnet8", help="the student: a registered model (kdtune.models; plugins add more)")
    method: str = declare("kd", help="distillation method (kdtune train --list shows each one's keys)")
    method_params: dict = declare({}, help="the method's hyperparameters as a mapping (usually written flat)",
                                  not_searchable="method hyperparameters are searched by their own flat names")
    sampler: str = declare("none", help="which samples each epoch trains on: none (all) or kdas")
    sampler_params: dict = declare({}, help="the sampler's hyperparameters as a mapping (usually written flat)",
                                   not_searchable="sampler hyperparameters are searched by their own flat names")
    # the recipe: kdtune.engine.Recipe's fields, flat, declared there
    epochs: int = _recipe("epochs")
    batch_size: int = _recipe("batch_size")
    lr: float = _recipe("lr")
    momentum: float = _recipe("momentum")
    weight_decay: float = _recipe("weight_decay")
    nesterov: bool = _recipe("nesterov")
    schedule: str = _recipe("schedule")
    lr_decay_epochs: tuple = _recipe("lr_decay_epochs")
    lr_decay_rate: float = _recipe("lr_decay_rate")
    lr_min: float = _recipe("lr_min")
    warmup_epochs: int = _recipe("warmup_epochs")
    # how it runs
    seed: int = declare(0, ge=0, help="seed of the student's initialisation, batch order and augmentation")
    device: str = declare("auto", parse=_device, help="torch device: auto = cuda when available, else cpu")
    amp: bool | None = declare(None, type=bool, null_means="on for CUDA, off on the CPU",
                               help="bf16 autocast for training (evaluation is fp32)")
    final: bool = declare(False, help="train on train+val and report test accuracy",
                          not_searchable="a final run reports test accuracy, which a search must never select on")
    # Teachers, their accuracy records and teacher-output caches live here. $KDTUNE_CACHE_DIR,
    # when set, replaces the default (a node's scratch disk; the test suite's private folder).
    cache_dir: str = declare("~/.cache/kdtune", path=True,
                             factory=lambda: os.environ.get("KDTUNE_CACHE_DIR", "~/.cache/kdtune"),
                             help="teachers and teacher-output caches ($KDTUNE_CACHE_DIR replaces the default)")
    # The exact teacher-output cache (kdtune.teacher_cache): auto = on for methods that use only
    # the teacher's logits (kd, dkd, ctkd, ctkd_dkd, and KDAS with them); feature methods and
    # SAKD run the teacher live.
    # crops: the FKD-style cache (kdtune.fkd_cache) of streaming datasets (imagenet), whose
    # augmentation has no finite set of views: stored crops with the teacher's top-k logits.
    teacher_cache: str = declare("auto", choices=("auto", "on", "off", "crops"),
                                 help="exact teacher-output cache: auto = on for logit-only methods; "
                                      "crops = FKD-style stored crops (streaming datasets)")
    teacher_cache_dtype: str = declare("float32", choices=("float32", "float16"),
                                       help="storage precision of the teacher-output cache")
    teacher_cache_crops: int = declare(5, ge=1, help="teacher_cache: crops: crops stored per training image")
    teacher_cache_topk: int = declare(10, ge=1, help="teacher_cache: crops: teacher logits stored per crop "
                                                     "(the largest k; the rest as their mean mass)")
    compile: str = declare("auto", choices=("auto", "on", "off"),
                           help="torch.compile of the step: auto = on for CUDA, off on the CPU")

    def recipe(self) -> Recipe:
        values = {name: getattr(self, name) for name in RECIPE}
        values["lr_decay_epochs"] = tuple(values["lr_decay_epochs"])
        return Recipe(**values)

    def flat(self) -> dict[str, Any]:
        """One flat dict, method hyperparameters at the top level (the inverse of from_dict)."""
        d = dataclasses.asdict(self)
        d.update(d.pop("method_params"))
        d.update(d.pop("sampler_params"))
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """Validate a flat mapping; raise :class:`ConfigError` listing every problem."""
        out, problems = validate(values)
        if problems:
            raise ConfigError(render(problems, source))
        return cls(**out)


RUN_KEYS = Schema.of(RunConfig)  # every run key with its declaration, in field order
# The keys written as mappings of hyperparameters; in files they are usually flat.
NESTED_KEYS = ("method_params", "sampler_params")
if [k for k in RUN_KEYS if k in RECIPE] != list(RECIPE):
    raise TypeError("RunConfig must take every field of kdtune.engine.Recipe, in its order")

OWNERS = {"method": METHODS, "sampler": SAMPLERS}  # the fields whose choice brings hyperparameters


def _known(registry: Registry, key: str, value: Any, problems: list[Problem]) -> bool:
    if value in registry:
        return True
    problems.append(Problem(key, registry.unknown_message(value)))
    return False


def _owners(values: dict[str, Any], problems: list[Problem]) -> dict[str, tuple[str | None, Schema]]:
    """Per owner field (method, sampler): the chosen name (None when unknown) and its schema."""
    owners = {}
    for field_name, registry in OWNERS.items():
        name = values.get(field_name, getattr(RunConfig, field_name))
        ok = isinstance(name, str) and _known(registry, field_name, name, problems)
        owners[field_name] = (name, registry.hparams(name)) if ok else (None, Schema())
    return owners


def validate(values: Any) -> tuple[dict[str, Any], list[Problem]]:
    """RunConfig's keyword arguments from a flat mapping, and every problem with it (paths:
    the keys). The problems are the caller's to render with their source."""
    load_plugins()  # here, not at import: a plugin may import kdtune.config itself
    problems: list[Problem] = []
    if not isinstance(values, dict):
        return {}, [Problem("", "expected a mapping of keys to values", values)]
    out: dict[str, Any] = {}
    owners = _owners(values, problems)
    given: dict[str, dict[str, Any]] = {field_name: {} for field_name in owners}
    # Flat keys, plus nested method_params / sampler_params mappings (same rules).
    items = [(k, v) for k, v in values.items() if k not in NESTED_KEYS]
    for nested in NESTED_KEYS:
        items += list((values.get(nested) or {}).items())
    for key, value in items:
        if key in RUN_KEYS:
            out[key], found = RUN_KEYS[key].validate(value)
            problems += found
            if found and found[0].rule.startswith("expected "):
                del out[key]  # the default stands in for the cross-field rules below
            continue
        owner = next((f for f, (_, schema) in owners.items() if key in schema), None)
        if owner is None:
            if all(name is not None for name, _ in owners.values()) or not _elsewhere(key):
                problems.append(_unknown_key(key, owners))
            continue
        given[owner][key] = value
    params: dict[str, dict[str, Any]] = {}
    for field_name, (name, _) in owners.items():
        params[field_name] = given[field_name]
        if name is not None:
            params[field_name], found = OWNERS[field_name].get(name).problems(given[field_name])
            problems += found

    cfg = {**{f.name: getattr(RunConfig(), f.name) for f in fields(RunConfig)}, **out}
    for key in ("teacher", "student"):
        if cfg[key] is not None:
            _known(MODELS, key, cfg[key], problems)
    method = owners["method"][0]
    needs_teacher = method is not None and METHODS.get(method).needs_teacher
    if cfg["teacher"] is None and needs_teacher:
        problems.append(Problem("teacher", f"method {method!r} needs a teacher, but got null"))
    elif method is not None and needs_teacher and cfg["teacher"] in MODELS and cfg["student"] in MODELS:
        cls = METHODS.get(method)
        full = {**cls.hparams.defaults(), **params["method"]}
        problems += as_problems(cls.check_models(cfg["teacher"], cfg["student"], full))
    if cfg["sampler"] != "none" and method is not None and not needs_teacher:
        problems.append(Problem("sampler", f"{cfg['sampler']!r} selects samples by teacher-student "
                                           f"disagreement, so it needs a distillation method, but method is {method!r}"))
    _known(DATASETS, "dataset", cfg["dataset"], problems)
    if (method is not None and needs_teacher and cfg["teacher_cache"] in ("on", "crops")
            and not getattr(METHODS.get(method), "teacher_logits_only", False)):
        why = ("also trains on a strong view, which has no finite set of views to cache"
               if getattr(METHODS.get(method), "strong_view", None) is not None else "reads the teacher's features")
        problems.append(Problem("teacher_cache", f"{cfg['teacher_cache']!r} needs a method that uses only the "
                                                 f"teacher's logits, but method {method!r} {why} (use auto or off)"))
    problems += _streaming_problems(cfg, method)
    problems += Recipe.check(cfg)
    ckpt = cfg["teacher_checkpoint"]
    if ckpt is not None and not Path(ckpt).expanduser().is_file():
        problems.append(Problem("teacher_checkpoint", f"file not found: {ckpt!r}"))
    out["method_params"], out["sampler_params"] = params["method"], params["sampler"]
    if "lr_decay_epochs" in out:
        out["lr_decay_epochs"] = tuple(out["lr_decay_epochs"])
    return out, list(dict.fromkeys(problems))


def _streaming_problems(cfg: dict[str, Any], method: str | None) -> list[Problem]:
    """What a streaming dataset (imagenet: RandomResizedCrop, no finite set of views) rules out."""
    if cfg["dataset"] not in DATASETS:
        return []
    streaming = getattr(DATASETS.get(cfg["dataset"]), "streaming", False)
    problems = []
    if streaming and cfg["teacher_cache"] == "on":
        problems.append(Problem("teacher_cache", f"'on' (the exact per-view cache) needs a finite set of views, but "
                                                 f"dataset {cfg['dataset']!r} draws RandomResizedCrops (use crops: "
                                                 f"stored crops with top-k logits, or auto/off: the teacher runs live)"))
    if not streaming and cfg["teacher_cache"] == "crops":
        problems.append(Problem("teacher_cache", f"'crops' is for streaming datasets (imagenet); dataset "
                                                 f"{cfg['dataset']!r} has a finite set of views, which the exact "
                                                 f"cache (auto or on) stores whole"))
    if streaming and method is not None and getattr(METHODS.get(method), "strong_view", None) is not None:
        problems.append(Problem("method", f"{method!r} trains on a second, strongly augmented view, which only the "
                                          f"in-memory loader makes; dataset {cfg['dataset']!r} streams its images"))
    return problems


def hparam_owners(key: str) -> list[str]:
    """``"methods 'dkd' and 'kd'"``, ``"sampler 'kdas'"``: the methods and samplers that take
    ``key``, one phrase per kind."""
    phrases = []
    for field_name, registry in OWNERS.items():
        names = [repr(name) for name in registry.names() if key in registry.hparams(name)]
        if names:
            listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
            phrases.append(f"{field_name}{'s' if len(names) > 1 else ''} {listed}")
    return phrases


def _elsewhere(key: str) -> bool:
    return bool(hparam_owners(key))


def _unknown_key(key: str, owners: dict[str, tuple[str | None, Schema]]) -> Problem:
    known = set(RUN_KEYS) | {p for _, schema in owners.values() for p in schema}
    hint = did_you_mean(key, sorted(known))
    takes = "; ".join(f"{field_name} {name!r} takes: {', '.join(schema) or 'nothing'}"
                      for field_name, (name, schema) in owners.items() if name is not None
                      and (field_name == "method" or name != "none"))
    elsewhere = hparam_owners(key)
    if elsewhere:
        hint += f"; it is a hyperparameter of {'; and of '.join(elsewhere)}"
    return Problem(key, f"unknown key{hint}" + (f" ({takes})" if takes else ""))


# A config or search file is a few kB; these caps stop a hostile or mistaken file (a
# "billion laughs" alias bomb, a huge or binary file) from exhausting memory or time.
MAX_YAML_BYTES = 1024 * 1024
MAX_YAML_NODES = 100_000  # values after expanding aliases
MAX_YAML_CHARS = 2_000_000  # characters of scalars after expanding aliases


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (data only: ``safe_load``); errors name the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError([f"{path}: {size} bytes; a config file is at most {MAX_YAML_BYTES} bytes"])
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"{path}: cannot be read ({e.strerror})"]) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not a text (UTF-8) file: undecodable byte at offset {e.start}"]) from e
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_expanded_size(node, path)
            values = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {str(e)[:500]}"]) from e
    except RecursionError as e:
        raise ConfigError([f"{path}: nested too deeply"]) from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError([f"{path}: expected a mapping of keys to values, but got {type(values).__name__}"])
    return values


def _check_expanded_size(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose aliases expand it beyond the caps (counted without expanding it)."""
    sizes: dict[int, tuple[int, int] | None] = {}  # id(node) -> (values, characters); None: being counted

    def size(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            if sizes[key] is None:
                raise ConfigError([f"{path}: an alias refers to a value that contains it (recursive)"])
            return sizes[key]
        sizes[key] = None
        if isinstance(node, yaml.ScalarNode):
            total = (1, len(node.value))
        else:
            children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
            counted = [size(c) for c in children]
            total = (1 + sum(n for n, _ in counted), sum(c for _, c in counted))
        sizes[key] = total
        return total

    nodes, chars = size(root)
    if nodes > MAX_YAML_NODES or chars > MAX_YAML_CHARS:
        raise ConfigError([f"{path}: its aliases (*name) expand to {nodes} values and {chars} characters; "
                           f"a config file may hold at most {MAX_YAML_NODES} values and {MAX_YAML_CHARS} "
                           f"characters"])


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (so ``0.1``, ``true``, ``[1, 2]`` work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r}: expected key=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
