"""The ``kdtune`` command: one argparse tree that ``python -m kdtune.X`` runs too; every --help
spells its command ``kdtune X``, describes every flag and ends with examples; the overview and
the helps import nothing heavy (torch takes seconds to import; ``kdtune --help`` must not wait
for it); exit codes tell bad input (2) from a bug (1, with its traceback) and an interruption
(130); kdtune's lines go through ``logging``, so that a library user can silence them."""
from __future__ import annotations

import subprocess
import sys


def kdtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdtune.cli", *args], capture_output=True, text=True, timeout=120)


def test_overview_lists_every_command_without_importing_torch() -> None:
    code = ("import sys\nfrom kdtune import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for command in ("search", "train", "report", "bench"):
        assert f"  {command} " in r.stdout
    assert r.stdout.strip().endswith("False")


def test_unknown_command_exits_2_with_a_hint() -> None:
    r = kdtune("serch")
    assert r.returncode == 2 and "unknown command 'serch'; did you mean 'search'?" in r.stderr
    assert kdtune().returncode == 2


def test_commands_run_their_programs(capsys) -> None:
    r = kdtune("report", "--help")
    assert r.returncode == 0 and "RESULTS" in r.stdout
    # the search's own refusal, through the same tree in this process (a subprocess imports torch
    # and Ray for it: 3 s of CPU); the search runs as a process in the tests that run searches
    from kdtune.cli import main

    assert main(["search", "no-such-space.yaml"]) == 2
    assert "no-such-space.yaml" in capsys.readouterr().err


def test_every_commands_help_answers_before_torch_loads() -> None:
    # torch takes seconds to import: a --help that waits for it is not an answer "at once"
    for command in ("search", "train", "report", "bench"):
        code = (f"import sys\nfrom kdtune import cli\ntry:\n    cli.main([{command!r}, '--help'])\n"
                "except SystemExit as e:\n    assert e.code == 0, e.code\n"
                "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas') if m in sys.modules))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "usage:" in r.stdout and r.stdout.strip().endswith("[]"), (command, r.stdout[-200:])


def test_version_names_kdtune_its_libraries_python_cuda_and_the_commit(capsys) -> None:
    from importlib import metadata

    from kdtune.cli import main
    from kdtune.versions import git_commit

    # in this process: kdtune.versions.report imports what it reports on itself (a subprocess cost
    # 3 s of CPU to import torch for the CUDA line)
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert err == "", err
    lines = out.splitlines()
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


def tree_parsers():
    """Every parser of the tree: ``kdtune``, each command, and each search-layer benchmark of
    ``kdtune bench`` (those parse their own flags; captured at the moment they would parse)."""
    import argparse

    from kdtune import cli
    from kdtune.cli import bench

    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {"kdtune": top, **{f"kdtune {name}": p for name, p in sub.choices.items()}}

    class Captured(Exception):
        pass

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    for flag, _ in bench.MODES:
        argv = [flag, "x"] if flag == "--record-curves" else ["--search", flag, "x"] if flag == "--replay" else [flag]
        original = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = capture
        try:
            bench.mode(argv)(argv)
        except Captured as e:
            parsers[e.args[0].prog] = e.args[0]
        finally:
            argparse.ArgumentParser.parse_args = original
    return parsers


def test_every_action_of_the_tree_has_help_and_every_help_ends_with_examples() -> None:
    import argparse

    parsers = tree_parsers()
    assert {"kdtune bench --search", "kdtune bench --overhead", "kdtune bench --winners-curse",
            "kdtune bench --record-curves", "kdtune bench --search --replay"} <= set(parsers)
    for prog, parser in parsers.items():
        assert prog.startswith("kdtune"), prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(c.help for c in action._choices_actions), prog
                continue
            selector = any(f"--{word.strip()}" in action.option_strings for word in prog.split("--")[1:])
            # hidden only where the flag names the benchmark itself (its prog says it)
            assert action.help and (action.help != argparse.SUPPRESS or selector), (prog, action.option_strings)
        assert "``" not in (parser.description or "") and "python -m" not in (parser.description or ""), prog
        examples = (parser.epilog or "").rstrip().split("examples:\n")[-1].splitlines()
        assert len(examples) >= 2 and all(line.startswith("  kdtune ") for line in examples), prog


def test_an_unexpected_exception_shows_its_traceback_and_exits_1(tmp_path) -> None:
    code = ("import sys\nimport kdtune.search.driver as d\n"
            "def boom(args):\n    raise RuntimeError('a bug, not bad input')\n"
            "d.execute = boom\nfrom kdtune.cli import main\nsys.exit(main(['search', 'x.yaml']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and "RuntimeError: a bug, not bad input" in r.stderr
    assert "error: a bug" not in r.stderr


def test_bad_input_exits_2_and_an_interruption_130(monkeypatch, capsys) -> None:
    import kdtune.search.driver as driver
    from kdtune.cli import main
    from kdtune.search.preflight import PreflightError

    def refuse(args):
        raise PreflightError("--storage-path x: not writable")

    monkeypatch.setattr(driver, "execute", refuse)
    assert main(["search", "x.yaml"]) == 2
    assert capsys.readouterr().err == "error: --storage-path x: not writable\n"

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "execute", interrupt)
    assert main(["search", "x.yaml"]) == 130


def test_verbose_and_quiet_set_kdtune_s_level(monkeypatch) -> None:
    import logging

    import kdtune.search.driver as driver
    from kdtune.cli import main
    from kdtune.logs import configure

    seen = []
    monkeypatch.setattr(driver, "execute", lambda args: seen.append(logging.getLogger("kdtune").level) or (0, None))
    try:
        for flag in ("--quiet", "--verbose", None):
            assert main(["search", "x.yaml", *([flag] if flag else [])]) == 0
    finally:
        configure()  # as the tests' conftest left it
    assert seen == [logging.WARNING, logging.DEBUG, logging.INFO]


def test_lines_keep_their_format_and_streams(capsys) -> None:
    import logging

    logging.getLogger("kdtune.search.driver").info("\nsearch x: 3 trials")
    logging.getLogger("kdtune.search.driver").warning("interrupted; continue with: kdtune search x.yaml --resume")
    logging.getLogger("kdtune.train").info("epoch   1/2  lr 0.1")
    logging.getLogger("kdtune.search.final").error("error: seed 1: no such file")
    out, err = capsys.readouterr()
    assert out == "\n[kdtune] search x: 3 trials\nepoch   1/2  lr 0.1\n"
    assert err == "[kdtune] interrupted; continue with: kdtune search x.yaml --resume\nerror: seed 1: no such file\n"


def test_silencing_the_kdtune_logger_silences_a_library_call(tmp_path, monkeypatch, capsys) -> None:
    import logging

    from kdtune.config import RunConfig
    from kdtune.train import run

    cfg = RunConfig.from_dict(dict(dataset="synthetic", val_size=16, method="none", student="resnet8", epochs=1,
                                   batch_size=16, device="cpu", dataset_options=dict(
                                       num_classes=4, image_size=8, channels=3, train_size=48, test_size=8)))
    run(cfg, tmp_path / "loud")
    assert "epoch   1/1" in capsys.readouterr().out  # progress by default
    logging.getLogger("kdtune").setLevel(logging.WARNING)  # as any library is silenced
    try:
        result = run(cfg, tmp_path / "quiet")
    finally:
        logging.getLogger("kdtune").setLevel(logging.INFO)
    assert result["status"] == "completed" and capsys.readouterr().out == ""


def test_a_library_call_installs_the_handler_only_where_logging_is_unconfigured(monkeypatch) -> None:
    import logging

    from kdtune.logs import Handler, default_handler

    kdtune, root = logging.getLogger("kdtune"), logging.getLogger()
    monkeypatch.setattr(kdtune, "handlers", [])
    level = kdtune.level
    kdtune.setLevel(logging.NOTSET)
    try:
        monkeypatch.setattr(root, "handlers", [logging.NullHandler()])  # the program configured logging
        default_handler()
        assert kdtune.handlers == [] and kdtune.level == logging.NOTSET
        monkeypatch.setattr(root, "handlers", [])  # nothing configured: kdtune's own, at INFO
        default_handler()
        assert [type(h) for h in kdtune.handlers] == [Handler] and kdtune.level == logging.INFO
    finally:
        kdtune.setLevel(level)


def test_cache_command_refuses_a_run_without_the_crop_cache(tmp_path, capsys) -> None:
    from kdtune.cli import main

    run = tmp_path / "run.yaml"
    run.write_text("dataset: digits\nteacher: resnet8\nstudent: resnet8\nteacher_cache: auto\n")
    assert main(["cache", str(run)]) == 2
    assert f"{run}: teacher_cache: expected 'crops', but got 'auto'" in capsys.readouterr().err
