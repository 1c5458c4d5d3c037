"""Pressure stall information from /proc/pressure/{cpu,io,memory} (Linux 4.20+, CONFIG_PSI).

The cumulative `total=` stall times (microseconds) are exported as counters, so rate() gives
the exact stall share over any window, finer than the kernel's own avg10/avg60.
"""

from __future__ import annotations

import os

from agentd.paths import read_text
from agentd.samplers.base import Malformed, Row, Sampler, Unavailable, complete, ints

RESOURCES = ("cpu", "io", "memory")


def parse_pressure(text: str, path: str = "pressure") -> dict[str, float]:
    """'some'/'full' -> total stall time in seconds; Malformed when cut short or a line has
    no total= (every PSI kernel prints `some ... total=N`)."""
    out = {}
    for n, line in enumerate(complete(text, path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        totals = [f[6:] for f in parts[1:] if f.startswith("total=")]
        if parts[0] not in ("some", "full") or len(totals) != 1:
            raise Malformed(f"{path} line {n}: {line!r}")
        out[parts[0]] = ints(totals, path, n)[0] / 1e6
    if "some" not in out:
        raise Malformed(f"{path}: no 'some' line")
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
        malformed = []
        for res, path in self._files.items():
            try:
                totals = parse_pressure(read_text(path), path)
            except OSError as e:
                # /proc/pressure/cpu exists but refuses reads when PSI is disabled at boot.
                self.log_once(30, ("unreadable", res), "cannot read %s: %s", path, e.strerror)
                continue
            except Malformed as e:
                malformed.append(str(e))  # the other resources are still read
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
                    if now > t0 and totals[kind] >= s0:  # a decrease is a reset: no figure
                        row[signal] = min((totals[kind] - s0) / (now - t0), 1.0)
                self._last[key] = (now, totals[kind])
        if malformed:
            # Counted as this run's error; what the other files gave is kept for next time.
            raise Malformed("; ".join(malformed))
        return row
