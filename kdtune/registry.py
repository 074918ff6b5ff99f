"""One generic name -> builder registry, shared by models, datasets, methods and samplers."""
from __future__ import annotations

import inspect
from typing import Any, Callable

from kdtune.hparams import Schema, did_you_mean, schema_of


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the known names and the closest one."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """Maps lower-case names to builders (classes or factory functions).

    ``@MODELS.register()`` registers under the function's own name;
    ``@METHODS.register("kd")`` under an explicit one. Registering a name twice is an error.
    The ``$KDTUNE_PLUGINS`` modules are imported by the entry points (config validation,
    ``build_model``, ``build_distiller``, ``load_dataset``), after kdtune itself, so a plugin
    may import any kdtune module without a circular import.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(builder: Callable[..., Any]) -> Callable[..., Any]:
            key = name or builder.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._builders[key] = builder
            return builder

        return add

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self:
            raise UnknownNameError(self.unknown_message(name))
        return self._builders[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def unknown_message(self, name: object) -> str:
        return f"unknown {self.kind} {name!r}{did_you_mean(name, self.names(), 0.5)} known: {', '.join(self.names())}"

    def hparams(self, name: str) -> Schema:
        """The hyperparameters entry ``name`` declares (see :mod:`kdtune.hparams`)."""
        return schema_of(self.get(name))

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """The keyword parameters a builder takes (models' ``num_classes``, ``in_channels``)."""
        sig = inspect.signature(self.get(name))
        return {p.name: p for p in sig.parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY}
