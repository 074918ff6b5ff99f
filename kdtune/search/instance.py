"""The private Ray instance a search starts, recorded so that a killed search leaves nothing alive.

``ray.init(address="local")`` starts Ray's daemons as the driver's descendants (GCS, raylet, and
the raylet's dashboard and runtime-env agents). When the driver ends normally, ``ray.shutdown()``
stops them all; when it is killed (``kill -9``, an OOM kill, a lost terminal) the GCS and raylet
notice and exit, but the agents are orphaned and live on. So the driver writes
``<search folder>/ray_instance.json`` (its own pid and start time, and those of every descendant)
after starting the instance, refreshes it while the search runs (trial workers start later), and
deletes it after ``ray.shutdown()``. A later search run in the same storage folder (``--resume``,
or a new search) finds a record whose driver is gone and ends the processes it lists: only
those, by pid, each checked against its recorded start time so that a reused pid is never hit.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import psutil

RECORD_FILE = "ray_instance.json"



def _identity(proc: psutil.Process) -> dict:
    return {"pid": proc.pid, "started": proc.create_time(), "name": proc.name()}


def record(own: Path) -> None:
    """Write (or refresh) the record of this driver's private Ray instance in ``own``."""
    me = psutil.Process()
    found = []
    for child in me.children(recursive=True):
        try:
            found.append(_identity(child))
        except psutil.Error:  # ended meanwhile
            continue
    own.mkdir(parents=True, exist_ok=True)
    tmp = own / f".{RECORD_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"driver": _identity(me), "processes": found}, indent=1))
    os.replace(tmp, own / RECORD_FILE)


class Recorder:
    """Keeps the record current while the search runs: trial workers start (and restart) after
    the instance, and a killed driver orphans them too. A daemon thread rescans every ``every_s``
    seconds (a walk of the driver's process tree: about a millisecond)."""

    def __init__(self, own: Path, every_s: float = 5.0) -> None:
        self.own, self._stop = own, threading.Event()
        record(own)
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="kdtune-ray-record", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                record(self.own)
            except OSError:  # the folder went away (a test's tmp dir): nothing to keep
                return

    def forget(self) -> None:
        """The instance ended with its driver (``ray.shutdown()``): nothing to clean up later."""
        self._stop.set()
        self._thread.join()
        (self.own / RECORD_FILE).unlink(missing_ok=True)


def _alive(entry: dict) -> psutil.Process | None:
    """The process of ``entry`` if it still runs (same pid and the same start time), else None."""
    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - float(entry["started"])) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (psutil.Error, KeyError, TypeError, ValueError):
        pass
    return None


def end_leftovers(storage: str) -> list[str]:
    """End what killed searches under ``storage`` left running; one line per search cleaned up.

    A record whose driver still runs belongs to a live search and is left alone."""
    if "://" in storage or not Path(storage).is_dir():
        return []
    said = []
    for path in sorted(Path(storage).glob(f"*/{RECORD_FILE}")):
        try:
            rec = json.loads(path.read_text())
            driver, listed = rec["driver"], list(rec["processes"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge; a damaged record is not acted on
        if _alive(driver) is not None:
            continue
        procs = [p for p in map(_alive, listed) if p is not None]
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        gone, alive = psutil.wait_procs(procs, timeout=3)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=3)
        path.unlink(missing_ok=True)
        if procs:
            said.append(f"ended {len(procs)} process(es) left by the killed search in {path.parent} "
                        f"(its driver, pid {driver.get('pid')}, is gone): "
                        + ", ".join(f"{p.pid}" for p in procs))
    return said
