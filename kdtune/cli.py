"""The ``kdtune`` command: ``kdtune search|train|report|bench ...``, the same programs as
``python -m kdtune.search`` and friends.

Only the chosen command's module is imported, and each command parses its arguments before it
imports torch, Ray, MLflow or pandas, so every ``--help`` answers at once.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one line for the overview)
COMMANDS = {
    "search": ("kdtune.search.cli", "search hyperparameters of a distillation method (Ray Tune, Optuna, MLflow)"),
    "train": ("kdtune.train", "one distillation run without Ray; --final for the test-set run of a chosen configuration"),
    "report": ("kdtune.report", "tables and plots of one or more searches as markdown and HTML"),
    "bench": ("kdtune.bench", "throughput figures of the data pipeline and the training step"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    return ("usage: kdtune COMMAND [ARGS ...]\n\nknowledge-distillation hyperparameter search on PyTorch\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n`kdtune COMMAND --help` describes a command.\n\n"
            "examples:\n  kdtune search search_spaces/quickstart.yaml\n  kdtune train --list kd\n"
            "  kdtune report ray_results/quickstart-digits")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        from kdtune.versions import report

        print(report())  # what a bug report needs: versions, commit, CUDA devices
        return 0
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"kdtune: unknown command {command!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    sys.argv[0] = f"kdtune {command}"
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
