"""The layers stay apart: the core (one distillation run) imports neither Ray, Optuna nor MLflow,
so it runs on a machine that has torch alone; the search and analysis packages load those only
where they are used."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("ray", "mlflow", "optuna")


def imported_after(code: str) -> set[str]:
    check = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True,
                         timeout=120).stdout.strip()
    return set(filter(None, out.split(",")))


def test_core_imports_no_search_stack() -> None:
    core = ("config data engine teachers sampling run registry plugins train bench models distillers "
            "distillers.sakd distillers.ctkd distillers.feature").split()
    assert imported_after("\n".join(f"import kdtune.{m}" for m in core)) == set()


def test_core_source_never_names_the_upper_layers() -> None:
    from pathlib import Path

    import kdtune

    root = Path(kdtune.__file__).parent
    upper = ("kdtune.search", "kdtune.analysis")
    # train --from-search hands over to the search layer inside main(), never at import time
    # (test_core_imports_no_search_stack checks that); that one line is allowed.
    allowed = {"train.py": "        from kdtune.search.final import main as from_search\n",
               "bench.py": "        from kdtune.search.bench_search import main as bench_search\n"}

    def text(p: Path) -> str:
        return p.read_text().replace(allowed.get(str(p.relative_to(root)), "\0"), "")

    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.parts[len(root.parts)] not in ("search", "analysis", "report.py")
                 and any(f"import {u}" in text(p) or f"from {u}" in text(p) for u in upper)]
    assert offenders == []


def test_search_and_analysis_packages_import_lazily() -> None:
    assert imported_after("import kdtune.search, kdtune.search.spec, kdtune.search.space, kdtune.analysis") == set()
