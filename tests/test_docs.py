"""The docs: ``mkdocs build --strict`` builds docs/ (a broken link or anchor, or a page missing
from the nav, fails it), and the README's relative links, which MkDocs does not see, name files
that exist."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (it is in the dev extra: pip install -e '.[dev]')")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                        "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "methods" / "index.html").is_file()


def test_the_readmes_links_name_existing_files() -> None:
    readme = (ROOT / "README.md").read_text()
    links = [target for target in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in target]
    assert links, "the README links into docs/"
    for target in links:
        path, _, anchor = target.partition("#")
        assert (ROOT / path).is_file(), f"README links to {target}, which does not exist"
