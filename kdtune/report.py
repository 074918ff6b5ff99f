"""``kdtune report RESULTS [RESULTS ...]`` (or ``python -m kdtune.report``): a short report of one or several searches.

The command line lives here, importing nothing heavy, so ``--help`` and usage errors answer before
pandas and matplotlib load; the report itself is :mod:`kdtune.analysis.report`.
"""
from __future__ import annotations

import argparse
import sys


DESCRIPTION = """kdtune report: a short report of one or several searches (best configuration,
gap to the baselines and published numbers, parameter importance, cost, plots)
as report.md and report.html."""
EXAMPLES = """examples:
  kdtune report ray_results/quickstart-digits
  kdtune report ray_results/kd-run ray_results/kdas-run --out cmp --baseline none=93.1
  kdtune report quickstart-digits --tracking-uri sqlite:///mlflow.db"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kdtune report", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="a search folder <storage-path>/<name> (holds kdtune_search.json), or an MLflow experiment name")
    p.add_argument("--out", help="output folder (default: <folder>/report for one search folder, else ./kdtune_report)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for experiment names (default: $MLFLOW_TRACKING_URI, "
                                          "else sqlite:///./mlflow.db)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=VALUE",
                   help="a reference accuracy used when the searches have no such trials, e.g. none=93.1 "
                        "(the student alone) or kd=95.4 (plain KD); repeatable")
    p.add_argument("--bootstrap", type=_count, default=30, metavar="N",
                   help="resamples behind each parameter importance's 5-95 %% interval (default 30; 0: no interval)")
    return p.parse_args(argv)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parse_args(argv)  # exits on --help and usage errors
    from kdtune.analysis.report import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
