"""Logging set-up suited to journald, and a log-once helper for conditions that persist."""

from __future__ import annotations

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


def setup(level: str = "info", stream=None) -> None:
    """Log to stderr; under systemd (JOURNAL_STREAM set) drop timestamps and use level prefixes."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournaldFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
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
