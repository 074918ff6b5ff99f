"""Hyperparameters declared once: name, type, default, range or choices, one-line help.

A method (``kdtune.distillers``) or a sample policy (``kdtune.sampling``) lists its
hyperparameters in a :class:`Schema` of :func:`hp` entries::

    class MyKD(KD):
        hparams = Schema(gamma=hp(0.5, ge=0, le=1, help="share of the loss on hard samples"))
        drop_hparams = ("temperature",)   # inherited from KD, but not a knob here

The same entries declare every other key a user writes: :func:`declare` makes one a dataclass
field (``engine.Recipe``, ``config.RunConfig``) and :meth:`Schema.of` reads them back; the search
file's sections (``kdtune.search.spec``) are Schemas too. Flags say what a key is beyond its
value: ``path`` (a file or folder, made absolute where a search file is read) and
``not_searchable`` (why a search must not vary it).

A subclass inherits its parents' entries (``hparams`` adds to them, ``drop_hparams`` removes
some), so nothing is written twice. Parameters with a default that a constructor spells out in
its signature, positional or keyword, count as declared too (typed by their default). Everything else reads the schema: the constructors (each
hyperparameter becomes an attribute of the same name), ``RunConfig`` and search-spec
validation, ``--list``, the docs' table, MLflow params and the results table.

Validation returns :class:`Problem` records (YAML path, rule, value), turned into text once,
where the input came from (a file, a ``--set``).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator


# --------------------------------------------------------------------------- problems

class _NoValue:
    def __repr__(self) -> str:
        return "<no value>"


NO_VALUE: Any = _NoValue()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where (a dotted YAML path such as ``fixed.temperature``;
    empty for the input as a whole), the rule it breaks, and the value found (if any).

    ``source`` names where the value came from (a file, ``--set KEY=VALUE``) when that differs
    from the input's own source; :func:`render` uses it.
    """

    path: str
    rule: str
    value: Any = NO_VALUE
    source: str | None = None

    @property
    def message(self) -> str:
        """The rule and the value found, without the path."""
        return self.rule if self.value is NO_VALUE else f"{self.rule}, but got {self.value!r}"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __hash__(self) -> int:  # values may be lists: hash what the user reads
        return hash((self.path, self.message, self.source))

    def under(self, prefix: str) -> Problem:
        """The same problem one level down, e.g. ``temperature`` -> ``fixed.temperature``."""
        return dataclasses.replace(self, path=f"{prefix}.{self.path}" if self.path else prefix)

    def text(self, source: str) -> str:
        return f"{self.source or source}: {self}"


def render(problems: list[Problem], source: str) -> list[str]:
    """Problems as the lines users read, each naming its source; repeats dropped."""
    return list(dict.fromkeys(p.text(source) for p in problems))


