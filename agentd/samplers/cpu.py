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
    per_cpu: dict[str, tuple[int, ...]]  # "0" -> jiffies per mode
    context_switches: int
    procs_running: int
    procs_blocked: int


def parse_stat(text: str, path: str = "/proc/stat") -> CpuStat:
    """/proc/stat, or Malformed when it is cut short or its cpu lines disagree on their
    number of columns (a truncated line would otherwise read as an old kernel's)."""
    total: tuple[int, ...] = ()
    per_cpu: dict[str, tuple[int, ...]] = {}
    ctxt = running = blocked = 0
    columns = None
    for n, line in enumerate(complete(text, path).splitlines(), 1):
        if line.startswith("cpu"):
            parts = line.split()
            columns = columns or len(parts)
            if len(parts) != columns or len(parts) < 5:
                raise Malformed(f"{path} line {n}: {len(parts) - 1} CPU columns (the first "
                                f"line has {columns - 1}, every kernel at least 4)")
            # Old kernels print fewer columns; pad so every mode is present.
            values = tuple(ints(parts[1:9], path, n)) + (0,) * (9 - len(parts))
            if parts[0] == "cpu":
                total = values
            else:
                per_cpu[parts[0][3:]] = values
        elif line.startswith(("ctxt ", "procs_running ", "procs_blocked ")):
            parts = line.split()
            if len(parts) != 2:
                raise Malformed(f"{path} line {n}: {line!r}")
            value = ints(parts[1:], path, n)[0]
            if parts[0] == "ctxt":
                ctxt = value
            elif parts[0] == "procs_running":
                running = value
            else:
                blocked = value
    if not total:
        raise Malformed(f"{path}: no aggregate 'cpu' line")
    return CpuStat(total, per_cpu, ctxt, running, blocked)


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


def usage_row(prev: CpuStat, cur: CpuStat) -> Row:
    """CPU use between two readings, in cores, normalised by elapsed jiffies (not wall time)
    so a late tick does not inflate the figures."""
    d = _deltas(prev.total, cur.total)
    if d is None:
        return {}  # counters went backwards: a reset, no figures for this tick
    elapsed = sum(d)
    ncpu = max(len(cur.per_cpu), 1)
    if elapsed <= 0:
        return {}
    scale = ncpu / elapsed
    max_core = 0.0
    for cpu, values in cur.per_cpu.items():
        before = prev.per_cpu.get(cpu)
        dc = _deltas(before, values) if before is not None else None
        if dc is not None and sum(dc) > 0:
            max_core = max(max_core, _busy(dc) / sum(dc))
    return {
        "cpu.busy:": _busy(d) * scale,
        "cpu.user:": (d[_USER] + d[_NICE]) * scale,
        "cpu.system:": (d[_SYSTEM] + d[_IRQ] + d[_SOFTIRQ]) * scale,
        "cpu.iowait:": d[_IOWAIT] * scale,
        "cpu.steal:": d[_STEAL] * scale,
        "cpu.max_core:": max_core,
        "cpu.count:": float(ncpu),
        "cpu.procs_blocked:": float(cur.procs_blocked),
    }


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

    def sample(self, now: float, slow: bool) -> Row:
        cur = parse_stat(self._file.read(), self._path)
        row = usage_row(self._last, cur)
        self._last = cur
        return row

    def close(self) -> None:
        self._file.close()

    def series(self) -> list[Series]:
        stat = self._last
        hz = float(USER_HZ)
        out: list[Series] = [("agentd_cpu_seconds_total", (mode,), v / hz)
                             for mode, v in zip(MODES, stat.total)]
        if self.opts["per_core"]:
            for cpu, values in stat.per_cpu.items():
                for mode, v in zip(MODES, values):
                    out.append(("agentd_cpu_core_seconds_total", (cpu, mode), v / hz))
        out += [
            ("agentd_cpu_online", (), float(len(stat.per_cpu))),
            ("agentd_cpu_procs_blocked", (), float(stat.procs_blocked)),
            ("agentd_cpu_procs_running", (), float(stat.procs_running)),
            ("agentd_cpu_context_switches_total", (), float(stat.context_switches)),
        ]
        return out
