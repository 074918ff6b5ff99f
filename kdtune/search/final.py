"""From a search's best (or chosen) trial to a final model:
``kdtune train --from-search ray_results/NAME [--trial ID] [--final] [--seeds 3]``.

The trial's full run configuration (``run.yaml``, stored in its folder and its MLflow run when
the trial started) is re-run by ``kdtune.train`` unchanged except for ``final`` (train on
train+val, evaluate on test) and the seed. Each seed is logged as an MLflow run under the
search's experiment (tags ``kdtune.kind = final`` and ``kdtune.final_of = <trial id>``; not nested
under the search's parent run, whose children are its trials), and
the runs' mean ± std is printed: one seed says little, on digits and CIFAR a 0.3 pp difference
is about 2 sigma of seed noise.

MLflow is imported only here, so ``kdtune.train`` itself never loads it.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kdtune.config import ConfigError, RunConfig
from kdtune.search.records import BEST_FILE, OBJECTIVE, RESULTS_FILE, RUN_FILE, STATE_FILE

FINAL_TAG = "kdtune.final_of"  # on a final run: the trial id it re-runs


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


def main(search_dir: str, trial: str | None, final: bool, seeds: int, output_dir: str | None,
         overrides: list[str]) -> int:
    search = Path(search_dir).resolve()
    try:
        if seeds < 1:
            raise ConfigError([f"--seeds: expected a whole number >= 1, but got {seeds}"])
        trial_id, config = resolve_trial(search, trial)
        RunConfig.from_dict(config, str(trial_folder(search, trial_id) / RUN_FILE))  # still valid here?
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from kdtune.train import main as train_main

    state = json.loads((search / STATE_FILE).read_text())
    name = state["spec"]["name"]
    metric = state["spec"]["search"]["metric"]
    out_root = Path(output_dir or f"runs/{name}-{trial_id}" + ("-final" if final else "")).resolve()
    split = "test" if final else "val"
    print(f"[kdtune] re-running trial {trial_id} of search {name} ({'final: train+val, test' if final else 'val'}) "
          f"with seeds {seeds_of(int(config['seed']), seeds)}; output {out_root}", flush=True)
    # The trial trained with as many torch threads as it had CPUs (the trainable sets them); CPU
    # kernels sum in another order with another thread count, so the re-run uses the same count.
    import torch

    torch.set_num_threads(int(max(1, state["spec"].get("resources", {}).get("cpus_per_trial", 1))))
    values, codes = [], []
    for seed in seeds_of(int(config["seed"]), seeds):
        out = out_root / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        run_cfg = {**config, "final": final, "seed": seed}
        path = out / RUN_FILE
        path.write_text(yaml.safe_dump(run_cfg, sort_keys=False))
        # kdtune.train's own entry point on the file, as if run by hand: it builds and seeds every
        # object afresh from the configuration, so nothing of a previous seed carries over.
        code = train_main([str(path), "--output-dir", str(out), *[a for o in overrides for a in ("--set", o)]])
        codes.append(code)
        result = json.loads((out / "final.json").read_text()) if (out / "final.json").is_file() else {}
        value = result.get(f"{split}/acc1", math.nan)
        values.append(value)
        log_final_run(state, trial_id, run_cfg, out, result, code)
    done = [v for v in values if math.isfinite(v)]
    if done:
        mean = statistics.fmean(done)
        std = statistics.stdev(done) if len(done) > 1 else math.nan
        spread = f" ± {std:.2f} (std over {len(done)} seeds)" if len(done) > 1 else " (1 seed: no spread)"
        print(f"[kdtune] trial {trial_id}: {split}/acc1 {mean:.2f}{spread}; per seed "
              + ", ".join(f"{v:.2f}" for v in values))
        summary = {"trial_id": trial_id, "search": name, "final": final, "split": split,
                   "objective": OBJECTIVE, "search_metric": metric, f"{split}/acc1": values,
                   "mean": mean, "std": std, "seeds": seeds_of(int(config["seed"]), seeds)}
        (out_root / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0 if all(c == 0 for c in codes) else 1


def log_final_run(state: dict[str, Any], trial_id: str, config: dict[str, Any], out: Path,
                  result: dict[str, Any], code: int) -> None:
    """One MLflow run per seed under the search's experiment."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from kdtune.search.tracking import experiment_id

    client = MlflowClient(state["tracking_uri"])
    exp = experiment_id(client, state["spec"]["name"])
    parent = state["parent_run_id"]
    parent_tags = client.get_run(parent).data.tags
    tags = {"kdtune.search_run": parent, FINAL_TAG: trial_id, "kdtune.kind": "final" if config["final"] else "rerun",
            **{k: v for k, v in parent_tags.items() if k in ("kdtune.version", "mlflow.source.git.commit")}}
    run = client.create_run(exp, run_name=f"final-{trial_id}-seed{config['seed']}", tags=tags)
    rid = run.info.run_id
    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, int(result.get("epochs", 0)))
               for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("epoch", "epochs", "lr") and math.isfinite(v)]
    # Params: the whole configuration (a final run has no searched/fixed split).
    params = [Param(k, str(v)) for k, v in config.items()]
    client.log_batch(rid, metrics=metrics, params=params)
    client.log_dict(rid, config, RUN_FILE)
    for name in ("final.json", "metrics.jsonl"):
        if (out / name).is_file():
            client.log_artifact(rid, str(out / name))
    mlflow.flush_async_logging()
    client.set_terminated(rid, status="FINISHED" if code == 0 else "FAILED")
