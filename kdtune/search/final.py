"""From a search's best (or chosen) trial to a final model:
``kdtune train --from-search ray_results/NAME [--trial ID] [--final] [--seeds 3]``.

The trial's full run configuration (``run.yaml``, stored in its folder and its MLflow run when
the trial started) is re-run by :func:`kdtune.train.run` unchanged except for ``final`` (train
on train+val, evaluate on test) and the seed. The teacher stays the trial's: ``teacher_seed`` is
pinned to the value the trial's teacher was trained with, data and teacher are loaded once, and
a teacher that is no longer cached is trained again only with ``--train-teacher``.

Where it logs: ``--tracking-uri`` (or ``$MLFLOW_TRACKING_URI``), else the search's own store,
which must still exist and take writes (checked before seed 0; exit 2 otherwise). A search
folder that was moved or copied is found where it is: paths that pointed inside its old place
point inside the new one. Each seed writes ``final.json`` and the command ``summary.json``
whatever the store does (kdtune.search.final_tracking). The runs' mean ± std is printed: one seed
says little, on digits and CIFAR a 0.3 pp difference is about 2 sigma of seed noise.

MLflow is imported only here, so ``kdtune.train`` itself never loads it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from kdtune.config import ConfigError, RunConfig
from kdtune.search.records import (BEST_FILE, OBJECTIVE, OPTUNA_FILE, RESULTS_FILE, RUN_FILE, STATE_FILE,
                                   sqlite_file)

logger = logging.getLogger(__name__)
# a seed's own lines (epochs, teacher), bare as kdtune.train prints them (kdtune.logs)
run_lines = logging.getLogger("kdtune.train")



def flat_run_config(spec, trial_config: dict[str, Any]) -> dict[str, Any]:
    """A trial's full, resolved run settings as plain YAML-able values (what ``run.yaml`` holds)."""
    flat = spec.run_config(trial_config).flat()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def trial_folder(search: Path, trial_id: str) -> Path | None:
    found = [d for d in search.glob(f"*_{trial_id}_*") if d.is_dir()]
    return found[0] if found else None


def resolve_trial(search: Path, trial_id: str | None) -> tuple[str, dict[str, Any]]:
    """``(trial id, its run.yaml)`` of ``trial_id``, or of the search's best trial (best.json)."""
    if not (search / STATE_FILE).is_file():
        raise ConfigError([f"--from-search: {search} is not a kdtune search folder (no {STATE_FILE}; "
                           f"expected e.g. ray_results/<name>)"])
    if trial_id is None:
        best = search / BEST_FILE
        if not best.is_file():
            raise ConfigError([f"--from-search: {search} has no {BEST_FILE} (the search found no finished "
                               f"trial, or is still running); pick one with --trial ID from {search / RESULTS_FILE}"])
        trial_id = json.loads(best.read_text())["trial_id"]
    folder = trial_folder(search, trial_id)
    if folder is None or not (folder / RUN_FILE).is_file():
        known = sorted(d.name.split("_")[1] for d in search.glob("*_*_*") if (d / RUN_FILE).is_file())
        raise ConfigError([f"--from-search: --trial {trial_id}: no such trial with a {RUN_FILE} in {search} "
                           f"(trials: {', '.join(known) or 'none'})"])
    return trial_id, yaml.safe_load((folder / RUN_FILE).read_text())


def seeds_of(base: int, n: int) -> list[int]:
    return [base + i for i in range(n)]


def pin_teacher(config: dict[str, Any]) -> dict[str, Any]:
    """The trial's run settings with its teacher fixed: a teacher kdtune trained for the search
    was trained with the trial's ``teacher_seed`` (null: the trial's seed), so the re-runs keep
    that value whatever their own seed is, and distil from the very file the trial used."""
    seed = config.get("teacher_seed")
    return {**config, "teacher_seed": int(config["seed"]) if seed is None else seed}


