"""``python -m kdtune.train`` end to end on digits: a training run and a refusal in a subprocess,
as a user runs them (exit status, the lines on stdout and stderr); the others through the same
command line in this process (:func:`kdtune.cli.main`, what ``python -m kdtune.train`` calls):
a new interpreter costs 4-5 s of CPU to import torch and kdtune."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commands import run_here


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdtune.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _train_here(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> subprocess.CompletedProcess:
    """``kdtune train ARGS`` in this process (tests/commands.py), as :func:`_train` gives it."""
    return run_here("train", *args, cwd=cwd, monkeypatch=monkeypatch, capsys=capsys)


def test_train_writes_metrics_checkpoint_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: digits\nteacher: resnet8\nstudent: resnet8\nmethod: kd\n"
                   "teacher_epochs: 2\nepochs: 2\nbatch_size: 128\ntemperature: 2.0\n"
                   f"cache_dir: {tmp_path / 'cache'}\n")
    out = tmp_path / "out"
    r = _train(str(cfg), "--output-dir", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epoch   2/2" in r.stdout and "teacher resnet8 (trained" in r.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    final = json.loads((out / "final.json").read_text())
    assert final["status"] == "completed" and final["epochs"] == 2
    student = torch.load(out / "student.pth", weights_only=True)
    assert "fc.weight" in student["model"]

    # continue the same run to 3 epochs: the teacher comes from the cache, epochs 1-2 are kept
    saved = re.sub(r"(?m)^epochs: 2$", "epochs: 3", (out / "config.yaml").read_text())
    (out / "config.yaml").write_text(saved)
    r = _train_here("--resume", "--output-dir", str(out), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "teacher resnet8 (cache" in r.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]


def test_resume_refuses_other_settings_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 3\n")
    r = _train(str(cfg), "--resume", "--output-dir", str(tmp_path / "o"), "--epochs", "5", "--data-root", "x",
               "--set", "lr=0.1", "--final", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for named in (f"config file {cfg}", "--epochs", "--data-root", "--set", "--final", "config.yaml"):
        assert named in r.stderr, (named, r.stderr)
    assert not (tmp_path / "o").exists()


def test_final_run_reports_test_accuracy(tmp_path: Path, monkeypatch, capsys) -> None:
    r = _train_here("--method", "none", "--student", "resnet8", "--epochs", "1", "--final",
                    "--output-dir", str(tmp_path / "f"), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert r.returncode == 0, r.stderr
    final = json.loads((tmp_path / "f" / "final.json").read_text())
    assert "test/acc1" in final and "best_test_acc1" in final and final["teacher"] is None


def test_bad_config_exits_2_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("method: kd\ntemperature: -1\nstudnet: resnet8\n")
    r = _train_here(str(cfg), "--output-dir", str(tmp_path / "o"), cwd=tmp_path, monkeypatch=monkeypatch,
                    capsys=capsys)
    assert r.returncode == 2
    assert f"{cfg}: temperature: must be > 0, but got -1.0" in r.stderr
    assert "studnet: unknown key; did you mean 'student'?" in r.stderr
    assert not (tmp_path / "o").exists()


def test_missing_cifar_exits_2_naming_the_root(tmp_path: Path, monkeypatch, capsys) -> None:
    r = _train_here("--dataset", "cifar100", "--data-root", str(tmp_path / "data"), cwd=tmp_path,
                    monkeypatch=monkeypatch, capsys=capsys)
    assert r.returncode == 2
    assert str(tmp_path / "data") in r.stderr and "cifar-100-python/train" in r.stderr
