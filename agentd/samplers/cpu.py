"""Host CPU from /proc/stat: time by mode (per core on request), blocked and runnable tasks."""

from __future__ import annotations

import os
from dataclasses import dataclass

from agentd.paths import read_text
from agentd.samplers.base import Option, Row, Sampler, Series, Unavailable

MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_USER, _NICE, _SYSTEM, _IDLE, _IOWAIT, _IRQ, _SOFTIRQ, _STEAL = range(8)
USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuStat:
    total: tuple[int, ...]  # jiffies per mode, all CPUs
    per_cpu: dict[str, tuple[int, ...]]  # "0" -> jiffies per mode
    context_switches: int
    procs_running: int
    procs_blocked: int


def parse_stat(text: str) -> CpuStat:
    total: tuple[int, ...] = ()
    per_cpu: dict[str, tuple[int, ...]] = {}
    ctxt = running = blocked = 0
    for line in text.splitlines():
        if line.startswith("cpu"):
            parts = line.split()
            # Old kernels print fewer columns; pad so every mode is present.
            values = tuple(int(v) for v in parts[1:9]) + (0,) * (9 - len(parts))
            if parts[0] == "cpu":
                total = values
            else:
                per_cpu[parts[0][3:]] = values
        elif line.startswith("ctxt "):
            ctxt = int(line.split()[1])
        elif line.startswith("procs_running "):
            running = int(line.split()[1])
        elif line.startswith("procs_blocked "):
            blocked = int(line.split()[1])
    if not total:
        raise ValueError("no aggregate 'cpu' line in /proc/stat")
    return CpuStat(total, per_cpu, ctxt, running, blocked)


def _busy(v: tuple[int, ...]) -> int:
    return v[_USER] + v[_NICE] + v[_SYSTEM] + v[_IRQ] + v[_SOFTIRQ]


def usage_row(prev: CpuStat, cur: CpuStat) -> Row:
    """CPU use between two readings, in cores, normalised by elapsed jiffies (not wall time)
    so a late tick does not inflate the figures."""
    d = [c - p for c, p in zip(cur.total, prev.total)]
    elapsed = sum(d)
    ncpu = max(len(cur.per_cpu), 1)
    if elapsed <= 0:
        return {}
    scale = ncpu / elapsed
    max_core = 0.0
    for cpu, values in cur.per_cpu.items():
        before = prev.per_cpu.get(cpu)
        if before is None:
            continue
        dc = sum(values) - sum(before)
        if dc > 0:
            max_core = max(max_core, (_busy(values) - _busy(before)) / dc)
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
        try:
            self._last = parse_stat(read_text(self._path))
        except OSError as e:
            raise Unavailable(f"cannot read {self._path}: {e.strerror}") from None

    def sample(self, now: float, slow: bool) -> Row:
        cur = parse_stat(read_text(self._path))
        row = usage_row(self._last, cur)
        self._last = cur
        return row

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
