"""The ``kdtune`` command dispatches to the same programs as ``python -m kdtune.X``, every --help
spells them ``kdtune X``, describes every flag and ends with examples, and the overview
imports nothing heavy (torch takes seconds to import; ``kdtune --help`` must not wait for it)."""
from __future__ import annotations

import subprocess
import sys


def kdtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdtune.cli", *args], capture_output=True, text=True, timeout=120)


def test_overview_lists_every_command_without_importing_torch() -> None:
    code = "import sys\nfrom kdtune import cli\ncli.main(['--help'])\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for command in ("search", "train", "report", "bench"):
        assert f"  {command} " in r.stdout
    assert r.stdout.strip().endswith("False")


def test_unknown_command_exits_2_with_a_hint() -> None:
    r = kdtune("serch")
    assert r.returncode == 2 and "unknown command 'serch'; did you mean 'search'?" in r.stderr
    assert kdtune().returncode == 2


def test_commands_run_their_programs() -> None:
    r = kdtune("report", "--help")
    assert r.returncode == 0 and "RESULTS" in r.stdout
    r = kdtune("search", "no-such-space.yaml")
    assert r.returncode == 2 and "no-such-space.yaml" in r.stderr


def test_every_commands_help_answers_before_torch_loads() -> None:
    # torch takes seconds to import: a --help that waits for it is not an answer "at once"
    for command in ("search", "train", "report", "bench"):
        code = (f"import sys\nfrom kdtune import cli\ntry:\n    cli.main([{command!r}, '--help'])\n"
                "except SystemExit as e:\n    assert e.code == 0, e.code\n"
                "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas') if m in sys.modules))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "usage:" in r.stdout and r.stdout.strip().endswith("[]"), (command, r.stdout[-200:])


def test_version_names_kdtune_its_libraries_python_cuda_and_the_commit() -> None:
    from importlib import metadata

    from kdtune.versions import git_commit

    r = subprocess.run([sys.executable, "-m", "kdtune.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("kdtune 0.") and lines[1].startswith("Python 3.")
    for name in ("torch", "torchvision", "ray", "optuna", "mlflow"):
        assert f"{name} {metadata.version(name)}" in lines, (name, lines)
    assert lines[-1].startswith("CUDA: torch built for ") and "devices: " in lines[-1]
    git = git_commit()
    if git is not None:  # a git checkout: the commit, as git says it
        assert f"(git {git[0][:12]}" in lines[0]


HELP_FOR = {"search": ["-m", "kdtune.search"], "train": ["-m", "kdtune.train"], "report": ["-m", "kdtune.report"],
            "bench": ["-m", "kdtune.bench"], "bench --search": ["-m", "kdtune.bench", "--search"],
            "bench --loader": ["-m", "kdtune.bench", "--loader"]}


def flags_without_help(text: str) -> list[str]:
    """Options in an argparse --help whose entry has no description: an option line with nothing
    after its invocation, and no indented description on the next line."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        described_here = "  " in line.strip()  # "--flag X   its help" on one line
        described_below = i + 1 < len(lines) and lines[i + 1].startswith(" " * 10) and not lines[i + 1].strip().startswith("-")
        if not (described_here or described_below):
            missing.append(line.strip())
    return missing


def test_every_help_spells_kdtune_x_describes_every_flag_and_ends_with_examples() -> None:
    for command, args in HELP_FOR.items():  # python -m kdtune.X still works, and says kdtune X
        r = subprocess.run([sys.executable, *args, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"usage: kdtune {command} "), r.stdout[:200]
        assert "python -m" not in r.stdout and "``" not in r.stdout, command  # one spelling, no raw reST
        assert flags_without_help(r.stdout) == [], (command, flags_without_help(r.stdout))
        examples = r.stdout.rstrip().split("\nexamples:\n")[-1].splitlines()
        assert len(examples) >= 2 and all(ln.startswith(f"  kdtune {command.split()[0]} ") for ln in examples), command
    bench = subprocess.run([sys.executable, "-m", "kdtune.bench", "--help"], capture_output=True, text=True, timeout=60)
    assert "--search " in bench.stdout  # the search-strategy benchmark is listed, not hidden
