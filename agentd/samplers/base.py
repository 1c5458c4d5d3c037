"""The interface every sampler implements, and the store of what it exports.

A sampler reads one source (NVML, /proc/stat, /proc/diskstats, ...). The daemon runs each in
its own thread at its own interval, so that a sampler stuck in a slow read never delays the
others. One run is `sample(now, slow)`: it updates the sampler's exported series and returns
one row for the high-rate window (canonical signal values keyed "signal:subject").
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

from agentd.catalog import METRICS_BY_NAME
from agentd.logs import LogOnce
from agentd.paths import Paths

Labels = tuple  # label values, in the order the catalog gives the metric's label names
Series = tuple  # (metric name, label values, value)
Row = dict  # window row: "signal:subject" -> float


class Malformed(ValueError):
    """A source file that is truncated or not in its format (a short read, a line with too
    few fields, a required field missing). The read counts as the sampler's error
    (agentd_sampler_errors_total) and nothing of it is exported: never a wrong number."""


def complete(text: str, path: str) -> str:
    """The text of a pseudo-file, checked to end where the kernel ends every one: at a
    newline. A read cut short (an empty or partial last line) raises Malformed."""
    if not text.endswith("\n"):
        raise Malformed(f"{path}: truncated (no newline at the end of {len(text)} bytes)")
    return text


def ints(fields: list[str], path: str, line: int) -> list[int]:
    """Integer fields of one line, or Malformed naming the file and line."""
    try:
        return [int(f) for f in fields]
    except ValueError:
        raise Malformed(f"{path} line {line}: not a number in {' '.join(fields)!r}") from None


class Unavailable(Exception):
    """The sampler's source is absent here (no GPU driver, no /proc/pressure, ...).

    Not an error: logged once with the reason, and the sampler is tried again later.
    """


class Duration(float):
    """An option type: seconds, written as a number or a duration ("200ms", "1m")."""


@dataclass(frozen=True)
class Option:
    """One sampler option, settable as [collectors.NAME] KEY in the config file or as the
    flag --collector.NAME.KEY (underscores in KEY become dashes). A numeric option (int,
    float, Duration) has bounds: (low, high), inclusive."""

    type: type
    default: Any
    help: str
    check: Callable[[Any], None] | None = None  # raises ValueError on a bad value
    bounds: tuple[float, float] | None = None


def regex(value: str) -> None:
    import re

    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"not a regular expression: {e}") from None


@dataclass
class SharedState:
    """What one sampler learns that another needs (kept tiny on purpose)."""

    # pid -> indexes of the GPUs it holds memory on; written by the gpu sampler, read by the
    # process sampler. Replaced whole, never mutated, so readers need no lock.
    gpu_processes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # GPU index -> UUID (the gpu sampler's, at open), for series labelled by GPU elsewhere.
    gpu_uuids: dict[int, str] = field(default_factory=dict)
    # GPUs that ran kernels under WAITING_BUSY of the last slow interval (the gpu sampler's,
    # replaced whole each slow tick): the process sampler reads their trees' workers every
    # tick, so loading that alternates with compute is seen at 10 Hz where GPUs wait.
    gpus_waiting: frozenset = frozenset()


@dataclass
class Context:
    paths: Paths
    fast_interval: float
    slow_interval: float
    shared: SharedState = field(default_factory=SharedState)
    hostname: str = field(default_factory=socket.gethostname)  # as dcgm-exporter's Hostname
    # The pynvml module the GPU sampler talks to (None: `import pynvml`); each simulated
    # node of a job served by one process has its own (agentd/gpu/fake/library.py).
    nvml: Any = None


class SeriesStore:
    """The series a sampler exports, safe to read from the scrape thread.

    Counters persist for the sampler's life. Gauges are replaced a group at a time, so a label
    set that stopped existing (an exited process, a lost GPU's per-process series) disappears
    at the next refresh instead of being exported forever.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[str, dict[tuple[str, Labels], float]] = {}

    # (name, number of labels) pairs checked already: gauges are replaced every slow tick,
    # and the same few hundred series need not be looked up in the catalog each time.
    _checked: set[tuple[str, int]] = set()

    @classmethod
    def _check(cls, name: str, labels: Labels) -> None:
        if (name, len(labels)) in cls._checked:
            return
        spec = METRICS_BY_NAME.get(name)
        if spec is None:
            raise KeyError(f"metric {name} is not in agentd/catalog.py")
        if len(labels) != len(spec.labels):
            raise ValueError(f"metric {name} takes labels {spec.labels}, got {labels!r}")
        cls._checked.add((name, len(labels)))

    def add(self, name: str, labels: Labels, delta: float) -> None:
        """Advance an integrated counter."""
        self.add_many(((name, labels, delta),))

    def add_many(self, deltas) -> None:
        """Advance several counters under one lock: (name, labels, delta) triples."""
        counters = self._counters
        with self._lock:
            for name, labels, delta in deltas:
                key = (name, labels)
                value = counters.get(key)
                if value is None:
                    self._check(name, labels)  # once per series, not once per tick
                    value = 0.0
                counters[key] = value + delta

    def set_counter(self, name: str, labels: Labels, value: float) -> None:
        """Export a counter the kernel or driver already keeps."""
        self._check(name, labels)
        with self._lock:
            self._counters[(name, labels)] = value

    def replace_gauges(self, group: str, gauges: Iterable[Series]) -> None:
        fresh = {}
        for name, labels, value in gauges:
            self._check(name, labels)
            fresh[(name, labels)] = value
        with self._lock:
            self._gauges[group] = fresh

    def items(self) -> list[Series]:
        with self._lock:
            out = [(n, labels, v) for (n, labels), v in self._counters.items()]
            for group in self._gauges.values():
                out.extend((n, labels, v) for (n, labels), v in group.items())
        return out


class Sampler:
    name: ClassVar[str]
    help: ClassVar[str]
    default_rate: ClassVar[str] = "fast"  # "fast" or "slow" loop
    default_interval: ClassVar[float | None] = None  # overrides the loop's interval
    window_columns: ClassVar[int] = 256  # the most channels its window ring holds (0: none)
    # Runs in a loop of its own: for sources whose reads can hang (a wedged GPU driver).
    isolated: ClassVar[bool] = False
    default_enabled: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, ctx: Context, options: dict[str, Any] | None = None):
        self.ctx = ctx
        self.opts = {k: o.default for k, o in self.options.items()}
        self.opts.update(options or {})
        self.out = SeriesStore()
        self.log = logging.getLogger(f"agentd.sampler.{self.name}")
        self.log_once = LogOnce(self.log)

    def open(self) -> None:
        """Find the source; raise Unavailable(reason) when it is absent."""

    def sample(self, now: float, slow: bool) -> Row | None:
        """Read the source once. `now` is monotonic seconds (time.monotonic() in the
        daemon: only differences mean anything, and they never go backwards when the wall
        clock is stepped); `slow` is True on slow-loop ticks (every tick for a slow
        sampler). Returns the window row, if any."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the source (NVML handles, event sets, helper threads)."""

    def series(self) -> list[Series]:
        """What the exporter serves for this sampler; no hardware access happens here."""
        return self.out.items()

    def meta(self) -> dict:
        """What the analysis needs to know beyond the window's numbers (identities, which
        processes use which GPU, the PCIe layout)."""
        return {}
