"""One Ray instance for the test session's searches, and checks scoped to what a test started.

The machine is shared, so nothing here looks at machine-wide state: the instance runs in its
own process group with its own temp dir and ports on 127.0.0.1, and it is stopped by signalling
that process group (``ray stop`` would stop every Ray instance of the user on the machine).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command, whatever PATH holds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tmpdir(prefix: str = "kdt") -> str:
    """A temp dir short enough for Ray's socket paths (< 108 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def base_env() -> dict[str, str]:
    """The environment of searches and of the instance's workers: this checkout first on
    PYTHONPATH (Ray workers inherit the raylet's environment, not the driver's)."""
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e["PYTHONUNBUFFERED"] = "1"
    e["RAY_AUTH_MODE"] = "disabled"
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    return e


def group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (zombies excluded)."""
    r = subprocess.run(["ps", "-e", "-o", "pid=,pgid=,stat="], capture_output=True, text=True)
    pids = []
    for line in r.stdout.splitlines():
        pid, group, stat = line.split(None, 2)
        if int(group) == pgid and not stat.startswith("Z"):
            pids.append(int(pid))
    return pids


def pids_using(path: str) -> list[int]:
    """Live processes whose command line names ``path`` (a Ray temp dir: raylet, GCS, workers)."""
    r = subprocess.run(["pgrep", "-f", path], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if int(p) != os.getpid()]


def stop_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace
        while time.time() < deadline and group_pids(pgid):
            time.sleep(0.2)
        if not group_pids(pgid):
            return


@dataclass
class RayInstance:
    address: str
    temp_dir: str
    pgid: int
    env: dict[str, str] = field(repr=False)

    @classmethod
    def start(cls, num_cpus: int = 2) -> "RayInstance":
        temp_dir, port, env = short_tmpdir(), free_port(), base_env()
        env["RAY_TMPDIR"] = temp_dir
        # start_new_session: `ray start` leads a new process group that its daemons (GCS, raylet,
        # workers) inherit, so the teardown can signal exactly them.
        proc = subprocess.Popen(
            [*RAY_CLI, "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={temp_dir}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            stop_group(proc.pid)
            raise
        if proc.returncode != 0:
            stop_group(proc.pid)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise RuntimeError(f"ray start failed:\n{out}")
        return cls(f"127.0.0.1:{port}", temp_dir, proc.pid, env)

    def stop(self) -> None:
        stop_group(self.pgid)
        for pid in pids_using(self.temp_dir):  # anything of this instance that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
