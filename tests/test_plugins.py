"""The example plugin (kdtune/examples/plugin.py) through the commands a user runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdtune.data import DATASETS, RawData, digits, load_dataset

PLUGIN = "kdtune.examples.plugin"
RUN = {"dataset": "digits_subset", "dataset_options": {"classes": 5}, "teacher": "tiny_cnn",
       "teacher_epochs": 1, "student": "tiny_cnn", "method": "kd_ramp", "ramp_epochs": 1,
       "sampler": "confidence", "power": 2, "epochs": 2, "batch_size": 128}


def _env() -> dict[str, str]:
    e = dict(os.environ, KDTUNE_PLUGINS=PLUGIN, PYTHONUNBUFFERED="1")
    e.pop("RAY_ADDRESS", None)
    return e


def _train(tmp_path: Path, values: dict, *extra: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**values, "cache_dir": str(tmp_path / "cache")}))
    return subprocess.run([sys.executable, "-m", "kdtune.train", str(cfg), "--output-dir", str(tmp_path / "out"),
                           *extra], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)


def test_plugin_method_sampler_model_and_dataset_train(tmp_path: Path) -> None:
    r = _train(tmp_path, RUN)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    epochs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in epochs] == [1, 2]
    # the plugin's own epoch metrics: the ramp (ramp_start 0.2 -> 1 over one epoch) and the weights
    assert [m["kd_ramp/factor"] for m in epochs] == [pytest.approx(0.2), pytest.approx(1.0)]
    assert all(0.1 <= m["confidence/mean_weight"] < 1 for m in epochs)  # floor 0.1; p_t(y)^2 < 1 somewhere
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (saved["ramp_epochs"], saved["power"], saved["temperature"] if "temperature" in saved else 4.0) == (1, 2.0, 4.0)
    state = torch.load(tmp_path / "out" / "student.pth", weights_only=True)["model"]
    assert state["fc.weight"].shape == (5, 32)  # the dataset option reached the plugin dataset


def test_plugin_hyperparameters_are_validated_before_any_work(tmp_path: Path) -> None:
    # One process (each costs 4-5 s of CPU to import torch and kdtune) runs what two runs of
    # `python -m kdtune.train` did, through the same kdtune.cli.main: first `--list kd_ramp` (its
    # plugin loaded by the listing's own lookup, in a fresh process), then the refused run (its
    # exit status is the process's).
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**RUN, "ramp_start": 2, "ramp_epochs": 0, "powr": 1, "logit_stand": "yes",
                                   "cache_dir": str(tmp_path / "cache")}))
    code = ("import sys\nfrom kdtune.cli import main\n"
            "print('--list exit status', main(['train', '--list', 'kd_ramp']), flush=True)\n"
            f"sys.exit(main(['train', {str(cfg)!r}, '--output-dir', {str(tmp_path / 'out')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for line in ("run.yaml: ramp_start: must be in [0, 1], but got 2.0",
                 "run.yaml: ramp_start: must be 1 when ramp_epochs is 0 (there is no ramp), but got 2.0",
                 "run.yaml: powr: unknown key; did you mean 'power'?",
                 "run.yaml: logit_stand: expected true or false, but got 'yes'"):  # inherited from KD
        assert line in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    listed = r.stdout.partition("--list exit status")
    assert listed[2].strip() == "0" and "ramp_start" in listed[0] and "logit_stand" in listed[0], r.stdout


def test_a_dataset_builder_that_declares_root_gets_data_root(tmp_path: Path) -> None:
    seen = []

    @DATASETS.register("test_plugins_rooted")
    def rooted(*, root: str | None = None) -> RawData:
        seen.append(root)
        return digits()

    data = load_dataset("test_plugins_rooted", root=str(tmp_path), val_size=100)
    assert seen == [str(tmp_path)] and len(data.val) == 100


@pytest.mark.slow
def test_plugin_in_a_two_trial_search(tmp_path: Path, shared_ray, monkeypatch, capsys) -> None:
    """On the session's Ray instance, whose workers were started without the plugin: the search
    forwards KDTUNE_PLUGINS to them. The command in this process (the tests above run a plugin in
    a command's own), with a store it makes itself."""
    from searches import search_here

    space = {"name": "plugin", "fixed": {**RUN, "cache_dir": str(tmp_path / "cache")},
             "space": {"ramp_start": {"type": "categorical", "choices": [0.2, 1.0]}},
             # one trial at a time: a second trial process would cost seconds of imports on 2 cores
             "search": {"algorithm": "grid", "metric": "val/acc1", "mode": "max", "seed": 0, "max_concurrent": 1},
             "scheduler": {"type": "none"}, "resources": {"cpus_per_trial": 1}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    r = search_here(tmp_path, path, ray=shared_ray, env_extra={"KDTUNE_PLUGINS": PLUGIN}, seed=False,
                    monkeypatch=monkeypatch, capsys=capsys)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from mlflow import MlflowClient

    from kdtune.analysis import load_results

    table = load_results(tmp_path / "ray" / "plugin").set_index("ramp_start")
    assert (table["status"] == "completed").all() and len(table) == 2
    assert table.loc[1.0, "kd_ramp/factor"] == 1.0 and table.loc[0.2, "kd_ramp/factor"] == pytest.approx(1.0)
    assert table["confidence/mean_weight"].between(0.1, 1).all()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("plugin")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`kdtune.trial_id` != ''")
    assert len(runs) == 2
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "kd_ramp/factor")
        start = float(run.data.params["ramp_start"])
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [pytest.approx(start), pytest.approx(1.0)]
