"""Pressure stall information from /proc/pressure/{cpu,io,memory} (Linux 4.20+, CONFIG_PSI).

The cumulative `total=` stall times (microseconds) are exported as counters, so rate() gives
the exact stall share over any window, finer than the kernel's own avg10/avg60.
"""

from __future__ import annotations

import os

from agentd.paths import read_text
from agentd.samplers.base import Row, Sampler, Unavailable

RESOURCES = ("cpu", "io", "memory")


def parse_pressure(text: str) -> dict[str, float]:
    """'some'/'full' -> total stall time in seconds."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        for field in parts[1:]:
            if field.startswith("total="):
                out[parts[0]] = int(field[6:]) / 1e6
    return out


class PressureSampler(Sampler):
    name = "pressure"
    help = "pressure stall information for CPU, I/O and memory (/proc/pressure)"
    default_rate = "slow"

    def open(self) -> None:
        self._files = {}
        for res in RESOURCES:
            path = self.ctx.paths.proc("pressure", res)
            if os.path.exists(path):
                self._files[res] = path
        if not self._files:
            raise Unavailable(
                f"{self.ctx.paths.proc('pressure')} is absent (kernel without CONFIG_PSI, "
                "or booted with psi=0)"
            )
        self._last: dict[str, tuple[float, float]] = {}

    def sample(self, now: float, slow: bool) -> Row:
        row: Row = {}
        for res, path in self._files.items():
            try:
                totals = parse_pressure(read_text(path))
            except OSError as e:
                # /proc/pressure/cpu exists but refuses reads when PSI is disabled at boot.
                self.log_once(30, ("unreadable", res), "cannot read %s: %s", path, e.strerror)
                continue
            for kind, seconds in totals.items():
                self.out.set_counter("agentd_pressure_waiting_seconds_total", (res, kind), seconds)
            for kind, signal in (("some", f"psi.{res}:"), ("full", "psi.io_full:")):
                if kind == "full" and res != "io":
                    continue
                if kind not in totals:
                    continue
                key = f"{res}.{kind}"
                if key in self._last:
                    t0, s0 = self._last[key]
                    if now > t0:
                        row[signal] = min(max((totals[kind] - s0) / (now - t0), 0.0), 1.0)
                self._last[key] = (now, totals[kind])
        return row
