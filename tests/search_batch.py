"""Searches run one after another in one process: ``python tests/search_batch.py JOBS.json``.

Each job is ``{"folder": ..., "argv": [...], "env": {...}}``: the ``kdtune search`` command line
(``kdtune.cli.main``, what the console script calls) run in ``folder``, with ``env`` added to the
environment (a plugin's folder in its ``PYTHONPATH`` goes on this process's path as well), its
output in ``folder/search.out`` and ``search.err`` (file descriptors 1 and 2, so that Ray's and
Tune's own lines land there too) and its exit status in ``folder/search.rc``.

Why: a search's process spends about 7 s of CPU importing torch, MLflow and Ray Tune before its
first trial; the tests' batch of short searches (tests/searches.py) pays that once per batch
process instead of once per search, and the end-to-end search (:func:`run` in the test process)
not at all. Each search connects to the cluster (``--address``) and
disconnects at its end, as a program that runs searches in turn does. A plugin stays imported
once loaded, so a job whose plugin changes kdtune for the rest of the process goes last.
"""
from __future__ import annotations

import json
import os
import sys
import traceback


def run(job: dict) -> int:
    from kdtune.cli import main

    saved_env, saved_path, saved_cwd = dict(os.environ), list(sys.path), os.getcwd()
    folder = job["folder"]
    os.chdir(folder)  # where the command would run; Ray puts it on the trials' path
    os.environ.update(job.get("env", {}))
    sys.path[:0] = [p for p in job.get("env", {}).get("PYTHONPATH", "").split(os.pathsep) if p]
    with open(os.path.join(folder, "search.out"), "w") as out, open(os.path.join(folder, "search.err"), "w") as err:
        sys.stdout.flush(), sys.stderr.flush()
        fds, streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = out, err  # in a test process, pytest's capture replaced them
        try:
            code = main(["search", *job["argv"]])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(fds[0], 1), os.dup2(fds[1], 2)
            os.close(fds[0]), os.close(fds[1])
            os.environ.clear()
            os.environ.update(saved_env)
            sys.path[:] = saved_path
            os.chdir(saved_cwd)
    with open(os.path.join(folder, "search.rc"), "w") as f:
        f.write(str(code))
    return code


if __name__ == "__main__":
    for job in json.loads(open(sys.argv[1]).read()):
        run(job)
