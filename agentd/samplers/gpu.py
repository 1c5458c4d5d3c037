"""GPUs: utilization, SM/tensor/DRAM activity, PCIe and NVLink bytes, memory, clocks and their
throttle reasons, power, temperature, XID events, ECC and remapped rows, per-process use.

Vendor-neutral: the backend (agentd.gpu.nvml for NVIDIA) reads the hardware; this file turns
its readings into integrated counters (so rate() gives exact means at any scrape interval),
gauges and window rows. One GPU failing or falling off the bus never stops the others: an
NVML call that fails on one GPU costs that GPU that value for that reading only (counted in
agentd_gpu_errors_total, logged once per call and error); a GPU lost at start or later stays
exported (agentd_gpu_lost 1, agentd_gpu_info with what could be read) and in meta().
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

from agentd.gpu.backend import CLOCK_EVENT_REASONS, FastReading, GpuIdentity, GpuLost, SlowReading
from agentd.gpu.nvml import NvmlBackend
from agentd.gpu.xid import CLASSES as XID_CLASSES, classify as xid_class
from agentd.jobs import JobResolver
from agentd.pcie import capacity as pcie_capacity
from agentd.samplers.base import Duration, Option, Row, Sampler, Series

_ACTIVITY_COUNTERS = {
    "sm_active": "agentd_gpu_sm_active_seconds_total",
    "sm_occupancy": "agentd_gpu_sm_occupancy_seconds_total",
    "tensor_active": "agentd_gpu_tensor_active_seconds_total",
    "dram_active": "agentd_gpu_dram_active_seconds_total",
}
# The counters the fast path advances, each GPU's kept in a list in this order (see
# GpuSampler._totals); the positions of the activity counters by GPM metric.
_FAST_COUNTERS = ("agentd_gpu_busy_seconds_total",
                  "agentd_gpu_pcie_rx_bytes_total", "agentd_gpu_pcie_tx_bytes_total",
                  "agentd_gpu_nvlink_rx_bytes_total", "agentd_gpu_nvlink_tx_bytes_total",
                  *_ACTIVITY_COUNTERS.values())
_BUSY, _PCIE, _NVLINK = 0, 1, 3  # positions in _FAST_COUNTERS (rx, then tx)
# A GPU whose kernels ran under this share of the last slow interval waits for something:
# its trees' workers are read every tick (SharedState.gpus_waiting). Steps' ordinary gaps
# are 2-4%; the analysis' stall line is 5%.
WAITING_BUSY = 0.95
_ACTIVITY_POSITION = {key: _FAST_COUNTERS.index(name) for key, name in _ACTIVITY_COUNTERS.items()}


class XidLog:
    """XID events in the log without flooding it: the first of each code on each GPU at
    once, the rest summed into at most one line per GPU per `every` seconds. (The counter
    counts every event; this only shapes the log.)"""

    def __init__(self, log: logging.Logger, every: float = 60.0):
        self.log = log
        self.every = every
        self._seen: set[tuple[int, int]] = set()
        self._pending: dict[int, Counter] = {}
        self._last_line: dict[int, float] = {}

    def event(self, index: int, xid: int, now: float) -> None:
        if (index, xid) not in self._seen:
            self._seen.add((index, xid))
            self.log.warning("GPU %d: XID %d", index, xid)
            self._last_line.setdefault(index, now)
        else:
            self._pending.setdefault(index, Counter())[xid] += 1

    def flush(self, now: float, force: bool = False) -> None:
        for index, counts in list(self._pending.items()):
            last = self._last_line.get(index, now)
            if force or now - last >= self.every:
                self.log.warning("GPU %d: %d more XID events in the last %.0f s (%s)", index,
                                 sum(counts.values()), now - last,
                                 ", ".join(f"XID {x}: {n}" for x, n in sorted(counts.items())))
                del self._pending[index]
                self._last_line[index] = now


class _Keys:
    """One GPU's window channel names, and its counters' names, built once: formatting them
    on every tick of every GPU cost more than the arithmetic they label."""

    def __init__(self, g: GpuIdentity):
        i = g.index
        self.labels = (str(i), g.uuid)
        self.busy = f"gpu.busy:{i}"
        self.busy_time = f"gpu.busy_time:{i}"
        self.util_sample = f"gpu.util_sample:{i}"
        self.util_sample_age = f"gpu.util_sample_age:{i}"
        self.pcie = (_PCIE, f"gpu.pcie_rx:{i}", f"gpu.pcie_tx:{i}")
        self.nvlink = (_NVLINK, f"gpu.nvlink_rx:{i}", f"gpu.nvlink_tx:{i}")
        self.activity = {key: f"gpu.{key}:{i}" for key in _ACTIVITY_COUNTERS}


class GpuSampler(Sampler):
    name = "gpu"
    help = "GPUs through NVML: utilization samples, PCIe/NVLink counters, GPM, clocks, XIDs"
    default_rate = "fast"
    window_columns = 512  # 19 signals x up to 26 GPUs
    isolated = True  # NVML calls can block for seconds when a GPU falls off the bus
    options = {
        "processes": Option(bool, True, "attribute GPU memory and SM use to processes"),
        "gpm_interval": Option(Duration, 0.2,
                               "time between GPM (SM/tensor/DRAM activity) readings; "
                               "NVIDIA's floor is 100ms", bounds=(0.1, 60.0)),
    }

    def open(self) -> None:
        self.backend = NvmlBackend(slow_interval=self.ctx.slow_interval,
                                   gpm_interval=self.opts["gpm_interval"],
                                   pynvml_module=self.ctx.nvml)
        gpus = self.backend.open()  # raises Unavailable without a driver
        self.gpus: dict[int, GpuIdentity] = {g.index: g for g in gpus}
        self.ctx.shared.gpu_uuids = {g.index: g.uuid for g in gpus}
        self.lost: set[int] = {d.index for d in self.backend.devices if d.lost}
        self._last_busy: dict[int, float] = {}
        self._busy_at_slow: dict[int, float | None] = {}  # the busy counter at the last slow tick
        self._key_cache: dict[int, _Keys] = {}
        self._last_slow_t: float | None = None
        self._last_fast: float | None = None
        self._xids = XidLog(self.log)
        self._jobs = JobResolver(self.ctx.paths)
        # The fast path's counters (_FAST_COUNTERS) per GPU, None until first advanced: a
        # list per GPU, added to in place, instead of one (name, labels, delta) per counter
        # per GPU per tick through the SeriesStore. Made here for every GPU, so the scrape
        # thread reads a dict that never changes size; a float in a list is read whole.
        self._totals: dict[int, list] = {g.index: [None] * len(_FAST_COUNTERS) for g in gpus}
        self.log.info("%d GPU(s), driver %s: %s", len(self.backend.devices),
                      self.backend.driver_version,
                      ", ".join(f"{g.index}:{g.name or '?'}" + (" (lost)" if g.index in self.lost
                                                                else "") for g in gpus) or "none")
        # Born at 0, so that increase() sees the first error.
        self.out.add_many(("agentd_gpu_errors_total", self._labels(g), 0.0) for g in gpus)
        # Every XID class of every GPU starts at 0, so increase() sees the first event; a
        # series born at 1 would hide it.
        self.out.add_many([("agentd_gpu_xid_errors_total", self._labels(g) + (c,), 0.0)
                           for g in gpus for c in XID_CLASSES])
        self._last_xid: dict[int, int] = {g.index: 0 for g in gpus}
        self._export_info()
        self._export_lost()
        self._export_last_xid()

    def _export_info(self) -> None:
        info = []
        host = self.ctx.hostname
        for g in self.gpus.values():
            info.append(("agentd_gpu_info", self._labels(g) + (
                g.name, g.pci_bus_id, self.backend.driver_version, g.pcie_counter_source,
                g.utilization_source,
                # dcgm-exporter's labels for the same GPU, so its series join agentd's.
                g.uuid, f"nvidia{g.minor}" if g.minor is not None else "", host),
                1.0))
            static = [
                ("agentd_gpu_memory_total_bytes", g.memory_total),
                ("agentd_gpu_sm_clock_max_hertz", g.sm_clock_max_hz),
                ("agentd_gpu_pcie_link_max_generation", g.pcie_max_generation),
                ("agentd_gpu_pcie_link_max_width", g.pcie_max_width),
                ("agentd_gpu_pcie_link_capacity_bytes_per_second",
                 pcie_capacity(g.pcie_max_generation, g.pcie_max_width)),
            ]
            info += [(n, self._labels(g), float(v)) for n, v in static if v is not None]
        self.out.replace_gauges("info", info)

    @staticmethod
    def _labels(g: GpuIdentity) -> tuple[str, str]:
        return (str(g.index), g.uuid)

    def _export_lost(self) -> None:
        self.out.replace_gauges("lost", [
            ("agentd_gpu_lost", self._labels(g), float(g.index in self.lost))
            for g in self.gpus.values()
        ])

    def _export_last_xid(self) -> None:
        self.out.replace_gauges("xid", [
            ("agentd_gpu_xid_last_code", self._labels(self.gpus[i]), float(code))
            for i, code in self._last_xid.items()])

    def _mark_lost(self, e: GpuLost) -> None:
        if e.index not in self.lost:
            self.lost.add(e.index)
            self.log.error("%s; no longer sampled", e)
            self._export_lost()

    def _count_errors(self, g: GpuIdentity, errors: list) -> None:
        if errors:
            self.out.add("agentd_gpu_errors_total", self._labels(g), float(len(errors)))

    def _unexpected(self, g: GpuIdentity, what: str, e: Exception) -> None:
        """A fault outside any one NVML call (a bug, a malformed answer): this GPU's reading
        is lost for this tick, counted and logged once; the other GPUs go on."""
        self.out.add("agentd_gpu_errors_total", self._labels(g), 1.0)
        self.log_once(logging.ERROR, (g.index, what, type(e).__name__),
                      "GPU %d: %s failed: %s: %s", g.index, what, type(e).__name__, e)

    def sample(self, now: float, slow: bool) -> Row:
        row: Row = {}
        tick = now - self._last_fast if self._last_fast is not None else None
        self._last_fast = now
        lost = self.lost
        for index, g in self.gpus.items():
            if index in lost:
                continue
            try:
                r = self.backend.read_fast(index)
            except GpuLost as e:
                self._mark_lost(e)
                continue
            except Exception as e:  # one GPU's fault must not cost the others their sample
                self._unexpected(g, "fast reading", e)
                continue
            if r.errors:
                self._count_errors(g, r.errors)
            if r.utilization_source != g.utilization_source or \
                    r.pcie_counter_source != g.pcie_counter_source:
                self.gpus[index] = g = replace(g, utilization_source=r.utilization_source,
                                               pcie_counter_source=r.pcie_counter_source)
                self._export_info()
            k = self._keys(g)
            self._account_fast(g, r, row, k)
            if tick and tick > 0 and r.busy_valid:
                # The driver's samples credited in this tick, per second of tick: unlike the
                # held utilization, its mean over a window is exact (aliasing-free).
                row[k.busy_time] = r.busy_seconds / tick
        if slow:
            self._sample_slow(now, row)
        return row

    def series(self) -> list[Series]:
        out = self.out.items()
        for index, totals in self._totals.items():
            labels = self._labels(self.gpus[index])
            out += [(name, labels, v) for name, v in zip(_FAST_COUNTERS, totals)
                    if v is not None]
        return out

    def _keys(self, g: GpuIdentity) -> _Keys:
        keys = self._key_cache.get(g.index)
        if keys is None:
            keys = self._key_cache[g.index] = _Keys(g)
        return keys

    def _account_fast(self, g: GpuIdentity, r: FastReading, row: Row, k: _Keys) -> None:
        i = g.index
        totals = self._totals[i]
        if r.busy_valid:
            t = totals[_BUSY]
            totals[_BUSY] = (0.0 if t is None else t) + r.busy_seconds
            if r.covered_seconds > 0:
                busy = r.busy_seconds / r.covered_seconds
            elif r.seconds_since_sample is not None and r.seconds_since_sample > 2.0:
                busy = 0.0  # the driver stopped adding samples: it does so while the GPU idles
            else:
                busy = self._last_busy.get(i)
            if busy is not None:
                self._last_busy[i] = busy
                row[k.busy] = busy
        else:
            self._last_busy.pop(i, None)  # nothing to hold across a failure
        if r.new_samples_mean is not None:
            row[k.util_sample] = r.new_samples_mean
            row[k.util_sample_age] = r.new_samples_age
        for (at, rx_key, tx_key), rx, tx in (
                (k.pcie, r.pcie_rx_bytes, r.pcie_tx_bytes),
                (k.nvlink, r.nvlink_rx_bytes, r.nvlink_tx_bytes)):
            if rx is None:
                continue
            tx = tx or 0
            t_rx, t_tx = totals[at], totals[at + 1]
            totals[at] = (0.0 if t_rx is None else t_rx) + rx
            totals[at + 1] = (0.0 if t_tx is None else t_tx) + tx
            if r.counter_seconds:
                row[rx_key] = rx / r.counter_seconds
                row[tx_key] = tx / r.counter_seconds
        if r.activity is not None and r.activity_seconds > 0:
            for key, value in r.activity.items():
                at = _ACTIVITY_POSITION[key]
                t = totals[at]
                totals[at] = (0.0 if t is None else t) + value * r.activity_seconds
                row[k.activity[key]] = value

    def _sample_slow(self, now: float, row: Row) -> None:
        elapsed = now - self._last_slow_t if self._last_slow_t is not None else 0.0
        elapsed = max(elapsed, 0.0)
        self._last_slow_t = now
        gauges: list[Series] = []
        procs: dict[int, list[int]] = {}
        for index, g in self.gpus.items():
            if index in self.lost:
                continue
            try:
                s = self.backend.read_slow(index)
            except GpuLost as e:
                self._mark_lost(e)
                continue
            except Exception as e:
                self._unexpected(g, "slow reading", e)
                continue
            self._count_errors(g, s.errors)
            gauges += self._account_slow(g, s, elapsed, row)
            for p in s.processes:
                procs.setdefault(p.pid, []).append(index)
        self.out.replace_gauges("state", gauges)
        self.ctx.shared.gpu_processes = {pid: tuple(ix) for pid, ix in procs.items()}
        self.ctx.shared.gpus_waiting = self._waiting(elapsed)
        self._jobs.retain(procs)
        try:
            events = self.backend.events()
        except Exception as e:
            events = []
            self.log_once(logging.ERROR, ("events", type(e).__name__),
                          "reading XID events failed: %s", e)
        for ev in events:
            g = self.gpus.get(ev.index)
            if g is not None:
                lab = self._labels(g)
                self.out.add_many([
                    ("agentd_gpu_xid_errors_total", lab + (xid_class(ev.xid),), 1),
                    ("agentd_gpu_xid_code_errors_total", lab + (str(ev.xid),), 1)])
                self._last_xid[ev.index] = ev.xid
                self._xids.event(ev.index, ev.xid, now)
        self._xids.flush(now)
        if events:
            self._export_last_xid()

    def _waiting(self, elapsed: float) -> frozenset:
        """The GPUs whose kernels ran under WAITING_BUSY of the `elapsed` seconds since the
        last slow tick (from the busy counter: exact, whatever the tick rate)."""
        waiting = set()
        for i, totals in self._totals.items():
            busy = totals[_BUSY]
            before = self._busy_at_slow.get(i)
            self._busy_at_slow[i] = busy
            if busy is not None and before is not None and elapsed > 0 and \
                    (busy - before) / elapsed < WAITING_BUSY:
                waiting.add(i)
        return frozenset(waiting)

    def _account_slow(self, g: GpuIdentity, s: SlowReading, elapsed: float, row: Row) -> list:
        lab = self._labels(g)
        i = g.index
        gauges = []
        for name, value, signal in (
            ("agentd_gpu_memory_used_bytes", s.memory_used, "gpu.mem_used"),
            ("agentd_gpu_sm_clock_hertz", s.sm_clock_hz, "gpu.sm_clock"),
            ("agentd_gpu_power_watts", s.power_w, "gpu.power"),
            ("agentd_gpu_power_limit_watts", s.power_limit_w, "gpu.power_limit"),
            ("agentd_gpu_temperature_celsius", s.temperature_c, "gpu.temperature"),
            ("agentd_gpu_pcie_link_generation", s.pcie_generation, None),
            ("agentd_gpu_pcie_link_width", s.pcie_width, None),
        ):
            if value is not None:
                gauges.append((name, lab, float(value)))
                if signal:
                    row[f"{signal}:{i}"] = float(value)
        if g.sm_clock_max_hz:
            row[f"gpu.sm_clock_max:{i}"] = g.sm_clock_max_hz
        cap = pcie_capacity(g.pcie_max_generation, g.pcie_max_width)
        if cap:
            row[f"gpu.pcie_capacity:{i}"] = cap
        if s.clock_event_reasons is not None:
            bits = 0
            for reason, active in s.clock_event_reasons.items():
                gauges.append(("agentd_gpu_clock_event_active", lab + (reason,), float(active)))
                self.out.add("agentd_gpu_clock_event_seconds_total", lab + (reason,),
                             elapsed if active else 0.0)
                bits |= int(active) << CLOCK_EVENT_REASONS.index(reason)
            row[f"gpu.throttle:{i}"] = float(bits)
        if s.ecc_errors is not None:
            for kind, n in s.ecc_errors.items():
                self.out.set_counter("agentd_gpu_ecc_errors_total", lab + (kind,), n)
        if s.remapped_rows is not None:
            corr, unc, pending, failed = s.remapped_rows
            gauges += [
                ("agentd_gpu_remapped_rows", lab + ("correctable",), float(corr)),
                ("agentd_gpu_remapped_rows", lab + ("uncorrectable",), float(unc)),
                ("agentd_gpu_remapped_rows_pending", lab, float(pending)),
                ("agentd_gpu_remapped_rows_failed", lab, float(failed)),
            ]
        if self.opts["processes"]:
            # Per job, not per pid: pids churn with every job (agentd/jobs.py).
            memory: dict[tuple, float] = {}
            sm: dict[tuple, float] = {}
            for p in s.processes:
                jlab = lab + self._jobs.labels(p.pid)
                if p.memory_used is not None:
                    memory[jlab] = memory.get(jlab, 0.0) + p.memory_used
                if p.sm_utilization is not None:
                    sm[jlab] = sm.get(jlab, 0.0) + p.sm_utilization
            gauges += [("agentd_gpu_process_memory_used_bytes", k, v) for k, v in memory.items()]
            gauges += [("agentd_gpu_process_sm_utilization_ratio", k, v) for k, v in sm.items()]
        return gauges

    def meta(self) -> dict:
        return {"gpus": {str(g.index): {"uuid": g.uuid, "name": g.name,
                                        "pci_bus_id": g.pci_bus_id, "lost": g.index in self.lost}
                         for g in self.gpus.values()}}

    def close(self) -> None:
        xids = getattr(self, "_xids", None)
        if xids is not None and self._last_slow_t is not None:
            xids.flush(self._last_slow_t, force=True)
        backend = getattr(self, "backend", None)
        if backend is not None:
            try:
                backend.close()
            except Exception as e:  # closing must not hide the reason we are closing
                self.log.log(logging.DEBUG, "NVML close: %s", e)
