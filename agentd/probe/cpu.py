"""The CPU a trainer may use: the cores of its cpuset (and affinity), capped by its CFS quota,
read from the cgroup it runs in, on cgroup v2, v1, or a mix of both (a controller lives in
one hierarchy only, so each is read where it is mounted).

The quota of a group is the tightest over its ancestors (a child cannot exceed its parent);
the cpuset is the leaf's effective one (the kernel already intersects it with the parents').
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from agentd.paths import Paths, read_optional
from agentd.probe.blockdev import parse_mountinfo


class CpuError(Exception):
    """The cgroup or process cannot be read (one line)."""


def parse_cpulist(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def format_cpulist(cpus: set[int]) -> str:
    """{0, 1, 2, 3, 8} -> '0-3,8'."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 cpu.max 'QUOTA PERIOD' -> cores (None: 'max', no quota)."""
    f = text.split()
    if not f or f[0] == "max":
        return None
    period = int(f[1]) if len(f) > 1 else 100000
    return int(f[0]) / period if period > 0 else None


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup -> {controller: path}; the v2 hierarchy's path is under ""."""
    out = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            out[""] = path
        for c in controllers.split(","):
            if c:
                out[c.removeprefix("name=")] = path
    return out


@dataclass(frozen=True)
class Hierarchy:
    mount_point: str
    root: str  # the cgroup path at the mount's root (not "/" inside a cgroup namespace)
    version: int
    controllers: frozenset[str]


def hierarchies(mountinfo: str) -> list[Hierarchy]:
    out = []
    for m in parse_mountinfo(mountinfo):
        if m.fstype == "cgroup2":
            out.append(Hierarchy(m.mount_point, m.root, 2, frozenset()))
        elif m.fstype == "cgroup":
            ctl = frozenset(o for o in m.super_options.split(",")
                            if o in ("cpu", "cpuacct", "cpuset", "memory", "blkio", "pids"))
            out.append(Hierarchy(m.mount_point, m.root, 1, ctl))
    return out


def _dir(h: Hierarchy, cgpath: str) -> str:
    rel = cgpath
    if h.root not in ("", "/") and (rel == h.root or rel.startswith(h.root.rstrip("/") + "/")):
        rel = rel[len(h.root):]
    return os.path.join(h.mount_point, rel.lstrip("/"))


def _ancestors(h: Hierarchy, directory: str) -> list[str]:
    """`directory` and each parent up to the hierarchy's mount point."""
    out = []
    d = os.path.normpath(directory)
    top = os.path.normpath(h.mount_point)
    while True:
        out.append(d)
        if d == top or not d.startswith(top):
            return out
        d = os.path.dirname(d)


def _existing(h: Hierarchy, cgpath: str) -> str:
    """The group's directory, or its nearest existing ancestor (a path named for another
    hierarchy may not exist in this one)."""
    for d in _ancestors(h, _dir(h, cgpath)):
        if os.path.isdir(d):
            return d
    return h.mount_point


def quota_cores(hs: list[Hierarchy], groups: dict[str, str]) -> float | None:
    """The tightest CFS quota over the group and its ancestors, in cores (None: none)."""
    best = None
    for h in hs:
        if h.version == 2:
            if "" not in groups:
                continue
            for d in _ancestors(h, _existing(h, groups[""])):
                text = read_optional(os.path.join(d, "cpu.max"))
                q = parse_cpu_max(text) if text else None
                if q is not None:
                    best = q if best is None else min(best, q)
        elif "cpu" in h.controllers and "cpu" in groups:
            for d in _ancestors(h, _existing(h, groups["cpu"])):
                quota = read_optional(os.path.join(d, "cpu.cfs_quota_us"))
                period = read_optional(os.path.join(d, "cpu.cfs_period_us"))
                try:
                    qv, pv = int(quota or -1), int(period or 0)
                except ValueError:
                    continue
                if qv > 0 and pv > 0:
                    best = qv / pv if best is None else min(best, qv / pv)
    return best


def cpuset(hs: list[Hierarchy], groups: dict[str, str]) -> set[int] | None:
    """The CPUs the group's cpuset allows (None when no cpuset controller is mounted)."""
    for h in hs:
        if h.version == 1 and "cpuset" in h.controllers and "cpuset" in groups:
            d = _existing(h, groups["cpuset"])
            for name in ("cpuset.effective_cpus", "cpuset.cpus"):
                text = read_optional(os.path.join(d, name))
                if text and text.strip():
                    return parse_cpulist(text)
    for h in hs:
        if h.version == 2 and "" in groups:
            for d in _ancestors(h, _existing(h, groups[""])):
                text = read_optional(os.path.join(d, "cpuset.cpus.effective"))
                if text and text.strip():
                    return parse_cpulist(text)
    return None


def _cgroup_arg(hs: list[Hierarchy], path: str) -> str:
    """--cgroup PATH: a cgroup path ('/system.slice/x.service'), or a directory under a
    hierarchy's mount point ('/sys/fs/cgroup/cpu/x'), as a cgroup path."""
    for h in hs:
        mp = h.mount_point.rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            return "/" + path[len(mp):].strip("/")
    return "/" + path.strip("/")


def measure(pid: int | None = None, cgroup: str | None = None,
            paths: Paths | None = None) -> dict:
    """The `cpu` entry of the state file for a process (default: this one) or a cgroup."""
    paths = paths or Paths()
    text = read_optional(paths.proc("self", "mountinfo"))
    if text is None:
        raise CpuError(f"cannot read {paths.proc('self', 'mountinfo')}")
    hs = hierarchies(text)
    if cgroup:
        shown = _cgroup_arg(hs, cgroup)
        groups = {"": shown, "cpu": shown, "cpuset": shown}
        if not any(os.path.isdir(_dir(h, shown)) for h in hs):
            raise CpuError(f"--cgroup {cgroup}: no such cgroup")
    else:
        who = str(pid) if pid else "self"
        cg = read_optional(paths.proc(who, "cgroup"))
        if cg is None:
            raise CpuError(f"cannot read {paths.proc(who, 'cgroup')}"
                           + (f": no process {pid}" if pid else ""))
        groups = parse_proc_cgroup(cg)
        shown = groups.get("") if groups.get("", "/") != "/" else (
            groups.get("cpu") or groups.get("cpuset") or groups.get(""))
    online_text = read_optional(paths.sys("devices", "system", "cpu", "online"))
    online = parse_cpulist(online_text) if online_text else set(range(os.cpu_count() or 1))
    cpus = cpuset(hs, groups)
    cpus = (cpus & online) if cpus else set(online)
    affinity = None
    if not cgroup and paths.procfs == "/proc":
        try:
            affinity = os.sched_getaffinity(pid or 0)
        except OSError:
            affinity = None
        if affinity:
            cpus = (cpus & affinity) or cpus
    quota = quota_cores(hs, groups)
    cores = float(len(cpus)) if quota is None else min(float(len(cpus)), quota)
    return {"source": "measured", "cores": round(cores, 3), "cpuset": format_cpulist(cpus),
            "cgroup": shown or None, "quota_cores": quota, "cpuset_cores": len(cpus),
            "pid": pid}
