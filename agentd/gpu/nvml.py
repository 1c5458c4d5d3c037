"""NVIDIA GPUs through NVML (nvidia-ml-py's `pynvml`).

Conventions (see also ../shared/REFERENCE.md):
- Utilization comes from the driver's own sample buffer (nvmlDeviceGetSamples), each sample
  the percent of its sample period (1/6 s to 1 s by product) in which a kernel ran. Sample
  timestamps are microseconds on an unspecified clock, so only their differences are used.
  Some drivers stop adding samples while the GPU idles and answer NVML_ERROR_NOT_FOUND: a
  sample is credited with at most one sample period, so a gap in the buffer counts as idle.
- PCIe bytes come from the cumulative field values NVML_FI_DEV_PCIE_COUNT_TX/RX_BYTES read in
  the same nvmlDeviceGetFieldValues call as NVLink. Where the driver lacks them, a helper
  thread polls nvmlDeviceGetPcieThroughput (which blocks ~20 ms per direction per GPU) at the
  slow interval, off the fast path, and integrates its KB/s readings.
- Utilization falls back to nvmlDeviceGetUtilizationRates (its percent integrated over each
  tick) on GPUs whose driver does not support the sample buffer, and is absent, never a false
  0, where neither answers. GpuIdentity.utilization_source says which.
- NVML_ERROR_NOT_SUPPORTED, a function the driver lacks (NVML_ERROR_FUNCTION_NOT_FOUND, or
  pynvml's NVMLLibraryMismatchError from its unversioned wrappers) make that value absent for
  that GPU, logged once; NVML_ERROR_GPU_IS_LOST raises GpuLost; a missing library or driver is
  Unavailable. Any other error is one call's failure on one GPU: that value is absent for this
  reading, the error is logged once per GPU, call and code, handed to the sampler to count
  (FastReading.errors / SlowReading.errors), and the call is retried with its own back-off
  (0.1 s doubling to 30 s) while everything else is read as usual.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
import time
from dataclasses import dataclass, field

from agentd.gpu.backend import (
    CLOCK_EVENT_REASONS,
    FastReading,
    GpuEvent,
    GpuIdentity,
    GpuLost,
    GpuProcessUse,
    SlowReading,
)
from agentd.logs import LogOnce
from agentd.samplers.base import Unavailable

log = logging.getLogger("agentd.gpu.nvml")

UINT_MAX = 0xFFFFFFFF
GPM_METRICS = (  # our name, pynvml constant
    ("sm_active", "NVML_GPM_METRIC_SM_UTIL"),
    ("sm_occupancy", "NVML_GPM_METRIC_SM_OCCUPANCY"),
    ("tensor_active", "NVML_GPM_METRIC_ANY_TENSOR_UTIL"),
    ("dram_active", "NVML_GPM_METRIC_DRAM_BW_UTIL"),
)
# GPM metrics need samples at least 100 ms apart (NVIDIA: a hard limit on Hopper).
GPM_MIN_INTERVAL = 0.1
# A call that failed is retried after BACKOFF_FIRST seconds, doubling up to BACKOFF_MAX.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0

def load_pynvml():
    import pynvml

    return pynvml


def clock_event_reason_bits(N) -> dict[str, int]:
    """Our reason names -> NVML's bits (nvmlClocksEventReason<CamelCase>)."""
    out = {}
    for name in CLOCK_EVENT_REASONS:
        attr = "nvmlClocksEventReason" + "".join(w.capitalize() for w in name.split("_"))
        if hasattr(N, attr):
            out[name] = getattr(N, attr)
    return out


_INT32 = (1, 5)  # NVML_VALUE_TYPE_UNSIGNED_INT, NVML_VALUE_TYPE_SIGNED_INT
_get = ctypes.Structure.__getattribute__
_set = ctypes.Structure.__setattr__

# The 10 Hz path calls NVML's C functions itself, on buffers kept per device, instead of
# through pynvml's wrappers: those allocate their ctypes structures on every call (and
# nvmlDeviceGetSamples asks twice, once for the count), which cost more CPU than the calls.
# The layouts are nvml.h's (pynvml's c_nvmlFieldValue_t and c_nvmlSample_t, checked at
# open): a whole array is decoded by one struct.iter_unpack.
_FIELD = struct.Struct("<IIqqIIQ")  # fieldId scopeId timestamp latencyUsec valueType rc value
_SAMPLE = struct.Struct("<QQ")  # timeStamp, sampleValue (a union; uiVal in its low bits)
SAMPLE_CAPACITY = 128  # utilization samples read per call (the driver keeps fewer)


