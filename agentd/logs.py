"""Logging set-up suited to journald, and a log-once helper for conditions that persist.

Under systemd, stderr is a stream to journald and JOURNAL_STREAM holds its "DEVICE:INODE"
(systemd.exec(5)); only when fd 2 is that very stream do lines carry sd-daemon priority
prefixes instead of timestamps (journald adds its own). Elsewhere, including a child whose
stderr was redirected but which inherited the variable, lines start with an ISO 8601 time
with its UTC offset, so that logs of nodes in different zones can be compared.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import threading

# sd-daemon(3) priority prefixes: journald reads "<N>" at the start of a line as the level.
_SD_PRIORITY = {
    logging.DEBUG: "<7>",
    logging.INFO: "<6>",
    logging.WARNING: "<4>",
    logging.ERROR: "<3>",
    logging.CRITICAL: "<2>",
}

LEVELS = ("debug", "info", "warning", "error")


class _JournaldFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = _SD_PRIORITY.get(record.levelno, "<6>")
        return prefix + super().format(record)


class _ZonedFormatter(logging.Formatter):
    """Timestamps as ISO 8601 with milliseconds and the local UTC offset:
    2026-12-01T13:25:20.123+01:00."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = datetime.datetime.fromtimestamp(record.created).astimezone()
        return t.isoformat(timespec="milliseconds")


def is_journal_stream(stream, env: dict | None = None) -> bool:
    """Whether `stream` is the journald stream that JOURNAL_STREAM names ("DEV:INODE")."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no file descriptor behind it
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str = "info", stream=None) -> None:
    """Log to stderr: with priority prefixes when it is journald's stream, else with zoned
    timestamps."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if is_journal_stream(stream):
        handler.setFormatter(_JournaldFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(_ZonedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("agentd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class LogOnce:
    """Logs a message the first time a key is seen; later repeats go to debug."""

    def __init__(self, logger: logging.Logger):
        self._logger = logger
        self._seen: set = set()
        self._lock = threading.Lock()

    def __call__(self, level: int, key, msg: str, *args) -> bool:
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        self._logger.log(level if first else logging.DEBUG, msg, *args)
        return first

    def forget(self, key) -> None:
        with self._lock:
            self._seen.discard(key)
