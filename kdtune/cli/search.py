"""``kdtune search SPACE.yaml``: its arguments, declared in a module that imports nothing heavy, so
that ``--help`` and usage errors answer before torch, Ray or MLflow load; then the search driver
(:func:`kdtune.search.driver.execute`, what :func:`kdtune.search.run` calls) runs the search."""
from __future__ import annotations

import argparse
import sys

HELP = "search hyperparameters of a distillation method (Ray Tune, Optuna, MLflow)"
DESCRIPTION = """kdtune search SPACE.yaml: search distillation hyperparameters. Ray Tune runs
the trials, Optuna's TPE proposes configurations, ASHA stops weak trials
early, and every trial is an MLflow run."""
EXAMPLES = """examples:
  kdtune search search_spaces/quickstart.yaml
  kdtune search search_spaces/kd.yaml --dry-run
  kdtune search search_spaces/kd.yaml --set fixed.epochs=120 --num-samples 32 --gpus-per-trial 0.25
  kdtune search search_spaces/kd.yaml --resume"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", help="search-space YAML file (see search_spaces/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the file by its dotted path, e.g. fixed.epochs=20 (repeatable)")
    p.add_argument("--num-samples", type=int, metavar="N", help="number of trials (sets search.num_samples)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="most trials running at once (sets search.max_concurrent)")
    p.add_argument("--gpus-per-trial", type=float, metavar="GPUS",
                   help="GPUs per trial: 0.25 packs 4 trials on a GPU; a whole number N > 1 runs each trial as N "
                        "data-parallel workers (sets resources.gpus_per_trial)")
    p.add_argument("--cpus-per-trial", type=float, metavar="CPUS", help="CPUs per trial (sets resources.cpus_per_trial)")
    p.add_argument("--confirm-top-k", type=int, metavar="K",
                   help="after the search, re-run the K best trials with more seeds and choose the best by its "
                        "mean over all seeds (the space file's confirm.top_k; 0: off)")
    p.add_argument("--confirm-seeds", type=int, metavar="N", help="more seeds per confirmed trial (confirm.seeds, default 3)")
    p.add_argument("--address", metavar="ADDRESS", help="Ray cluster to connect to (default: $RAY_ADDRESS, else a private local one)")
    p.add_argument("--storage-path", default="ray_results", metavar="PATH",
                   help="where searches keep their folders: a path (made absolute) or a URI (default ./ray_results)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search from --storage-path (the latest of its name: NAME, NAME-2, ...)")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="Optuna storage URL for the study (default: sqlite:///<storage>/<name>/optuna.db); "
                        "e.g. a shared PostgreSQL/MySQL database for a cluster")
    p.add_argument("--status-every", type=float, default=30.0, metavar="SECONDS",
                   help="print a status line this often (default 30)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved spec and translated space, then stop")


def run(args: argparse.Namespace) -> int:
    """The search ``args`` describe; a refusal (invalid file or override, a failed preflight
    check) is one line and exit 2, before anything is made."""
    from kdtune.config import ConfigError
    from kdtune.search.driver import execute
    from kdtune.search.preflight import PreflightError

    try:
        return execute(args)[0]
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