def _value(raw: int, vtype: int) -> int | float:
    """An nvmlValue_t union read as a little-endian uint64, as its valueType says."""
    if vtype in (2, 3):  # unsigned long (64-bit on Linux), unsigned long long
        return raw
    if vtype == 1:
        return raw & 0xFFFFFFFF
    if vtype == 5:
        v = raw & 0xFFFFFFFF
        return v - (1 << 32) if v >= 1 << 31 else v
    if vtype == 4:
        return raw - (1 << 64) if raw >= 1 << 63 else raw
    if vtype == 6:
        return raw & 0xFFFF
    return struct.unpack("<d", raw.to_bytes(8, "little"))[0]  # 0: double


def counter_delta(prev: int, cur: int, bits: int) -> int | None:
    """Advance of a hardware counter, through one wrap of a 32-bit counter.
    A 64-bit counter that goes backwards was reset (driver reload): None, no rate this time."""
    if cur >= prev:
        return cur - prev
    if bits == 32:
        return cur + 2**32 - prev
    return None


def error_name(N, e: BaseException) -> str:
    """A stable token for an error: NVML's constant name (NVML_ERROR_UNKNOWN), else the
    exception's class name."""
    code = getattr(e, "value", None)
    if isinstance(e, N.NVMLError) and isinstance(code, int):
        names = _ERROR_NAMES.get(id(N))
        if names is None:
            names = _ERROR_NAMES[id(N)] = {getattr(N, n): n for n in dir(N)
                                           if n.startswith("NVML_ERROR_")}
        return names.get(code, f"NVML_ERROR_{code}")
    return type(e).__name__


_ERROR_NAMES: dict[int, dict[int, str]] = {}


@dataclass
class _Device:
    index: int
    handle: object
    identity: GpuIdentity | None = None
    address: int = 0  # the handle's pointer value, to match event data
    lost: bool = False
    absent: set = field(default_factory=set)  # capabilities the device lacks
    # capability -> [consecutive failures, monotonic time of the next try]
    failing: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)  # (NVML function, error) since the last reading
    util_source: str = "samples"  # "samples", "rates" or "none"
    util_primed: bool = False
    util_resync: bool = False  # a failed read: do not credit the gap before the next sample
    util_last_ts: int = 0
    util_period_s: float | None = None
    util_last_seen: float = 0.0  # monotonic time the newest sample arrived
    util_clock_offset: float | None = None  # our clock minus the driver's, at its lowest
    rates_prev_t: float | None = None  # monotonic time of the last utilization-rates read
    # The fields read each tick; None until a probe answered (it failed at start).
    counter_fields: list | None = field(default_factory=list)
    pcie_source: str = "unknown"  # "counter", "throughput_sampled", "none" or "unknown"
    counter_prev: dict = field(default_factory=dict)  # field id -> (value, bits, timestamp us)
    field_buf: object = None  # nvmlFieldValue_t[n] with the field ids set once
    field_ref: object = None  # byref(field_buf), as pynvml passes it
    field_count: object = None  # n, as a c_int
    field_view: object = None  # the buffer's bytes, as one memoryview kept for unpacking
    field_call: object = None  # the nvmlDeviceGetFieldValues call on it, made once
    samples: object = None  # nvmlDeviceGetSamples' buffer and arguments, kept
    samples_call: object = None  # the nvmlDeviceGetSamples call on it, made once
    gpm_samples: list = field(default_factory=list)
    gpm_request: object = None
    gpm_prev_t: float | None = None
    proc_util_last_ts: int = 0


