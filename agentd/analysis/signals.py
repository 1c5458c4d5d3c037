"""Canonical signals on one time grid: what every detector reads, whatever the source.

A channel is "signal:subject" (e.g. "gpu.busy:3", "disk.read:nvme0n1", "cpu.busy:"), with the
units of agentd/catalog.py SIGNALS. A signal a source lacks is absent, not zero; NaN marks a
missing sample. `resolution` is the grid step, and says how fine a source can see: 0.1 s
from agentd's window, 15-30 s from a Prometheus scrape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Signals:
    t: np.ndarray  # [n] Unix seconds, end of each interval
    channels: dict[str, np.ndarray]  # "signal:subject" -> [n] float (NaN: missing)
    resolution: float  # seconds between samples
    source: str = ""  # "window", "recording", "prometheus (agentd)", "prometheus (dcgm)", ...
    node: str = ""
    meta: dict = field(default_factory=dict)  # topology, GPU identities, notes

    def has(self, signal: str) -> bool:
        prefix = signal + ":"
        return any(k.startswith(prefix) for k in self.channels)

    def subjects(self, signal: str) -> list[str]:
        prefix = signal + ":"
        subs = [k[len(prefix):] for k in self.channels if k.startswith(prefix)]
        return sorted(subs, key=lambda s: (len(s), s))

    def get(self, signal: str, subject: str = "") -> np.ndarray | None:
        return self.channels.get(f"{signal}:{subject}")

    def matrix(self, signal: str) -> tuple[list[str], np.ndarray]:
        subs = self.subjects(signal)
        if not subs:
            return [], np.zeros((len(self.t), 0))
        return subs, np.stack([self.channels[f"{signal}:{s}"] for s in subs], axis=1)

    def gpus(self) -> list[str]:
        return self.subjects("gpu.busy")

    def slice(self, t0: float, t1: float) -> "Signals":
        keep = (self.t > t0) & (self.t <= t1)
        return Signals(self.t[keep], {k: v[keep] for k, v in self.channels.items()},
                       self.resolution, self.source, self.node, self.meta)

    @property
    def duration(self) -> float:
        """Seconds the samples cover (gaps in the rows excluded)."""
        return float(len(self.t) * self.resolution)

    @property
    def span(self) -> float:
        """Seconds from the first sample to the end of the last."""
        return float(self.t[-1] - self.t[0] + self.resolution) if len(self.t) else 0.0


MAX_GAP_STEPS = 50  # a pause in the rows longer than this many steps splits the grid


def from_groups(groups: dict[str, dict], step: float | None = None, source: str = "window",
                node: str = "", meta: dict | None = None) -> Signals:
    """Align the window's per-sampler rings ({name: {interval, t, columns, values}}) on the
    finest ring's grid. Slow signals are held (step-wise) between their samples; a sample
    never reaches back before its own ring began. Rows are taken in time order (duplicates
    dropped); where no sampler wrote for a while (the agent stopped, the clock jumped) the
    grid skips the gap, so memory follows the rows present, never the span of time."""
    clean = {}
    for k, g in groups.items():
        t = np.asarray(g["t"], dtype=float)
        if not len(t):
            continue
        values = np.asarray(g["values"], dtype=float).reshape(len(t), -1)
        ok = np.isfinite(t)
        t, values = t[ok], values[ok]
        order = np.argsort(t, kind="stable")
        t, values = t[order], values[order]
        keep = np.ones(len(t), dtype=bool)
        keep[1:] = np.diff(t) > 0
        values = np.where(np.isfinite(values), values, np.nan)
        if keep.any():
            clean[k] = {**g, "t": t[keep], "values": values[keep]}
    groups = clean
    if not groups:
        return Signals(np.zeros(0), {}, step or 0.1, source, node, meta or {})
    step = step or min(float(g["interval"] or 1.0) for g in groups.values())
    grid = _grid(groups, step)
    channels: dict[str, np.ndarray] = {}
    for g in groups.values():
        t, values = g["t"], g["values"]
        interval = float(g["interval"] or step)
        fine = interval < step * 0.75
        if interval <= step * 1.25:
            # A ring at the grid's rate: a row holds what happened since the row before it
            # (rates over the tick), so each grid point takes the row whose interval covers
            # it, the first at or after it. A row late under load covers the points it was
            # late for: holding the row before across them would give the late rows' values
            # (the busy phases whose CPU use delayed the sampler) too little weight. A first
            # row reaches back one interval; no row covers more than 2.5.
            idx = np.searchsorted(t, grid - step * 1e-3, side="left")
            at = t[np.clip(idx, 0, len(t) - 1)]
            valid = (idx < len(t)) & (at - grid <= np.where(
                idx == 0, interval, max(interval * 2.5, step * 1.5)) + step * 1e-3)
            idx = np.clip(idx, 0, len(t) - 1)
        else:
            # Slower rings (gauges read once a second, held): the latest row at or before.
            idx = np.searchsorted(t, grid + step * 1e-3, side="right") - 1
            valid = (idx >= 0) & (grid - t[np.clip(idx, 0, None)] <= max(
                interval * 2.5, step * 1.5))
        for j, col in enumerate(g["columns"]):
            v = values[:, j]
            if fine:
                out = _bin_mean(t, v, grid, step)
            else:
                out = np.where(valid, v[np.clip(idx, 0, None)], np.nan)
            channels[col] = out
    return Signals(grid, channels, step, source, node, meta or {})


def _grid(groups: dict[str, dict], step: float) -> np.ndarray:
    """Grid points at multiples of `step` over the spans where rows exist."""
    times = np.unique(np.concatenate([g["t"] for g in groups.values()]))
    breaks = np.flatnonzero(np.diff(times) > max(step * MAX_GAP_STEPS, 10.0))
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [len(times) - 1]))
    parts = []
    for a, b in zip(starts, ends):
        t0 = np.round(times[a] / step) * step
        parts.append(np.arange(t0, times[b] + step / 2, step))
    return np.concatenate(parts) if parts else np.zeros(0)


def _bin_mean(t: np.ndarray, v: np.ndarray, grid: np.ndarray, step: float) -> np.ndarray:
    ok = ~np.isnan(v)
    bins = np.searchsorted(grid, t[ok] - step * 1e-3, side="left")
    inside = bins < len(grid)
    sums = np.bincount(bins[inside], weights=v[ok][inside], minlength=len(grid))
    counts = np.bincount(bins[inside], minlength=len(grid))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def nanmean(x: np.ndarray | None) -> float:
    if x is None:
        return float("nan")
    x = np.asarray(x, dtype=float)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def coverage(x: np.ndarray | None) -> float:
    """Share of samples present."""
    if x is None or len(x) == 0:
        return 0.0
    return float((~np.isnan(np.asarray(x, dtype=float))).mean())
