"""The search layer: search-space files (``spec``, ``space``), the searchers (Optuna TPE, random,
grid), the Ray Tune trainable, MLflow tracking and the search's records.

``kdtune search SPACE.yaml`` runs a search (:mod:`kdtune.search.driver`); from Python,
``kdtune.search.run(space, ...)`` runs the same and returns a :class:`SearchResult`
(:mod:`kdtune.search.api`). Importing this package imports neither Ray nor MLflow: the modules
that need them (``searchers``, ``trainable``, ``tracking``, ``tune_space``) import them, and the
driver loads those only once the spec is valid.
"""
from kdtune.search.api import SearchResult, run

__all__ = ["SearchResult", "run"]
