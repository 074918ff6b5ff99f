"""One run's configuration: a flat mapping of names to values, validated in one pass.

The same flat names are used in YAML files, on the command line (``--set key=value``), in
search spaces, MLflow params and result tables: ``lr`` is ``lr`` everywhere, and a method's
hyperparameters (``temperature``, ``beta``, ...) sit beside the recipe's.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from kdtune.data import DATASETS
from kdtune.distillers import METHODS
from kdtune.engine import SCHEDULES, Recipe
from kdtune.models import MODELS
from kdtune.plugins import load_plugins
from kdtune.registry import Registry
from kdtune.sampling import SAMPLERS

load_plugins()


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: list[str]) -> None:
        # Problems quote the values they are about; a huge value must not make a huge message.
        problems = [p if len(p) <= 1000 else f"{p[:800]}... [{len(p)} characters] ...{p[-100:]}" for p in problems]
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class RunConfig:
    """Everything one distillation run needs. Method and sampler hyperparameters live in
    ``method_params`` and ``sampler_params`` (flat in files: see :meth:`from_dict`)."""

    # what is distilled
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    val_size: int | None = None
    split_seed: int = 0
    dataset_options: dict = field(default_factory=dict)
    teacher: str | None = "resnet20"
    teacher_checkpoint: str | None = None
    teacher_epochs: int = 240  # recipe length when kdtune trains the teacher itself
    student: str = "resnet8"
    method: str = "kd"
    method_params: dict = field(default_factory=dict)
    sampler: str = "none"  # which samples each epoch trains on: none (all) or kdas
    sampler_params: dict = field(default_factory=dict)
    # the recipe: kdtune.engine.Recipe's fields, flat, with its defaults
    epochs: int = Recipe.epochs
    batch_size: int = Recipe.batch_size
    lr: float = Recipe.lr
    momentum: float = Recipe.momentum
    weight_decay: float = Recipe.weight_decay
    nesterov: bool = Recipe.nesterov
    schedule: str = Recipe.schedule
    lr_decay_epochs: tuple = Recipe.lr_decay_epochs
    lr_decay_rate: float = Recipe.lr_decay_rate
    lr_min: float = Recipe.lr_min
    warmup_epochs: int = Recipe.warmup_epochs
    # how it runs
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    final: bool = False
    # Teachers, their accuracy records and teacher-output caches live here. $KDTUNE_CACHE_DIR,
    # when set, replaces the default (a node's scratch disk; the test suite's private folder).
    cache_dir: str = field(default_factory=lambda: os.environ.get("KDTUNE_CACHE_DIR", "~/.cache/kdtune"))
    # The exact teacher-output cache (kdtune.teacher_cache): auto = on for methods that use only
    # the teacher's logits (kd, dkd, ctkd, ctkd_dkd, and KDAS with them); feature methods and
    # SAKD run the teacher live.
    teacher_cache: str = "auto"
    teacher_cache_dtype: str = "float32"  # or float16 (half the file)
    # torch.compile of the distiller's step: auto = on for CUDA, off on the CPU.
    compile: str = "auto"

    def recipe(self) -> Recipe:
        names = {f.name for f in fields(Recipe)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
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
        return cls(**_validate(values, source))


_FIELD_TYPES: dict[str, tuple[type, ...]] = {}
for _f in fields(RunConfig):
    _FIELD_TYPES[_f.name] = {
        "str": (str,), "str | None": (str, type(None)), "bool": (bool,), "int": (int,),
        "int | None": (int, type(None)), "float": (float,), "bool | None": (bool, type(None)),
        "dict": (dict,), "tuple": (list, tuple),
    }[str(_f.type)]

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def coerce(value: Any, types: tuple[type, ...]) -> tuple[Any, bool]:
    """``value`` converted to one of ``types`` where that is lossless; ``(value, ok)``.

    Accepts ints for floats and numbers written as strings such as ``1e-4``, which PyYAML
    reads as strings. bool is never taken for a number, nor a number for a bool.
    """
    if isinstance(value, bool):
        return value, bool in types
    if float in types and isinstance(value, int):
        return float(value), True
    if isinstance(value, str) and _FLOAT.match(value.strip()) and (float in types or int in types):
        number = float(value)
        if float in types:
            return number, True
        return (int(number), True) if number.is_integer() else (value, False)
    if int in types and isinstance(value, float) and value.is_integer() and float not in types:
        return value, False  # 3.0 for an epoch count is most likely a mistake; say so
    return value, isinstance(value, types)


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             dict: "a mapping", list: "a list", tuple: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _known(registry: Registry, key: str, value: Any, source: str, problems: list[str]) -> bool:
    if value in registry:
        return True
    problems.append(f"{source}: {key}: {registry.unknown_message(value)}")
    return False


def param_types(registry: Registry, name: str) -> dict[str, tuple[type, ...]]:
    """The hyperparameters entry ``name`` of ``registry`` takes, with the types their defaults imply."""
    overrides = getattr(registry.get(name), "param_types", {})  # e.g. an int or a list
    return {p: overrides.get(p, (type(param.default),)) for p, param in registry.parameters(name).items()}


def method_param_types(method: str) -> dict[str, tuple[type, ...]]:
    return param_types(METHODS, method)


def _owners(values: dict[str, Any], source: str, problems: list[str]) -> list[tuple[str, Registry, str, dict]]:
    """The registries whose chosen entry takes flat hyperparameters: (field, registry, name, types)."""
    owners = []
    for field_name, registry in (("method", METHODS), ("sampler", SAMPLERS)):
        name = values.get(field_name, getattr(RunConfig, field_name))
        ok = isinstance(name, str) and _known(registry, field_name, name, source, problems)
        owners.append((field_name, registry, name if ok else None, param_types(registry, name) if ok else {}))
    return owners


def _validate(values: dict[str, Any], source: str) -> dict[str, Any]:
    problems: list[str] = []
    if not isinstance(values, dict):
        raise ConfigError([f"{source}: expected a mapping of keys to values, but got {values!r}"])
    out: dict[str, Any] = {}
    owners = _owners(values, source, problems)
    params: dict[str, dict[str, Any]] = {field_name: {} for field_name, *_ in owners}
    # Flat keys, plus nested method_params / sampler_params mappings (same rules).
    items = [(k, v) for k, v in values.items() if k not in ("method_params", "sampler_params")]
    for nested in ("method_params", "sampler_params"):
        items += list((values.get(nested) or {}).items())
    for key, value in items:
        if key in _FIELD_TYPES:
            target, types = out, _FIELD_TYPES[key]
        else:
            owner = next(((f, t) for f, _, name, t in owners if key in t), None)
            if owner is None:
                if all(name is not None for *_, name, _ in owners) or key not in _all_params():
                    problems.append(_unknown_key(key, owners, source))
                continue
            target, types = params[owner[0]], owner[1][key]
        coerced, ok = coerce(value, types)
        if not ok:
            problems.append(f"{source}: {key}: expected {_type_name(types)}, but got {value!r}")
            continue
        target[key] = coerced
    for field_name, registry, name, _ in owners:
        if name is not None:
            problems += [f"{source}: {p}" for p in registry.get(name).check(params[field_name])]

    cfg = {**{f.name: getattr(RunConfig(), f.name) for f in fields(RunConfig)}, **out}
    for key in ("teacher", "student"):
        if cfg[key] is not None:
            _known(MODELS, key, cfg[key], source, problems)
    method = owners[0][2]
    needs_teacher = method is not None and METHODS.get(method).needs_teacher
    if cfg["teacher"] is None and needs_teacher:
        problems.append(f"{source}: teacher: method {method!r} needs a teacher, but got null")
    elif method is not None and needs_teacher and cfg["teacher"] in MODELS and cfg["student"] in MODELS:
        problems += [f"{source}: {p}" for p in
                     METHODS.get(method).check_models(cfg["teacher"], cfg["student"], params["method"])]
    if cfg["sampler"] != "none" and method is not None and not needs_teacher:
        problems.append(f"{source}: sampler: {cfg['sampler']!r} selects samples by teacher-student "
                        f"disagreement, so it needs a distillation method, but method is {method!r}")
    _known(DATASETS, "dataset", cfg["dataset"], source, problems)
    if (method is not None and needs_teacher and cfg["teacher_cache"] == "on"
            and not getattr(METHODS.get(method), "teacher_logits_only", False)):
        problems.append(f"{source}: teacher_cache: 'on' needs a method that uses only the teacher's logits, "
                        f"but method {method!r} reads the teacher's features (use auto or off)")
    problems += [f"{source}: {p}" for p in _check_ranges(cfg)]
    ckpt = cfg["teacher_checkpoint"]
    if ckpt is not None and not Path(ckpt).expanduser().is_file():
        problems.append(f"{source}: teacher_checkpoint: file not found: {ckpt!r}")
    if problems:
        raise ConfigError(problems)
    out["method_params"], out["sampler_params"] = params["method"], params["sampler"]
    if "lr_decay_epochs" in out:
        out["lr_decay_epochs"] = tuple(out["lr_decay_epochs"])
    return out


def _check_ranges(cfg: dict[str, Any]) -> list[str]:
    rules = [
        ("epochs", cfg["epochs"] >= 1, ">= 1"),
        ("teacher_epochs", cfg["teacher_epochs"] >= 1, ">= 1"),
        ("batch_size", cfg["batch_size"] >= 1, ">= 1"),
        ("lr", cfg["lr"] > 0, "> 0"),
        ("momentum", 0 <= cfg["momentum"] < 1, "in [0, 1)"),
        ("weight_decay", cfg["weight_decay"] >= 0, ">= 0"),
        ("lr_decay_rate", 0 < cfg["lr_decay_rate"] <= 1, "in (0, 1]"),
        ("lr_min", 0 <= cfg["lr_min"] and (cfg["lr"] <= 0 or cfg["lr_min"] < cfg["lr"]), "in [0, lr)"),
        ("warmup_epochs", 0 <= cfg["warmup_epochs"] < cfg["epochs"], "in [0, epochs)"),
        ("schedule", cfg["schedule"] in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
        ("teacher_cache", cfg["teacher_cache"] in ("auto", "on", "off"), "one of auto, on, off"),
        ("teacher_cache_dtype", cfg["teacher_cache_dtype"] in ("float32", "float16"), "one of float32, float16"),
        ("compile", cfg["compile"] in ("auto", "on", "off"), "one of auto, on, off"),
        ("val_size", cfg["val_size"] is None or cfg["val_size"] >= 0, ">= 0 or null"),
        ("lr_decay_epochs", all(isinstance(m, int) and m >= 1 for m in cfg["lr_decay_epochs"]),
         "a list of positive integers"),
    ]
    if cfg["nesterov"] and cfg["momentum"] == 0:
        rules.append(("nesterov", False, "false when momentum is 0 (SGD requires momentum > 0)"))
    return [f"{key}: must be {rule}, but got {cfg[key]!r}" for key, ok, rule in rules if not ok]


def _all_params() -> set[str]:
    return {p for reg in (METHODS, SAMPLERS) for m in reg.names() for p in reg.parameters(m)}


def _unknown_key(key: str, owners: list, source: str) -> str:
    import difflib

    known = set(_FIELD_TYPES) | {p for *_, types in owners for p in types}
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    takes = "; ".join(f"{field_name} {name!r} takes: {', '.join(types) or 'nothing'}"
                      for field_name, _, name, types in owners if name is not None
                      and (field_name == "method" or name != "none"))
    elsewhere = [f"{field} {name!r}" for field, reg in (("method", METHODS), ("sampler", SAMPLERS))
                 for name in reg.names() if key in reg.parameters(name)]
    if elsewhere:
        hint += f"; it is a hyperparameter of {' and '.join(elsewhere)}"
    return f"{source}: {key}: unknown key{hint}" + (f" ({takes})" if takes else "")


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
