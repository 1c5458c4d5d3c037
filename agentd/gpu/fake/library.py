"""A stand-in for libnvidia-ml.so, plugged in under the real `pynvml` module.

`pynvml` looks every C function up with getattr(pynvml.nvmlLib, NAME). Installing a
FakeNvmlLibrary as `pynvml.nvmlLib` therefore leaves every line of pynvml itself running:
its structures, its two-call size protocols, its NVMLError subclasses raised from return
codes, its bytes/str conversions. What this file emulates is the C side: each function takes
the same arguments pynvml passes (ctypes objects, byref() pointers) and returns an
nvmlReturn_t code, with NVML's units (percent, mW, MHz, KB/s, KiB, microsecond timestamps).

A function the scenario marks missing raises AttributeError, which pynvml turns into
NVMLError_FunctionNotFound, as with an old driver.

install() puts a library under the process's `pynvml` module, which every NVML user in the
process shares. Several simulated nodes served by one process (agentd/sim/serve.py) each
get their own instance of the pynvml module instead (private_pynvml(): the same file run
again as a separate module, with its own nvmlLib, locks and structure classes) and
install(library, module) their library there; the GPU sampler of each node's daemon is
handed its node's module (Context.nvml).
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import pynvml as N

UINT_MAX = 0xFFFFFFFF
GPM_METRIC_IDS = {
    N.NVML_GPM_METRIC_SM_UTIL: "sm_active",
    N.NVML_GPM_METRIC_SM_OCCUPANCY: "sm_occupancy",
    N.NVML_GPM_METRIC_ANY_TENSOR_UTIL: "tensor_active",
    N.NVML_GPM_METRIC_DRAM_BW_UTIL: "dram_active",
}
XID_EVENT = N.nvmlEventTypeXidCriticalError


@dataclass
class DeviceInfo:
    index: int
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    pci_bus_id: str = ""
    minor: int = 0
    memory_total: int = 85_520_809_984  # bytes
    sm_clock_max_mhz: int = 1980
    power_limit_mw: int = 700_000
    pcie_gen: int = 5
    pcie_width: int = 16
    pcie_max_gen: int = 5
    pcie_max_width: int = 16
    architecture: int = N.NVML_DEVICE_ARCH_HOPPER
    gpm: bool = True
    nvlink_links: int = 18
    util_sample_period_s: float = 1 / 6
    util_buffer_dry_when_idle: bool = False
    pcie_counter_bits: int = 64
    not_supported: frozenset[str] = frozenset()  # C function names answering NOT_SUPPORTED
    # (C function name, NVML error code, from t, until t): the function answers that error
    # while from <= t < until (t: seconds since the library was installed)
    errors: tuple[tuple[str, int, float, float], ...] = ()
    unsupported_fields: frozenset[int] = frozenset()
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    remapped: tuple[int, int, int, int] = (0, 0, 0, 0)  # corr, unc, pending, failure


@dataclass
class DeviceState:
    memory_used: int
    sm_clock_mhz: int
    power_mw: int
    temperature_c: int
    clock_event_reasons: int
    pcie_gen: int
    pcie_width: int


@dataclass
class GpuProcess:
    pid: int
    used_memory: int
    sm_util: float  # 0..1


class DeviceModel(Protocol):
    """What a fake GPU does over time; t is seconds since the library was installed."""

    info: DeviceInfo
    lost_at: float | None

    def busy_between(self, t0: float, t1: float) -> float: ...

    def activity_between(self, t0: float, t1: float) -> dict[str, float]: ...

    def pcie_bytes(self, t: float) -> tuple[int, int]: ...  # cumulative (tx, rx)

    def nvlink_bytes(self, t: float) -> tuple[int, int]: ...  # cumulative (tx, rx)

    def state(self, t: float) -> DeviceState: ...

    def processes(self, t: float) -> list[GpuProcess]: ...

    def xids(self, t0: float, t1: float) -> list[tuple[float, int]]: ...


@dataclass
class _EventSet:
    devices: dict[int, int] = field(default_factory=dict)  # device index -> event mask
    delivered_until: dict[int, float] = field(default_factory=dict)
    pending: list[tuple[float, int, int]] = field(default_factory=list)  # (t, index, xid)


class _Symbol:
    """A C function: callable, and accepting attributes (pynvml sets fn.restype)."""

    def __init__(self, fn: Callable):
        self._fn = fn

    def __call__(self, *args):
        return self._fn(*args)


def _val(x) -> int:
    return x.value if hasattr(x, "value") else int(x)


def _out(ref):
    """The object behind a byref() argument."""
    return ref._obj


class FakeNvmlLibrary:
    BOOT_SECONDS = 86_400.0  # sample timestamps count from a pretend boot, not from 1970

    def __init__(
        self,
        devices: list[DeviceModel],
        *,
        driver_version: str = "550.90.07",
        nvml_version: str = "12.550.90.07",
        cuda_driver_version: int = 12040,
        init_error: int = N.NVML_SUCCESS,
        latency: dict[str, float] | None = None,
        missing_functions: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.time,
        pynvml_module=None,
    ):
        # The pynvml module this library serves: its structure classes make the handles.
        self.N = pynvml_module or N
        self.devices = devices
        self.driver_version = driver_version
        self.nvml_version = nvml_version
        self.cuda_driver_version = cuda_driver_version
        self.init_error = init_error
        self.latency = {"nvmlDeviceGetPcieThroughput": 0.020, **(latency or {})}
        self.missing = frozenset(missing_functions)
        self.clock = clock
        self.t0 = clock()
        self.calls: dict[str, int] = {}
        self.cpu_seconds = 0.0
        self._lock = threading.Lock()
        self._initialized = 0
        # Opaque handles: pynvml passes pointers; we map the pointee's address back.
        self._device_structs = [self.N.struct_c_nvmlDevice_t() for _ in devices]
        self._device_by_addr = {
            ctypes.addressof(s): i for i, s in enumerate(self._device_structs)
        }
        self._gpm_samples: dict[int, tuple[ctypes.Structure, float | None, int]] = {}
        self._event_sets: dict[int, tuple[ctypes.Structure, _EventSet]] = {}

    # --- plumbing ---------------------------------------------------------------------------

    def __getattr__(self, name: str) -> _Symbol:
        if name.startswith("_") or name in self.missing:
            raise AttributeError(name)
        impl = getattr(type(self), "c_" + name, None)
        if impl is None:
            raise AttributeError(name)
        delay = self.latency.get(name, 0.0)
        bound = impl.__get__(self)

        def call(*args):
            # CPU spent emulating the driver, this bookkeeping included, so benchmarks can
            # tell it from agentd's own (a sleep costs no CPU time).
            t0 = time.thread_time()
            try:
                self.calls[name] = self.calls.get(name, 0) + 1
                if delay:
                    time.sleep(delay)
                if name not in ("nvmlInitWithFlags", "nvmlErrorString") and not self._initialized:
                    return N.NVML_ERROR_UNINITIALIZED
                return bound(*args)
            finally:
                self.cpu_seconds += time.thread_time() - t0

        return _Symbol(call)

    def now(self) -> float:
        return self.clock() - self.t0

    def _ts_us(self, t: float) -> int:
        return int((self.BOOT_SECONDS + t) * 1e6)

    def _device(self, handle, fn: str):
        """(index, model) for a handle, or an error code."""
        try:
            idx = self._device_by_addr[ctypes.addressof(handle.contents)]
        except (ValueError, KeyError, AttributeError):
            return None, N.NVML_ERROR_INVALID_ARGUMENT
        model = self.devices[idx]
        now = self.now()
        if model.lost_at is not None and now >= model.lost_at:
            return None, N.NVML_ERROR_GPU_IS_LOST
        if fn in model.info.not_supported:
            return None, N.NVML_ERROR_NOT_SUPPORTED
        code = self._injected_error(model, fn, now)
        if code:
            return None, code
        return model, N.NVML_SUCCESS

    @staticmethod
    def _injected_error(model: DeviceModel, fn: str, now: float) -> int:
        for name, code, start, end in model.info.errors:
            if name == fn and start <= now < end:
                return code
        return N.NVML_SUCCESS

    # --- init and system --------------------------------------------------------------------

    def c_nvmlInitWithFlags(self, flags):
        if self.init_error != N.NVML_SUCCESS:
            return self.init_error
        with self._lock:
            self._initialized += 1
        return N.NVML_SUCCESS

    def c_nvmlShutdown(self):
        with self._lock:
            self._initialized = max(self._initialized - 1, 0)
        return N.NVML_SUCCESS

    def c_nvmlErrorString(self, result):
        return N.NVMLError._errcode_to_string.get(_val(result), "Unknown Error").encode()

    def c_nvmlSystemGetDriverVersion(self, buf, size):
        buf.value = self.driver_version.encode()
        return N.NVML_SUCCESS

    def c_nvmlSystemGetNVMLVersion(self, buf, size):
        buf.value = self.nvml_version.encode()
        return N.NVML_SUCCESS

    def c_nvmlSystemGetCudaDriverVersion(self, ref):
        _out(ref).value = self.cuda_driver_version
        return N.NVML_SUCCESS

    def c_nvmlDeviceGetCount_v2(self, ref):
        _out(ref).value = len(self.devices)
        return N.NVML_SUCCESS

    def c_nvmlDeviceGetHandleByIndex_v2(self, index, ref):
        i = _val(index)
        if not 0 <= i < len(self.devices):
            return N.NVML_ERROR_INVALID_ARGUMENT
        code = self._injected_error(self.devices[i], "nvmlDeviceGetHandleByIndex_v2", self.now())
        if code:
            return code
        _out(ref).contents = self._device_structs[i]
        return N.NVML_SUCCESS

    # --- identity -----------------------------------------------------------------------------

    def c_nvmlDeviceGetName(self, handle, buf, size):
        m, rc = self._device(handle, "nvmlDeviceGetName")
        if m:
            buf.value = m.info.name.encode()
        return rc

    def c_nvmlDeviceGetUUID(self, handle, buf, size):
        m, rc = self._device(handle, "nvmlDeviceGetUUID")
        if m:
            buf.value = m.info.uuid.encode()
        return rc

    def c_nvmlDeviceGetIndex(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetIndex")
        if m:
            _out(ref).value = m.info.index
        return rc

    def c_nvmlDeviceGetMinorNumber(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetMinorNumber")
        if m:
            _out(ref).value = m.info.minor
        return rc

    def c_nvmlDeviceGetPciInfo_v3(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetPciInfo_v3")
        if m:
            info = _out(ref)
            bus_id = m.info.pci_bus_id
            info.busId = bus_id.encode()
            info.busIdLegacy = bus_id[-12:].encode()
            domain, bus, dev = bus_id.split(":")[0], bus_id.split(":")[1], bus_id.split(":")[2]
            info.domain = int(domain, 16)
            info.bus = int(bus, 16)
            info.device = int(dev.split(".")[0], 16)
            info.pciDeviceId = 0x233010DE
            info.pciSubSystemId = 0x16C110DE
        return rc

    def c_nvmlDeviceGetArchitecture(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetArchitecture")
        if m:
            _out(ref).value = m.info.architecture
        return rc

    # --- utilization ----------------------------------------------------------------------------

    def _util_samples(self, m: DeviceModel, last_ts: int) -> list[tuple[int, int]]:
        period = m.info.util_sample_period_s
        now = self.now()
        newest = int(now / period)
        # The driver keeps about 100 samples, from before we started too where the model
        # knows what the GPU did then (a device driven by a process that ran before us).
        oldest = max(newest - 99, newest - 99 if getattr(m, "has_history", False) else 1)
        if last_ts:
            # Skip straight to the samples after last_ts (timestamps are k periods from boot).
            oldest = max(oldest, int((last_ts / 1e6 - self.BOOT_SECONDS) / period) - 1)
        out = []
        for k in range(oldest, newest + 1):
            t = k * period
            ts = self._ts_us(t)
            if ts <= last_ts:
                continue
            value = int(round(100 * m.busy_between(t - period, t)))
            if value == 0 and m.info.util_buffer_dry_when_idle:
                continue
            out.append((ts, value))
        return out

    def c_nvmlDeviceGetSamples(self, handle, sampling_type, last_ts, vtype_ref, count_ref, buf):
        m, rc = self._device(handle, "nvmlDeviceGetSamples")
        if not m:
            return rc
        if _val(sampling_type) != N.NVML_GPU_UTILIZATION_SAMPLES:
            return N.NVML_ERROR_NOT_SUPPORTED
        samples = self._util_samples(m, _val(last_ts))
        if not samples:
            return N.NVML_ERROR_NOT_FOUND
        _out(vtype_ref).value = N.NVML_VALUE_TYPE_UNSIGNED_INT
        count = _out(count_ref)
        if buf is None:
            count.value = len(samples)
            return N.NVML_SUCCESS
        n = min(count.value, len(buf), len(samples))
        # Samples that arrived between the two calls are left for the next one.
        for i, (ts, value) in enumerate(samples[:n]):
            buf[i].timeStamp = ts
            buf[i].sampleValue.uiVal = value
        count.value = n
        return N.NVML_SUCCESS

    def c_nvmlDeviceGetUtilizationRates(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetUtilizationRates")
        if m:
            period = m.info.util_sample_period_s
            t = int(self.now() / period) * period
            u = _out(ref)
            u.gpu = int(round(100 * m.busy_between(t - period, t)))
            u.memory = int(round(100 * m.activity_between(t - period, t).get("dram_active", 0)))
        return rc

    def c_nvmlDeviceGetProcessUtilization(self, handle, buf, count_ref, last_ts):
        m, rc = self._device(handle, "nvmlDeviceGetProcessUtilization")
        if not m:
            return rc
        period = m.info.util_sample_period_s
        t = int(self.now() / period) * period
        ts = self._ts_us(t)
        procs = [p for p in m.processes(t) if ts > _val(last_ts)]
        if not procs:
            return N.NVML_ERROR_NOT_FOUND
        count = _out(count_ref)
        if buf is None:
            count.value = len(procs)
            return N.NVML_ERROR_INSUFFICIENT_SIZE
        n = min(count.value, len(procs))
        for i, p in enumerate(procs[:n]):
            buf[i].pid = p.pid
            buf[i].timeStamp = ts
            buf[i].smUtil = int(round(100 * p.sm_util))
            buf[i].memUtil = 0
            buf[i].encUtil = 0
            buf[i].decUtil = 0
        count.value = n
        return N.NVML_SUCCESS

    def c_nvmlDeviceGetComputeRunningProcesses_v3(self, handle, count_ref, buf):
        return self._compute_processes(handle, count_ref, buf,
                                       "nvmlDeviceGetComputeRunningProcesses_v3")

    def c_nvmlDeviceGetComputeRunningProcesses_v2(self, handle, count_ref, buf):
        # Drivers before R510; its structure has the fields filled below too.
        return self._compute_processes(handle, count_ref, buf,
                                       "nvmlDeviceGetComputeRunningProcesses_v2")

    def _compute_processes(self, handle, count_ref, buf, fn: str):
        m, rc = self._device(handle, fn)
        if not m:
            return rc
        procs = m.processes(self.now())
        count = _out(count_ref)
        if buf is None:
            count.value = len(procs)
            return N.NVML_ERROR_INSUFFICIENT_SIZE if procs else N.NVML_SUCCESS
        if count.value < len(procs):
            count.value = len(procs)
            return N.NVML_ERROR_INSUFFICIENT_SIZE
        for i, p in enumerate(procs):
            buf[i].pid = p.pid
            buf[i].usedGpuMemory = p.used_memory
            buf[i].gpuInstanceId = UINT_MAX
            buf[i].computeInstanceId = UINT_MAX
        count.value = len(procs)
        return N.NVML_SUCCESS

    # --- memory, clocks, power, temperature --------------------------------------------------

    def c_nvmlDeviceGetMemoryInfo(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetMemoryInfo")
        if m:
            mem = _out(ref)
            used = m.state(self.now()).memory_used
            mem.total = m.info.memory_total
            mem.used = used
            mem.free = m.info.memory_total - used
        return rc

    def c_nvmlDeviceGetClockInfo(self, handle, clock_type, ref):
        m, rc = self._device(handle, "nvmlDeviceGetClockInfo")
        if m:
            _out(ref).value = m.state(self.now()).sm_clock_mhz
        return rc

    def c_nvmlDeviceGetMaxClockInfo(self, handle, clock_type, ref):
        m, rc = self._device(handle, "nvmlDeviceGetMaxClockInfo")
        if m:
            _out(ref).value = m.info.sm_clock_max_mhz
        return rc

    def c_nvmlDeviceGetPowerUsage(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetPowerUsage")
        if m:
            _out(ref).value = m.state(self.now()).power_mw
        return rc

    def c_nvmlDeviceGetEnforcedPowerLimit(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetEnforcedPowerLimit")
        if m:
            _out(ref).value = m.info.power_limit_mw
        return rc

    def c_nvmlDeviceGetTemperature(self, handle, sensor, ref):
        m, rc = self._device(handle, "nvmlDeviceGetTemperature")
        if m:
            _out(ref).value = m.state(self.now()).temperature_c
        return rc

    def c_nvmlDeviceGetCurrentClocksEventReasons(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetCurrentClocksEventReasons")
        if m:
            _out(ref).value = m.state(self.now()).clock_event_reasons
        return rc

    # --- PCIe and NVLink -------------------------------------------------------------------------

    def c_nvmlDeviceGetCurrPcieLinkGeneration(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetCurrPcieLinkGeneration")
        if m:
            _out(ref).value = m.state(self.now()).pcie_gen
        return rc

    def c_nvmlDeviceGetCurrPcieLinkWidth(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetCurrPcieLinkWidth")
        if m:
            _out(ref).value = m.state(self.now()).pcie_width
        return rc

    def c_nvmlDeviceGetMaxPcieLinkGeneration(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetMaxPcieLinkGeneration")
        if m:
            _out(ref).value = m.info.pcie_max_gen
        return rc

    def c_nvmlDeviceGetMaxPcieLinkWidth(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetMaxPcieLinkWidth")
        if m:
            _out(ref).value = m.info.pcie_max_width
        return rc

    def c_nvmlDeviceGetPcieThroughput(self, handle, counter, ref):
        # The real call measures over 20 ms and blocks that long (latency table above).
        m, rc = self._device(handle, "nvmlDeviceGetPcieThroughput")
        if m:
            t1 = self.now()
            t0 = t1 - 0.020
            (tx0, rx0), (tx1, rx1) = m.pcie_bytes(t0), m.pcie_bytes(t1)
            delta = (tx1 - tx0) if _val(counter) == N.NVML_PCIE_UTIL_TX_BYTES else (rx1 - rx0)
            _out(ref).value = int(delta / 0.020 / 1000)  # KB/s
        return rc

    def c_nvmlDeviceGetFieldValues(self, handle, count, ref):
        m, rc = self._device(handle, "nvmlDeviceGetFieldValues")
        if not m:
            return rc
        values = _out(ref)
        t = self.now()
        wall_us = int(self.clock() * 1e6)
        pcie = nvlink = None
        # Raw ctypes field access: pynvml's Python-level __setattr__ on every field would
        # make the fake driver cost more than a real one.
        put = ctypes.Structure.__setattr__
        for i in range(_val(count)):
            fv = values[i]
            fid = ctypes.Structure.__getattribute__(fv, "fieldId")
            put(fv, "timestamp", wall_us)
            put(fv, "latencyUsec", 0)
            if fid in m.info.unsupported_fields:
                put(fv, "nvmlReturn", N.NVML_ERROR_NOT_SUPPORTED)
                continue
            put(fv, "nvmlReturn", N.NVML_SUCCESS)
            value = fv.value
            if fid in (N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES):
                pcie = pcie or m.pcie_bytes(t)
                v = pcie[0] if fid == N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES else pcie[1]
                if m.info.pcie_counter_bits == 32:
                    put(fv, "valueType", N.NVML_VALUE_TYPE_UNSIGNED_INT)
                    value.uiVal = v & UINT_MAX
                else:
                    put(fv, "valueType", N.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)
                    value.ullVal = v
            elif fid in (N.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                         N.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX):
                links = m.info.nvlink_links
                scope = ctypes.Structure.__getattribute__(fv, "scopeId")
                if links == 0 or (scope != UINT_MAX and scope >= links):
                    put(fv, "nvmlReturn", N.NVML_ERROR_NOT_SUPPORTED)
                    continue
                nvlink = nvlink or m.nvlink_bytes(t)
                v = nvlink[0] if fid == N.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX else nvlink[1]
                if scope != UINT_MAX:
                    v //= links
                put(fv, "valueType", N.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)
                value.ullVal = v // 1024  # KiB
            else:
                put(fv, "nvmlReturn", N.NVML_ERROR_NOT_SUPPORTED)
        return N.NVML_SUCCESS

    # --- reliability ----------------------------------------------------------------------------

    def c_nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type, ref):
        m, rc = self._device(handle, "nvmlDeviceGetTotalEccErrors")
        if m:
            corrected = _val(error_type) == N.NVML_MEMORY_ERROR_TYPE_CORRECTED
            _out(ref).value = m.info.ecc_corrected if corrected else m.info.ecc_uncorrected
        return rc

    def c_nvmlDeviceGetRemappedRows(self, handle, corr, unc, pending, failure):
        m, rc = self._device(handle, "nvmlDeviceGetRemappedRows")
        if m:
            # A model whose rows get remapped while it runs says when (remapped_rows(t)).
            rows = m.remapped_rows(self.now()) if hasattr(m, "remapped_rows") else \
                m.info.remapped
            for ref, v in zip((corr, unc, pending, failure), rows):
                _out(ref).value = v
        return rc

    # --- events (XID) ----------------------------------------------------------------------------

    def c_nvmlEventSetCreate(self, ref):
        s = self.N.struct_c_nvmlEventSet_t()
        with self._lock:
            self._event_sets[ctypes.addressof(s)] = (s, _EventSet())
        _out(ref).contents = s
        return N.NVML_SUCCESS

    def _event_set(self, handle) -> _EventSet | None:
        try:
            return self._event_sets[ctypes.addressof(handle.contents)][1]
        except (ValueError, KeyError):
            return None

    def c_nvmlDeviceGetSupportedEventTypes(self, handle, ref):
        m, rc = self._device(handle, "nvmlDeviceGetSupportedEventTypes")
        if m:
            _out(ref).value = XID_EVENT | N.nvmlEventTypeSingleBitEccError
        return rc

    def c_nvmlDeviceRegisterEvents(self, handle, event_types, set_handle):
        m, rc = self._device(handle, "nvmlDeviceRegisterEvents")
        if not m:
            return rc
        es = self._event_set(set_handle)
        if es is None:
            return N.NVML_ERROR_INVALID_ARGUMENT
        with self._lock:
            es.devices[m.info.index] = _val(event_types)
            es.delivered_until[m.info.index] = self.now()
        return N.NVML_SUCCESS

    def c_nvmlEventSetWait_v2(self, set_handle, data_ref, timeout_ms):
        es = self._event_set(set_handle)
        if es is None:
            return N.NVML_ERROR_INVALID_ARGUMENT
        deadline = time.monotonic() + _val(timeout_ms) / 1000
        while True:
            with self._lock:
                now = self.now()
                for idx, mask in es.devices.items():
                    if not mask & XID_EVENT:
                        continue
                    since = es.delivered_until[idx]
                    model = self.devices[idx]
                    es.pending.extend((t, idx, x) for t, x in model.xids(since, now))
                    es.delivered_until[idx] = now
                if es.pending:
                    es.pending.sort()
                    _, idx, xid = es.pending.pop(0)
                    data = _out(data_ref)
                    data.device = ctypes.pointer(self._device_structs[idx])
                    data.eventType = XID_EVENT
                    data.eventData = xid
                    data.gpuInstanceId = UINT_MAX
                    data.computeInstanceId = UINT_MAX
                    return N.NVML_SUCCESS
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return N.NVML_ERROR_TIMEOUT
            time.sleep(min(remaining, 0.01))

    def c_nvmlEventSetFree(self, set_handle):
        with self._lock:
            try:
                del self._event_sets[ctypes.addressof(set_handle.contents)]
            except (ValueError, KeyError):
                return N.NVML_ERROR_INVALID_ARGUMENT
        return N.NVML_SUCCESS

    # --- GPM (Hopper and newer) -------------------------------------------------------------------

    def c_nvmlGpmQueryDeviceSupport(self, handle, ref):
        m, rc = self._device(handle, "nvmlGpmQueryDeviceSupport")
        if m:
            _out(ref).isSupportedDevice = int(m.info.gpm)
        return rc

    def c_nvmlGpmSampleAlloc(self, ref):
        s = self.N.struct_c_nvmlGpmSample_t()
        with self._lock:
            self._gpm_samples[ctypes.addressof(s)] = (s, None, -1)
        _out(ref).contents = s
        return N.NVML_SUCCESS

    def c_nvmlGpmSampleFree(self, sample):
        with self._lock:
            self._gpm_samples.pop(ctypes.addressof(sample.contents), None)
        return N.NVML_SUCCESS

    def c_nvmlGpmSampleGet(self, handle, sample):
        m, rc = self._device(handle, "nvmlGpmSampleGet")
        if not m:
            return rc
        if not m.info.gpm:
            return N.NVML_ERROR_NOT_SUPPORTED
        addr = ctypes.addressof(sample.contents)
        with self._lock:
            if addr not in self._gpm_samples:
                return N.NVML_ERROR_INVALID_ARGUMENT
            s = self._gpm_samples[addr][0]
            self._gpm_samples[addr] = (s, self.now(), m.info.index)
        return N.NVML_SUCCESS

    def c_nvmlGpmMetricsGet(self, ref):
        req = _out(ref)
        with self._lock:
            a = self._gpm_samples.get(ctypes.addressof(req.sample1.contents))
            b = self._gpm_samples.get(ctypes.addressof(req.sample2.contents))
        if not a or not b or a[1] is None or b[1] is None or a[2] != b[2]:
            return N.NVML_ERROR_INVALID_ARGUMENT
        t0, t1, model = a[1], b[1], self.devices[a[2]]
        if t1 <= t0:
            return N.NVML_ERROR_INVALID_ARGUMENT
        activity = model.activity_between(t0, t1)
        (tx0, rx0), (tx1, rx1) = model.pcie_bytes(t0), model.pcie_bytes(t1)
        for i in range(req.numMetrics):
            metric = req.metrics[i]
            mid = metric.metricId
            metric.nvmlReturn = N.NVML_SUCCESS
            if mid in GPM_METRIC_IDS:
                metric.value = 100.0 * activity.get(GPM_METRIC_IDS[mid], 0.0)
            elif mid == N.NVML_GPM_METRIC_PCIE_TX_PER_SEC:
                metric.value = max(tx1 - tx0, 0) / (t1 - t0) / 2**20
            elif mid == N.NVML_GPM_METRIC_PCIE_RX_PER_SEC:
                metric.value = max(rx1 - rx0, 0) / (t1 - t0) / 2**20
            else:
                metric.nvmlReturn = N.NVML_ERROR_NOT_SUPPORTED
        return N.NVML_SUCCESS


_installed: FakeNvmlLibrary | None = None


def install(library: FakeNvmlLibrary, module=None) -> FakeNvmlLibrary:
    """Make `pynvml` (or `module`, an instance from private_pynvml()) talk to the fake
    library instead of libnvidia-ml.so."""
    global _installed
    target = module or N
    if library.N is not target:
        raise ValueError("the library was made for another pynvml module")
    with target.libLoadLock:
        target.nvmlLib = library
        target._nvmlGetFunctionPointer_cache.clear()
    if module is None:
        _installed = library
    return library


def private_pynvml(name: str):
    """A separate instance of the pynvml module (`pynvml` run again from its file under
    another name): its own nvmlLib, library lock, function cache and ctypes structures, so
    that a fake library installed there serves only its users."""
    global _private_count
    with _private_lock:
        _private_count += 1
        unique = f"_agentd_pynvml_{name}_{_private_count}"
    spec = importlib.util.spec_from_file_location(unique, N.__file__)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load another pynvml from {N.__file__}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module  # pynvml finds itself there (its error classes)
    spec.loader.exec_module(module)
    return module


_private_count = 0
_private_lock = threading.Lock()


def uninstall() -> None:
    global _installed
    with N.libLoadLock:
        N.nvmlLib = None
        N._nvmlGetFunctionPointer_cache.clear()
    _installed = None


def installed() -> FakeNvmlLibrary | None:
    return _installed
