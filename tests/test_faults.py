"""Bad input and faults, met as a user or a careless operator meets them.

Every case runs in its own tmp folder with its own ``RAY_TMPDIR`` and MLflow store, and checks
the exit status, the time taken, the one-line message, that no traceback was printed, that no
process it started is left (found among the test process's own descendants by a marker in
their environment, which every child of the command inherits: tests/processes.py), and that no
MLflow run is left RUNNING. The commands run as users run them, in a subprocess of their own
session; train, bench and report cases that start nothing run in-process (``main(argv)``),
which is much cheaper. Cases that start Ray are marked slow. What a running search must hold
(loopback only, one search per name, a clean Ctrl-C) is checked on test_search's interrupted
search, which runs anyway.
"""
from __future__ import annotations

import fcntl
import json
import os
import pickle
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import processes
import searches
from conftest import write_cifar

SPACE = {
    "name": "faults",
    "fixed": {"dataset": "digits", "teacher": "resnet8", "teacher_epochs": 1, "student": "resnet8",
              "method": "kd", "epochs": 2, "batch_size": 256, "seed": 0},
    "space": {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
    "search": {"algorithm": "random", "num_samples": 2, "max_concurrent": 1},
    "scheduler": {"type": "none"},
    "resources": {"cpus_per_trial": 1},
}
# Starting Python, torch and MLflow takes a few seconds; on a loaded 2-core box, much more.
# The limits are for "fails at once instead of hanging or working for minutes".
QUICK_S = 90


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    seconds: float
    leftovers: list[str]

    @property
    def text(self) -> str:
        return self.out + self.err


class Pwned:
    """A pickle that runs a command when loaded: touches ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def write_space(folder: Path, **changes) -> Path:
    """The case's space file, with the case's own teacher cache."""
    return searches.write_space(folder, SPACE, cache_dir=folder / "cache", **changes)


def _marked(marker: str) -> list[int]:
    """The test's processes that a case started (its marker in their environment)."""
    return processes.with_env(f"KDTUNE_FAULT_TEST={marker}")


def _wait_gone(marker: str, seconds: float = 20) -> list[str]:
    """Processes of the case still alive after ``seconds``; they are killed, and reported."""
    deadline = time.monotonic() + seconds
    while (pids := _marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [processes.describe(p) for p in pids]
    processes.kill(pids)
    return left


def case_env(folder: Path, marker: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="kdf", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    (folder / "ray_tmpdir").write_text(ray_tmp)
    env.update(RAY_TMPDIR=ray_tmp, KDTUNE_FAULT_TEST=marker, PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}")
    return env


def run_cli(folder: Path, module: str, *args: str, timeout: float = 300, prefix: tuple[str, ...] = (),
            env_extra: dict[str, str] | None = None) -> Outcome:
    marker = uuid.uuid4().hex
    env = case_env(folder, marker)
    env.update(env_extra or {})
    start = time.perf_counter()
    try:
        r = subprocess.run([*prefix, sys.executable, "-m", module, *args], cwd=folder, env=env,
                           capture_output=True, text=True, timeout=timeout, start_new_session=True)
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -1, str(e.stdout or ""), f"TIMEOUT after {timeout}s\n{e.stderr or ''}"
    seconds = time.perf_counter() - start
    leftovers = _wait_gone(marker)
    shutil.rmtree((folder / "ray_tmpdir").read_text(), ignore_errors=True)
    return Outcome(rc, out, err, seconds, leftovers)


def running_runs(folder: Path) -> list[str]:
    """MLflow runs left RUNNING in the case's own store (read with sqlite: no MLflow import)."""
    db = folder / "mlflow.db"
    if not db.exists():
        return []
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute("select run_uuid from runs where status = 'RUNNING'")]
    except sqlite3.OperationalError:  # no runs table: nothing was ever recorded
        return []
    finally:
        con.close()


def assert_clean_failure(o: Outcome, folder: Path, pattern: str, limit_s: float = QUICK_S) -> None:
    detail = f"rc {o.rc} in {o.seconds:.1f}s\nstdout: {o.out[-2000:]}\nstderr: {o.err[-3000:]}"
    assert o.rc == 2, detail
    assert "Traceback" not in o.text, detail
    assert re.search(pattern, o.err), f"expected {pattern!r} in stderr\n{detail}"
    error_lines = [line for line in o.err.splitlines() if line.startswith("error:")]
    assert error_lines and all(len(line) < 1000 for line in o.err.splitlines()), detail
    assert o.seconds < limit_s, detail
    assert not o.leftovers, f"processes left: {o.leftovers}"
    assert not running_runs(folder), "an MLflow run was left RUNNING"


def assert_no_trace(folder: Path) -> None:
    """A refused search made nothing: no storage folder, no MLflow store."""
    assert not (folder / "rr").exists(), sorted(str(p) for p in (folder / "rr").rglob("*"))
    assert not (folder / "mlflow.db").exists()


def search(folder: Path, space: Path | str, *args: str, **kw) -> Outcome:
    return run_cli(folder, "kdtune.search", str(space), "--storage-path", str(folder / "rr"), *args, **kw)


def refused_here(capsys, folder: Path, space: Path | str, *args: str) -> Outcome:
    """The search command in this process, for the cases it refuses before any trial (it starts
    no process), at a fraction of a subprocess's cost: its exit status, output, time and what it
    left running (tests/searches.py's ``search_here`` runs whole searches)."""
    from kdtune.cli import main as kdtune

    main = lambda argv: kdtune(['search', *argv])  # noqa: E731

    if "--tracking-uri" not in args:
        args = (*args, "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}")
    before = set(processes.children())
    start = time.perf_counter()
    try:
        rc = main([str(space), "--storage-path", str(folder / "rr"), *args])
    except SystemExit as e:  # argparse
        rc = e.code
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    return Outcome(rc, captured.out, captured.err, seconds, [processes.describe(p) for p in set(processes.children()) - before])


# ---------------------------------------------------------------------------- data files never run code


def test_cifar_reader_refuses_code_and_reads_every_pickle_protocol(tmp_path: Path) -> None:
    from kdtune.data import DataError, load_dataset

    folder = tmp_path / "cifar-100-python"
    write_cifar(tmp_path, "cifar100", n_train=40, n_test=10)
    blob = {b"data": np.arange(4 * 3072).astype(np.uint8).reshape(4, 3072), b"fine_labels": np.array([1, 2, 3, 4]),
            b"coarse_labels": [np.int64(1)] * 4, b"filenames": [b"a.png"] * 4, b"batch_label": "train"}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (folder / "train").write_bytes(pickle.dumps(blob, protocol=protocol))
        data = load_dataset("cifar100", root=tmp_path, val_size=1)
        assert len(data.train) + len(data.val) == 4
    # the official files are Python 2 pickles naming numpy.core (numpy 1's module name)
    py2 = pickle.dumps(blob, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (folder / "train").write_bytes(py2)
    assert torch.equal(load_dataset("cifar100", root=tmp_path, val_size=0).train.images.flatten()[:5],
                       torch.arange(5, dtype=torch.uint8))

    victim = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps({b"data": Pwned(victim), b"fine_labels": [1]}))
    with pytest.raises(DataError, match=r"cifar-100-python/train: refused: the pickle names posix\.system"):
        load_dataset("cifar100", root=tmp_path)
    assert not victim.exists()


def test_train_refuses_a_cifar_file_that_would_run_code(tmp_path: Path, capsys) -> None:
    from kdtune.cli import main as kdtune

    main = lambda argv: kdtune(['train', *argv])  # noqa: E731

    write_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    victim = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps({b"data": Pwned(victim), b"labels": [1]}))
    start = time.perf_counter()
    rc = main(["--dataset", "cifar10", "--data-root", str(tmp_path), "--method", "none",
               "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "data_batch_3: refused" in err and "Traceback" not in err
    assert time.perf_counter() - start < QUICK_S
    assert not victim.exists()


def test_search_refuses_a_cifar_file_that_would_run_code(tmp_path: Path, capsys) -> None:
    write_cifar(tmp_path, "cifar100", n_train=40, n_test=10)
    victim = tmp_path / "pwned"
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": Pwned(victim), b"fine_labels": [1]}))
    fixed = {**SPACE["fixed"], "dataset": "cifar100", "data_root": str(tmp_path), "method": "none"}
    o = refused_here(capsys, tmp_path, write_space(tmp_path, fixed=fixed))
    assert_clean_failure(o, tmp_path, r"cifar-100-python/test: refused: the pickle names posix\.system")
    assert not victim.exists()
    assert searches.mlflow_run_count(tmp_path) == 0


def test_malicious_teacher_checkpoint_refused_while_two_searches_create_one_store(tmp_path: Path) -> None:
    """Two searches (different names) start at once on a new mlflow.db: neither may crash in the
    store's creation; both reach the teacher, whose pickle would run code, and refuse it."""
    victim = tmp_path / "pwned"
    torch.save({"model": Pwned(victim)}, tmp_path / "teacher.pth")
    outcomes: dict[str, Outcome] = {}

    def one(name: str) -> None:
        folder = tmp_path / name
        folder.mkdir()
        fixed = {**SPACE["fixed"], "teacher_checkpoint": str(tmp_path / "teacher.pth")}
        space = write_space(folder, fixed=fixed, name=name)
        outcomes[name] = search(folder, space, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")

    threads = [threading.Thread(target=one, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, o in outcomes.items():
        assert_clean_failure(o, tmp_path, r"fixed\.teacher_checkpoint: .*teacher\.pth: not a readable PyTorch "
                                          r"checkpoint", limit_s=2 * QUICK_S)
        assert_no_trace(tmp_path / name)
    assert not victim.exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was made


def test_truncated_teacher_checkpoint_refused_before_anything_is_made(tmp_path: Path, capsys) -> None:
    from kdtune.models import build_model

    path = tmp_path / "teacher.pth"
    torch.save({"model": build_model("resnet8", num_classes=10, in_channels=1).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:5000])
    space = write_space(tmp_path, fixed={**SPACE["fixed"], "teacher_checkpoint": str(path)})
    for extra in ((), ("--dry-run",)):
        o = refused_here(capsys, tmp_path, space, *extra)
        assert_clean_failure(o, tmp_path, r"fixed\.teacher_checkpoint: .*teacher\.pth: not a readable PyTorch checkpoint")
        assert_no_trace(tmp_path)


# ---------------------------------------------------------------------------- search: one clear line


def test_search_bad_flag_and_bad_key_and_python_tag(tmp_path: Path, capsys) -> None:
    space = write_space(tmp_path)
    o = refused_here(capsys, tmp_path, space, "--num-samples", "many")
    assert o.rc == 2 and "--num-samples: invalid int value" in o.err and "Traceback" not in o.text

    bad = write_space(tmp_path, space={"temprature": {"type": "float", "low": 1, "high": 8}})
    o = refused_here(capsys, tmp_path, bad)
    assert_clean_failure(o, tmp_path, r"temprature.*temperature")

    victim = tmp_path / "pwned"
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(space.read_text() + f"extra: !!python/object/apply:os.system ['touch {victim}']\n")
    o = refused_here(capsys, tmp_path, tagged)
    assert_clean_failure(o, tmp_path, r"tagged\.yaml: not valid YAML")
    assert not victim.exists() and not (tmp_path / "rr").exists()


def test_space_files_that_are_binary_huge_or_alias_bombs(tmp_path: Path, capsys) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\nfixed:\n  note: " + "x" * (2 * 1024 * 1024) + "\n")
    levels = "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 8))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
                    + levels + "name: x\nfixed:\n  epochs: *a7\n")
    assert bomb.stat().st_size < 1500
    for path, pattern in [(binary, r"binary\.yaml: not a text \(UTF-8\) file"),
                          (huge, r"huge\.yaml: \d+ bytes; a config file is at most"),
                          (bomb, r"bomb\.yaml: its aliases \(\*name\) expand to \d+ values")]:
        o = refused_here(capsys, tmp_path, path)
        assert_clean_failure(o, tmp_path, pattern)
        assert len(o.err) < 2000


def test_huge_values_are_shortened_in_messages(tmp_path: Path) -> None:
    from kdtune.config import ConfigError, RunConfig

    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"epochs": "9" * 5000 + "x"})
    assert "epochs" in str(e.value) and len(str(e.value)) < 1100


def test_unknown_tracking_scheme(tmp_path: Path, capsys) -> None:
    o = refused_here(capsys, tmp_path, write_space(tmp_path), "--tracking-uri", "foobar://x")
    assert_clean_failure(o, tmp_path, r"--tracking-uri 'foobar://x': tracking store not usable")
    assert_no_trace(tmp_path)


def test_unreachable_tracking_server_fails_fast_naming_it(tmp_path: Path, capsys, monkeypatch) -> None:
    """A server that accepts connections and never answers (the worst case: no refusal). The
    preflight's request timeout (10 s) shortened to 2 s: the test waits for it, idle."""
    from kdtune.search import preflight

    monkeypatch.setattr(preflight, "TRACKING_TIMEOUT_S", 2)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        o = refused_here(capsys, tmp_path, write_space(tmp_path), "--tracking-uri", uri)
    finally:
        silent.close()
    assert_clean_failure(o, tmp_path, re.escape(f"--tracking-uri '{uri}': tracking store not usable"))
    assert o.seconds < 12  # 2 s of request timeout, then the answer (MLflow alone retries for minutes)


def test_read_only_tracking_store(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).execute("create table t (x)").connection.commit()
    db.chmod(0o444)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root writes read-only files; drop the capabilities that allow it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a read-only file is writable")
        prefix = ("setpriv", "--bounding-set=-dac_override,-fowner", "--")
    o = search(tmp_path, write_space(tmp_path), prefix=prefix)
    assert_clean_failure(o, tmp_path, r"--tracking-uri 'sqlite:///.*mlflow\.db': cannot write .*readonly")


def test_storage_path_below_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("")
    from kdtune.cli import main as kdtune

    main = lambda argv: kdtune(['search', *argv])  # noqa: E731

    start = time.perf_counter()
    rc = main([str(write_space(tmp_path)), "--storage-path", str(tmp_path / "afile" / "rr"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    captured = capsys.readouterr()
    o = Outcome(rc, captured.out, captured.err, time.perf_counter() - start, [])
    assert_clean_failure(o, tmp_path, r"--storage-path .*afile/rr: cannot be created or written: Not a directory")
    assert searches.mlflow_run_count(tmp_path) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_more_gpus_per_trial_than_the_machine_has(tmp_path: Path, capsys) -> None:
    space = write_space(tmp_path)
    for extra in ((), ("--dry-run",)):  # a dry run refuses the same way
        o = refused_here(capsys, tmp_path, space, "--gpus-per-trial", "1", *extra)
        assert_clean_failure(o, tmp_path, r"resources\.gpus_per_trial: 1 asked for, but this machine .* has 0 GPUs")
        assert_no_trace(tmp_path)
    # ... also when a search of the name exists: no "starting a new search" line, no NAME-2 folder
    (tmp_path / "rr" / "faults").mkdir(parents=True)
    (tmp_path / "rr" / "faults" / "kdtune_search.json").write_text("{}")
    o = refused_here(capsys, tmp_path, space, "--gpus-per-trial", "1")
    assert_clean_failure(o, tmp_path, r"resources\.gpus_per_trial")
    assert "starting a new search" not in o.text and sorted(os.listdir(tmp_path / "rr")) == ["faults"]

    o = refused_here(capsys, tmp_path, write_space(tmp_path, fixed={**SPACE["fixed"], "device": "cuda"}))
    assert_clean_failure(o, tmp_path, r"fixed\.device: 'cuda' asked for, but CUDA is not available")


def test_second_search_of_a_name_while_one_runs(tmp_path: Path, capsys) -> None:
    """The running one is stood in for by this test holding the search's lock."""
    own = tmp_path / "rr" / "faults"
    own.mkdir(parents=True)
    with open(own / ".kdtune_search.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(json.dumps({"pid": os.getpid(), "host": "here", "started": "now"}))
        lock.flush()
        o = refused_here(capsys, tmp_path, write_space(tmp_path))
    assert_clean_failure(o, tmp_path, rf"a search named 'faults' is already running \(pid {os.getpid()} on here")
    assert not (tmp_path / "mlflow.db").exists() and not (own / "kdtune_search.json").exists()


def test_resume_with_a_corrupt_search_record(tmp_path: Path, capsys) -> None:
    own = tmp_path / "rr" / "faults"
    own.mkdir(parents=True)
    (own / "kdtune_search.json").write_text('{"parent_run_id": ')
    o = refused_here(capsys, tmp_path, write_space(tmp_path), "--resume")
    assert_clean_failure(o, tmp_path, r"faults/kdtune_search\.json: not a readable kdtune search record")


# ---------------------------------------------------------------------------- train, bench, report


def _in_process(capsys, main, argv: list[str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err, time.perf_counter() - start


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_on_cuda_without_cuda(tmp_path: Path, capsys) -> None:
    from kdtune.cli import main as kdtune

    main = lambda argv: kdtune(['train', *argv])  # noqa: E731

    rc, err, seconds = _in_process(capsys, main, ["--device", "cuda", "--output-dir", str(tmp_path / "out")])
    assert rc == 2 and "device: 'cuda' asked for, but CUDA is not available" in err and seconds < QUICK_S


def test_train_output_dir_below_a_file_fails_before_loading_anything(tmp_path: Path, capsys) -> None:
    from kdtune.cli import main as kdtune

    main = lambda argv: kdtune(['train', *argv])  # noqa: E731

    (tmp_path / "afile").write_text("")
    # CIFAR files that do not exist: had the data been loaded first, the message would be about them
    rc, err, seconds = _in_process(capsys, main, ["--dataset", "cifar100", "--data-root", str(tmp_path / "none"),
                                                  "--output-dir", str(tmp_path / "afile" / "out")])
    assert rc == 2 and "--output-dir" in err and "afile/out: cannot be created" in err and "CIFAR" not in err


def test_train_resume_with_a_truncated_checkpoint(tmp_path: Path, capsys) -> None:
    from kdtune.cli import main as kdtune

    main = lambda argv: kdtune(['train', *argv])  # noqa: E731

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("dataset: digits\nstudent: resnet8\nmethod: none\nepochs: 2\n")
    torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 1}, out / "full.pth")
    (out / "checkpoint.pth").write_bytes((out / "full.pth").read_bytes()[:700])
    rc, err, seconds = _in_process(capsys, main, ["--resume", "--output-dir", str(out)])
    assert rc == 2 and re.search(r"--resume: .*out/checkpoint\.pth: not a readable kdtune checkpoint", err), err


def test_train_refuses_a_teacher_checkpoint_that_would_run_code(tmp_path: Path, capsys) -> None:
    from kdtune.cli import main as kdtune

    main = lambda argv: kdtune(['train', *argv])  # noqa: E731

    victim = tmp_path / "pwned"
    torch.save({"model": Pwned(victim)}, tmp_path / "teacher.pth")
    rc, err, seconds = _in_process(capsys, main, ["--teacher-checkpoint", str(tmp_path / "teacher.pth"),
                                                  "--epochs", "1", "--output-dir", str(tmp_path / "out")])
    assert rc == 2 and "teacher.pth: not a readable PyTorch checkpoint" in err and not victim.exists()


def test_bench_unknown_model_and_zero_steps(capsys) -> None:
    from kdtune.cli import main as kdtune

    main = lambda argv: kdtune(['bench', *argv])  # noqa: E731

    rc, err, _ = _in_process(capsys, main, ["--skip-pipeline", "--pairs", "nosuchnet:resnet8"])
    assert rc == 2 and "--pairs 'nosuchnet:resnet8': teacher: unknown model 'nosuchnet'" in err
    rc, err, _ = _in_process(capsys, main, ["--skip-pipeline", "--steps", "0"])
    assert rc == 2 and "--steps: expected a positive integer, but got 0" in err
    rc, err, _ = _in_process(capsys, main, ["--skip-pipeline", "--methods", "kd,nope"])
    assert rc == 2 and "--methods: unknown method 'nope'" in err


def test_report_names_a_corrupt_search_record(tmp_path: Path, capsys) -> None:
    from kdtune.cli import main as kdtune

    main = lambda argv: kdtune(['report', *argv])  # noqa: E731

    folder = tmp_path / "rr" / "faults"
    folder.mkdir(parents=True)
    (folder / "kdtune_search.json").write_text("{parent_run_id: 1}")
    rc, err, _ = _in_process(capsys, main, [str(folder)])
    assert rc == 2 and f"{folder / 'kdtune_search.json'}: not a readable kdtune search record" in err


# ---------------------------------------------------------------------------- slow: a real search


@pytest.mark.slow
def test_more_gpus_per_trial_than_the_cluster_has(tmp_path: Path, shared_ray, monkeypatch, capsys) -> None:
    """With --address the cluster's resources count, read after connecting (before any record).
    The session's shared instance declares no GPU. The command in this process: the refused
    search leaves it disconnected (a program's next search connects to its own cluster)."""
    import ray

    address = shared_ray.address
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    o = refused_here(capsys, tmp_path, write_space(tmp_path), "--address", address, "--gpus-per-trial", "0.5")
    assert_clean_failure(o, tmp_path, rf"resources\.gpus_per_trial: 0\.5 asked for, but the Ray cluster at "
                                      rf"{re.escape(address)} has 0 GPUs")
    assert searches.mlflow_run_count(tmp_path) == 0
    assert not ray.is_initialized()


@pytest.mark.slow
def test_a_killed_search_leaves_nothing_after_resume(tmp_path: Path, shared_ray, monkeypatch, capsys) -> None:
    """kill -9 of a driver orphans its private Ray instance's agents (the GCS and raylet notice and
    exit; the dashboard and runtime-env agents do not). --resume ends exactly those, by pid."""
    space = write_space(tmp_path)
    marker = uuid.uuid4().hex
    env = case_env(tmp_path, marker)
    out = open(tmp_path / "killed.out", "w")
    proc = subprocess.Popen(searches.search_cmd(tmp_path, space), cwd=tmp_path, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    record = tmp_path / "ray" / "faults" / "ray_instance.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if " started (1 of 2)" in (tmp_path / "killed.out").read_text() and record.is_file():
            break
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "killed.out").read_text()[-3000:]
    killed = _marked(marker)  # the driver, Ray's daemons and the trial's worker
    proc.kill()
    proc.wait()
    out.close()
    time.sleep(2)  # the GCS and raylet see their driver gone and exit
    orphans = [p for p in processes.live(killed) if p != proc.pid]
    resumed = searches.search_here(tmp_path, space, "--resume", ray=shared_ray, monkeypatch=monkeypatch,
                                   capsys=capsys)
    try:
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        if orphans:  # what Ray leaves (and how fast the rest exits) varies; whatever is left is ended, and said
            said = re.search(r"\[kdtune\] ended \d+ process\(es\) left by the killed search in .*/faults "
                             rf"\(its driver, pid {proc.pid}, is gone\): ([\d, ]+)", resumed.stdout)
            assert said, resumed.stdout
            ended = [int(pid) for pid in said.group(1).split(",")]
            assert not processes.live(ended), [processes.describe(p) for p in processes.live(ended)]
        # The rest of the killed search (its raylet, a trial's worker) exits by itself once the
        # process it depends on is gone: often within seconds, which a resume run as a command of
        # its own used to cover, but Ray waits up to gcs_rpc_server_reconnect_timeout_s (a minute)
        # for a lost GCS; a trial's worker outlived a 30-s wait once in ten. Nothing of it may
        # outlive that.
        deadline = time.monotonic() + 90
        while processes.live(killed) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes.live(killed), [processes.describe(p) for p in processes.live(killed)]
        assert not record.exists()
    finally:
        processes.kill(processes.live(killed))
        shutil.rmtree((tmp_path / "ray_tmpdir").read_text(), ignore_errors=True)
