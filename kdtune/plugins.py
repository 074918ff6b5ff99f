"""User extensions: modules named in ``$KDTUNE_PLUGINS`` are imported before any name is resolved.

A plugin registers its own models, datasets or methods with the usual decorators
(``@MODELS.register()``, ``@DATASETS.register("name")``, ``@METHODS.register("name")``), so it
works the same in ``kdtune.train``, in the search driver and in every Ray worker (workers
inherit the environment variable).
"""
from __future__ import annotations

import importlib
import os

_loaded: set[str] = set()


def load_plugins() -> None:
    for name in filter(None, (n.strip() for n in os.environ.get("KDTUNE_PLUGINS", "").split(","))):
        if name not in _loaded:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ImportError(f"KDTUNE_PLUGINS: cannot import plugin module {name!r}: {e}") from e
            _loaded.add(name)
