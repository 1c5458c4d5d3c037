"""Fake GPUs described by a scenario file (TOML), for `agentd run --fake-nvml FILE`.

A scenario fixes what each fake GPU does: a constant utilization or a periodic step
(busy for step_busy_s of every step_period_s), PCIe and NVLink traffic, memory, clocks,
power, throttling episodes, XID events, the moment it falls off the bus, its processes, and
which NVML calls it does not support or answer with an error, and when:

    [[gpus.errors]]                    # GPU(s) of this group answer NVML_ERROR_UNKNOWN
    function = "nvmlDeviceGetFieldValues"   # (the C function) from 5 s to 20 s
    error = "unknown"
    start_s = 5
    end_s = 20                         # default: for ever

See agentd/scenarios/*.toml for examples; such a
library file can be named without its path or suffix (`--fake-nvml h100x8-steady`).
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field

import pynvml as N

from agentd.gpu.nvml import clock_event_reason_bits
from agentd.tomlfile import read_toml
from agentd.gpu.fake.library import DeviceInfo, DeviceState, FakeNvmlLibrary, GpuProcess


class ScenarioError(ValueError):
    pass


CLOCK_EVENT_REASONS = clock_event_reason_bits(N)

# NVML error codes by name: "unknown" or "NVML_ERROR_UNKNOWN", "timeout", "gpu_is_lost", ...
NVML_ERRORS = {name[len("NVML_ERROR_"):].lower(): getattr(N, name)
               for name in dir(N) if name.startswith("NVML_ERROR_")}

INIT_ERRORS = {
    "none": N.NVML_SUCCESS,
    "library_not_found": N.NVML_ERROR_LIBRARY_NOT_FOUND,
    "driver_not_loaded": N.NVML_ERROR_DRIVER_NOT_LOADED,
    "no_permission": N.NVML_ERROR_NO_PERMISSION,
}


@dataclass
class Episode:
    start_s: float
    end_s: float
    reasons: int
    sm_clock_mhz: int | None


@dataclass
class ScenarioDevice:
    """One fake GPU whose behaviour is a closed-form function of time."""

    info: DeviceInfo
    utilization: float = 0.0
    step_period_s: float = 0.0
    step_busy_s: float = 0.0
    phase_s: float = 0.0
    sm_active_per_busy: float = 0.6
    sm_occupancy_per_busy: float = 0.4
    tensor_active_per_busy: float = 0.3
    dram_active_per_busy: float = 0.35
    pcie_rx_rate: float = 0.0  # bytes/s, mean
    pcie_tx_rate: float = 0.0
    nvlink_rx_rate: float = 0.0
    nvlink_tx_rate: float = 0.0
    memory_used: int = 0
    sm_clock_mhz: int = 1980
    power_idle_w: float = 70.0
    power_busy_w: float = 650.0
    temperature_c: int = 55
    throttle: list[Episode] = field(default_factory=list)
    xid_events: list[tuple[float, int]] = field(default_factory=list)
    lost_at: float | None = None
    procs: list[GpuProcess] = field(default_factory=list)
    counter_base: int = 3 * 2**40  # counters have been running since boot

    def _busy_integral(self, t: float) -> float:
        """Seconds of kernel time in [0, t]."""
        if self.step_period_s > 0:
            p, b = self.step_period_s, self.step_busy_s
            x = t + self.phase_s
            return math.floor(x / p) * b + min(x % p, b)
        return self.utilization * t

    def busy_between(self, t0: float, t1: float) -> float:
        if t1 <= t0:
            return 0.0
        if self.lost_at is not None:
            t1 = min(t1, self.lost_at)
            if t1 <= t0:
                return 0.0
        return (self._busy_integral(t1) - self._busy_integral(t0)) / (t1 - t0)

    def activity_between(self, t0: float, t1: float) -> dict[str, float]:
        busy = self.busy_between(t0, t1)
        return {
            "sm_active": busy * self.sm_active_per_busy,
            "sm_occupancy": busy * self.sm_occupancy_per_busy,
            "tensor_active": busy * self.tensor_active_per_busy,
            "dram_active": busy * self.dram_active_per_busy,
        }

    def _idle_integral(self, t: float) -> float:
        """Seconds without a kernel in [0, t]; computed directly so it never decreases."""
        if self.step_period_s > 0:
            p, b = self.step_period_s, self.step_busy_s
            x = t + self.phase_s
            return math.floor(x / p) * (p - b) + max(x % p - b, 0.0)
        return (1 - self.utilization) * t

    def pcie_bytes(self, t: float) -> tuple[int, int]:
        # Input copies happen while the GPU waits: spread the mean rate over idle time.
        if self.step_period_s > 0 and self.step_busy_s < self.step_period_s:
            idle_share = 1 - self.step_busy_s / self.step_period_s
            moved = self._idle_integral(t) / idle_share
        else:
            moved = t
        return (self.counter_base + int(self.pcie_tx_rate * moved),
                self.counter_base + int(self.pcie_rx_rate * moved))

    def nvlink_bytes(self, t: float) -> tuple[int, int]:
        return (self.counter_base + int(self.nvlink_tx_rate * t),
                self.counter_base + int(self.nvlink_rx_rate * t))

    def state(self, t: float) -> DeviceState:
        period = self.info.util_sample_period_s
        busy = self.busy_between(t - period, t)
        reasons, clock = 0, self.sm_clock_mhz
        if busy == 0:
            reasons |= N.nvmlClocksEventReasonGpuIdle
        for ep in self.throttle:
            if ep.start_s <= t < ep.end_s:
                reasons |= ep.reasons
                if ep.sm_clock_mhz is not None:
                    clock = ep.sm_clock_mhz
        power = self.power_idle_w + (self.power_busy_w - self.power_idle_w) * busy
        return DeviceState(
            memory_used=self.memory_used,
            sm_clock_mhz=clock,
            power_mw=int(power * 1000),
            temperature_c=self.temperature_c,
            clock_event_reasons=reasons,
            pcie_gen=self.info.pcie_gen if busy > 0 else 1,  # links train down when idle
            pcie_width=self.info.pcie_width,
        )

    def processes(self, t: float) -> list[GpuProcess]:
        return list(self.procs)

    def xids(self, t0: float, t1: float) -> list[tuple[float, int]]:
        return [(t, x) for t, x in self.xid_events if t0 < t <= t1]


_GPU_KEYS = {
    "count", "name", "utilization", "step_period_s", "step_busy_s", "stagger_s",
    "sm_active_per_busy", "sm_occupancy_per_busy", "tensor_active_per_busy",
    "dram_active_per_busy", "pcie_rx_bytes_per_second", "pcie_tx_bytes_per_second",
    "nvlink_rx_bytes_per_second", "nvlink_tx_bytes_per_second", "nvlink_links",
    "memory_total_bytes", "memory_used_bytes", "sm_clock_hz", "sm_clock_max_hz",
    "power_idle_watts", "power_busy_watts", "power_limit_watts", "temperature_celsius",
    "pcie_generation", "pcie_width", "pcie_max_generation", "pcie_max_width", "gpm",
    "util_sample_period_s", "util_buffer_dry_when_idle", "pcie_counter_bits", "not_supported",
    "unsupported_fields", "throttle", "xid", "lost_at_s", "processes", "ecc_corrected",
    "ecc_uncorrected", "remapped_rows", "errors", "trainer_feed",
}
_TOP_KEYS = {"driver_version", "cuda_driver_version", "init_error", "missing_functions",
             "latency", "gpus", "description"}


def _num(d: dict, key: str, default, where: str, lo=None, hi=None):
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ScenarioError(f"{where}.{key}: expected a number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ScenarioError(f"{where}.{key}: {v} is outside [{lo}, {hi}]")
    return v


_ITEMS = {dict: "tables", str: "strings", int: "integers"}


def _list(d: dict, key: str, where: str, kind: type, default=()) -> list:
    """d[key] as a list whose items are all of `kind` (a bool is no integer)."""
    v = d.get(key, list(default))
    if not isinstance(v, list) or not all(
            isinstance(x, kind) and not isinstance(x, bool) for x in v):
        raise ScenarioError(f"{where}.{key}: expected an array of {_ITEMS[kind]}, got {v!r}")
    return v


def _check_keys(d: dict, allowed: set, where: str) -> None:
    if not isinstance(d, dict):
        raise ScenarioError(f"{where}: expected a table")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ScenarioError(f"{where}: unknown key {unknown[0]!r}")


def _devices(group: dict, first_index: int, where: str) -> list[ScenarioDevice]:
    _check_keys(group, _GPU_KEYS, where)
    count = int(_num(group, "count", 1, where, 1, 64))
    util = _num(group, "utilization", 0.0, where, 0, 1)
    period = _num(group, "step_period_s", 0.0, where, 0)
    busy = _num(group, "step_busy_s", 0.0, where, 0)
    if period and busy > period:
        raise ScenarioError(f"{where}.step_busy_s: {busy} exceeds step_period_s {period}")
    stagger = _num(group, "stagger_s", 0.0, where, 0)
    episodes = []
    for i, ep in enumerate(_list(group, "throttle", where, dict)):
        w = f"{where}.throttle[{i}]"
        _check_keys(ep, {"start_s", "end_s", "reasons", "sm_clock_hz"}, w)
        bits = 0
        for r in _list(ep, "reasons", w, str):
            if r not in CLOCK_EVENT_REASONS:
                raise ScenarioError(f"{w}.reasons: unknown reason {r!r}")
            bits |= CLOCK_EVENT_REASONS[r]
        clock = _num(ep, "sm_clock_hz", 0, w, 0)
        episodes.append(Episode(_num(ep, "start_s", 0, w, 0), _num(ep, "end_s", 1e18, w, 0),
                                bits, int(clock / 1e6) if clock else None))
    xids = []
    for i, x in enumerate(_list(group, "xid", where, dict)):
        w = f"{where}.xid[{i}]"
        _check_keys(x, {"at_s", "code"}, w)
        xids.append((_num(x, "at_s", 0, w, 0), int(_num(x, "code", 0, w, 1))))
    procs = []
    for i, p in enumerate(_list(group, "processes", where, dict)):
        w = f"{where}.processes[{i}]"
        _check_keys(p, {"pid", "memory_bytes", "sm_util"}, w)
        procs.append(GpuProcess(int(_num(p, "pid", 0, w, 1)), int(_num(p, "memory_bytes", 0, w, 0)),
                                _num(p, "sm_util", 0.0, w, 0, 1)))
    errors = []
    for i, e in enumerate(_list(group, "errors", where, dict)):
        w = f"{where}.errors[{i}]"
        _check_keys(e, {"function", "error", "start_s", "end_s"}, w)
        fn = e.get("function")
        if not isinstance(fn, str) or not hasattr(FakeNvmlLibrary, "c_" + fn):
            raise ScenarioError(f"{w}.function: {fn!r} is not an NVML function the fake "
                                "library has (C names, e.g. nvmlDeviceGetFieldValues)")
        name = str(e.get("error", "unknown")).lower().removeprefix("nvml_error_")
        if name not in NVML_ERRORS or NVML_ERRORS[name] == N.NVML_SUCCESS:
            raise ScenarioError(f"{w}.error: {e.get('error')!r} is not an NVML error "
                                "(e.g. unknown, timeout, gpu_is_lost, NVML_ERROR_UNKNOWN)")
        errors.append((fn, NVML_ERRORS[name], _num(e, "start_s", 0, w, 0),
                       _num(e, "end_s", math.inf, w, 0)))
    lost = group.get("lost_at_s")
    cls, extra = ScenarioDevice, {}
    feed = group.get("trainer_feed")
    if feed is not None:
        # A real process's activity (bench/workloads' trainer) instead of a formula.
        from agentd.gpu.fake.trainer import TrainerFeedDevice

        if not isinstance(feed, str) or not feed:
            raise ScenarioError(f"{where}.trainer_feed: expected a file path")
        if count != 1:
            raise ScenarioError(f"{where}.trainer_feed: one GPU per feed (count = 1)")
        cls, extra = TrainerFeedDevice, {"feed_path": feed}
    bits = int(_num(group, "pcie_counter_bits", 64, where))
    if bits not in (32, 64):
        raise ScenarioError(f"{where}.pcie_counter_bits: must be 32 or 64")
    out = []
    for k in range(count):
        index = first_index + k
        info = DeviceInfo(
            index=index,
            name=str(group.get("name", DeviceInfo.name)),
            uuid="GPU-" + str(uuid.uuid5(uuid.NAMESPACE_OID, f"agentd-fake-gpu-{index}")),
            pci_bus_id=f"00000000:{0x18 + 0x10 * index:02X}:00.0",
            minor=index,
            memory_total=int(_num(group, "memory_total_bytes", DeviceInfo.memory_total, where, 1)),
            sm_clock_max_mhz=int(_num(group, "sm_clock_max_hz", 1.98e9, where, 1) / 1e6),
            power_limit_mw=int(_num(group, "power_limit_watts", 700, where, 1) * 1000),
            pcie_gen=int(_num(group, "pcie_generation", 5, where, 1, 7)),
            pcie_width=int(_num(group, "pcie_width", 16, where, 1, 32)),
            pcie_max_gen=int(_num(group, "pcie_max_generation", 5, where, 1, 7)),
            pcie_max_width=int(_num(group, "pcie_max_width", 16, where, 1, 32)),
            gpm=bool(group.get("gpm", True)),
            nvlink_links=int(_num(group, "nvlink_links", 18, where, 0, 64)),
            util_sample_period_s=_num(group, "util_sample_period_s", 1 / 6, where, 0.01, 2),
            util_buffer_dry_when_idle=bool(group.get("util_buffer_dry_when_idle", False)),
            pcie_counter_bits=bits,
            not_supported=frozenset(_list(group, "not_supported", where, str)),
            unsupported_fields=frozenset(_list(group, "unsupported_fields", where, int)),
            ecc_corrected=int(_num(group, "ecc_corrected", 0, where, 0)),
            ecc_uncorrected=int(_num(group, "ecc_uncorrected", 0, where, 0)),
            remapped=tuple(_list(group, "remapped_rows", where, int, (0, 0, 0, 0))),
            errors=tuple(errors),
        )
        out.append(cls(
            info=info,
            utilization=util,
            step_period_s=period,
            step_busy_s=busy,
            phase_s=stagger * k,
            sm_active_per_busy=_num(group, "sm_active_per_busy", 0.6, where, 0, 1),
            sm_occupancy_per_busy=_num(group, "sm_occupancy_per_busy", 0.4, where, 0, 1),
            tensor_active_per_busy=_num(group, "tensor_active_per_busy", 0.3, where, 0, 1),
            dram_active_per_busy=_num(group, "dram_active_per_busy", 0.35, where, 0, 1),
            pcie_rx_rate=_num(group, "pcie_rx_bytes_per_second", 0.0, where, 0),
            pcie_tx_rate=_num(group, "pcie_tx_bytes_per_second", 0.0, where, 0),
            nvlink_rx_rate=_num(group, "nvlink_rx_bytes_per_second", 0.0, where, 0),
            nvlink_tx_rate=_num(group, "nvlink_tx_bytes_per_second", 0.0, where, 0),
            memory_used=int(_num(group, "memory_used_bytes", 0, where, 0)),
            sm_clock_mhz=int(_num(group, "sm_clock_hz", 1.98e9, where, 1) / 1e6),
            power_idle_w=_num(group, "power_idle_watts", 70, where, 0),
            power_busy_w=_num(group, "power_busy_watts", 650, where, 0),
            temperature_c=int(_num(group, "temperature_celsius", 55, where, -50, 150)),
            throttle=episodes,
            xid_events=xids,
            lost_at=None if lost is None else _num(group, "lost_at_s", 0, where, 0),
            procs=procs,
            **extra,
        ))
    return out


def library_from_dict(doc: dict, where: str = "scenario", **kwargs) -> FakeNvmlLibrary:
    _check_keys(doc, _TOP_KEYS, where)
    init = doc.get("init_error", "none")
    if init not in INIT_ERRORS:
        raise ScenarioError(f"{where}.init_error: expected one of {sorted(INIT_ERRORS)}")
    devices: list[ScenarioDevice] = []
    groups = doc.get("gpus", [])
    if not isinstance(groups, list):
        raise ScenarioError(f"{where}.gpus: expected an array of tables ([[gpus]])")
    for i, g in enumerate(groups):
        if not isinstance(g, dict):
            raise ScenarioError(f"{where}.gpus[{i}]: expected a table")
        devices += _devices(g, len(devices), f"{where}.gpus[{i}]")
    latency = doc.get("latency", {})
    if not isinstance(latency, dict):
        raise ScenarioError(f"{where}.latency: expected a table")
    for k, v in latency.items():
        _num(latency, k, 0, f"{where}.latency", 0, 5)
    lib = FakeNvmlLibrary(
        devices,
        driver_version=str(doc.get("driver_version", "550.90.07")),
        cuda_driver_version=int(_num(doc, "cuda_driver_version", 12040, where, 0)),
        init_error=INIT_ERRORS[init],
        latency=latency,
        missing_functions=frozenset(_list(doc, "missing_functions", where, str)),
        **kwargs,
    )
    for d in devices:
        if hasattr(d, "bind"):
            d.bind(lib)  # a device fed by a real process needs the library's clock
    return lib


SCENARIO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                            "scenarios")


def library() -> list[str]:
    """The names of the fake-GPU scenarios shipped with agentd."""
    return sorted(f[:-5] for f in os.listdir(SCENARIO_DIR) if f.endswith(".toml"))


def resolve(path_or_name: str) -> str:
    """A scenario file: the path itself when it is a file, else the library file of that
    name (agentd/scenarios/NAME.toml)."""
    if os.path.isfile(path_or_name):
        return path_or_name
    candidate = os.path.join(SCENARIO_DIR, path_or_name + ".toml")
    if os.sep not in path_or_name and os.path.isfile(candidate):
        return candidate
    raise ScenarioError(f"fake NVML scenario {path_or_name!r} does not exist (give a file, "
                        f"or one of: {', '.join(library())})")


def load_scenario(path_or_name: str, **kwargs) -> FakeNvmlLibrary:
    path = resolve(path_or_name)
    doc = read_toml(path, "fake-NVML scenario", ScenarioError)
    return library_from_dict(doc, where=path, **kwargs)
