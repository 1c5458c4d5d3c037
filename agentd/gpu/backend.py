"""What a GPU backend hands the gpu sampler, whatever the vendor.

A backend (agentd.gpu.nvml today; AMD's amdsmi later) opens the devices, and on each tick
returns what changed since its last reading: kernel time, bytes moved, activity. Integration
over the vendor's own sample buffers happens in the backend, because only it knows their
semantics; the sampler turns these readings into counters, gauges and window rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# Clock-event (throttle) reasons; a reason's position is its bit in the gpu.throttle signal,
# the same bit NVML uses (nvmlClocksEventReason*: GpuIdle = 1 << 0 ... DisplayClock = 1 << 8).
CLOCK_EVENT_REASONS = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clock_setting",
)


class GpuLost(Exception):
    """The device stopped answering (fallen off the bus); it is not read again."""

    def __init__(self, index: int, detail: str = ""):
        super().__init__(f"GPU {index} is lost{': ' + detail if detail else ''}")
        self.index = index


@dataclass(frozen=True)
class GpuIdentity:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    minor: int | None
    memory_total: int | None  # bytes
    sm_clock_max_hz: float | None
    pcie_max_generation: int | None
    pcie_max_width: int | None
    # "counter", "throughput_sampled", "none", or "unknown" while the probe call fails
    pcie_counter_source: str
    # "samples" (the driver's sample buffer), "rates" (utilization rates integrated per
    # tick, coarser) or "none" (busy time absent)
    utilization_source: str = "samples"


@dataclass(slots=True)  # one per GPU per tick
class FastReading:
    """Changes since the previous fast reading of one GPU."""

    # The utilization source answered (or had nothing new yet): busy_seconds is a figure.
    # False while it fails or where the GPU has none: busy is then absent, not 0.
    busy_valid: bool = False
    utilization_source: str = "samples"
    pcie_counter_source: str = "counter"
    busy_seconds: float = 0.0  # kernel time in the newly arrived driver samples
    covered_seconds: float = 0.0  # time those samples span
    last_utilization: float | None = None  # latest driver sample, 0..1
    # The samples that arrived since the last reading, for step-period estimation on the
    # driver's own timeline: their mean value, and how long before this reading the middle
    # of their sample periods lies (the driver's timestamps mapped onto our clock).
    new_samples_mean: float | None = None
    new_samples_age: float | None = None
    seconds_since_sample: float | None = None  # age of the newest driver sample
    pcie_tx_bytes: int | None = None
    pcie_rx_bytes: int | None = None
    nvlink_tx_bytes: int | None = None
    nvlink_rx_bytes: int | None = None
    counter_seconds: float | None = None  # time between the two counter readings
    # Mean activity fractions over activity_seconds (GPM): sm_active, sm_occupancy,
    # tensor_active, dram_active.
    activity: dict[str, float] | None = None
    activity_seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (NVML function, error)


@dataclass
class GpuProcessUse:
    pid: int
    memory_used: int | None
    sm_utilization: float | None  # 0..1


@dataclass(slots=True)
class SlowReading:
    memory_used: int | None = None
    sm_clock_hz: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    temperature_c: float | None = None
    clock_event_reasons: dict[str, bool] | None = None
    pcie_generation: int | None = None
    pcie_width: int | None = None
    ecc_errors: dict[str, int] | None = None  # "corrected"/"uncorrected" -> lifetime count
    remapped_rows: tuple[int, int, bool, bool] | None = None  # corr, unc, pending, failed
    processes: list[GpuProcessUse] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (NVML function, error)


@dataclass(frozen=True)
class GpuEvent:
    index: int
    xid: int
