"""User extensions: modules named in ``$KDTUNE_PLUGINS`` are imported before any name is resolved.

A plugin registers its own models, datasets, methods or samplers with the usual decorators
(``@MODELS.register()``, ``@DATASETS.register("name")``, ``@METHODS.register("name")``,
``@SAMPLERS.register("name")``), so it works the same in ``kdtune train``, in the search
driver and in every Ray worker (workers inherit the environment variable). The registries
import the plugins at their first lookup, not when kdtune is imported, so a plugin may import
any kdtune module (``kdtune.config`` included). See docs/plugins.md and
``kdtune/examples/plugin.py``.
"""
from __future__ import annotations

import importlib
import os

_loaded: set[str] = set()


def load_plugins() -> None:
    for name in filter(None, (n.strip() for n in os.environ.get("KDTUNE_PLUGINS", "").split(","))):
        if name not in _loaded:
            _loaded.add(name)  # first: a plugin that looks names up while importing must not recurse
            try:
                importlib.import_module(name)
            except ImportError as e:
                _loaded.discard(name)
                raise ImportError(f"KDTUNE_PLUGINS: cannot import plugin module {name!r}: {e}") from e
            except Exception:
                _loaded.discard(name)  # tried again, and failing again, at the next lookup
                raise
