"""One Ray instance for the test session's searches, and checks scoped to what a test started.

The machine is shared, so nothing here looks at machine-wide state: the instance runs in its
own process group with its own temp dir and ports on 127.0.0.1, and it is stopped by signalling
that process group (``ray stop`` would stop every Ray instance of the user on the machine), then
whatever of it is still among the test process's descendants (tests/processes.py).
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import processes
import searches

RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command, whatever PATH holds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tmpdir(prefix: str = "kdt") -> str:
    """A temp dir short enough for Ray's socket paths (< 108 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def base_env() -> dict[str, str]:
    """The environment of the instance's workers and of the searches that connect to it (Ray
    workers inherit the raylet's environment, not the driver's)."""
    return searches.env(RAY_AUTH_MODE="disabled")


@dataclass
class RayInstance:
    address: str
    temp_dir: str
    pgid: int
    env: dict[str, str] = field(repr=False)

    @classmethod
    def start(cls, num_cpus: int = 2, num_gpus: int = 0, env_extra: dict[str, str] | None = None) -> "RayInstance":
        """``env_extra``: more environment for the instance's workers (and its searches)."""
        temp_dir, port, env = short_tmpdir(), free_port(), base_env()
        # no idle workers started for the first driver (kdtune's own private instance does the same)
        env.update(env_extra or {}, RAY_TMPDIR=temp_dir, RAY_prestart_worker_first_driver="0")
        # start_new_session: `ray start` leads a new process group that its daemons (GCS, raylet,
        # workers) inherit, so the teardown can signal exactly them.
        proc = subprocess.Popen(
            [*RAY_CLI, "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
             # no log monitor: the searches run quiet (log_to_driver off), so it forwarded nothing, and
             # it rescans every worker's log file all session long (about 6 s of CPU per instance)
             "--include-log-monitor=false",
             f"--temp-dir={temp_dir}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            processes.stop_group(proc.pid)
            raise
        if proc.returncode != 0:
            processes.stop_group(proc.pid)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise RuntimeError(f"ray start failed:\n{out}")
        return cls(f"127.0.0.1:{port}", temp_dir, proc.pid, env)

    def stop(self) -> None:
        # Ray's GCS and raylet take 10 s and more to end on SIGTERM; a test instance holds
        # nothing worth a graceful shutdown.
        processes.stop_group(self.pgid, grace=1.0)
        processes.kill(processes.naming(self.temp_dir))  # anything of this instance that left the group
        shutil.rmtree(self.temp_dir, ignore_errors=True)