def run_configs(config: dict[str, Any], final: bool, seeds: int, overrides: list[str], source: str):
    """``[(seed, RunConfig)]`` of the re-runs: the trial's settings, its teacher pinned, then
    ``--set`` values, then ``final`` and each seed."""
    from kdtune.config import parse_override

    values = pin_teacher(config)
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return [(seed, RunConfig.from_dict({**values, "final": final, "seed": seed}, source))
            for seed in seeds_of(int(values["seed"]), seeds)]


def original_folder(state: dict[str, Any]) -> Path | None:
    """Where the search's folder was when it ran (its state file says, or its Optuna study's path)."""
    if state.get("folder"):
        return Path(state["folder"])
    study = sqlite_file(state.get("optuna_storage") or "")
    return study.parent if study is not None and study.name == OPTUNA_FILE else None


def relocate(value: Any, old: Path | None, new: Path) -> Any:
    """A stored path or ``sqlite:///`` URI that pointed inside the search folder at ``old``, now
    pointing inside it at ``new`` (a moved or copied folder); anything else unchanged."""
    if not isinstance(value, str) or old is None or old == new:
        return value
    scheme = "sqlite:///" if value.startswith("sqlite:///") else ""
    path = value[len(scheme):]
    if path == str(old) or path.startswith(str(old) + os.sep):
        return scheme + str(new) + path[len(str(old)):]
    return value


def tracking_store(state: dict[str, Any], search: Path, given: str | None) -> str:
    """The store the re-runs log to: ``given`` (--tracking-uri, $MLFLOW_TRACKING_URI), else the
    search's own, which must still exist and take writes. Raises ConfigError (one line)."""
    from kdtune.search.preflight import PreflightError, check_tracking

    stored = relocate(state.get("tracking_uri"), original_folder(state), search)
    uri = given or stored
    if not uri:
        raise ConfigError([f"{search / STATE_FILE}: no tracking_uri stored; give one with --tracking-uri"])
    try:
        if not given and (db := sqlite_file(uri)) is not None and not db.is_file():
            raise PreflightError(f"the search's MLflow store {uri} no longer exists")
        check_tracking(uri)
    except PreflightError as e:
        hint = "" if given else "; log elsewhere with --tracking-uri URI (or $MLFLOW_TRACKING_URI)"
        raise ConfigError([f"{e}{hint}"]) from e
    return uri


