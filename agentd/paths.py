"""Where the host's /proc, /sys and /var/log live: every file read goes through here.

Like node_exporter's --path.procfs/--path.sysfs, this lets tests read fixture trees copied
from real machines and lets a containerised agentd read the host's /proc mounted elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Paths:
    procfs: str = "/proc"
    sysfs: str = "/sys"
    varlog: str = "/var/log"  # the kubelet's containers/ and pods/ links name Kubernetes pods

    def proc(self, *parts: str) -> str:
        return os.path.join(self.procfs, *parts)

    def sys(self, *parts: str) -> str:
        return os.path.join(self.sysfs, *parts)

    def varlog_dir(self, *parts: str) -> str:
        return os.path.join(self.varlog, *parts)


def read_text(path: str) -> str:
    """Read a small pseudo-file in one system call (pseudo-files are generated on read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def read_optional(path: str) -> str | None:
    try:
        return read_text(path)
    except OSError:
        return None


class ProcFile:
    """A pseudo-file read again and again (10 times a second): kept open and re-read with
    pread at offset 0, which makes the kernel generate it afresh. One system call per read
    instead of four (open, read, the read that finds the end, close), and no path to join:
    on a VM that halves what reading /proc/stat, /proc/diskstats or /proc/PID/stat costs.

    read() raises OSError as read_text() does (a process that exited: ESRCH or ENOENT); the
    file is then closed and opened afresh on the next read. A regular file (a fixture tree,
    the simulator's /proc, whose files are replaced rather than regenerated) is read afresh
    every time: procfs files say they are empty, which tells them apart.
    """

    __slots__ = ("path", "_fd", "_size", "_regular")

    def __init__(self, path: str, size: int = 4096):
        self.path = path
        self._fd: int | None = None
        self._size = size
        self._regular = False

    def read(self) -> str:
        if self._regular:
            return read_text(self.path)
        fd = self._fd
        if fd is None:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(fd).st_size:
                os.close(fd)
                self._regular = True
                return read_text(self.path)
            self._fd = fd
        try:
            while True:
                data = os.pread(fd, self._size, 0)
                if len(data) < self._size:
                    return data.decode("utf-8", "replace")
                self._size *= 2  # it did not fit: read it whole with a larger buffer
        except OSError:
            self.close()
            raise

    def read_optional(self) -> str | None:
        try:
            return self.read()
        except OSError:
            return None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass
