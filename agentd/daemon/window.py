"""The high-rate window: the last N minutes of every sampler's rows at full rate, in fixed memory.

Each sampler has its own ring (its own timestamps and interval), so a slow or stalled sampler
never blurs another's timing; readers align rings by time. Memory is bounded by
rows x max_columns x 4 bytes per ring (float32 values) plus 8 bytes per row for timestamps;
columns are allocated as channels appear, so a node with few devices uses less.

Time: a ring keeps each row's monotonic time and, from its newest row, the offset between
the wall clock and the monotonic one. Readers get wall-clock times (Unix seconds) computed as
monotonic time + that offset: rows stay in arrival order with their true spacing whatever
the wall clock does (an NTP step of an hour back or forth moves the whole window with it,
never a negative interval or a gap), and the newest row carries the wall clock's own reading.
"""

from __future__ import annotations

import io
import math
import threading

import numpy as np

VALUE_DTYPE = np.float32


def ring_rows(seconds: float, interval: float) -> int:
    """Rows of a ring holding `seconds` of rows at `interval`."""
    return max(math.ceil(seconds / interval), 2)


def ring_bytes(rows: int, max_columns: int) -> int:
    """The most memory a ring can take: its values at full width and its timestamps."""
    return rows * (max_columns * np.dtype(VALUE_DTYPE).itemsize + 8)


class Ring:
    def __init__(self, rows: int, max_columns: int = 256, initial_columns: int = 16):
        self.rows = max(int(rows), 2)
        self.max_columns = max_columns
        self._t = np.full(self.rows, np.nan)  # monotonic seconds of each row
        self._offset = 0.0  # wall clock minus monotonic clock at the newest row
        self._v = np.full((self.rows, min(initial_columns, max_columns)), np.nan, VALUE_DTYPE)
        self._columns: dict[str, int] = {}
        self._last_write = np.zeros(max_columns, np.int64)  # row count at each column's write
        # A sampler's rows have the same keys tick after tick (or a few variants): their
        # columns are looked up once per variant, and a row is stored by one numpy assignment.
        self._layouts: dict[tuple, np.ndarray] = {}
        self.appended = 0  # rows appended since creation
        self.dropped_columns = 0
        self._lock = threading.Lock()

    @property
    def reserved_bytes(self) -> int:
        return ring_bytes(self.rows, self.max_columns)

    @property
    def used_bytes(self) -> int:
        return self._t.nbytes + self._v.nbytes

    def _column(self, key: str) -> int | None:
        col = self._columns.get(key)
        if col is not None:
            return col
        if len(self._columns) < self._v.shape[1]:
            col = len(self._columns)
        elif self._v.shape[1] < self.max_columns:
            width = min(self._v.shape[1] * 2, self.max_columns)
            grown = np.full((self.rows, width), np.nan, VALUE_DTYPE)
            grown[:, : self._v.shape[1]] = self._v
            self._v = grown
            col = len(self._columns)
        else:
            # Reuse a column whose channel has not been written for a whole ring: its data
            # has aged out completely (an exited process, a removed disk).
            stale = [c for k, c in self._columns.items()
                     if self.appended - self._last_write[c] >= self.rows]
            if not stale:
                self.dropped_columns += 1
                return None
            col = stale[0]
            del self._columns[next(k for k, c in self._columns.items() if c == col)]
            self._v[:, col] = np.nan
            self._layouts.clear()  # a column changed hands
        self._columns[key] = col
        self._last_write[col] = self.appended
        return col

    def _layout(self, keys: tuple) -> np.ndarray | None:
        """The columns of a row's keys, in order; None (not remembered) when a key has no
        column, so that every such row is counted in dropped_columns."""
        cols = [self._column(k) for k in keys]
        if None in cols:
            return None
        layout = np.array(cols, dtype=np.intp)
        if len(self._layouts) >= 64:
            self._layouts.clear()
        self._layouts[keys] = layout
        return layout

    def append(self, t: float, row: dict[str, float], monotonic: float | None = None) -> None:
        """A row at wall-clock time t (Unix seconds), taken at `monotonic` (time.monotonic();
        without it, t stands for both, as for recordings and tests)."""
        with self._lock:
            i = self.appended % self.rows
            m = t if monotonic is None else monotonic
            self._t[i] = m
            self._offset = t - m
            keys = tuple(row)
            cols = self._layouts.get(keys)
            if cols is None:
                cols = self._layout(keys)
            line = self._v[i]  # after _layout: the matrix may have grown
            line[:] = np.nan
            if cols is not None:
                line[cols] = np.fromiter(row.values(), np.float64, len(row))
                self._last_write[cols] = self.appended
            else:
                for key, value in row.items():
                    col = self._columns.get(key)
                    if col is not None:
                        line[col] = value
                        self._last_write[col] = self.appended
            self.appended += 1

    def snapshot(self, since: float | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(times, column names, values[rows, columns]) in time order, copies."""
        with self._lock:
            n = min(self.appended, self.rows)
            start = self.appended % self.rows if self.appended > self.rows else 0
            order = (np.arange(n) + start) % self.rows
            t = self._t[order] + self._offset
            names = sorted(self._columns, key=self._columns.get)
            v = self._v[order][:, [self._columns[k] for k in names]]
        if since is not None:
            keep = t >= since
            t, v = t[keep], v[keep]
        return t, names, v

    def channels(self) -> list[str]:
        """The channel names the ring holds a column for."""
        with self._lock:
            return list(self._columns)

    def column(self, key: str, since: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(times, values) of one channel in time order, copies; only the rows at or after
        `since` are touched (a scrape reads the last minute of a ten-minute ring)."""
        with self._lock:
            col = self._columns.get(key)
            n = min(self.appended, self.rows)
            start = self.appended % self.rows if self.appended > self.rows else 0
            if since is None:
                order = (np.arange(n) + start) % self.rows
            else:
                rows = np.flatnonzero(self._t[:n] >= since - self._offset)
                order = rows[np.argsort((rows - start) % self.rows, kind="stable")]
            t = self._t[order] + self._offset
            v = self._v[order, col] if col is not None else np.full(len(order), np.nan,
                                                                     VALUE_DTYPE)
        return t, v


class Window:
    """The rings of all samplers, by sampler name."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._rings: dict[str, Ring] = {}
        self._intervals: dict[str, float] = {}
        self._lock = threading.Lock()

    def ring(self, name: str, interval: float, max_columns: int = 256) -> Ring:
        """The sampler's ring, kept across restarts of the sampler when its interval holds."""
        rows = ring_rows(self.seconds, interval)
        with self._lock:
            ring = self._rings.get(name)
            if ring is None or ring.rows != rows:
                ring = Ring(rows, max_columns)
                self._rings[name] = ring
                self._intervals[name] = interval
            return ring

    def drop(self, name: str) -> None:
        with self._lock:
            self._rings.pop(name, None)
            self._intervals.pop(name, None)

    def rings(self) -> dict[str, Ring]:
        with self._lock:
            return dict(self._rings)

    @property
    def reserved_bytes(self) -> int:
        return sum(r.reserved_bytes for r in self.rings().values())

    @property
    def used_bytes(self) -> int:
        return sum(r.used_bytes for r in self.rings().values())

    def export(self, since: float | None = None) -> dict[str, dict]:
        out = {}
        for name, ring in self.rings().items():
            t, names, v = ring.snapshot(since)
            out[name] = {"interval": self._intervals.get(name), "t": t, "columns": names,
                         "values": v}
        return out

    def to_npz(self, since: float | None = None, meta: dict | None = None,
               compress: bool = True) -> bytes:
        return groups_to_npz(self.export(since), meta, compress)


def groups_to_npz(groups: dict[str, dict], meta: dict | None = None,
                  compress: bool = True) -> bytes:
    """The window's (and a recording's) file format: compressed numpy arrays per sampler
    ring, t:NAME (Unix seconds), v:NAME (values), c:NAME (channel names), i:NAME (interval),
    and the node's description as JSON in "meta". `compress=False` stores the arrays as
    they are (a zip of .npy members, read the same way): what the daemon hands its own
    processes, where deflating would cost more than the copy."""
    import json

    arrays = {"meta": np.array(json.dumps(meta or {}, default=str))}
    for name, g in groups.items():
        arrays[f"t:{name}"] = g["t"]
        arrays[f"v:{name}"] = g["values"]
        arrays[f"c:{name}"] = np.array(g["columns"], dtype=np.str_)
        arrays[f"i:{name}"] = np.array([g["interval"] or 0.0])
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return buf.getvalue()


def load_npz(data: bytes) -> dict[str, dict]:
    """The inverse of Window.to_npz: sampler -> {interval, t, columns, values}."""
    return load_npz_with_meta(data)[0]


def load_npz_with_meta(data: bytes) -> tuple[dict[str, dict], dict]:
    """The groups and the node's description of a window in npz form. Raises ValueError,
    saying what is wrong, on bytes that are not such a window: this reads files and HTTP
    replies, so whatever numpy, zipfile or json raise on corrupt input becomes that."""
    import json

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            names = {k.split(":", 1)[1] for k in z.files if ":" in k}
            groups = {n: _group(n, z[f"i:{n}"], z[f"t:{n}"], z[f"c:{n}"], z[f"v:{n}"])
                      for n in names}
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"not a window in npz form ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError("its meta is not a JSON object")
    return groups, meta


def _group(name: str, interval, t, columns, values) -> dict:
    """One ring's arrays, checked to fit together."""
    if interval.ndim != 1 or len(interval) < 1 or interval.dtype.kind not in "iuf" or \
            not (np.isfinite(interval[0]) and interval[0] >= 0):
        raise ValueError(f"ring {name}: the interval is not a number of seconds")
    if t.ndim != 1 or t.dtype.kind not in "iuf":
        raise ValueError(f"ring {name}: the times are not a list of numbers")
    if columns.ndim != 1 or columns.dtype.kind != "U":
        raise ValueError(f"ring {name}: the channel names are not a list of text")
    if values.ndim != 2 or values.dtype.kind not in "iuf" or \
            values.shape != (len(t), len(columns)):
        raise ValueError(f"ring {name}: values of shape {values.shape} do not fit "
                         f"{len(t)} times and {len(columns)} channels")
    return {"interval": float(interval[0]), "t": t, "columns": [str(c) for c in columns],
            "values": values}


def gpu_window_stats(t: np.ndarray, busy: np.ndarray, idle_threshold: float
                     ) -> dict[str, float] | None:
    """Idle fraction, longest idle gap (seconds) and utilization quantiles of one GPU's busy
    series at the fast interval. Pure: arrays in, numbers out."""
    ok = ~np.isnan(busy)
    t, busy = t[ok], busy[ok].astype(np.float64)
    if len(busy) < 2:
        return None
    # Rows in arrival order; a time that went backwards (a recording across a clock step)
    # counts as no time, never as negative time.
    steps = np.diff(t)
    forward = steps[steps > 0]
    typical = _quantile(np.sort(forward), 0.5) if len(forward) else 0.0
    dt = np.clip(np.append(steps, typical), 0.0, None)
    if dt.sum() <= 0:
        return None
    idle = busy < idle_threshold
    longest = 0.0
    if idle.any():
        # Sum the row durations of each run of idle rows.
        edges = np.diff(np.concatenate(([0], idle.astype(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        cum = np.concatenate(([0.0], np.cumsum(dt)))
        longest = float(np.max(cum[ends] - cum[starts]))
    ordered = np.sort(busy)
    q10, q50, q90 = (_quantile(ordered, q) for q in (0.1, 0.5, 0.9))
    return {
        "idle_ratio": float(dt[idle].sum() / dt.sum()),
        "longest_idle_seconds": longest,
        "p10": float(q10),
        "p50": float(q50),
        "p90": float(q90),
    }


def _quantile(ordered: np.ndarray, q: float) -> float:
    """np.quantile(x, q) (its default, linear method) of sorted values, bit for bit, without
    its generic machinery: ~50 us a call, the bulk of a scrape's window statistics."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    frac = pos - lo
    a, b = float(ordered[lo]), float(ordered[hi])
    d = b - a
    return b - d * (1 - frac) if frac >= 0.5 else a + d * frac
