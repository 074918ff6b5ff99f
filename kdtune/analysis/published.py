"""Published accuracies of the reference methods (``kdtune/published.yaml``), as a DataFrame.

One row per (source, method, pair): ``dataset``, ``teacher`` (None for a model trained alone),
``student``, ``method``, ``acc1``, ``time_change`` (KDAS's reported wall-clock change, %, else
NaN), ``source``, ``title``, ``url``. Methods are named the way kdtune runs them (:func:`variant`):
``kd``, ``dkd``, ``ctkd``, with ``+ls`` for logit standardization and ``+kdas`` for the KDAS
sampler; ``none`` is a model trained without a teacher. Every number is a test-set accuracy; a
result's ``dataset`` is the file's unless the result names its own (ImageNet's rows).
"""
from __future__ import annotations

import functools
import math
from importlib import resources
from typing import Any

import pandas as pd
import yaml

COLUMNS = ["dataset", "teacher", "student", "method", "acc1", "time_change", "source", "name", "title", "url"]
# How the papers name kdtune's methods, for sentences such as "published KD + CTKD 73.52".
LABELS = {"none": "student alone", "kd": "KD", "dkd": "DKD", "ctkd": "KD + CTKD", "ctkd_dkd": "DKD + CTKD",
          "kd+ls": "KD + LS", "dkd+ls": "DKD + LS", "ctkd+ls": "CTKD + LS", "kd+ls+kdas": "LS + KDAS",
          "kd+kdas": "KD + KDAS", "dkd+kdas": "DKD + KDAS", "mlkd": "MLKD", "mlkd+ls": "MLKD + LS",
          "dist": "DIST", "wttm": "WTTM", "crd": "CRD", "reviewkd": "ReviewKD"}


def variant(method: str, logit_stand: Any = False, sampler: Any = "none") -> str:
    """The published name of a run: its method, ``+ls`` with logit standardization, ``+kdas``
    with the KDAS sampler (missing values, as in other methods' trials, count as off)."""
    name = str(method)
    if _on(logit_stand):
        name += "+ls"
    if isinstance(sampler, str) and sampler == "kdas":
        name += "+kdas"
    return name


def label(name: str) -> str:
    return LABELS.get(name, name)


@functools.lru_cache(maxsize=1)
def _load() -> pd.DataFrame:
    text = resources.files("kdtune").joinpath("published.yaml").read_text()
    data = yaml.safe_load(text)
    rows = []
    for entry in data["results"]:
        source = data["sources"][entry["source"]]
        times = entry.get("time_change", {})
        for pair, acc in entry["acc1"].items():
            teacher, _, student = pair.rpartition(" -> ")
            rows.append({"dataset": entry.get("dataset", data["dataset"]), "teacher": teacher or None, "student": student,
                         "method": entry["method"], "acc1": float(acc),
                         "time_change": float(times.get(pair, math.nan)), "source": entry["source"],
                         "name": source["name"], "title": source["title"], "url": source["url"]})
    return pd.DataFrame(rows, columns=COLUMNS)


def published_results() -> pd.DataFrame:
    """Every published number (a copy: change it freely)."""
    return _load().copy()


def published_for(teacher: str | None, student: str, method: str, dataset: str = "cifar100") -> pd.DataFrame:
    """The published rows for this pair and method (``method`` as :func:`variant` names it); for
    ``none`` the student trained alone, whatever the teacher."""
    table = _load()
    match = (table["dataset"] == dataset) & (table["student"] == student) & (table["method"] == method)
    match &= table["teacher"].isna() if method == "none" else table["teacher"] == teacher
    return table[match].reset_index(drop=True)


def _on(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)
