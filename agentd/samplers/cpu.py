"""Host CPU from /proc/stat: time by mode (per core on request), blocked and runnable tasks."""

from __future__ import annotations

import os
from typing import NamedTuple

from agentd.paths import ProcFile
from agentd.samplers.base import (Malformed, Option, Row, Sampler, Series, Unavailable,
                                  complete, ints)

MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_USER, _NICE, _SYSTEM, _IDLE, _IOWAIT, _IRQ, _SOFTIRQ, _STEAL = range(8)
USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuStat(NamedTuple):
    """/proc/stat, read ten times a second (a NamedTuple: cheaper to build than a frozen
    dataclass)."""

    total: tuple[int, ...]  # jiffies per mode, all CPUs
    per_cpu: dict[str, tuple[int, ...]] | None  # "0" -> jiffies per mode; None: not parsed
    context_switches: int
    procs_running: int
    procs_blocked: int
    cpus: int  # online CPUs (cpuN lines)


_SCALARS = (("ctxt", "\nctxt "), ("procs_running", "\nprocs_running "),
            ("procs_blocked", "\nprocs_blocked "))


def _cpu_values(parts: list[str], columns: int, path: str, n: int) -> tuple[int, ...]:
    if len(parts) != columns or len(parts) < 5:
        raise Malformed(f"{path} line {n}: {len(parts) - 1} CPU columns (the first line has "
                        f"{columns - 1}, every kernel at least 4)")
    # Old kernels print fewer columns; pad so every mode is present.
    return tuple(ints(parts[1:9], path, n)) + (0,) * (9 - len(parts))


def parse_stat(text: str, path: str = "/proc/stat", per_cpu: bool = True) -> CpuStat:
    """/proc/stat, or Malformed when it is cut short or its cpu lines disagree on their
    number of columns (a truncated line would otherwise read as an old kernel's).

    per_cpu=False leaves the per-CPU lines unparsed (only counted): a GPU node has 100-200
    CPUs, and parsing their lines field by field cost ~1 ms a tick at 224; the sampler parses
    them once a second. Everything else is found by searching the text, not line by line."""
    text = complete(text, path)
    first = text[:text.find("\n")]
    head = first.split()
    if not head or head[0] != "cpu":
        raise Malformed(f"{path}: no aggregate 'cpu' line")
    columns = len(head)
    total = _cpu_values(head, columns, path, 1)
    cpus = text.count("\ncpu")
    cores = None
    if per_cpu:
        cores = {}
        lines = text.split("\n", cpus + 1)
        for n, line in enumerate(lines[1:cpus + 1], 2):
            parts = line.split()
            if not parts or not parts[0].startswith("cpu"):
                raise Malformed(f"{path} line {n}: a cpu line after the others")
            cores[parts[0][3:]] = _cpu_values(parts, columns, path, n)
    scalars = {}
    for name, key in _SCALARS:
        at = text.find(key)
        if at < 0:
            scalars[name] = 0
            continue
        value = text[at + len(key):text.find("\n", at + 1)]
        try:
            scalars[name] = int(value)
        except ValueError:
            raise Malformed(f"{path}: {name} {value!r}") from None
    return CpuStat(total, cores, scalars["ctxt"], scalars["procs_running"],
                   scalars["procs_blocked"], cpus)


def _deltas(prev: tuple[int, ...], cur: tuple[int, ...]) -> list[int] | None:
    """Per-mode advance, or None when a counter went backwards (CPU hot-plug, a reset).
    idle and iowait are exempt, clamped at 0: the kernel documents that they can decrease
    slightly (NO_HZ accounting of idle CPUs; Documentation/filesystems/proc.rst)."""
    d = [c - p for c, p in zip(cur, prev)]
    for i, v in enumerate(d):
        if v < 0:
            if i not in (_IDLE, _IOWAIT):
                return None
            d[i] = 0
    return d


def _busy(v) -> int:
    return v[_USER] + v[_NICE] + v[_SYSTEM] + v[_IRQ] + v[_SOFTIRQ]