class NvmlBackend:
    name = "nvml"

    def __init__(self, slow_interval: float = 1.0, pynvml_module=None, clock=time.monotonic,
                 gpm_interval: float = 0.2):
        self.N = N = pynvml_module or load_pynvml()
        self.clock = clock
        # 5 ms of slack so that ticks jittering around the interval still qualify.
        self.gpm_interval = max(gpm_interval, GPM_MIN_INTERVAL) - 0.005
        # Error classes by code: their generated names differ between pynvml releases.
        err = N.nvmlExceptionClass
        # pynvml's unversioned wrappers turn FunctionNotFound into NVMLLibraryMismatchError.
        self.Missing = (err(N.NVML_ERROR_FUNCTION_NOT_FOUND),) + tuple(
            c for c in (getattr(N, "NVMLLibraryMismatchError", None),) if c is not None)
        self.NotSupported = (err(N.NVML_ERROR_NOT_SUPPORTED),) + self.Missing
        self.Lost = err(N.NVML_ERROR_GPU_IS_LOST)
        self.NotFound = err(N.NVML_ERROR_NOT_FOUND)
        self.Timeout = err(N.NVML_ERROR_TIMEOUT)
        self.slow_interval = slow_interval
        self.devices: list[_Device] = []
        self.driver_version = ""
        self._event_set = None
        self._log_once = LogOnce(log)
        self._fallback: dict[int, list[float]] = {}  # index -> [tx bytes, rx bytes, last t]
        self._fallback_lock = threading.Lock()
        self._fallback_stop = threading.Event()
        self._fallback_thread: threading.Thread | None = None
        self._reasons = clock_event_reason_bits(self.N)
        self._counter_ids = (N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES,
                             N.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                             N.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX)
        if ctypes.sizeof(N.c_nvmlFieldValue_t) != _FIELD.size or \
                ctypes.sizeof(N.c_nvmlSample_t) != _SAMPLE.size:
            raise RuntimeError("pynvml's structure layouts differ from nvml.h's")

    # --- set-up -------------------------------------------------------------------------------

    def open(self) -> list[GpuIdentity]:
        N = self.N
        try:
            N.nvmlInit()
        except N.NVMLError as e:
            code = getattr(e, "value", None)
            if code in (N.NVML_ERROR_LIBRARY_NOT_FOUND, N.NVML_ERROR_DRIVER_NOT_LOADED):
                raise Unavailable(f"no NVIDIA driver ({e}); sampling the host only") from None
            raise Unavailable(f"NVML initialisation failed: {e}") from None
        try:
            self.driver_version = str(N.nvmlSystemGetDriverVersion())
            count = N.nvmlDeviceGetCount()
        except N.NVMLError as e:
            N.nvmlShutdown()
            raise Unavailable(f"NVML cannot list devices: {e}") from None
        self.devices = []
        for i in range(count):
            try:
                handle = N.nvmlDeviceGetHandleByIndex(i)
            except N.NVMLError as e:
                # A GPU that fell off the bus before we started: report it, keep the others.
                log.error("GPU %d cannot be opened (%s); reported as lost", i, e)
                dev = _Device(i, None, lost=True)
                dev.identity = _lost_identity(i, {})
                self.devices.append(dev)
                continue
            dev = _Device(i, handle, address=ctypes.cast(handle, ctypes.c_void_p).value or 0)
            dev.identity = self._identify(dev)
            self.devices.append(dev)
        self._open_events()
        for d in self.devices:
            if d.pcie_source == "throughput_sampled":
                self._add_fallback(d)
        return [d.identity for d in self.devices]

    def _backoff(self, dev: _Device, capability: str) -> bool:
        """True while a call that failed waits for its next try."""
        state = dev.failing.get(capability)
        return state is not None and self.clock() < state[1]

    def _failed(self, dev: _Device, capability: str, fn_name: str, e: BaseException) -> None:
        state = dev.failing.setdefault(capability, [0, 0.0])
        state[0] += 1
        state[1] = self.clock() + min(BACKOFF_FIRST * 2 ** (state[0] - 1), BACKOFF_MAX)
        error = error_name(self.N, e)
        dev.errors.append((fn_name, error))
        self._log_once(logging.WARNING, (dev.index, fn_name, error),
                       "GPU %d: %s failed: %s (%s); that value is absent while it fails, "
                       "retried with back-off; the other values and GPUs are read as usual",
                       dev.index, fn_name, e, error)

    def _succeeded(self, dev: _Device, capability: str, fn_name: str) -> None:
        if dev.failing.pop(capability, None) is not None:
            self._log_once(logging.INFO, (dev.index, fn_name, "recovered"),
                           "GPU %d: %s answers again", dev.index, fn_name)

    def _absent(self, dev: _Device, capability: str, fn_name: str, e: BaseException) -> None:
        dev.absent.add(capability)
        if isinstance(e, self.Missing):
            # The driver's library lacks the function: one line for all GPUs.
            self._log_once(logging.WARNING, ("missing", fn_name),
                           "%s is missing from this driver's NVML (%s); %s is absent on "
                           "every GPU, the rest is read", fn_name, type(e).__name__,
                           capability.replace("_", " "))
        else:
            self._log_once(logging.INFO, (dev.index, capability),
                           "GPU %d: %s not available (%s)", dev.index, capability, e)

    def _call(self, dev: _Device, capability: str, fn, *args):
        """One NVML call for one device: None where unsupported, failing (counted, backing
        off) or missing from the driver; GpuLost when the GPU is lost."""
        if capability in dev.absent or (dev.failing and self._backoff(dev, capability)):
            return None
        try:
            value = fn(*args)
        except self.NotSupported as e:
            self._absent(dev, capability, getattr(fn, "__name__", capability), e)
            return None
        except self.Lost:
            dev.lost = True
            raise GpuLost(dev.index, "NVML_ERROR_GPU_IS_LOST") from None
        except Exception as e:  # one call's failure costs that value only
            self._failed(dev, capability, getattr(fn, "__name__", capability), e)
            return None
        if dev.failing:
            self._succeeded(dev, capability, getattr(fn, "__name__", capability))
        return value

    def _identify(self, dev: _Device) -> GpuIdentity:
        """What the GPU is; when it is lost already, what could be read before (and the
        device is marked lost, so it stays visible as such)."""
        known: dict = {}
        try:
            return self._identify_fields(dev, known)
        except GpuLost as e:
            log.error("%s at start; reported as lost", e)
            dev.lost = True
            return _lost_identity(dev.index, known)

    def _identify_fields(self, dev: _Device, known: dict) -> GpuIdentity:
        N, h = self.N, dev.handle
        uuid = known["uuid"] = self._call(dev, "uuid", N.nvmlDeviceGetUUID, h) or \
            f"GPU-unknown-{dev.index}"
        name = known["name"] = self._call(dev, "name", N.nvmlDeviceGetName, h) or "unknown"
        pci = self._call(dev, "pci", N.nvmlDeviceGetPciInfo, h)
        bus_id = pci.busId.decode() if pci is not None and isinstance(pci.busId, bytes) else (
            str(pci.busId) if pci is not None else "")
        known["pci_bus_id"] = bus_id
        mem = self._call(dev, "memory", N.nvmlDeviceGetMemoryInfo, h)
        clock_max = self._call(dev, "sm_clock_max", N.nvmlDeviceGetMaxClockInfo, h,
                               N.NVML_CLOCK_SM)
        gen = self._call(dev, "pcie_max_generation", N.nvmlDeviceGetMaxPcieLinkGeneration, h)
        width = self._call(dev, "pcie_max_width", N.nvmlDeviceGetMaxPcieLinkWidth, h)
        minor = self._call(dev, "minor", N.nvmlDeviceGetMinorNumber, h)
        source = dev.pcie_source = self._probe_counters(dev)
        # The first utilization read primes the sample buffer and finds the source.
        self._read_utilization(dev, FastReading())
        dev.rates_prev_t = None  # rates are integrated from the first tick on
        gpm = self._call(dev, "gpm", N.nvmlGpmQueryDeviceSupport, h)
        if gpm is not None and gpm.isSupportedDevice:
            try:
                dev.gpm_samples = [N.nvmlGpmSampleAlloc(), N.nvmlGpmSampleAlloc()]
            except N.NVMLError as e:
                self._log_once(logging.INFO, (dev.index, "gpm"), "GPU %d: GPM unavailable (%s)",
                               dev.index, e)
        else:
            dev.absent.add("gpm")
        return GpuIdentity(
            index=dev.index, uuid=str(uuid), name=str(name), pci_bus_id=bus_id, minor=minor,
            memory_total=mem.total if mem is not None else None,
            sm_clock_max_hz=clock_max * 1e6 if clock_max else None,
            pcie_max_generation=gen, pcie_max_width=width, pcie_counter_source=source,
            utilization_source=dev.util_source,
        )

    def _probe_counters(self, dev: _Device) -> str:
        N = self.N
        # (field, scope) pairs throughout: pynvml takes a bare field id only after a
        # caught TypeError, which is a measurable cost at 10 Hz.
        wanted = [(N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, 0), (N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, 0),
                  (N.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, UINT_MAX),
                  (N.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, UINT_MAX)]
        self._set_fields(dev, wanted)
        values = self._call(dev, "field_values", self._field_values(dev))
        if values is None and "field_values" not in dev.absent:
            dev.counter_fields = None  # the call failed: probe again on a later tick
            return "unknown"
        dev.counter_fields = []
        for (fid, _, ts, _, vtype, rc, raw), w in zip(values or (), wanted):
            if rc == N.NVML_SUCCESS:
                dev.counter_fields.append(w)
                dev.counter_prev[fid] = (_value(raw, vtype), 32 if vtype in _INT32 else 64, ts)
        self._set_fields(dev, dev.counter_fields)
        have = {f for f, _ in dev.counter_fields}
        if N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES in have and N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES in have:
            return "counter"
        if "pcie_throughput" not in dev.absent:
            self._log_once(logging.INFO, (dev.index, "pcie_counters"),
                           "GPU %d: no PCIe byte counters; sampling nvmlDeviceGetPcieThroughput "
                           "every %.1fs in a helper thread", dev.index, self.slow_interval)
            return "throughput_sampled"
        return "none"

    def _set_fields(self, dev: _Device, fields: list) -> None:
        """The device's field-value buffer, holding these (field id, scope id) pairs."""
        buf = (self.N.c_nvmlFieldValue_t * len(fields))()
        for i, (fid, scope) in enumerate(fields):
            _set(buf[i], "fieldId", fid)
            _set(buf[i], "scopeId", scope)
        dev.field_buf, dev.field_ref = buf, ctypes.byref(buf)
        dev.field_count = ctypes.c_int32(len(fields))
        dev.field_view = memoryview(buf).cast("B")

    def _field_values(self, dev: _Device):
        """nvmlDeviceGetFieldValues on the device's buffer, as a call for _call(): one
        7-tuple per field (id, scope, timestamp, latency, value type, return, raw value).
        Made once per device (it reads the buffer the device holds at the time of a call):
        a closure made on every tick of every GPU was a measurable part of a tick."""
        if dev.field_call is not None:
            return dev.field_call
        N = self.N

        def nvmlDeviceGetFieldValues():
            ret = N._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")(
                dev.handle, dev.field_count, dev.field_ref)
            if ret != N.NVML_SUCCESS:
                raise N.NVMLError(ret)
            return list(_FIELD.iter_unpack(dev.field_view))

        dev.field_call = nvmlDeviceGetFieldValues
        return nvmlDeviceGetFieldValues

    def _utilization_samples(self, dev: _Device) -> list[tuple[int, int]]:
        """nvmlDeviceGetSamples(GPU utilization) newer than dev.util_last_ts, in one call on
        a buffer kept for the device: [(timestamp us, percent)], oldest first."""
        N = self.N
        if dev.samples is None:
            vtype, count = N._nvmlValueType_t(), ctypes.c_uint(0)
            dev.samples = ((N.c_nvmlSample_t * SAMPLE_CAPACITY)(), count, ctypes.c_ulonglong(0),
                           ctypes.byref(vtype), ctypes.byref(count),
                           N._nvmlSamplingType_t(N.NVML_GPU_UTILIZATION_SAMPLES), vtype)
        buf, count, last, vtype_ref, count_ref, kind, _ = dev.samples
        count.value = SAMPLE_CAPACITY
        last.value = dev.util_last_ts
        ret = N._nvmlGetFunctionPointer("nvmlDeviceGetSamples")(
            dev.handle, kind, last, vtype_ref, count_ref, buf)
        if ret != N.NVML_SUCCESS:
            raise N.NVMLError(ret)
        n = min(count.value, SAMPLE_CAPACITY)
        raw = memoryview(buf).cast("B")[:n * _SAMPLE.size]
        return sorted((ts, value & 0xFFFFFFFF) for ts, value in _SAMPLE.iter_unpack(raw))

    def _samples_call(self, dev: _Device):
        """_utilization_samples as a call for _call(), an answer of NVML_ERROR_NOT_FOUND (no
        sample newer than the last one) being no samples; made once per device."""
        if dev.samples_call is not None:
            return dev.samples_call

        def nvmlDeviceGetSamples():
            try:
                return self._utilization_samples(dev)
            except self.NotFound:
                return []

        dev.samples_call = nvmlDeviceGetSamples
        return nvmlDeviceGetSamples

    def _open_events(self) -> None:
        N = self.N
        try:
            self._event_set = N.nvmlEventSetCreate()
        except N.NVMLError as e:
            self._log_once(logging.INFO, "events", "XID events unavailable: %s", e)
            return
        for dev in self.devices:
            if dev.lost or dev.handle is None:
                continue
            try:
                supported = N.nvmlDeviceGetSupportedEventTypes(dev.handle)
                if supported & N.nvmlEventTypeXidCriticalError:
                    N.nvmlDeviceRegisterEvents(dev.handle, N.nvmlEventTypeXidCriticalError,
                                               self._event_set)
            except N.NVMLError as e:
                self._log_once(logging.INFO, (dev.index, "events"),
                               "GPU %d: XID events unavailable (%s)", dev.index, e)

    # --- the fast path --------------------------------------------------------------------------

    def read_fast(self, index: int) -> FastReading:
        dev = self.devices[index]
        if dev.lost:
            raise GpuLost(index)
        r = FastReading()
        try:
            self._read_utilization(dev, r)
            self._read_counters(dev, r)
            self._read_gpm(dev, r)
        finally:
            if dev.errors:
                r.errors, dev.errors = dev.errors, []
            r.pcie_counter_source = dev.pcie_source
        return r

    def _read_utilization(self, dev: _Device, r: FastReading) -> None:
        if dev.util_source == "samples":
            self._read_samples(dev, r)
        if dev.util_source == "rates":
            self._read_rates(dev, r)
        r.utilization_source = dev.util_source

    def _read_samples(self, dev: _Device, r: FastReading) -> None:
        now = self.clock()
        if dev.util_primed and dev.util_period_s and \
                0 <= now - dev.util_last_seen < 0.9 * dev.util_period_s:
            # No new driver sample can be there yet: spare the call (and its NOT_FOUND).
            r.seconds_since_sample = now - dev.util_last_seen
            r.busy_valid = True
            return
        pts = self._call(dev, "utilization", self._samples_call(dev))
        if pts is None:
            # No sample buffer on this GPU: the driver's utilization rates instead.
            if not self._source_gone(dev, "utilization", "rates", "no utilization samples; "
                                     "integrating nvmlDeviceGetUtilizationRates (coarser)"):
                dev.util_resync = True
            return
        if len(pts) >= 2 and dev.util_period_s is None:
            gaps = [b[0] - a[0] for a, b in zip(pts, pts[1:]) if b[0] > a[0]]
            if gaps:
                dev.util_period_s = min(gaps) / 1e6  # the driver's sample period
        if not dev.util_primed:
            # First read: the buffer's history predates us; integrate from its newest sample.
            dev.util_primed = True
            if pts:
                dev.util_last_ts = pts[-1][0]
                dev.util_last_seen = now
                r.last_utilization = min(pts[-1][1], 100) / 100
            return
        r.busy_valid = True
        if pts:
            # The driver's timestamps are on its own clock: the smallest (our clock - its
            # newest timestamp) seen so far maps them onto ours (a sample read just after it
            # was taken gives the true offset; later reads only add to it).
            offset = now - pts[-1][0] / 1e6
            if dev.util_clock_offset is None or offset < dev.util_clock_offset:
                dev.util_clock_offset = offset
        prev = dev.util_last_ts
        fresh_t, fresh_v = [], []
        for ts, value in pts:
            if ts <= prev:
                continue
            fresh_t.append(ts / 1e6)
            fresh_v.append(min(value, 100) / 100)
            if prev:  # the very first sample ever seen only marks where time starts
                dt = (ts - prev) / 1e6
                if dev.util_period_s is None or dt < dev.util_period_s:
                    dev.util_period_s = dt
                if dev.util_resync and dt > dev.util_period_s * 1.5:
                    # Samples were missed while the call failed, not skipped by an idle
                    # driver: that gap is unknown, neither busy nor idle.
                    dt = 0.0
                # A sample speaks for one sample period; a longer gap means the driver
                # skipped samples because the GPU idled.
                credited = min(dt, dev.util_period_s * 1.5)
                r.busy_seconds += min(value, 100) / 100 * credited
                r.covered_seconds += dt
                dev.util_resync = False
            r.last_utilization = min(value, 100) / 100
            prev = ts
        if prev != dev.util_last_ts:
            dev.util_last_ts = prev
            dev.util_last_seen = now
        if fresh_v and dev.util_clock_offset is not None:
            half = (dev.util_period_s or 0.0) / 2
            r.new_samples_mean = sum(fresh_v) / len(fresh_v)
            r.new_samples_age = now - (sum(fresh_t) / len(fresh_t) + dev.util_clock_offset) + half
        r.seconds_since_sample = now - dev.util_last_seen

    def _source_gone(self, dev: _Device, capability: str, successor: str, why: str) -> bool:
        """Move to the next utilization source when this one is absent on the GPU."""
        if capability not in dev.absent:
            return False
        dev.util_source = successor
        self._log_once(logging.WARNING, (dev.index, "utilization", successor), "GPU %d: %s",
                       dev.index, why)
        return True

    def _read_rates(self, dev: _Device, r: FastReading) -> None:
        """nvmlDeviceGetUtilizationRates: the percent of the driver's last sample period in
        which a kernel ran, credited to the time since the previous read."""
        now = self.clock()
        u = self._call(dev, "utilization_rates", self.N.nvmlDeviceGetUtilizationRates,
                       dev.handle)
        if u is None:
            self._source_gone(dev, "utilization_rates", "none",
                              "no utilization from this driver; its busy time is absent (not 0)")
            dev.rates_prev_t = None  # the time until the next answer is unknown
            return
        prev, dev.rates_prev_t = dev.rates_prev_t, now
        r.last_utilization = min(u.gpu, 100) / 100
        if prev is None or now <= prev:
            return
        r.busy_valid = True
        r.busy_seconds = r.last_utilization * (now - prev)
        r.covered_seconds = now - prev
        r.seconds_since_sample = 0.0

    def _read_counters(self, dev: _Device, r: FastReading) -> None:
        if dev.counter_fields is None:
            # The probe failed at start: probe again (with the call's back-off); its first
            # answer primes the counters, or hands PCIe to the throughput helper.
            dev.pcie_source = self._probe_counters(dev)
            if dev.pcie_source == "throughput_sampled":
                self._add_fallback(dev)
            return
        if dev.counter_fields:
            values = self._call(dev, "field_values", self._field_values(dev))
            if values is None:
                return
            deltas: dict[int, int] = {}
            seconds = None
            counter_prev = dev.counter_prev
            for fid, _, ts, _, vtype, rc, raw in values:
                if rc:  # not NVML_SUCCESS (0)
                    continue
                if vtype == 3 or vtype == 2:  # 64-bit unsigned: the usual counter, as it is
                    cur = (raw, 64, ts)
                else:
                    cur = (_value(raw, vtype), 32 if vtype in _INT32 else 64, ts)
                prev = counter_prev.get(fid)
                counter_prev[fid] = cur
                if prev is None:
                    continue
                delta = counter_delta(prev[0], cur[0], cur[1])
                if delta is None:
                    continue  # reset: no figure this time, counting resumes from here
                deltas[fid] = delta
                if ts > prev[2]:
                    seconds = (ts - prev[2]) / 1e6
            r.counter_seconds = seconds
            pcie_tx, pcie_rx, nvlink_tx, nvlink_rx = self._counter_ids
            r.pcie_tx_bytes = deltas.get(pcie_tx)
            r.pcie_rx_bytes = deltas.get(pcie_rx)
            kib_tx = deltas.get(nvlink_tx)
            kib_rx = deltas.get(nvlink_rx)
            r.nvlink_tx_bytes = kib_tx * 1024 if kib_tx is not None else None
            r.nvlink_rx_bytes = kib_rx * 1024 if kib_rx is not None else None
        if self._fallback:  # only GPUs without PCIe counters have an entry (rarely any)
            with self._fallback_lock:
                acc = self._fallback.get(dev.index)
                if acc is not None:
                    tx, rx = int(acc[0]), int(acc[1])
                    acc[0] -= tx
                    acc[1] -= rx
                    r.pcie_tx_bytes, r.pcie_rx_bytes = tx, rx

    def _read_gpm(self, dev: _Device, r: FastReading) -> None:
        N = self.N
        if not dev.gpm_samples or "gpm" in dev.absent:
            return
        now = self.clock()
        if dev.gpm_prev_t is not None and now - dev.gpm_prev_t < self.gpm_interval:
            return  # too close to the previous sample; measure over a longer span next tick
        cur = dev.gpm_samples[1]
        if self._call(dev, "gpm", N.nvmlGpmSampleGet, dev.handle, cur) is None:
            return
        if dev.gpm_prev_t is not None:
            req = dev.gpm_request
            if req is None:
                # Built once per GPU: the structure holds room for every GPM metric (~19 KB).
                req = dev.gpm_request = N.c_nvmlGpmMetricsGet_t()
                req.version = N.NVML_GPM_METRICS_GET_VERSION
                req.numMetrics = len(GPM_METRICS)
                for i, (_, metric_id) in enumerate(GPM_METRICS):
                    req.metrics[i].metricId = getattr(N, metric_id)
            _set(req, "sample1", dev.gpm_samples[0])
            _set(req, "sample2", cur)
            if self._call(dev, "gpm", N.nvmlGpmMetricsGet, req) is not None:
                metrics = _get(req, "metrics")
                activity = {}
                for i, (name, _) in enumerate(GPM_METRICS):
                    m = metrics[i]
                    if _get(m, "nvmlReturn") == N.NVML_SUCCESS:
                        activity[name] = min(max(_get(m, "value") / 100, 0.0), 1.0)
                r.activity = activity
                r.activity_seconds = now - dev.gpm_prev_t
        dev.gpm_samples.reverse()  # the newest sample becomes the base of the next interval
        dev.gpm_prev_t = now

    # --- the slow path --------------------------------------------------------------------------

    def read_slow(self, index: int) -> SlowReading:
        dev = self.devices[index]
        if dev.lost:
            raise GpuLost(index)
        r = SlowReading()
        try:
            self._read_slow(dev, r)
        finally:
            r.errors, dev.errors = dev.errors, []
        return r

    def _read_slow(self, dev: _Device, r: SlowReading) -> None:
        N, h, c = self.N, dev.handle, self._call
        mem = c(dev, "memory", N.nvmlDeviceGetMemoryInfo, h)
        r.memory_used = mem.used if mem is not None else None
        clock = c(dev, "sm_clock", N.nvmlDeviceGetClockInfo, h, N.NVML_CLOCK_SM)
        r.sm_clock_hz = clock * 1e6 if clock is not None else None
        power = c(dev, "power", N.nvmlDeviceGetPowerUsage, h)
        r.power_w = power / 1000 if power is not None else None
        limit = c(dev, "power_limit", N.nvmlDeviceGetEnforcedPowerLimit, h)
        r.power_limit_w = limit / 1000 if limit is not None else None
        r.temperature_c = c(dev, "temperature", N.nvmlDeviceGetTemperature, h,
                            N.NVML_TEMPERATURE_GPU)
        reasons = c(dev, "clock_event_reasons", N.nvmlDeviceGetCurrentClocksEventReasons, h)
        if reasons is not None:
            r.clock_event_reasons = {k: bool(reasons & bit) for k, bit in self._reasons.items()}
        r.pcie_generation = c(dev, "pcie_generation", N.nvmlDeviceGetCurrPcieLinkGeneration, h)
        r.pcie_width = c(dev, "pcie_width", N.nvmlDeviceGetCurrPcieLinkWidth, h)
        corrected = c(dev, "ecc", N.nvmlDeviceGetTotalEccErrors, h,
                      N.NVML_MEMORY_ERROR_TYPE_CORRECTED, N.NVML_AGGREGATE_ECC)
        if corrected is not None:
            uncorrected = c(dev, "ecc", N.nvmlDeviceGetTotalEccErrors, h,
                            N.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, N.NVML_AGGREGATE_ECC)
            if uncorrected is not None:
                r.ecc_errors = {"corrected": corrected, "uncorrected": uncorrected}
        rows = c(dev, "remapped_rows", N.nvmlDeviceGetRemappedRows, h)
        if rows is not None:
            r.remapped_rows = (rows[0], rows[1], bool(rows[2]), bool(rows[3]))
        r.processes = self._processes(dev)

    def _processes(self, dev: _Device) -> list[GpuProcessUse]:
        N = self.N
        procs = self._call(dev, "processes", N.nvmlDeviceGetComputeRunningProcesses, dev.handle)
        if procs is None and "processes" in dev.absent and hasattr(
                N, "nvmlDeviceGetComputeRunningProcesses_v2"):
            # Drivers before the _v3 call (R470 and older) still have _v2.
            procs = self._call(dev, "processes_v2", N.nvmlDeviceGetComputeRunningProcesses_v2,
                               dev.handle)
        if not procs:
            return []

        def process_utilization():
            try:
                return N.nvmlDeviceGetProcessUtilization(dev.handle, dev.proc_util_last_ts)
            except self.NotFound:
                return []

        process_utilization.__name__ = "nvmlDeviceGetProcessUtilization"
        sm: dict[int, float] = {}
        for s in self._call(dev, "process_utilization", process_utilization) or ():
            sm[s.pid] = min(s.smUtil, 100) / 100
            dev.proc_util_last_ts = max(dev.proc_util_last_ts, s.timeStamp)
        return [GpuProcessUse(p.pid, p.usedGpuMemory, sm.get(p.pid)) for p in procs]

    def events(self) -> list[GpuEvent]:
        """XID events since the last call; never blocks (timeout 0)."""
        N = self.N
        if self._event_set is None:
            return []
        out = []
        by_address = {d.address: d.index for d in self.devices if d.handle is not None}
        for _ in range(256):  # bounded drain
            try:
                data = N.nvmlEventSetWait(self._event_set, 0)
            except self.Timeout:
                break
            except N.NVMLError as e:
                self._log_once(logging.WARNING, "event_wait", "XID event wait failed: %s", e)
                break
            if data.eventType & N.nvmlEventTypeXidCriticalError:
                addr = ctypes.cast(data.device, ctypes.c_void_p).value or 0
                idx = by_address.get(addr)
                if idx is not None:
                    out.append(GpuEvent(idx, int(data.eventData)))
        return out

    # --- the PCIe throughput fallback -----------------------------------------------------------

    def _add_fallback(self, dev: _Device) -> None:
        with self._fallback_lock:
            self._fallback[dev.index] = [0.0, 0.0, time.monotonic()]
        if self._fallback_thread is None:
            self._fallback_thread = threading.Thread(
                target=self._fallback_loop, name="nvml-pcie-throughput", daemon=True)
            self._fallback_thread.start()

    def _fallback_loop(self) -> None:
        N = self.N
        while not self._fallback_stop.wait(self.slow_interval):
            for index in list(self._fallback):
                dev = self.devices[index]
                if dev.lost:
                    continue
                try:
                    tx = N.nvmlDeviceGetPcieThroughput(dev.handle, N.NVML_PCIE_UTIL_TX_BYTES)
                    rx = N.nvmlDeviceGetPcieThroughput(dev.handle, N.NVML_PCIE_UTIL_RX_BYTES)
                except self.Lost:
                    dev.lost = True
                    continue
                except self.NotSupported as e:
                    self._log_once(logging.INFO, (index, "pcie_throughput"),
                                   "GPU %d: no PCIe throughput either (%s)", index, e)
                    with self._fallback_lock:
                        del self._fallback[index]
                    continue
                except N.NVMLError as e:
                    self._log_once(logging.WARNING, (index, "pcie_throughput"),
                                   "GPU %d: nvmlDeviceGetPcieThroughput failed: %s", index, e)
                    continue
                now = time.monotonic()
                with self._fallback_lock:
                    acc = self._fallback[index]
                    # A 20 ms reading stands for the whole interval since the last one.
                    elapsed = now - acc[2]
                    acc[0] += tx * 1000 * elapsed
                    acc[1] += rx * 1000 * elapsed
                    acc[2] = now

    def close(self) -> None:
        N = self.N
        self._fallback_stop.set()
        if self._fallback_thread is not None:
            self._fallback_thread.join(timeout=2)
        for dev in self.devices:
            for s in dev.gpm_samples:
                try:
                    N.nvmlGpmSampleFree(s)
                except N.NVMLError:
                    pass
        if self._event_set is not None:
            try:
                N.nvmlEventSetFree(self._event_set)
            except N.NVMLError:
                pass
        try:
            N.nvmlShutdown()
        except N.NVMLError:
            pass


def _lost_identity(index: int, known: dict) -> GpuIdentity:
    """A GPU lost before it could be identified: what was read, empty strings for the rest."""
    return GpuIdentity(
        index=index, uuid=known.get("uuid", ""), name=known.get("name", ""),
        pci_bus_id=known.get("pci_bus_id", ""), minor=None, memory_total=None,
        sm_clock_max_hz=None, pcie_max_generation=None, pcie_max_width=None,
        pcie_counter_source="none", utilization_source="none",
    )
