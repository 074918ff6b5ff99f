"""Search spaces: typed hyperparameter ranges, read from YAML, translated for Optuna and Ray Tune.

A hyperparameter has one name everywhere: in the YAML file, in Optuna's ``trial.params``, in
Tune's trial config and in :class:`~kdtune.config.RunConfig`. When ``method`` or ``sampler``
itself is searched (the conditional keys, independent of each other), every choice brings its
own sub-space: its parameters exist only in the trials of that method or sampler.

Three translations of one :class:`Space`:
  * :meth:`Space.suggest` -- define-by-run, for ``OptunaSearch(space=space.suggest)``;
  * :meth:`Space.to_tune` -- Ray Tune domains, for random search with Tune's own generator;
  * :meth:`Space.grid` -- every point, for grid search.
Integer bounds are inclusive in all three.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from kdtune.hparams import Problem, Schema, coerce, did_you_mean, hp

KINDS = ("float", "int", "categorical")
# A searched parameter's keys in YAML (a range's numbers are floats or ints by its type).
PARAM = Schema(
    type=hp(None, type=str, choices=KINDS, required=True, help="a float or int range, or categorical choices"),
    low=hp(None, type=float, required=True, help="the lowest value, inclusive (float and int)"),
    high=hp(None, type=float, required=True, help="the highest value, inclusive (float and int)"),
    log=hp(False, help="sample on a log scale (low > 0, no step)"),
    step=hp(None, type=float, gt=0, null_means="a continuous float; 1 for an int",
            help="values are low + k * step; high - low must be a multiple of it"),
    choices=hp(None, type=list, required=True,
               help="categorical's values: strings, numbers, true/false (method, sampler: each with its sub-space)"),
)
# The keys each kind of parameter takes in YAML.
PARAM_KEYS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
MAX_GRID = 10_000  # more grid points than any search here could run
# Keys searched as a categorical whose choices map to sub-spaces (RunConfig fields).
CONDITIONAL_KEYS = ("method", "sampler")


class ParamError(ValueError):
    """A :class:`Param` that cannot be built; ``problems`` name the keys (``low``, ``step``...)."""

    def __init__(self, name: str, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(f"invalid parameter {name!r}: " + "; ".join(str(p) for p in problems))


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: a float or int range (bounds inclusive) or a set of choices,
    in its YAML form, standing for an Optuna distribution (:attr:`distribution`).

    Building one builds that distribution: Optuna's constructor holds the rules of a range (low
    <= high, low > 0 on a log scale, step > 0 and not with log), and its ValueError becomes a
    :class:`ParamError` whose problems name the key. kdtune adds one rule of its own: high - low
    is a multiple of step (Optuna would quietly lower high).
    """

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        problems = _param_problems(self)
        if problems:
            raise ParamError(self.name, problems)

    @property
    def distribution(self) -> Any:
        """The Optuna distribution (``FloatDistribution``, ``IntDistribution`` or
        ``CategoricalDistribution``) this parameter is sampled from."""
        return _distribution(self.kind, self.low, self.high, self.log, self.step, self.choices)

    @property
    def numeric(self) -> bool:
        """A float or int range (not a set of choices)."""
        return self.kind != "categorical"

    @property
    def enumerable(self) -> bool:
        """Whether its values can be listed (a grid): choices, an int range, a stepped float range."""
        return self.kind != "float" or self.step is not None

    def probes(self) -> list[tuple[str, Any]]:
        """``(YAML key, value)`` pairs that stand for every value in a rule that is an interval
        (RunConfig's are): the bounds of a range, every choice of a set."""
        if self.numeric:
            return [("low", self.low), ("high", self.high)]
        return [(f"choices[{i}]", c) for i, c in enumerate(self.choices)]

    def nearest(self, value: float) -> float | int:
        """The value of this range nearest ``value``: clipped to the bounds, put on the step, and
        an int for an int range (what PBT's mutations are brought back to)."""
        value = min(max(float(value), self.low), self.high)
        if self.step:
            value = min(self.low + round((value - self.low) / self.step) * self.step, self.high)
        return int(round(value)) if self.kind == "int" else float(value)

    def suggest(self, trial: Any) -> Any:
        """Draw this parameter from an Optuna trial (``Trial``, ``FixedTrial``, ...)."""
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def to_tune(self) -> Any:
        """The Ray Tune domain that samples the same values as :meth:`suggest` with a random sampler."""
        from ray import tune  # only where a Tune translation is asked for: the analysis layer reads spaces without Ray

        if self.kind == "categorical":
            return tune.choice(list(self.choices))
        if self.kind == "float":
            if self.step is None:
                return tune.loguniform(self.low, self.high) if self.log else tune.uniform(self.low, self.high)
            # Tune's quniform rounds a uniform draw to multiples of q: its end values come up half
            # as often, and its grid ignores low. Optuna's stepped floats are uniform over
            # low + k * step; a choice over the same grid is that distribution exactly.
            if self.grid_size() <= MAX_GRID:
                return tune.choice(self.grid_values())
            return tune.quniform(self.low, self.high, self.step)  # too fine to list: close enough
        if self.log:
            return tune.lograndint(self.low, self.high + 1)  # upper bound exclusive
        step = self.step or 1
        if step == 1:
            return tune.randint(self.low, self.high + 1)  # upper bound exclusive
        if self.low % step == 0 or self.grid_size() > MAX_GRID:
            # qrandint is inclusive and uniform over the multiples of step: Optuna's grid
            # (low + k * step) when low is one of them (and close enough when too long to list)
            return tune.qrandint(self.low, self.high, step)
        return tune.choice(self.grid_values())

    def grid_size(self) -> int:
        if self.kind == "categorical":
            return len(self.choices)
        if self.kind == "int":
            return (self.high - self.low) // (self.step or 1) + 1
        if self.enumerable:
            return round((self.high - self.low) / self.step) + 1
        raise ValueError(f"{self.name}: a float range has no values to enumerate for grid search; "
                         f"use type: categorical with choices, or type: int")

    def grid_values(self) -> list:
        """Every value (choices, stepped ranges, int ranges); a plain float range raises ValueError."""
        n = self.grid_size()
        if n > MAX_GRID:
            raise ValueError(f"{self.name}: grid search enumerates at most {MAX_GRID} values, but got {n}")
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        # round() removes the binary noise of low + k * step (0.30000000000000004)
        return [round(self.low + k * self.step, 12) for k in range(n)]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (the inverse of :func:`parse_param`)."""
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class Space:
    """Searched hyperparameters: ``params`` apply to every trial; ``methods`` (when ``method``
    is searched) maps each method to the sub-space that exists only in its trials, and
    ``samplers`` (when ``sampler`` is searched) does the same for each sampler."""

    params: dict[str, Param] = field(default_factory=dict)
    methods: dict[str, dict[str, Param]] | None = None
    samplers: dict[str, dict[str, Param]] | None = None

    @property
    def conditionals(self) -> dict[str, dict[str, dict[str, Param]]]:
        """The searched conditional keys ("method", "sampler"), each mapping choice -> sub-space."""
        found = {"method": self.methods, "sampler": self.samplers}
        return {key: choices for key, choices in found.items() if choices is not None}

    def declared(self) -> dict[str, Param]:
        """Every searched name with its declaration; a conditional key ("method", "sampler") as a
        categorical over its choices. A name in several sub-spaces has one type in all of them
        (the schema gives each hyperparameter one), so the first declaration stands for all."""
        out: dict[str, Param] = {key: Param(key, "categorical", choices=tuple(choices))
                                 for key, choices in self.conditionals.items()}
        for choices in self.conditionals.values():
            for sub in choices.values():
                for name, param in sub.items():
                    out.setdefault(name, param)
        return {**out, **{n: p for n, p in self.params.items() if n not in out}}

    def suggest(self, trial: Any) -> None:
        """Define-by-run space for ``OptunaSearch(space=space.suggest)``.

        Returns None: Ray reads the values from the trial. Optuna only sees a method's (or a
        sampler's) parameters in trials of that method (sampler).
        """
        for key, choices in self.conditionals.items():
            choice = trial.suggest_categorical(key, list(choices))
            for param in choices[choice].values():
                param.suggest(trial)
        for param in self.params.values():
            param.suggest(trial)
        return None

    def to_tune(self) -> dict[str, Any]:
        """Ray Tune domains (``param_space``) for Tune's BasicVariantGenerator.

        Tune configs cannot leave keys out per trial, so a method's (sampler's) parameter is a
        :class:`Conditional` that resolves to None in trials of other methods (samplers); the
        trainable drops keys whose value is None.
        """
        from ray import tune

        from kdtune.search.tune_space import Conditional

        out: dict[str, Any] = {key: tune.choice(list(choices)) for key, choices in self.conditionals.items()}
        for key, choices in self.conditionals.items():
            by_name: dict[str, dict[str, Any]] = {}
            for choice, sub in choices.items():
                for name, param in sub.items():
                    by_name.setdefault(name, {})[choice] = param.to_tune()
            out.update({name: Conditional(name, domains, key) for name, domains in by_name.items()})
        out.update({name: param.to_tune() for name, param in self.params.items()})
        return out

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point; a searched method (sampler) expands only its own parameters, and
        searched methods and samplers are combined in every pairing.

        Raises ValueError for a float range (no values to enumerate) or more than MAX_GRID points.
        """
        axes = [[(key, choice, sub) for choice, sub in choices.items()]
                for key, choices in self.conditionals.items()]
        branches = []
        for combo in itertools.product(*axes):
            base = {key: choice for key, choice, _ in combo}
            params: dict[str, Param] = {}
            for _, _, sub in combo:
                params.update(sub)
            branches.append((base, {**params, **self.params}))
        total = sum(math.prod(p.grid_size() for p in params.values()) for _, params in branches)
        if total > MAX_GRID:
            raise ValueError(f"grid search runs at most {MAX_GRID} points, but this space has {total}")
        points = []
        for base, params in branches:
            values = [[(p.name, v) for v in p.grid_values()] for p in params.values()]
            points += [{**base, **dict(combo)} for combo in itertools.product(*values)]
        return points

    def names(self) -> list[str]:
        """Every hyperparameter name a trial config may hold (the searched "method" and
        "sampler" first, then their sub-spaces' parameters, then the others)."""
        names = list(self.conditionals)
        for choices in self.conditionals.values():
            for sub in choices.values():
                names += [n for n in sub if n not in names]
        return names + [n for n in self.params if n not in names]

    def entries(self) -> list[tuple[str, tuple[str, str] | None, Param]]:
        """``(yaml_path, (key, choice) or None, param)`` for every parameter, conditional ones
        first; ``(key, choice)`` is e.g. ``("method", "kd")`` or ``("sampler", "kdas")``."""
        out = [(f"space.{key}.choices.{c}.{n}", (key, c), p)
               for key, choices in self.conditionals.items() for c, sub in choices.items() for n, p in sub.items()]
        return out + [(f"space.{n}", None, p) for n, p in self.params.items()]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (the inverse of :func:`parse_space`)."""
        out: dict[str, Any] = {}
        for key, choices in self.conditionals.items():
            out[key] = {"type": "categorical", "choices": {
                c: {n: p.to_dict() for n, p in sub.items()} for c, sub in choices.items()}}
        out.update({n: p.to_dict() for n, p in self.params.items()})
        return out


# --------------------------------------------------------------------------- parsing YAML

def parse_param(name: str, raw: Any, path: str) -> tuple[Param | None, list[Problem]]:
    """A Param from its YAML mapping, or None and every problem (at ``<path>.<key>``)."""
    problems: list[Problem] = []

    def bad(key: str | None, message: str) -> None:
        problems.append(Problem(f"{path}.{key}" if key else path, message))

    if not isinstance(raw, dict):
        bad(None, f"expected a mapping such as {{type: float, low: 0.1, high: 1.0}}, but got {raw!r} "
                  f"(values that are not searched go under fixed)")
        return None, problems
    kind = raw.get("type")
    if kind not in KINDS:
        bad("type", f"must be one of {', '.join(KINDS)}, but got {kind!r}"
            + ("" if "type" in raw else " (missing)"))
        return None, problems
    for key in raw:
        if key not in PARAM_KEYS[kind]:
            bad(str(key), f"unknown key{did_you_mean(str(key), PARAM_KEYS[kind])} "
                          f"(type {kind} takes: {', '.join(PARAM_KEYS[kind])})")
    if kind == "categorical":
        choices = _parse_choices(raw.get("choices"), bad)
        values: dict[str, Any] = {"choices": choices}
    else:
        types = (float,) if kind == "float" else (int,)
        values = {key: _number(raw, key, types, bad) for key in ("low", "high", "step")}
        values["log"], found = PARAM["log"].validate(raw.get("log", False), path=f"{path}.log")
        problems += found
    if problems:
        return None, problems
    try:
        return Param(name, kind, **values), []
    except ParamError as e:
        return None, [p.under(path) for p in e.problems]


def parse_space(raw: Any, path: str = "space") -> tuple[Space, list[Problem]]:
    """A Space from the YAML ``space`` mapping, and every problem found (empty when valid)."""
    problems: list[Problem] = []
    if not isinstance(raw, dict) or not raw:
        problems.append(Problem(f"{path}", f"expected a mapping of hyperparameter names to ranges, but got {raw!r}"))
        return Space(), problems
    params: dict[str, Param] = {}
    conditionals: dict[str, dict[str, dict[str, Param]]] = {}
    for name, spec in raw.items():
        if name in CONDITIONAL_KEYS:
            choices = _parse_conditional(name, spec, f"{path}.{name}", problems)
            if choices is not None:
                conditionals[name] = choices
            continue
        param = _parse_named(name, spec, path, problems)
        if param is not None:
            params[name] = param
    problems += _conditional_problems(conditionals, params, path)
    return Space(params, conditionals.get("method"), conditionals.get("sampler")), problems


def _parse_named(name: Any, spec: Any, path: str, problems: list[Problem]) -> Param | None:
    if not isinstance(name, str) or not name:
        problems.append(Problem(f"{path}.{name}", f"a hyperparameter name must be a non-empty string, but got {name!r}"))
        return None
    param, found = parse_param(name, spec, f"{path}.{name}")
    problems += found
    return param


def _parse_conditional(key: str, raw: Any, path: str, problems: list[Problem]) -> dict[str, dict[str, Param]] | None:
    """``<key>: {type: categorical, choices: {<choice>: {...sub-space...}, ...}}`` (or a list of
    names), for key "method" (``{kd: {...}, none: {}}``) or "sampler" (``{kdas: {...}, none: {}}``)."""
    if not isinstance(raw, dict) or raw.get("type") != "categorical":
        got = raw.get("type") if isinstance(raw, dict) else raw
        problems.append(Problem(f"{path}", f"the {key} is searched as {{type: categorical, choices: {{<{key}>: "
                        f"<its sub-space>, ...}}}}, but got {got!r}"))
        return None
    for k in raw:
        if k not in ("type", "choices"):
            problems.append(Problem(f"{path}.{k}", f"unknown key{did_you_mean(str(k), ('type', 'choices'))} "
                            f"(the {key} takes: type, choices)"))
    choices = raw.get("choices")
    names = choices if isinstance(choices, list) and all(isinstance(c, str) for c in choices) else None
    if names and len(set(names)) == len(names):
        choices = {c: {} for c in names}  # choices searched without sub-spaces of their own
    if not isinstance(choices, dict) or not choices:
        problems.append(Problem(f"{path}.choices", f"expected a mapping of {key} names to their sub-spaces "
                        f"(each possibly {{}}), but got {choices!r}"))
        return None
    out: dict[str, dict[str, Param]] = {}
    for choice, sub in choices.items():
        sub_path = f"{path}.choices.{choice}"
        if sub is None:
            sub = {}
        if not isinstance(choice, str) or not isinstance(sub, dict):
            problems.append(Problem(f"{sub_path}", f"expected a {key} name mapped to a sub-space (a mapping, "
                            f"possibly {{}}), but got {choice!r}: {sub!r}"))
            continue
        out[choice] = {}
        for name, spec in sub.items():
            if name in CONDITIONAL_KEYS:
                where = "" if name == key else f"; search it at {path.rpartition('.')[0]}.{name}"
                problems.append(Problem(f"{sub_path}.{name}", f"a {key}'s sub-space cannot search the {name}{where}"))
                continue
            param = _parse_named(name, spec, sub_path, problems)
            if param is not None:
                out[choice][name] = param
    return out


def _conditional_problems(conditionals: dict[str, dict[str, dict[str, Param]]], params: dict[str, Param],
                          path: str) -> list[Problem]:
    """Optuna keeps one distribution per name in a study: a name shared by several methods
    (samplers) must keep its kind and log scale (and its choices, if categorical). A name
    belongs to one place: every trial, the method sub-spaces or the sampler sub-spaces."""
    problems = []
    owner: dict[str, str] = {}  # name -> the conditional key whose sub-spaces hold it
    for key, choices in conditionals.items():
        first: dict[str, tuple[str, Param]] = {}
        for choice, sub in choices.items():
            for name, param in sub.items():
                where = f"{path}.{key}.choices.{choice}.{name}"
                if name in params:
                    problems.append(Problem(f"{where}", f"also searched for every {key} at {path}.{name}; keep one of them"))
                elif owner.get(name, key) != key:
                    problems.append(Problem(f"{where}", f"also searched under {path}.{owner[name]}.choices; "
                                    f"keep one of them"))
                elif name not in first:
                    first[name] = (choice, param)
                    owner[name] = key
                elif not _compatible(first[name][1], param):
                    other, ref = first[name]
                    problems.append(Problem(f"{where}", f"Optuna keeps one distribution per name, so it must be "
                                    f"{_describe(ref)} as under {other!r}, but got {_describe(param)}"))
    return problems


def _compatible(first: Param, other: Param) -> bool:
    """Whether an Optuna study can hold both under one name (the same kind, log scale, and
    choices; Optuna's own rule, which a study applies when a trial suggests the name)."""
    from optuna.distributions import check_distribution_compatibility

    try:
        check_distribution_compatibility(first.distribution, other.distribution)
    except ValueError:
        return False
    return True


def _describe(p: Param) -> str:
    if p.kind == "categorical":
        return f"categorical with choices {list(p.choices)}"
    return f"{p.kind} with log: {str(p.log).lower()}"


def _parse_choices(raw: Any, bad: Any) -> tuple:
    if not isinstance(raw, list) or not raw:
        bad("choices", f"must be a non-empty list, but got {raw!r}")
        return ()
    choices = []
    for i, value in enumerate(raw):
        if isinstance(value, str):
            value = coerce(value, (float,))[0]  # "1e-4": PyYAML reads such numbers as strings
        if not isinstance(value, (str, int, float, bool)):
            bad(f"choices[{i}]", f"must be a string, a number or true/false, but got {value!r}")
        elif value in choices:  # == also matches 1 and true, which Optuna could not tell apart
            bad(f"choices[{i}]", f"must not repeat choices[{choices.index(value)}], but got {value!r}")
        choices.append(value)
    return tuple(choices)


def _number(raw: dict, key: str, types: tuple[type, ...], bad: Any) -> Any:
    if key not in raw or (key == "step" and raw[key] is None):
        if key != "step":
            bad(key, f"missing; a {'float' if float in types else 'int'} parameter needs low and high")
        return None
    value, ok = coerce(raw[key], types)
    if not ok:
        bad(key, f"expected {'a number' if float in types else 'an integer'}, but got {raw[key]!r}")
        return None
    if not math.isfinite(value):
        bad(key, f"must be finite, but got {value!r}")
        return None
    return value


def _distribution(kind: str, low: Any, high: Any, log: bool, step: Any, choices: tuple) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if kind == "float":
        return FloatDistribution(low, high, log=log, step=step)
    if kind == "int":
        return IntDistribution(low, high, log=log, step=1 if step is None else step)
    return CategoricalDistribution(choices)


# Optuna's constructors name the rule a range breaks; each is said here at its key, with the values.
# Optuna stops at the first: what broke it is then set aside (the last column) to find the next.
_OPTUNA_RULES = (  # (words of Optuna's message, key, kdtune's message, values that set it aside)
    ("not supported when `log` is true", "step", "cannot be combined with log: true (Optuna has no stepped log "
                                                 "scale), but got step={step!r}", {"step": None}),
    ("step is 1 when `log`", "step", "cannot be combined with log: true (Optuna has no stepped log scale), "
                                     "but got step={step!r}", {"step": None}),
    ("`low <= high` must hold", "low", "must be <= high, but got low={low!r}, high={high!r}", {"high": "low"}),
    ("`low > 0` must hold for `log=True`", "low", "must be > 0 when log is true, but got {low!r}", {"log": False}),
    ("`low >= 1` must hold for `log=True`", "low", "must be >= 1 when log is true, but got {low!r}", {"log": False}),
    ("`step > 0` must hold", "step", "must be {positive}, but got {step!r}", {"step": None}),
)


def _distribution_problems(p: Param) -> list[Problem]:
    """Problems of ``p``'s range: every rule of the distribution's constructor it breaks, then
    (when it breaks none) whether the distribution kept its high."""
    given = {"low": p.low, "high": p.high, "log": p.log, "step": p.step}
    shown = {**given, "positive": "> 0" if p.kind == "float" else ">= 1"}
    problems: list[Problem] = []
    for _ in range(len(_OPTUNA_RULES) + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna warns when it lowers high to the step's grid
                distribution = _distribution(p.kind, choices=p.choices, **given)
        except ValueError as e:
            rule = next((r for r in _OPTUNA_RULES if r[0] in str(e)), None)
            if rule is None:
                return [*problems, Problem("", str(e))]  # a rule of a newer Optuna: its own words
            _, key, message, aside = rule
            problems.append(Problem(key, message.format(**shown)))
            given.update({k: given[v] if v in given else v for k, v in aside.items()})
            continue
        if not problems and p.kind != "categorical" and distribution.high != p.high:
            problems.append(Problem("step", f"high - low must be a multiple of step, but got low={p.low!r}, "
                                            f"high={p.high!r}, step={p.step!r}"))
        break
    return sorted(problems, key=lambda found: ("low", "high", "step", "").index(found.path))


def _param_problems(p: Param) -> list[Problem]:
    if p.kind not in KINDS:
        return [Problem("kind", f"must be one of {', '.join(KINDS)}", p.kind)]
    if p.kind == "categorical":
        if not p.choices:
            return [Problem("choices", "must be a non-empty list", ())]
        return []
    number = (int, float) if p.kind == "float" else (int,)
    for key in ("low", "high", "step"):
        value = getattr(p, key)
        if (key != "step" or value is not None) and (isinstance(value, bool) or not isinstance(value, number)):
            return [Problem(key, f"expected {'a number' if p.kind == 'float' else 'an integer'}", value)]
    return _distribution_problems(p)
