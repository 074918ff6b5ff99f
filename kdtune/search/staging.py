"""Ray's staging folder, one per search process.

Ray 2.60 stages a search's files (experiment state, trial folders, the trials' working
directories) in ``<Ray session>/artifacts/<start time, to the second>/<search name>/`` on each
node, then copies them to the storage folder. Two searches of one name started within the same
second on one cluster therefore share that folder: each copies the other's trials into its own
storage folder, and their experiment-state files (named by the same second) overwrite each other,
so a restore could read the other search's state. Seen when four searches were started at once
on one cluster. The time in the folder name is made unique to the driver process here.

``Experiment._storage_context_cls`` is the class Tune builds its storage context from (the seam
Ray's own tests use); the context is pickled to the trials, so this class lives in a module the
workers import.
"""
from __future__ import annotations

import os
import socket

from kdtune.search.internals import storage_context_class, use_storage_context_class

StorageContext = storage_context_class()


class ProcessStaging(StorageContext):
    """Ray's storage context, with the driver's host and process id after the start second."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._timestamp = f"{self._timestamp}_{socket.gethostname()}_{os.getpid()}"


def use_process_staging() -> bool:
    """Make Tune stage this process's searches in a folder of their own (see the module's text)."""
    return use_storage_context_class(ProcessStaging)
