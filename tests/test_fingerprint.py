"""Refactors leave behaviour unchanged: model outputs and state dicts, every method's loss terms on
fixed inputs and a fixed-seed 2-epoch digits run per method match ``tests/data/fingerprint.json``
(made by ``tests/tools/fingerprint.py``, which says how and when to regenerate it)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def fingerprint(part: str) -> dict:
    # A subprocess: the script sets deterministic algorithms and one thread for itself only.
    # One part per test, so that the parts compute in parallel (pytest-xdist) and once each.
    out = subprocess.run([sys.executable, str(HERE / "tools" / "fingerprint.py"), part], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out)[part]


def _close(a, b, rel: float) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)
    return a == b


@pytest.mark.parametrize("part,rel", [("models", 0.0), ("losses", 1e-5), ("digits", 1e-4)])
def test_behaviour_matches_the_recorded_fingerprint(part: str, rel: float) -> None:
    expected = json.loads((HERE / "data" / "fingerprint.json").read_text())[part]
    got = fingerprint(part)
    assert sorted(got) == sorted(expected), "entries added or removed: regenerate deliberately"
    moved = {name: (got[name], want) for name, want in expected.items()
             if sorted(got[name]) != sorted(want)
             or not all(_close(got[name][k], v, rel) for k, v in want.items())}
    assert not moved, f"{part} changed: {moved}"