def did_you_mean(word: Any, known: Any, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``word``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------- values

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


def type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             dict: "a mapping", list: "a list", tuple: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


# --------------------------------------------------------------------------- declarations

@dataclass(frozen=True)
class HP:
    """One hyperparameter (build it with :func:`hp`)."""

    default: Any
    help: str
    types: tuple[type, ...]
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    parse: Callable[[Any], Any] | None = None  # raises ValueError for a bad value
    null_means: str = ""  # what null stands for, when the default is null
    name: str = ""
    path: bool = False  # a file or folder (a search file's relative path is made absolute)
    not_searchable: str = ""  # why a search must not vary it (empty: it may be searched)
    why: str = ""  # the reason for the range, said with it when a value is outside
    required: bool = False  # no default: the input must give it (the default, None, is no value)

    def but(self, default: Any) -> HP:
        """The same hyperparameter with another default (checked against its rule)."""
        _, problems = self.validate(default, path="default")
        if problems:
            raise ValueError(f"{self.name or 'hp'}: the default breaks its own rule: {problems[0]}")
        return dataclasses.replace(self, default=default)

    @property
    def type(self) -> str:
        """The YAML type: float, int, bool, str, or a union such as ``float | null``."""
        names = {float: "float", int: "int", bool: "bool", str: "str", list: "list", tuple: "list",
                 type(None): "null", dict: "mapping"}
        return " | ".join(dict.fromkeys(names.get(t, t.__name__) for t in self.types))

    def rule(self) -> str:
        """The range or the choices, as the error messages and the docs say them."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        low = ("(", self.gt) if self.gt is not None else ("[", self.ge) if self.ge is not None else None
        high = (")", self.lt) if self.lt is not None else ("]", self.le) if self.le is not None else None
        if low and high:
            return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
        if low:
            return f"{'>' if low[0] == '(' else '>='} {_num(low[1])}"
        if high:
            return f"{'<' if high[0] == ')' else '<='} {_num(high[1])}"
        return ""

    def in_range(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return True
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def validate(self, value: Any, path: str | None = None) -> tuple[Any, list[Problem]]:
        """``(coerced value, problems)`` for a value given for this hyperparameter."""
        path = self.name if path is None else path
        if isinstance(value, bool) and str in self.types and self.choices and {"on", "off"} <= set(self.choices):
            # YAML 1.1 (PyYAML) reads an unquoted on/off as true/false: `teacher_cache: off`
            # means the choice "off", not a type error.
            value = "on" if value else "off"
        coerced, ok = coerce(value, self.types)
        if not ok and self.choices is not None:  # the choices say more than their type
            return value, [Problem(path, f"must be {self.rule()}", value)]
        if not ok:
            return value, [Problem(path, f"expected {type_name(self.types)}", value)]
        if coerced is None:
            return coerced, []
        if isinstance(coerced, float) and not math.isfinite(coerced):
            # YAML's .inf and .nan are floats, and no range below catches nan
            return value, [Problem(path, "expected a finite number", value)]
        if not self.in_range(coerced):
            null = f" (or null for {self.null_means})" if self.null_means else ""
            why = f" ({self.why})" if self.why else ""
            return coerced, [Problem(path, f"must be {self.rule()}{null}{why}", coerced)]
        if self.parse is not None:
            try:
                self.parse(coerced)
            except (ValueError, TypeError) as e:
                return coerced, [Problem(path, str(e))]
        return coerced, []


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else str(x)


def hp(default: Any, *, help: str, type: type | tuple[type, ...] | None = None,  # noqa: A002
       gt: float | None = None, ge: float | None = None, lt: float | None = None,
       le: float | None = None, choices: tuple | list | None = None,
       parse: Callable[[Any], Any] | None = None, null_means: str = "", path: bool = False,
       not_searchable: str = "", why: str = "", required: bool = False) -> HP:
    """A hyperparameter: its default, a one-line ``help``, and optionally its range
    (``gt``/``ge``/``lt``/``le``: >, >=, <, <=) or ``choices``.

    The type is the default's (an int default takes integers only, a float one any number)
    unless ``type`` says otherwise; ``null_means`` allows null and says what it stands for.
    ``parse`` validates values a range cannot describe (it raises ValueError). ``path`` marks a
    file or folder; ``not_searchable`` says why a search must not vary the key; ``why`` is the
    reason for the range, said with it when a value is outside. ``required`` (with default None):
    there is no default; the input must give a value (of ``type``).
    """
    if type is None:
        if default is None:
            raise TypeError("hp(None, ...) needs type= (what the value is when it is not null)")
        types: tuple[type, ...] = (builtins_type(default),)
    else:
        types = type if isinstance(type, tuple) else (type,)
    if (default is None and not required) or null_means:
        types = (*types, builtins_type(None)) if builtins_type(None) not in types else types
    spec = HP(default, help, types, gt, ge, lt, le, None if choices is None else tuple(choices), parse, null_means,
              path=path, not_searchable=not_searchable, why=why, required=required)
    if default is not None:
        _, problems = spec.validate(default, path="default")
        if problems:
            raise ValueError(f"hp: the default breaks its own rule: {problems[0]}")
    return spec


builtins_type = type


def declare(default: Any, *, help: str, factory: Callable[[], Any] | None = None, **rule: Any) -> Any:  # noqa: A002
    """A dataclass field declared by its :func:`hp` entry (read back with :meth:`Schema.of`).

    ``factory`` makes the dataclass's default when it is computed or mutable (``{}``, an
    environment variable); ``default`` is then what the docs and ``--list`` show.
    """
    entry = hp(default, help=help, **rule)
    if factory is None and isinstance(default, (dict, list)):
        factory = lambda: type(default)(default)  # noqa: E731 -- a fresh copy per instance
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"hp": entry})
    return dataclasses.field(default=default, metadata={"hp": entry})


class Schema:
    """An ordered, immutable set of named :class:`HP` entries."""

    def __init__(self, **entries: HP) -> None:
        for name, entry in entries.items():
            if not isinstance(entry, HP):
                raise TypeError(f"hyperparameter {name!r}: declare it with hp(default, help=...), "
                                f"not {entry!r}")
        self._entries = {name: dataclasses.replace(e, name=name) for name, e in entries.items()}

    @classmethod
    def of(cls, dataclass_type: type) -> Schema:
        """The entries of a dataclass whose fields are declared (:func:`declare`), in field order. A
        field declared otherwise is a mistake, refused here (where it is written)."""
        entries = {}
        for f in dataclasses.fields(dataclass_type):
            if "hp" not in f.metadata:
                raise TypeError(f"{dataclass_type.__name__}.{f.name}: declare it with declare(default, help=...)")
            entries[f.name] = f.metadata["hp"]
        return cls(**entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> HP:
        return self._entries[name]

    def __or__(self, other: Schema) -> Schema:
        """Both schemas' entries; ``other``'s win (and keep this one's order)."""
        return Schema(**{**self._entries, **other._entries})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self._entries == other._entries

    def __repr__(self) -> str:
        return f"Schema({', '.join(self._entries)})"

    def items(self) -> list[tuple[str, HP]]:
        return list(self._entries.items())

    def names(self) -> list[str]:
        return list(self._entries)

    def defaults(self) -> dict[str, Any]:
        return {name: e.default for name, e in self._entries.items()}

    def only(self, *names: str) -> Schema:
        return Schema(**{n: self._entries[n] for n in names})

    def without(self, *names: str) -> Schema:
        return Schema(**{n: e for n, e in self._entries.items() if n not in names})

    def with_defaults(self, **defaults: Any) -> Schema:
        """The same entries with other defaults (checked against their rules)."""
        return Schema(**{n: e.but(defaults[n]) if n in defaults else e for n, e in self._entries.items()})

    def validate(self, values: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
        """Given values coerced to their types, and every problem (paths: the names). Unknown
        names are the caller's to report (it knows the other keys a file may hold)."""
        out, problems = {}, []
        for name, value in values.items():
            if name in self._entries:
                out[name], found = self._entries[name].validate(value)
                problems += found
        return out, problems

    def resolve(self, values: dict[str, Any], owner: str = "") -> dict[str, Any]:
        """Every hyperparameter's value: the defaults, updated with ``values`` (coerced). Raises
        TypeError for an unknown name and ValueError for a bad value, as a constructor would."""
        unknown = [k for k in values if k not in self._entries]
        if unknown:
            raise TypeError(f"{owner or 'this'} takes no hyperparameter {unknown[0]!r}"
                            f"{did_you_mean(unknown[0], self._entries)} (takes: "
                            f"{', '.join(self._entries) or 'nothing'})")
        given, problems = self.validate(values)
        if problems:
            raise ValueError(f"{owner}: " + "; ".join(str(p) for p in problems))
        return {**self.defaults(), **given}


# --------------------------------------------------------------------------- the mixin

class Configurable:
    """Base of everything that declares hyperparameters (methods, sample policies).

    * ``hparams``: this class's own entries; the inherited ones are merged in (see module doc);
    * ``drop_hparams``: inherited entries this class does not take;
    * :meth:`check`: rules across several hyperparameters (``end_rate <= start_rate``). Every
      class's own ``check`` runs, parents' too, so overriding it never drops a parent's rules;
    * :meth:`set_hparams` (from ``__init__``) sets one attribute per hyperparameter.
    """

    hparams: ClassVar[Schema] = Schema()
    drop_hparams: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        merged = Schema()
        for base in reversed(cls.__bases__):
            merged = merged | getattr(base, "hparams", Schema())
        own = cls.__dict__.get("hparams", Schema())
        if not isinstance(own, Schema):
            raise TypeError(f"{cls.__name__}.hparams must be a Schema(name=hp(...), ...), not {own!r}")
        # A base's drops apply here too: a mixin (CTKD's learned temperature) drops a name that
        # the distiller it is mixed into (KD) brings.
        drops = {*cls.__dict__.get("drop_hparams", ()), *(d for b in cls.__bases__ for d in getattr(b, "drop_hparams", ()))}
        merged = merged.without(*drops) | own
        # A constructor that spells hyperparameters in its signature declares them there.
        init = cls.__dict__.get("__init__")
        cls.hparams = merged | signature_hparams(init, merged) if init is not None else merged

    def set_hparams(self, values: dict[str, Any]) -> None:
        for name, value in type(self).hparams.resolve(values, type(self).__name__).items():
            setattr(self, name, value)

    @classmethod
    def check(cls, params: dict[str, Any]) -> list[Problem | str]:
        """Problems across hyperparameters. ``params`` holds every hyperparameter (defaults
        filled in) whose value has the right type; return ``Problem("end_rate", "must be <=
        start_rate", ...)`` records (or ``"key: message"`` strings)."""
        return []

    @classmethod
    def problems(cls, given: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
        """``given`` coerced, and its problems: the schema's rules, then every ``check`` in
        the class hierarchy on the complete values."""
        coerced, problems = cls.hparams.validate(given)
        bad_type = {p.path for p in problems if p.rule.startswith("expected ")}
        full = {**cls.hparams.defaults(), **{k: v for k, v in coerced.items() if k not in bad_type}}
        for klass in cls.__mro__:
            rule = klass.__dict__.get("check")
            if rule is not None:
                problems += as_problems(rule.__get__(None, cls)(full))
        return coerced, list(dict.fromkeys(problems))


def as_problems(found: list[Problem | str]) -> list[Problem]:
    """``check`` results as Problems (a plain ``"key: message"`` string is accepted)."""
    out = []
    for item in found:
        if isinstance(item, Problem):
            out.append(item)
        else:
            path, sep, rule = str(item).partition(": ")
            out.append(Problem(path, rule) if sep else Problem("", str(item)))
    return out


_STRUCTURAL = {"self", "student", "teacher", "input_shape", "args", "kwargs"}


def signature_hparams(init: Any, known: Schema | None = None) -> Schema:
    """Hyperparameters a constructor (or a builder function) takes in its signature but no
    schema declares: every parameter with a default, positional or keyword (so none vanishes),
    typed by its default. A parameter without a default that is not structural (student,
    teacher, input shapes) cannot be set from a config: refused here, where it is written."""
    entries = {}
    for p in inspect.signature(init).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _STRUCTURAL or (known and p.name in known):
            continue
        if p.default is p.empty:
            if p.kind == p.KEYWORD_ONLY:
                raise TypeError(f"{getattr(init, '__qualname__', init)}: hyperparameter {p.name!r} has no "
                                f"default; give it one, or declare it with hp(default, help=...)")
            continue  # a required positional: something structural (shapes, a model)
        entries[p.name] = hp(p.default, help="", type=object if p.default is None else None)
    return Schema(**entries)


def schema_of(builder: Any) -> Schema:
    """A builder's hyperparameters: its ``hparams``, or for a plain function registered as a
    builder, its parameters after the structural ones (types from their defaults)."""
    declared = getattr(builder, "hparams", None)
    return declared if isinstance(declared, Schema) else signature_hparams(builder)


def notes(e: HP) -> str:
    """What null stands for and the flags, as ``" (null: ...; a path)"``, or ``""``."""
    found = ["required" if e.required else "", f"null: {e.null_means}" if e.null_means else "", "a path" if e.path else "",
             "not searchable" if e.not_searchable else ""]
    found = [n for n in found if n]
    return f" ({'; '.join(found)})" if found else ""


def table(rows: list[tuple[str, Schema]], what: str = "hyperparameter") -> str:
    """A Markdown table of declarations: owner, name, type, default, range, description (with
    what null stands for and the flags)."""
    lines = [f"| | {what} | type | default | range | what it does |", "|---|---|---|---|---|---|"]
    for owner, schema in rows:
        for name, e in schema.items():
            default = "—" if e.required else "null" if e.default is None else str(e.default).lower() if isinstance(e.default, bool) \
                else _num(e.default) if isinstance(e.default, float) \
                else str(list(e.default)) if isinstance(e.default, tuple) else str(e.default)  # YAML's form
            cells = [owner, f"`{name}`", e.type, default, e.rule() or "—", e.help + notes(e)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            owner = ""
    return "\n".join(lines)
