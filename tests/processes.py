"""The processes a test started, found without reading anyone else's.

conftest makes every pytest process a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so
whatever a test starts stays a descendant of it even when it daemonizes -- ``ray start``'s GCS
and raylet, Ray's workers, a search's private instance -- instead of being handed to init. The
processes a test left behind are then found among the pytest process's own descendants
(psutil's ``children(recursive=True)``): nothing here lists the machine's processes. Adopted
processes that exit stay zombies until the pytest process ends; they are not counted.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Linux only; elsewhere nothing (psutil has no call for it)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone
        return False


def live(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (not gone, not zombies)."""
    out = []
    for pid in pids:
        try:
            if _alive(psutil.Process(pid)):
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _procs(recursive: bool) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=recursive) if _alive(p)]


def descendants() -> list[int]:
    """This process's live (not zombie) descendants."""
    return [p.pid for p in _procs(recursive=True)]


def children() -> list[int]:
    """This process's live child processes."""
    return [p.pid for p in _procs(recursive=False)]


def _matching(test) -> list[int]:
    found = []
    for p in _procs(recursive=True):
        try:
            if test(p):
                found.append(p.pid)
        except (psutil.Error, OSError):  # gone, or not ours to read
            pass
    return found


def in_group(pgid: int) -> list[int]:
    """The live descendants in process group ``pgid``."""
    return _matching(lambda p: os.getpgid(p.pid) == pgid)


def naming(text: str) -> list[int]:
    """The live descendants whose command line holds ``text`` (a Ray temp dir, say)."""
    return _matching(lambda p: text in "\0".join(p.cmdline()))


def with_env(entry: str) -> list[int]:
    """The live descendants whose environment holds ``entry`` (``NAME=value``), which every
    process a command starts inherits."""
    name, _, value = entry.partition("=")
    return _matching(lambda p: p.environ().get(name) == value)


def describe(pid: int) -> str:
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())[:120]
    except psutil.Error:
        cmdline = ""
    return f"{pid} {cmdline}".strip()


def stop_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM process group ``pgid``, then SIGKILL what is left of it after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace
        while time.time() < deadline and in_group(pgid):
            time.sleep(0.2)
        if not in_group(pgid):
            return


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        found += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found
