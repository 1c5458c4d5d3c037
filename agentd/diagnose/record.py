"""`agentd record`: the high-rate window written to a file as it is gathered, from this
node's samplers or from a running daemon, for a later `agentd diagnose --recording FILE`.

The file is a stream of chunks (agentd.diagnose.sources.recording), appended every
`flush` seconds: a crash, SIGKILL or a full disk loses at most the rows since the last
chunk, and the file stays readable. The output path is checked before sampling starts.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time

import numpy as np

from agentd.diagnose import OutputError
from agentd.diagnose.sources import SourceError
from agentd.diagnose.sources.http import HttpOptions
from agentd.diagnose.sources.recording import MAGIC, chunk
from agentd.exitcodes import OK as EXIT_OK


class RecordError(OutputError):
    """The recording cannot be written (exit status 4); what was written is kept."""


class Writer:
    def __init__(self, path: str):
        self.path = path
        self.rows = 0
        self.chunks = 0
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise RecordError(f"--out {path}: directory {parent} does not exist")
        if os.path.isdir(path):
            raise RecordError(f"--out {path} is a directory")
        try:
            # Unbuffered: a failed write must not leave bytes in a buffer that a later
            # flush (at close) would append after the cut.
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                              0o644)
        except OSError as e:
            raise RecordError(f"cannot write {path}: {_reason(e)}") from None
        self.size = 0
        try:
            self._write(MAGIC)
        except OSError as e:
            self.discard()
            raise RecordError(f"cannot write {path}: {_reason(e)}") from None
        self.size = len(MAGIC)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def append(self, groups: dict, meta: dict) -> None:
        from agentd.daemon.window import groups_to_npz

        n = max((len(g["t"]) for g in groups.values()), default=0)
        if n == 0:
            return
        data = chunk(groups_to_npz(groups, meta))
        try:
            self._write(data)
            os.fsync(self.fd)
        except OSError as e:
            # A partial chunk would be skipped by readers anyway; cut it off so the file
            # ends cleanly after the last complete one.
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            kept = f"the {self.rows} rows recorded before are kept" if self.rows else \
                "nothing had been recorded yet"
            raise RecordError(f"cannot write {self.path}: {_reason(e)}; {kept}") from None
        self.size += len(data)
        self.rows += n
        self.chunks += 1

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def discard(self) -> None:
        """Close and remove the file: it holds no rows."""
        self.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _reason(e: OSError) -> str:
    return "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))


def record(out: str, seconds: float, daemon_url: str | None, config, poll: float = 60.0,
           flush: float = 10.0, http: HttpOptions | None = None) -> int:
    """Record for `seconds`; SIGINT/SIGTERM stop early and keep what was recorded."""
    writer = Writer(out)
    stop = threading.Event()
    handlers = {s: signal.signal(s, lambda *a: stop.set()) for s in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    error: list[RecordError] = []

    def on_rows(groups: dict, meta: dict) -> None:
        if error:
            return
        try:
            writer.append(groups, meta)
        except RecordError as e:
            error.append(e)
            stop.set()

    try:
        if daemon_url:
            _record_from_daemon(daemon_url, seconds, min(poll, flush * 6), stop, on_rows, http)
        else:
            from agentd.diagnose.sources.live import sample_locally

            groups, meta = sample_locally(seconds, config, stop, on_rows=on_rows, every=flush)
            on_rows(groups, meta)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        writer.close()
        if writer.rows == 0:
            writer.discard()  # a file without rows is no recording
    if error:
        raise error[0]
    if writer.rows == 0:
        raise SourceError("nothing was recorded")
    print(f"agentd record: {writer.rows} rows in {writer.chunks} chunks written to {out}",
          file=sys.stderr)
    return EXIT_OK


def _record_from_daemon(url: str, seconds: float, poll: float, stop: threading.Event,
                        on_rows, http: HttpOptions | None) -> None:
    """Poll the daemon's window; each poll overlaps the last, and only newer rows are kept."""
    from agentd.daemon.window import load_npz_with_meta
    from agentd.diagnose.sources.daemon import fetch_window

    url = url.rstrip("/")
    last: dict[str, float] = {}
    t_start = time.time()
    t_end = t_start + seconds
    got_any = False
    while True:
        final = stop.is_set() or time.time() >= t_end
        try:
            groups, meta = load_npz_with_meta(fetch_window(url, poll * 2 + 5, http))
        except SourceError as e:
            if not got_any:
                raise
            print(f"agentd record: {e}; keeping what was recorded", file=sys.stderr)
            return
        except ValueError as e:
            raise SourceError(f"agentd at {url} sent a window that cannot be read: {e}") \
                from None
        fresh = {}
        for name, g in groups.items():
            if name == "topology":
                continue
            t = np.asarray(g["t"], dtype=float)
            keep = (t > last.get(name, t_start - 1e-9)) & (t <= t_end)
            if keep.any():
                fresh[name] = {**g, "t": t[keep], "values": g["values"][keep]}
                last[name] = float(t[keep][-1])
        if fresh:
            got_any = True
            on_rows(fresh, meta)
        if final or stop.is_set():
            return
        stop.wait(min(poll, max(t_end - time.time(), 0.0)))
