"""Distillation methods, built by name from ``METHODS``."""
from __future__ import annotations

from kdtune.distillers import ctkd, dkd, kd  # noqa: F401  (registration)
from kdtune.distillers.base import METHODS, Distiller, Vanilla

__all__ = ["METHODS", "Distiller", "Vanilla", "build_distiller"]


def build_distiller(method: str, student, teacher, **hparams) -> Distiller:
    return METHODS.build(method, student, teacher, **hparams)