def busiest_core(prev: CpuStat, cur: CpuStat) -> float | None:
    """The busiest CPU's share of its time between two readings with their per-CPU lines
    parsed (None without them); CPUs whose counters went backwards are left out."""
    if prev.per_cpu is None or cur.per_cpu is None:
        return None
    max_core = 0.0
    for cpu, values in cur.per_cpu.items():
        before = prev.per_cpu.get(cpu)
        dc = _deltas(before, values) if before is not None else None
        if dc is not None and sum(dc) > 0:
            max_core = max(max_core, _busy(dc) / sum(dc))
    return max_core


def usage_row(prev: CpuStat, cur: CpuStat, cores_since: CpuStat | None = None) -> Row:
    """CPU use between two readings, in cores, normalised by elapsed jiffies (not wall time)
    so a late tick does not inflate the figures; the busiest core since `cores_since` (the
    last reading with its per-CPU lines, by default `prev`) where both have them."""
    d = _deltas(prev.total, cur.total)
    if d is None:
        return {}  # counters went backwards: a reset, no figures for this tick
    elapsed = sum(d)
    ncpu = max(cur.cpus, 1)
    if elapsed <= 0:
        return {}
    scale = ncpu / elapsed
    row = {
        "cpu.busy:": _busy(d) * scale,
        "cpu.user:": (d[_USER] + d[_NICE]) * scale,
        "cpu.system:": (d[_SYSTEM] + d[_IRQ] + d[_SOFTIRQ]) * scale,
        "cpu.iowait:": d[_IOWAIT] * scale,
        "cpu.steal:": d[_STEAL] * scale,
        "cpu.count:": float(ncpu),
        "cpu.procs_blocked:": float(cur.procs_blocked),
    }
    max_core = busiest_core(cores_since if cores_since is not None else prev, cur)
    if max_core is not None:
        row["cpu.max_core:"] = max_core
    return row


class CpuSampler(Sampler):
    name = "cpu"
    help = "CPU time by mode (iowait, steal included), blocked tasks (/proc/stat)"
    default_rate = "fast"
    options = {
        # Per-core series duplicate node_exporter's node_cpu_seconds_total and grow with the
        # core count (8 modes x 96 cores = 768 series, half of a scrape); the window keeps
        # the busiest core (cpu.max_core) either way.
        "per_core": Option(bool, False, "also export CPU time per core "
                                        "(agentd_cpu_core_seconds_total)"),
    }

    def open(self) -> None:
        self._path = self.ctx.paths.proc("stat")
        self._file = ProcFile(self._path)
        try:
            self._last = parse_stat(self._file.read(), self._path)
        except OSError as e:
            raise Unavailable(f"cannot read {self._path}: {e.strerror}") from None
        self._last_cores = self._last  # the last reading with its per-CPU lines

    def sample(self, now: float, slow: bool) -> Row:
        # The per-CPU lines (the busiest core, the per-core series) once a second: their
        # parse grows with the node's CPUs, the aggregate line's does not.
        cur = parse_stat(self._file.read(), self._path, per_cpu=slow)
        row = usage_row(self._last, cur, self._last_cores)  # busiest core: slow ticks
        self._last = cur
        if slow:
            self._last_cores = cur
        return row

    def close(self) -> None:
        self._file.close()

    def series(self) -> list[Series]:
        stat = self._last
        hz = float(USER_HZ)
        out: list[Series] = [("agentd_cpu_seconds_total", (mode,), v / hz)
                             for mode, v in zip(MODES, stat.total)]
        if self.opts["per_core"]:
            for cpu, values in (self._last_cores.per_cpu or {}).items():
                for mode, v in zip(MODES, values):
                    out.append(("agentd_cpu_core_seconds_total", (cpu, mode), v / hz))
        out += [
            ("agentd_cpu_online", (), float(stat.cpus)),
            ("agentd_cpu_procs_blocked", (), float(stat.procs_blocked)),
            ("agentd_cpu_procs_running", (), float(stat.procs_running)),
            ("agentd_cpu_context_switches_total", (), float(stat.context_switches)),
        ]
        return out
