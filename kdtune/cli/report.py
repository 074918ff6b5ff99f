"""``kdtune report``: its arguments, declared in a module that imports nothing heavy (``--help``
answers before pandas and matplotlib load), and the report: :mod:`kdtune.analysis.report`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HELP = "tables and plots of one or more searches as markdown and HTML"
log = logging.getLogger(__name__)

DESCRIPTION = """kdtune report: a short report of one or several searches (best configuration,
gap to the baselines and published numbers, parameter importance, cost, plots)
as report.md and report.html."""
EXAMPLES = """examples:
  kdtune report ray_results/quickstart-digits
  kdtune report ray_results/kd-run ray_results/kdas-run --out cmp --baseline none=93.1
  kdtune report quickstart-digits --tracking-uri sqlite:///mlflow.db"""


def add_arguments(p: argparse.ArgumentParser) -> None:
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

def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from kdtune import analysis
    from kdtune.analysis.report import default_out, parse_baselines, write_report

    try:
        baselines = parse_baselines(args.baseline)
        searches = analysis.load_searches(args.results, args.tracking_uri)
    except (analysis.SearchNotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out(searches)
    written = write_report(searches, out, baselines, bootstrap=args.bootstrap)
    log.info(f"report: {written['html']} ({len(written) - 2} plots; markdown: {written['md']})")
    return 0
