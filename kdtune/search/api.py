"""``kdtune.search.run``: a search from Python, the library under ``kdtune search``.

    import kdtune.search
    result = kdtune.search.run("search_spaces/quickstart.yaml", overrides=["search.num_samples=4"])
    print(result.best_config, result.best_value)
    result.table.sort_values(result.objective_column, ascending=False).head()

Imports nothing heavy until it is called (``import kdtune.search`` stays cheap).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class SearchResult:
    """What a search left: its name and folder, whether it finished, its best trial (``best.json``:
    trial id, objective, hyperparameters and full run configuration) and the results table (one
    row per trial, the columns of ``results.csv``)."""

    name: str
    folder: Path
    interrupted: bool
    best: dict[str, Any] | None
    table: Any = field(repr=False)  # pandas.DataFrame

    @classmethod
    def of(cls, folder: Path, exit_code: int) -> "SearchResult":
        """The result of the search in ``folder`` that ended with ``exit_code`` (130: interrupted)."""
        import pandas as pd

        from kdtune.search.records import BEST_FILE, RESULTS_FILE

        best = json.loads((folder / BEST_FILE).read_text()) if (folder / BEST_FILE).is_file() else None
        table = pd.read_csv(folder / RESULTS_FILE) if (folder / RESULTS_FILE).is_file() else pd.DataFrame()
        return cls(folder.name, folder, exit_code == 130, best, table)

    @property
    def best_config(self) -> dict[str, Any] | None:
        """The best trial's searched hyperparameters (None: no trial finished)."""
        return None if self.best is None else self.best["params"]

    @property
    def best_value(self) -> float | None:
        return None if self.best is None else self.best["objective"]["value"]

    @property
    def pareto_front(self) -> list[dict[str, Any]] | None:
        """A search with several objectives (``search.objectives``): its Pareto front from
        ``best.json``, best first by the first objective, each trial's id, ``values`` (metric ->
        value), ``epochs`` and ``params``; None for a single-objective search or when no trial finished."""
        return None if self.best is None else self.best.get("pareto_front")

    @property
    def objective_column(self) -> str:
        """The results table's column of kdtune's objective (``final_<metric>``)."""
        from kdtune.search.records import objective_column

        return objective_column(self.best["objective"]["metric"] if self.best else "val/acc1")


def run(space: str | Path, *, overrides: Sequence[str] = (), storage_path: str = "ray_results",
        tracking_uri: str | None = None, address: str | None = None, resume: bool = False,
        optuna_storage: str | None = None, num_samples: int | None = None, max_concurrent: int | None = None,
        gpus_per_trial: float | None = None, cpus_per_trial: float | None = None,
        confirm_top_k: int | None = None, confirm_seeds: int | None = None, status_every: float = 30.0,
        verbose: bool = False) -> SearchResult:
    """Run the search ``space`` describes, as ``kdtune search`` does (the keyword arguments are its
    flags; ``overrides`` its ``--set`` values), and return what it found.

    Raises:
        kdtune.config.ConfigError: the space file or an override is invalid (every problem listed).
        kdtune.search.preflight.PreflightError: the search cannot start (resources, storage,
            tracking store, data or teacher checkpoint); nothing was made.
    """
    from kdtune.logs import default_handler
    from kdtune.search.driver import execute

    default_handler()  # progress lines, unless the program configured logging (kdtune.logs)
    code, folder = execute(options(space, overrides=overrides, storage_path=storage_path, tracking_uri=tracking_uri,
                                   address=address, resume=resume, optuna_storage=optuna_storage,
                                   num_samples=num_samples, max_concurrent=max_concurrent,
                                   gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial,
                                   confirm_top_k=confirm_top_k, confirm_seeds=confirm_seeds,
                                   status_every=status_every, verbose=verbose))
    return SearchResult.of(folder, code)


def options(space: str | Path, *, overrides: Sequence[str] = (), storage_path: str = "ray_results",
            tracking_uri: str | None = None, address: str | None = None, resume: bool = False,
            optuna_storage: str | None = None, num_samples: int | None = None, max_concurrent: int | None = None,
            gpus_per_trial: float | None = None, cpus_per_trial: float | None = None,
            confirm_top_k: int | None = None, confirm_seeds: int | None = None, status_every: float = 30.0,
            verbose: bool = False):
    """The options of ``kdtune search`` (what :func:`kdtune.search.driver.execute` reads) for these
    arguments, as :func:`run` takes them."""
    from argparse import Namespace

    return Namespace(space=str(space), overrides=list(overrides), storage_path=storage_path,
                     tracking_uri=tracking_uri, address=address, resume=resume, optuna_storage=optuna_storage,
                     num_samples=num_samples, max_concurrent=max_concurrent, gpus_per_trial=gpus_per_trial,
                     cpus_per_trial=cpus_per_trial, confirm_top_k=confirm_top_k, confirm_seeds=confirm_seeds,
                     status_every=status_every, verbose=verbose, dry_run=False)
