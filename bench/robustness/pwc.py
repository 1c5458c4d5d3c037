"""Piecewise-constant signals: the generator's exact representation of a node's activity.

Every quantity the generator models (a GPU running a kernel, bytes per second on a link, cores
busy, tasks in D state) is a sum of segments (start, end, level). Its running integral is then
piecewise linear, so the integral over any interval, and the mean a counter read at any two
instants reports, is exact: np.interp on the integral at the breakpoints. Samplers and
exporters are emulated from these integrals, never from a fine time grid.
"""

from __future__ import annotations

import numpy as np


class Segments:
    """Segments collected while a timeline is generated; overlapping levels add up."""

    def __init__(self) -> None:
        self._t0: list[np.ndarray] = []
        self._t1: list[np.ndarray] = []
        self._v: list[np.ndarray] = []
        self._s0: list[float] = []  # scalar segments, appended one at a time
        self._s1: list[float] = []
        self._sv: list[float] = []

    def put(self, t0: float, t1: float, value: float) -> None:
        """One segment (the fast path of the step loop)."""
        if t1 > t0 and value:
            self._s0.append(t0)
            self._s1.append(t1)
            self._sv.append(value)

    def add(self, t0, t1, value) -> None:
        t0 = np.atleast_1d(np.asarray(t0, dtype=float))
        t1 = np.atleast_1d(np.asarray(t1, dtype=float))
        v = np.broadcast_to(np.asarray(value, dtype=float), t0.shape)
        keep = t1 > t0
        if keep.any():
            self._t0.append(t0[keep])
            self._t1.append(t1[keep])
            self._v.append(np.array(v[keep]))

    def build(self, start: float, end: float) -> "Pwc":
        if self._s0:
            self.add(np.array(self._s0), np.array(self._s1), np.array(self._sv))
            self._s0, self._s1, self._sv = [], [], []
        if not self._t0:
            return Pwc(np.array([start, end]), np.zeros(1))
        t0 = np.clip(np.concatenate(self._t0), start, end)
        t1 = np.clip(np.concatenate(self._t1), start, end)
        v = np.concatenate(self._v)
        times = np.concatenate([t0, t1, [start, end]])
        deltas = np.concatenate([v, -v, [0.0, 0.0]])
        order = np.argsort(times, kind="stable")
        times, deltas = times[order], deltas[order]
        level = np.cumsum(deltas)
        # One breakpoint per distinct time: the level after all changes at that instant.
        last = np.ones(len(times), dtype=bool)
        last[:-1] = times[1:] != times[:-1]
        b = times[last]
        lv = level[last][:-1]
        lv[np.abs(lv) < 1e-9] = 0.0
        return Pwc(b, lv)


class Pwc:
    """A piecewise-constant function: level v[k] on [b[k], b[k+1])."""

    def __init__(self, b: np.ndarray, v: np.ndarray):
        self.b = np.asarray(b, dtype=float)
        self.v = np.asarray(v, dtype=float)
        self.c = np.concatenate([[0.0], np.cumsum(self.v * np.diff(self.b))])

    @staticmethod
    def constant(start: float, end: float, value: float) -> "Pwc":
        return Pwc(np.array([start, end]), np.array([float(value)]))

    def integral(self, t) -> np.ndarray:
        """The running integral from the start to each t (clamped to the span)."""
        return np.interp(np.asarray(t, dtype=float), self.b, self.c)

    def between(self, a, b) -> np.ndarray:
        """Integral over [a, b] for arrays of instants."""
        return self.integral(b) - self.integral(a)

    def mean(self, a, b) -> np.ndarray:
        a = np.asarray(a, dtype=float)
        b = np.asarray(b, dtype=float)
        span = np.where(b > a, b - a, np.nan)
        return self.between(a, b) / span

    def at(self, t) -> np.ndarray:
        """The level at each instant t (the level of the segment holding t)."""
        i = np.searchsorted(self.b, np.asarray(t, dtype=float), side="right") - 1
        return self.v[np.clip(i, 0, len(self.v) - 1)]

    def map(self, fn) -> "Pwc":
        """fn applied to each level: a derived quantity that is a function of the level."""
        return Pwc(self.b, fn(self.v))

    def scale(self, k: float) -> "Pwc":
        return Pwc(self.b, self.v * k)

    def total(self) -> float:
        return float(self.c[-1])


def add(*parts: Pwc) -> Pwc:
    """The sum of several functions on the union of their breakpoints."""
    b = np.unique(np.concatenate([p.b for p in parts]))
    mid = (b[:-1] + b[1:]) / 2
    return Pwc(b, sum(p.at(mid) for p in parts))


def clamp_min(p: Pwc, other: Pwc) -> Pwc:
    """Levelwise min of two functions."""
    b = np.unique(np.concatenate([p.b, other.b]))
    mid = (b[:-1] + b[1:]) / 2
    return Pwc(b, np.minimum(p.at(mid), other.at(mid)))


def fluid_queue(demand: Pwc, capacity: float) -> Pwc:
    """What a server of `capacity` (units/s) delivers when work arrives at the rate `demand`:
    work beyond the capacity waits in a backlog and is served as soon as there is room, so
    the total is conserved (up to what is still queued at the end) and the rate never
    exceeds the capacity."""
    b, v = demand.b, demand.v
    out_b: list[float] = [b[0]]
    out_v: list[float] = []
    q = 0.0
    for k in range(len(v)):
        t0, t1, d = b[k], b[k + 1], v[k]
        length = t1 - t0
        if d >= capacity:
            q += (d - capacity) * length
            out_b.append(t1)
            out_v.append(capacity)
        elif q > 0:
            drain = q / (capacity - d)
            if drain >= length:
                q -= (capacity - d) * length
                out_b.append(t1)
                out_v.append(capacity)
            else:
                q = 0.0
                out_b += [t0 + drain, t1]
                out_v += [capacity, d]
        else:
            out_b.append(t1)
            out_v.append(d)
    return Pwc(np.array(out_b), np.array(out_v))