def main(search_dir: str, trial: str | None, final: bool, seeds: int, output_dir: str | None,
         overrides: list[str], train_teacher: bool = False, tracking_uri: str | None = None) -> int:
    search = Path(search_dir).resolve()
    try:
        if seeds < 1:
            raise ConfigError([f"--seeds: expected a whole number >= 1, but got {seeds}"])
        trial_id, config = resolve_trial(search, trial)
        state = json.loads((search / STATE_FILE).read_text())
        old = original_folder(state)
        config = {k: relocate(v, old, search) for k, v in config.items()}
        runs = run_configs(config, final, seeds, overrides, str(trial_folder(search, trial_id) / RUN_FILE))
        uri = tracking_store(state, search, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    except ConfigError as e:
        print(f"error: {e.problems[0] if len(e.problems) == 1 else e}", file=sys.stderr)
        return 2
    from kdtune.run import load_data, load_teacher
    from kdtune.search.final_tracking import FinalTracker
    from kdtune.search.tracking import version_tags
    from kdtune.teachers import CheckpointError, TeacherNotCached
    from kdtune.train import RunInputError, run, write_json_atomic

    name = state["spec"]["name"]
    metric = state["spec"]["search"]["metric"]
    out_root = Path(output_dir or f"runs/{name}-{trial_id}" + ("-final" if final else "")).resolve()
    split = "test" if final else "val"
    seed_list = [seed for seed, _ in runs]
    logger.info(f"re-running trial {trial_id} of search {name} ({'final: train+val, test' if final else 'val'}) "
                f"with seeds {seed_list}; output {out_root}; MLflow {uri}")
    # The trial trained with as many torch threads as it had CPUs (the trainable sets them); CPU
    # kernels sum in another order with another thread count, so the re-run uses the same count.
    import torch

    torch.set_num_threads(int(max(1, state["spec"].get("resources", {}).get("cpus_per_trial", 1))))
    # Data and teacher once, before seed 0: every seed distils from the same teacher, and one
    # the search did not have is trained only when asked (--train-teacher).
    first = runs[0][1]
    try:
        data = load_data(first)
        teacher = load_teacher(first, data, train=train_teacher)
    except TeacherNotCached as e:
        print(f"error: {e}; the search's teacher is gone (another cache_dir, or the cache was cleared): "
              f"give its file with --set teacher_checkpoint=PATH, or add --train-teacher to train it again "
              f"with the same recipe and seed", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if teacher[1] is not None:
        logger.info(f"every seed distils from teacher {teacher[1].model} ({teacher[1].source}: "
                    f"{teacher[1].path})")
    tags = {k: v for k, v in version_tags().items() if k in ("kdtune.version", "mlflow.source.git.commit")}
    tracker = FinalTracker(uri, name, str(state.get("parent_run_id", "")), trial_id, final, tags)
    tracker.start()
    values, codes = [], []
    summary_file = out_root / "summary.json"
    summary = None
    try:
        for seed, cfg in runs:
            out = out_root / f"seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "log.txt").write_text("")

            def log(msg: str, out: Path = out) -> None:  # the terminal, and the seed's own log file
                run_lines.info(msg)
                with open(out / "log.txt", "a") as f:
                    f.write(msg + "\n")

            run_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.flat().items()}
            (out / RUN_FILE).write_text(yaml.safe_dump(run_cfg, sort_keys=False))
            rid = tracker.start_seed(seed, run_cfg)
            try:
                result = run(cfg, out, data=data, teacher=teacher, log=log,
                             on_epoch=lambda m, rid=rid: tracker.epoch(rid, m))
                code = 0 if result["status"] == "completed" else 1
            except RunInputError as e:
                logger.error(f"error: seed {seed}: {e}")
                result, code = {}, 2
            codes.append(code)
            tracker.end_seed(rid, out, "FINISHED" if code == 0 else "FAILED")
            values.append(result.get(f"{split}/acc1", math.nan))
        done = [v for v in values if math.isfinite(v)]
        if done:
            mean = statistics.fmean(done)
            std = statistics.stdev(done) if len(done) > 1 else math.nan
            spread = f" ± {std:.2f} (std over {len(done)} seeds)" if len(done) > 1 else " (1 seed: no spread)"
            logger.info(f"trial {trial_id}: {split}/acc1 {mean:.2f}{spread}; per seed "
                        + ", ".join(f"{v:.2f}" for v in values))
            summary = {"trial_id": trial_id, "search": name, "final": final, "split": split,
                       "objective": OBJECTIVE, "search_metric": metric, f"{split}/acc1": values,
                       "mean": mean, "std": std, "seeds": seed_list,
                       "teacher": None if teacher[1] is None else teacher[1].__dict__,
                       "tracking_uri": uri, "summary_run_id": tracker.summary_id, "seed_run_ids": tracker.seed_runs}
            write_json_atomic(summary_file, summary)
        tracker.end(summary, summary_file, "FINISHED" if all(c == 0 for c in codes) else "FAILED")
    except KeyboardInterrupt:
        tracker.abandon("KILLED")
        logger.warning(f"interrupted; the seeds that finished are in {out_root}")
        return 130
    except BaseException:
        tracker.abandon("FAILED")
        raise
    if tracker.failed is not None:
        logger.warning(f"MLflow logging failed ({tracker.failed}); the results are in {out_root}")
        return 1
    return 0 if all(c == 0 for c in codes) else 1
