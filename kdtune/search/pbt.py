"""Population-based training (``scheduler.type: pbt | pb2``): which hyperparameters a trial may
change mid-run, how a mutation stays inside the search space, and each trial's mutation history.

PBT (Jaderberg et al. 2017; Ray Tune's ``PopulationBasedTraining``) runs a population of trials;
every ``perturbation_interval`` epochs a trial in the bottom ``quantile_fraction`` copies the
checkpoint of one in the top fraction (*exploit*) and continues with that trial's hyperparameters
mutated (*explore*: each multiplied by 0.8 or 1.2, or resampled with ``resample_probability``).
PB2 (Parker-Holder et al. 2020; Tune's ``PB2``) explores with a time-varying Gaussian-process
bandit over the parameters' bounds instead of random perturbations.

What a checkpoint allows: a mutated value takes effect on the copied weights, optimizer moments,
sampler and method state (KDTrainable.load_checkpoint keeps the trial's own hyperparameters over
the checkpoint's), so only values that shape no module and no data pipeline can change: the
optimizer's (lr, momentum, weight decay, the schedule's floor and decay rate) and the numeric
hyperparameters of the method and the sampler (temperature, kd_weight, DKD's alpha and beta,
KDAS's rates and periods, CTKD's curriculum), except the few that size or initialise a module.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kdtune.search.space import Param

# Run settings a mutation may change: read every epoch (the LR) or by the optimizer's step.
MUTABLE_RUN = ("lr", "momentum", "weight_decay", "lr_min", "lr_decay_rate")
# Numeric method hyperparameters that a checkpoint fixes: they size a module (its weights are in
# the checkpoint) or set only its initial value, which the copied state overrides.
FIXED_BY_CHECKPOINT = ("feat_dim", "temperature_hidden", "hint_layer", "theta_init", "init_pred_var")
POLICY_FILE = "pbt_policy_{trial_id}.txt"  # Tune's record of a trial's exploits (log_config)
METRIC_PREFIX = "pbt/"  # MLflow: pbt/<name>, the value a trial trained each epoch with
HISTORY_COLUMN = "mutations"  # results table: the trial's exploits, in order, one text
HISTORY_TAG = "kdtune.mutations"  # MLflow: the same text on the trial's run


def mutable(name: str, param: Param) -> str | None:
    """Why ``param`` cannot change mid-run, or None when it can."""
    from kdtune.config import RUN_KEYS

    if not param.numeric:
        return "a choice (PBT mutates numbers)"
    if name in FIXED_BY_CHECKPOINT:
        return "it sizes or initialises a module whose state the checkpoint holds"
    if name in RUN_KEYS and name not in MUTABLE_RUN:
        return f"a run setting a checkpoint fixes (mutable ones: {', '.join(MUTABLE_RUN)})"
    return None


class WithinSpace:
    """Tune's ``custom_explore_fn``: a mutated configuration brought back into the search space.
    PBT multiplies a value by 0.8 or 1.2 without looking at its range, and PB2's suggestions are
    floats; each mutated parameter is clipped to its bounds, put on its step, and made an int
    where the space says int. A module-level class: Tune pickles the scheduler with the search."""

    def __init__(self, params: list[Param]) -> None:
        self.params = params

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for p in self.params:
            if config.get(p.name) is not None:
                config[p.name] = p.nearest(config[p.name])
        return config


def build(spec, time_attr: str) -> Any:
    """Tune's PBT or PB2 scheduler for ``spec`` (``scheduler.type`` pbt or pb2), counting time in
    ``time_attr`` (kdtune.search.schedulers passes its own: this module is below it, read by
    spec.py's validation)."""
    from ray.tune.schedulers import PopulationBasedTraining

    params = [spec.space.params[name] for name in spec.mutate]  # PBT spaces have no sub-spaces (spec.py)
    # Synchronous: every trial pauses at each perturbation epoch until the whole population is
    # there, so a trial only ever copies a checkpoint of its own epoch. Asynchronous PBT lets a
    # trial copy one that is epochs ahead (or finished) when the population cannot all run at once,
    # as on a few CPUs, and its epochs then no longer count one schedule.
    if spec.scheduler == "pb2":
        from ray.tune.schedulers.pb2 import PB2  # imports scikit-learn (seconds): only for pb2

        return PB2(time_attr=time_attr, perturbation_interval=spec.perturbation_interval,
                   hyperparam_bounds={p.name: [p.low, p.high] for p in params}, synch=True,
                   quantile_fraction=spec.quantile_fraction, custom_explore_fn=WithinSpace(params))
    return PopulationBasedTraining(time_attr=time_attr, perturbation_interval=spec.perturbation_interval, synch=True,
                                   hyperparam_mutations={p.name: p.to_tune() for p in params},
                                   quantile_fraction=spec.quantile_fraction,
                                   resample_probability=spec.resample_probability,
                                   custom_explore_fn=WithinSpace(params))


def original_tags(trials: list) -> dict[str, str]:
    """Each Tune trial's original experiment tag -> its id (a perturbed trial's tag is the
    original one + "@perturbed[...]")."""
    return {t.experiment_tag.split("@")[0]: t.trial_id for t in trials}


def trial_history(trial, tags: dict[str, str], names: list[str]) -> list[dict[str, Any]]:
    """:func:`history` of a Tune ``trial`` (``tags``: :func:`original_tags` of its search's
    trials, made once by the caller). Tune writes the policy files in the
    driver's staging folder and copies them to the search's folder: after a --resume the new
    staging folder holds only the trials exploited since, so the search's folder is read for
    the others."""
    folders = []
    try:
        folders.append(Path(trial.local_experiment_path))
    except AssertionError:  # Tune names its staging folder only while Ray is up
        pass
    if trial.path and "://" not in str(trial.path):
        folders.append(Path(trial.path).parent)
    for folder in folders:
        if (folder / POLICY_FILE.format(trial_id=trial.trial_id)).is_file():
            return history(folder, trial.trial_id, names, tags)
    return []


def history(experiment: Path, trial_id: str, names: list[str], tags: dict[str, str]) -> list[dict[str, Any]]:
    """The exploits behind a trial's final weights, oldest first, from Tune's policy file: each
    ``{"epoch", "from_trial", "changes": {name: [old, new]}}``. The file is the lineage of the
    weights (Tune copies the cloned trial's file before adding the new step), so a trial that
    copied one that had itself copied another lists both steps. ``tags``: each trial's original
    experiment tag ("3_lr=0.05") -> its id, since the file names trials by tag."""
    path = Path(experiment) / POLICY_FILE.format(trial_id=trial_id)
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            _, clone_tag, epoch, clone_epoch, clone_config, new_config = json.loads(line)
        except (ValueError, TypeError):
            continue  # a line cut short by a killed search
        changes = {n: [clone_config.get(n), new_config.get(n)] for n in names
                   if clone_config.get(n) != new_config.get(n)}
        # the population's epoch (synchronous PBT: both trials are there; Tune has read the clone's
        # as 0 for a trial paused at that moment)
        steps.append({"epoch": max(int(epoch or 0), int(clone_epoch or 0)), "from_trial": tags.get(clone_tag, clone_tag), "changes": changes})
    return steps


def history_text(steps: list[dict[str, Any]]) -> str:
    """``epoch 2 from 3f2a9c01: lr 0.05 -> 0.06; epoch 4 from ...`` (empty: never exploited)."""
    def num(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)

    return "; ".join(f"epoch {s['epoch']} from {s['from_trial']}: "
                     + (", ".join(f"{n} {num(a)} -> {num(b)}" for n, (a, b) in s["changes"].items()) or "no change")
                     for s in steps)
