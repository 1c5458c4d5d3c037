"""Real kernel limits for a case: a read-bandwidth limit on one block device and a memory
limit, in a cgroup of its own (v1 blkio/memory controllers where mounted, else v2 io.max and
memory.max). Needs root; `unavailable()` says why a limit cannot be had here.
"""

from __future__ import annotations

import os

ROOT = "/sys/fs/cgroup"


def _v1(controller: str) -> str | None:
    d = os.path.join(ROOT, controller)
    return d if os.path.isfile(os.path.join(d, "cgroup.procs")) and not os.path.isfile(
        os.path.join(d, "cgroup.controllers")) else None


def _v2() -> str | None:
    for d in (ROOT, os.path.join(ROOT, "unified")):
        if os.path.isfile(os.path.join(d, "cgroup.controllers")):
            return d
    return None


def _v2_has(controller: str) -> bool:
    d = _v2()
    if d is None:
        return False
    try:
        with open(os.path.join(d, "cgroup.controllers")) as f:
            return controller in f.read().split()
    except OSError:
        return False


def unavailable(read_bps: bool, memory: bool) -> str | None:
    """Why these limits cannot be set here, or None."""
    if os.geteuid() != 0:
        return "needs root (cgroup limits)"
    if read_bps and not (_v1("blkio") or _v2_has("io")):
        return "no cgroup blkio (v1) or io (v2) controller"
    if memory and not (_v1("memory") or _v2_has("memory")):
        return "no cgroup memory controller"
    return None


def device_number(name: str) -> str:
    with open(f"/sys/class/block/{name}/dev") as f:
        return f.read().strip()  # "254:0"


class Group:
    def __init__(self, name: str, read_bps: tuple[str, int] | None = None,
                 memory_bytes: int | None = None):
        """read_bps: (block device name, bytes/s); memory_bytes: memory and page cache."""
        self.name = name
        self.read_bps = read_bps
        self.memory_bytes = memory_bytes
        self.dirs: list[str] = []
        self._memory_file: str | None = None

    def _make(self, parent: str) -> str:
        d = os.path.join(parent, self.name)
        os.makedirs(d, exist_ok=True)
        self.dirs.append(d)
        return d

    @staticmethod
    def _write(path: str, value: str) -> None:
        with open(path, "w") as f:
            f.write(value)

    def create(self) -> "Group":
        v2 = _v2()
        if self.read_bps:
            dev, bps = self.read_bps
            if _v1("blkio"):
                d = self._make(_v1("blkio"))
                self._write(os.path.join(d, "blkio.throttle.read_bps_device"),
                            f"{device_number(dev)} {bps}")
            else:
                self._write(os.path.join(v2, "cgroup.subtree_control"), "+io")
                d = self._make(v2)
                self._write(os.path.join(d, "io.max"), f"{device_number(dev)} rbps={bps}")
        if self.memory_bytes is not None:
            if _v1("memory"):
                d = self._make(_v1("memory"))
                self._memory_file = os.path.join(d, "memory.limit_in_bytes")
            else:
                self._write(os.path.join(v2, "cgroup.subtree_control"), "+memory")
                d = self._make(v2)
                self._memory_file = os.path.join(d, "memory.max")
            self.set_memory(self.memory_bytes)
        return self

    def set_memory(self, nbytes: int) -> None:
        if self._memory_file:
            self._write(self._memory_file, str(int(nbytes)))

    def memory_usage(self) -> dict[str, int]:
        """The group's memory.stat (v1: rss, cache, ...; v2: anon, file, ...)."""
        if not self._memory_file:
            return {}
        out = {}
        with open(os.path.join(os.path.dirname(self._memory_file), "memory.stat")) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if v.strip().isdigit():
                    out[k] = int(v)
        return out

    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(self.dirs)]

    def remove(self) -> None:
        """Move what is left to the parent group and remove ours."""
        for d in dict.fromkeys(reversed(self.dirs)):
            parent = os.path.join(os.path.dirname(d), "cgroup.procs")
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids = f.read().split()
                for pid in pids:
                    try:
                        self._write(parent, pid)
                    except OSError:
                        pass
                os.rmdir(d)
            except OSError:
                pass
        self.dirs = []


def join(procs_files: list[str], pid: int | None = None) -> None:
    """Put a process (default: this one) into the groups; its children follow."""
    for p in procs_files:
        with open(p, "w") as f:
            f.write(str(pid or os.getpid()))
