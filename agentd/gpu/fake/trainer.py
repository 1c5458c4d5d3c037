"""A fake GPU driven by a real process: the trainer of bench/workloads publishes what its
stand-in "GPU" did (kernel-busy intervals, bytes copied to and from the device, its PID and
device memory) in a small memory-mapped file, the feed; this device model reads the feed, so
NVML utilization, busy time, PCIe counters and the GPU's process list follow what the real
process did, scheduling jitter included.

A scenario selects it per GPU with `trainer_feed = "/path/to/feed"` (one GPU per feed).

The feed (little-endian), written by one writer, read by any number of readers:

    header   64 bytes: magic "AGTFEED1", pid u32, pad u32, memory_used u64,
             busy_count u64, copy_count u64, h2d_total u64, d2h_total u64, pad
    busy     RING x (start f64, end f64): kernel intervals in Unix seconds; end 0 while
             the kernel runs
    copies   RING x (start f64, end f64, direction u64 (0 h2d, 1 d2h), bytes u64,
             bytes before u64): each copy, with the direction's total before it

Slot k of a ring holds record number k (mod RING); a count is advanced after its record is
written, so a reader never sees a half-written record as counted. Readers keep only the
newest RING - SLACK records, which a writer cannot be overwriting while they read.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

import numpy as np

from agentd.gpu.fake.library import DeviceState, GpuProcess
from agentd.gpu.fake.scenario import ScenarioDevice

MAGIC = b"AGTFEED1"
RING = 8192
SLACK = 64
_HEADER = struct.Struct("<8sIIQQQQQ")  # 56 bytes, padded to 64
HEADER_SIZE = 64
_BUSY = 16
_COPY = 40
BUSY_OFFSET = HEADER_SIZE
COPY_OFFSET = BUSY_OFFSET + RING * _BUSY
FEED_SIZE = COPY_OFFSET + RING * _COPY
H2D, D2H = 0, 1


class FeedWriter:
    """The trainer's side: publish kernels and copies as they happen."""

    def __init__(self, path: str, pid: int | None = None, memory_used: int = 0):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, FEED_SIZE)
            self.mm = mmap.mmap(fd, FEED_SIZE)
        finally:
            os.close(fd)
        self.path = path
        self.busy_count = 0
        self.copy_count = 0
        self.totals = [0, 0]
        self.pid = pid or os.getpid()
        self.memory_used = memory_used
        self._header()

    def _header(self) -> None:
        _HEADER.pack_into(self.mm, 0, MAGIC, self.pid, 0, self.memory_used, self.busy_count,
                          self.copy_count, self.totals[H2D], self.totals[D2H])

    def kernel_start(self, t: float | None = None) -> None:
        slot = BUSY_OFFSET + (self.busy_count % RING) * _BUSY
        struct.pack_into("<dd", self.mm, slot, time.time() if t is None else t, 0.0)
        self.busy_count += 1
        self._header()

    def kernel_end(self, t: float | None = None) -> None:
        if self.busy_count == 0:
            return
        slot = BUSY_OFFSET + ((self.busy_count - 1) % RING) * _BUSY
        struct.pack_into("<d", self.mm, slot + 8, time.time() if t is None else t)

    def copy(self, direction: int, nbytes: int, start: float, end: float) -> None:
        """A copy of `nbytes` that ran from `start` to `end` (Unix seconds)."""
        slot = COPY_OFFSET + (self.copy_count % RING) * _COPY
        struct.pack_into("<ddQQQ", self.mm, slot, start, max(end, start), direction, nbytes,
                         self.totals[direction])
        self.totals[direction] += nbytes
        self.copy_count += 1
        self._header()

    def close(self) -> None:
        self.mm.close()


@dataclass
class FeedSnapshot:
    pid: int
    memory_used: int
    busy: np.ndarray  # [n, 2] start, end (end = +inf while running)
    copies: np.ndarray  # [n, 5] start, end, direction, bytes, bytes before


