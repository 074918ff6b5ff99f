"""The search layer: search-space files (``spec``, ``space``), the searchers (Optuna TPE, random,
grid), the Ray Tune trainable, MLflow tracking and the search's records.

``kdtune search SPACE.yaml`` runs a search (:mod:`kdtune.search.driver`). Importing this
package imports neither Ray nor MLflow: the modules that need them (``searchers``, ``trainable``,
``tracking``, ``tune_space``) import them, and the driver loads those only once the spec is valid.
"""
