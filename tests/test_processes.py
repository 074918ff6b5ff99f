"""The process helpers the leak checks rely on find what a test started: if they found nothing,
every "nothing left behind" assertion would pass vacuously."""
from __future__ import annotations

import os
import subprocess
import sys

import processes

LISTENER = ("import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); time.sleep(60)")


def test_helpers_find_a_started_process_and_its_socket_then_stop_it() -> None:
    marker = f"KDTUNE_PROCESSES_TEST={os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, "marker-argument"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "KDTUNE_PROCESSES_TEST": str(os.getpid())}, start_new_session=True)
    try:
        port = int(proc.stdout.readline())
        assert proc.pid in processes.children() and proc.pid in processes.descendants()
        assert processes.with_env(marker) == [proc.pid]
        assert processes.naming("marker-argument") == [proc.pid]
        assert processes.in_group(proc.pid) == [proc.pid]
        assert processes.listening([proc.pid]) == [(proc.pid, "127.0.0.1", port)]
        assert processes.describe(proc.pid).startswith(f"{proc.pid} {sys.executable} -c import socket")
    finally:
        processes.stop_group(proc.pid, grace=5)
        proc.wait(timeout=10)
        proc.stdout.close()
    assert processes.live([proc.pid]) == [] and processes.in_group(proc.pid) == []
