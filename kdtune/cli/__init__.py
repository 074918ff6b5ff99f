"""The ``kdtune`` command: one argparse tree, ``kdtune search|train|report|bench|cache ...``.

Each command is a module of this package that declares its arguments once (``add_arguments``)
and runs the library under them (``run(args)``: :func:`kdtune.train.run`, the search driver
behind :func:`kdtune.search.run`, :func:`kdtune.analysis.report.write_report`,
:mod:`kdtune.benchmarks`). Those modules import nothing heavy at module level, so every
``--help`` and usage error answers before torch, Ray or MLflow load. ``python -m kdtune.search``
(and ``kdtune.train``, ``kdtune.report``, ``kdtune.bench``) run this same tree.

Exit status: 0 done; 1 failed (a diverged run, a failed seed, or an unexpected exception, whose
traceback is shown); 2 bad input (a usage error, or the one-line ``error: ...`` of an invalid
file, value or preflight check, before anything starts); 130 interrupted.

``kdtune bench`` has benchmarks that belong to the search layer, each with its own flags
(``--search``, ``--overhead``, ``--winners-curse``, ``--record-curves``; ``--search --replay``):
the flag names the benchmark, and its arguments go to that benchmark's parser
(:func:`kdtune.cli.bench.mode`), not through ``kdtune bench``'s own.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("search", "train", "report", "bench", "cache")  # each a module kdtune.cli.<name>

DESCRIPTION = "kdtune: knowledge-distillation hyperparameter search on PyTorch (Ray Tune, Optuna, MLflow)."
EXAMPLES = """`kdtune COMMAND --help` describes a command.

examples:
  kdtune search search_spaces/quickstart.yaml
  kdtune train --list kd
  kdtune report ray_results/quickstart-digits"""


def command(name: str):
    """The module of the command ``name`` (kdtune.cli.search, ...)."""
    return importlib.import_module(f"kdtune.cli.{name}")


def verbosity() -> argparse.ArgumentParser:
    """The options every command has: how much of kdtune's own logging shows (kdtune.logs)."""
    p = argparse.ArgumentParser(add_help=False)
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="more detail: kdtune's debug lines; for a search also Ray's and MLflow's own logging "
                           "and the trials' output")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="only warnings and errors (results and tables still print)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The whole tree: ``kdtune`` and one subparser per command, each declared by its module."""
    p = argparse.ArgumentParser(prog="kdtune", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action="store_true",
                   help="print kdtune's, its libraries' and CUDA's versions (what a bug report needs) and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    common = verbosity()
    for name in COMMANDS:
        module = command(name)
        parser = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION, epilog=module.EXAMPLES,
                                parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(run=module.run)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` (without the program name) parsed by the tree; exits 2 on a usage error and 0
    after --help, as argparse does."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        build_parser().print_help(sys.stderr)
        return 2
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"kdtune: unknown command {argv[0]!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if argv[0] == "bench" and (mode := command("bench").mode(argv[1:])) is not None:
        return _run(lambda: mode(argv[1:]), "--verbose" in argv, "--quiet" in argv)
    args = parse_args(argv)
    if args.version:
        from kdtune.versions import report

        print(report())
        return 0
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return 2
    return _run(lambda: args.run(args), args.verbose, args.quiet)


def _run(call, verbose: bool, quiet: bool) -> int:
    """Run a command with kdtune's log handler installed. Bad input is the command's own one-line
    ``error:`` and exit 2; anything else it raises propagates, so that its traceback shows and the
    exit status is 1 (a bug must not look like bad input)."""
    from kdtune.logs import configure

    configure(verbose=verbose, quiet=quiet)
    try:
        return call()
    except KeyboardInterrupt:  # where a command has no hint of its own: no traceback for Ctrl-C
        print("\ninterrupted", file=sys.stderr)
        return 130