class FeedReader:
    def __init__(self, path: str):
        self.path = path
        self.mm: mmap.mmap | None = None

    def _map(self) -> mmap.mmap | None:
        if self.mm is None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                return None
            try:
                if os.fstat(fd).st_size < FEED_SIZE:
                    return None
                self.mm = mmap.mmap(fd, FEED_SIZE, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
        return self.mm

    def snapshot(self) -> FeedSnapshot | None:
        mm = self._map()
        if mm is None:
            return None
        magic, pid, _, mem, nbusy, ncopy, _, _ = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC:
            return None
        busy = np.frombuffer(mm, dtype="<f8", count=RING * 2, offset=BUSY_OFFSET).reshape(
            RING, 2)
        raw = np.frombuffer(mm, dtype=np.uint8, count=RING * _COPY, offset=COPY_OFFSET)
        copies = np.empty((RING, 5))
        view = raw.reshape(RING, _COPY)
        copies[:, 0:2] = view[:, 0:16].copy().view("<f8")
        copies[:, 2:5] = view[:, 16:40].copy().view("<u8")
        return FeedSnapshot(pid, mem, _newest(busy.copy(), nbusy), _newest(copies, ncopy))


def _newest(ring: np.ndarray, count: int) -> np.ndarray:
    """Records count-n .. count-1 in order (n: what cannot be mid-overwrite)."""
    n = min(count, RING - SLACK)
    idx = np.arange(count - n, count) % RING
    return ring[idx]


class TrainerFeedDevice(ScenarioDevice):
    """A scenario GPU whose activity comes from a trainer's feed; the rest of its behaviour
    (identity, clocks, power as a function of busy, NVLink) is the scenario's."""

    has_history = True  # the feed holds what the trainer did before the library started

    def __init__(self, *args, feed_path: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.feed = FeedReader(feed_path)
        self.epoch = time.time()  # Unix time of the library's t = 0 (set by bind())
        self.clock = time.time  # the library's clock
        self._snap: tuple[float, FeedSnapshot | None] = (-1.0, None)

    def bind(self, library) -> None:
        self.epoch = library.t0
        self.clock = library.clock

    def _snapshot(self) -> FeedSnapshot | None:
        # One read per 2 ms serves the burst of calls of one sampler tick.
        now = time.monotonic()
        if now - self._snap[0] > 0.002:
            self._snap = (now, self.feed.snapshot())
        return self._snap[1]

    def busy_between(self, t0: float, t1: float) -> float:
        if t1 <= t0:
            return 0.0
        snap = self._snapshot()
        if snap is None or not len(snap.busy):
            return 0.0
        a, b = self.epoch + t0, self.epoch + t1
        start = snap.busy[:, 0]
        end = np.where(snap.busy[:, 1] > 0, snap.busy[:, 1], self.clock())
        overlap = np.clip(np.minimum(end, b) - np.maximum(start, a), 0.0, None)
        return float(min(overlap.sum() / (b - a), 1.0))

    def pcie_bytes(self, t: float) -> tuple[int, int]:
        snap = self._snapshot()
        out = [0, 0]
        if snap is not None and len(snap.copies):
            at = self.epoch + t
            c = snap.copies
            for direction in (H2D, D2H):
                rows = c[(c[:, 2] == direction) & (c[:, 0] <= at)]
                if not len(rows):
                    first = c[c[:, 2] == direction]
                    out[direction] = int(first[0, 4]) if len(first) else 0
                    continue
                start, end, _, nbytes, before = rows[-1]
                frac = 1.0 if end <= start else min(max((at - start) / (end - start), 0.0), 1.0)
                out[direction] = int(before + nbytes * frac)
        return (self.counter_base + out[D2H], self.counter_base + out[H2D])

    def _alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def processes(self, t: float) -> list[GpuProcess]:
        snap = self._snapshot()
        if snap is None or not snap.pid or not self._alive(snap.pid):
            return []
        return [GpuProcess(snap.pid, snap.memory_used, self.busy_between(t - 1.0, t))]

    def state(self, t: float) -> DeviceState:
        st = super().state(t)
        snap = self._snapshot()
        if snap is not None and snap.pid and self._alive(snap.pid):
            st.memory_used = snap.memory_used
        return st
