"""``kdtune`` commands as tests run them in this process: :func:`kdtune.cli.main`, what the
``kdtune`` console script calls, with the command's exit status and output. A new interpreter
costs 4-5 s of CPU to import torch and kdtune, so each command path keeps one test in a real
process (test_train_cli, test_cli, the searches) and the others call it here."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def run_here(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> subprocess.CompletedProcess:
    """``kdtune ARGS`` in this process, in ``cwd``: its exit status and its output, as
    ``subprocess.run`` gives them."""
    from kdtune.cli import main
    from kdtune.logs import configure

    capsys.readouterr()
    monkeypatch.chdir(cwd)
    try:
        code = main(list(args))
    finally:
        configure()  # as the tests' conftest left it
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["kdtune", *args], code, out, err)
