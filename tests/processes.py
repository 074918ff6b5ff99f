"""The processes a test started, found without reading anyone else's.

conftest makes every pytest process a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so
whatever a test starts stays a descendant of it even when it daemonizes -- ``ray start``'s GCS
and raylet, Ray's workers, a search's private instance -- instead of being handed to init. The
processes a test left behind are then found among the pytest process's own descendants, read
from ``/proc/<pid>/task/*/children`` down from it: nothing here lists the machine's processes.
Adopted processes that exit stay zombies until the pytest process ends; they are not counted.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Linux only; elsewhere nothing (the process checks here read /proc and need Linux anyway)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:  # gone
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def _state_and_group(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    except OSError:
        return None
    return fields[0], int(fields[2])


def _live(pids: list[int]) -> list[int]:
    return [pid for pid in pids if (st := _state_and_group(pid)) and st[0] != "Z"]


def descendants() -> list[int]:
    """This process's live (not zombie) descendants."""
    seen: list[int] = []
    todo = [os.getpid()]
    while todo:
        for child in _children(todo.pop()):
            if child not in seen:
                seen.append(child)
                todo.append(child)
    return _live(seen)


def children() -> list[int]:
    """This process's live child processes."""
    return _live(_children(os.getpid()))


def in_group(pgid: int) -> list[int]:
    """The live descendants in process group ``pgid``."""
    return [pid for pid in descendants() if (st := _state_and_group(pid)) and st[1] == pgid]


def _read(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def naming(text: str) -> list[int]:
    """The live descendants whose command line holds ``text`` (a Ray temp dir, say)."""
    return [pid for pid in descendants() if text.encode() in _read(pid, "cmdline")]


def with_env(entry: str) -> list[int]:
    """The live descendants whose environment holds ``entry`` (``NAME=value``), which every
    process a command starts inherits."""
    return [pid for pid in descendants() if entry.encode() in _read(pid, "environ").split(b"\0")]


def describe(pid: int) -> str:
    cmdline = _read(pid, "cmdline").replace(b"\0", b" ")[:120].decode(errors="replace")
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
    """(pid, address, port) of every TCP socket in LISTEN state that one of ``pids`` holds: the
    sockets of their own file descriptors, looked up in /proc/net/tcp{,6}."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            lines = f.read().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((inodes[inode], socket.inet_ntop(family, raw), int(port, 16)))
    return found
