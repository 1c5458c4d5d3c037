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
