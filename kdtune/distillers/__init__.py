"""Distillation methods, built by name from ``METHODS``."""
from __future__ import annotations

import inspect

from kdtune.distillers import crd, ctkd, dist, dkd, feature, kd, mlkd, reviewkd, sakd, wttm  # noqa: F401  (registration)
from kdtune.distillers.base import METHODS, Distiller, Vanilla
from kdtune.plugins import load_plugins

__all__ = ["METHODS", "Distiller", "Vanilla", "build_distiller"]


def build_distiller(method: str, student, teacher, *, input_shape=(3, 32, 32), **hparams) -> Distiller:
    """Method ``method`` over ``student`` and ``teacher``; ``input_shape`` is the images' (C, H, W)."""
    load_plugins()
    builder = METHODS.get(method)
    # Only builders that size modules from feature maps (the feature distillers' connectors)
    # take the input shape. It is a positional-or-keyword parameter there, not a keyword-only
    # one, so it is no hyperparameter (configs and search spaces never see it); builders that
    # do not declare it (kd, dkd, plugins) are called exactly as before.
    if "input_shape" in inspect.signature(builder).parameters:
        hparams["input_shape"] = tuple(input_shape)
    return builder(student, teacher, **hparams)
