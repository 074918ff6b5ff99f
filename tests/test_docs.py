"""The docs: ``mkdocs build --strict`` builds docs/ (a broken link or anchor, or a page missing
from the nav, fails it), the README's relative links, which MkDocs does not see, name files
that exist, and the tables generated from the declarations are what the code declares."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _generated_tables() -> list[tuple[str, str, str, Any]]:
    from kdtune import listing
    from kdtune.search import spec

    return [("methods.md", listing.README_BEGIN, listing.README_END, listing.markdown),
            ("training.md", listing.RUN_BEGIN, listing.RUN_END, listing.run_markdown),
            ("search-spaces.md", spec.MARKDOWN_BEGIN, spec.MARKDOWN_END, spec.markdown)]


@pytest.mark.parametrize("page, begin, end, generate", _generated_tables(), ids=[t[0] for t in _generated_tables()])
def test_generated_tables_are_what_the_code_declares(page: str, begin: str, end: str, generate: Any) -> None:
    from kdtune.listing import generated

    assert generated((ROOT / "docs" / page).read_text(), begin, end) == generate(), (
        f"docs/{page}'s generated table is stale: paste {generate.__module__}.{generate.__name__}() between its markers")


def test_generated_tables_cover_every_key() -> None:
    from kdtune.config import RUN_KEYS
    from kdtune.listing import run_markdown
    from kdtune.search.spec import FILE, SECTIONS, TOP, markdown

    run, search = run_markdown(), markdown()
    assert all(f"`{key}`" in run and entry.help for key, entry in RUN_KEYS.items())
    for schema in (FILE, TOP, *SECTIONS.values()):
        assert all(f"`{key}`" in search and entry.help for key, entry in schema.items())
    assert "|  | `lr` | float | 0.05 | > 0 | base learning rate |" in run
    assert "|  | `gpus_per_trial` | float | 0 | >= 0 |" in search and "`workers_per_trial`" in search
