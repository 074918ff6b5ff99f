"""kdtune's own lines go through :mod:`logging`, under the ``kdtune`` logger (each module logs to
``logging.getLogger(__name__)``), so that a program that uses kdtune as a library silences or
redirects them like any other library's::

    logging.getLogger("kdtune").setLevel(logging.WARNING)   # progress lines off

The ``kdtune`` command installs one handler (:func:`configure`) that prints them as they always
looked: ``[kdtune] ...`` for the search and analysis layers, bare lines for a single run's
progress (the epoch lines), INFO to stdout and warnings and errors to stderr. ``--verbose``
sets the level to DEBUG, ``--quiet`` to WARNING. The library entry points
(:func:`kdtune.train.run`, :func:`kdtune.search.run`) and Ray's trial processes install the same
handler only when logging is not configured at all (:func:`default_handler`), so a notebook
sees the progress it expects and a program's own logging setup is left as it is.
"""
from __future__ import annotations

import logging
import sys

LOGGER = "kdtune"
# A single run's progress (teacher training, the epoch lines, a trial's own output): printed
# without the prefix, as they always were, since they belong to the run, not to the search around it.
BARE = ("kdtune.train", "kdtune.run", "kdtune.teachers", "kdtune.teacher_cache", "kdtune.search.trainable")


class Formatter(logging.Formatter):
    """``[kdtune] message``; bare for the run modules (:data:`BARE`) and for ``error: ...`` lines
    (kdtune's one spelling of an error, as the commands print them). Leading blank lines stay
    in front of the prefix."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name.startswith(BARE) or text.startswith("error:"):
            return text
        body = text.lstrip("\n")
        return text[:len(text) - len(body)] + "[kdtune] " + body


class Handler(logging.StreamHandler):
    """INFO and DEBUG to stdout, warnings and errors to stderr (where the lines always went), the
    stream looked up at each line so that a redirection made later (pytest's capture, Ray's log
    files of a trial) sees them."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


def configure(verbose: bool = False, quiet: bool = False) -> logging.Logger:
    """The command line's setup: kdtune's one handler (replacing one installed before) and its
    level: DEBUG with ``verbose``, WARNING with ``quiet``, else INFO."""
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, Handler)]:
        logger.removeHandler(handler)
    logger.addHandler(Handler())
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    return logger


def default_handler() -> None:
    """A library call's setup: kdtune's handler at INFO, only when nothing is configured (no
    handler on ``kdtune`` or on the root logger; a level set on ``kdtune`` is kept). Without it
    Python would print warnings only, and a search would run silently for hours."""
    logger = logging.getLogger(LOGGER)
    if logger.handlers or logging.getLogger().handlers:
        return
    logger.addHandler(Handler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
