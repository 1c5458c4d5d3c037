"""A simulated node as agentd's samplers see one: fake GPUs behind the fake NVML library and
a /proc and /sys tree whose files say what the simulated hardware and processes did.

The simulator runs a little ahead of the clock in chunks; every quantity is read off its
cumulative counters at the time asked, so NVML's sample buffer, a GPM interval or a
/proc/diskstats read between two ticks all see consistent, exact values.

A node of a multi-node job (agentd/sim/cluster.py) reads its counters from a ClusterHistory,
which runs the whole job ahead in chunks on the nodes' one clock; such a node also has its
own host name, its trainers' cgroup (a Slurm job or a Kubernetes pod, with the kubelet's
/var/log/pods and /var/log/containers entries under its varlog tree), RDMA ports under
/sys/class/infiniband (what agentd's network sampler and node_exporter's infiniband
collector read), and its own instance of the pynvml module with its fake library installed,
so that several nodes' daemons can share one process (agentd/sim/serve.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid as uuidlib

import numpy as np
import pynvml as N

from agentd.gpu.fake.library import DeviceInfo, DeviceState, FakeNvmlLibrary, GpuProcess
from agentd.pcie import GENERATION_GTS as GTS
from agentd.pcie import capacity
from agentd.sim.model import Simulator, Trace, storage_throughput, uplink_link
from agentd.sim.scenario import Scenario

# The Trace fields a History keeps (cumulative counters and per-step values).
TRACE_FIELDS = ("busy", "sm_active", "pcie_rx", "nvlink", "steps", "stall", "storage_read",
                "storage_ops", "storage_busy", "storage_weighted", "cache_read", "worker_cpu",
                "trainer_cpu", "gpu_read", "io_wait", "cpu_wait", "clock_factor", "write",
                "io_full", "mem_wait", "pcie_tx", "io_blocked", "collective_wait",
                "cpu_other")
# RDMA port counters written under /sys/class/infiniband/DEV/ports/1/counters that the
# simulation moves (the others stay 0); each from a ClusterHistory "net.FIELD" key.
IB_COUNTERS = {"port_xmit_data": "tx_bytes", "port_rcv_data": "rx_bytes",
               "port_xmit_packets": "tx_packets", "port_rcv_packets": "rx_packets",
               "unicast_xmit_packets": "tx_packets", "unicast_rcv_packets": "rx_packets",
               "port_xmit_wait": "xmit_wait", "symbol_error": "symbol_error",
               "port_rcv_errors": "rcv_errors", "link_error_recovery": "link_error_recovery",
               "link_downed": "link_downed"}
IB_ZERO = ("excessive_buffer_overrun_errors", "local_link_integrity_errors",
           "multicast_rcv_packets", "multicast_xmit_packets", "port_rcv_constraint_errors",
           "port_rcv_discards", "port_rcv_remote_physical_errors",
           "port_rcv_switch_relay_errors", "port_xmit_constraint_errors", "port_xmit_discards",
           "VL15_dropped")
MGMT_BYTES_PER_S = 2.5e6  # the management interface's own traffic (logs, metrics, ssh)


def job_gpu_activity(sm, busy, spin, sm_when_computing: float, dram_factor=1.0) -> dict:
    """A multi-node job's GPU activity over an interval from its shares of SM activity,
    busy time and collective wait (floats or arrays): tensor cores work only while it
    computes (NCCL's spin and its transfers use none), DRAM mostly then too."""
    # sm = c*compute + 0.05*spin + 0.1*(busy - compute - spin): the simulator's SM shares.
    compute = np.clip((sm - 0.1 * busy + 0.05 * spin) / (sm_when_computing - 0.1), 0.0, 1.0)
    comm = np.clip(busy - compute - spin, 0.0, 1.0)
    return {"sm_active": sm, "sm_occupancy": sm * 0.6,
            "tensor_active": 0.7 * sm_when_computing * compute,
            "dram_active": np.minimum(0.4 * compute * dram_factor + 0.1 * comm, 1.0)}


def job_gpu_gauges(active, clock, base_clock, thermal, temperature_offset, limit_w):
    """(power W, temperature C, clock below its normal) of a multi-node job's GPU (floats
    or arrays): power and heat follow compute activity (`active`: 0..1, a rank spinning in
    the all-reduce is busy for NVML but draws little), a power-capped GPU draws its limit at
    lowered clocks, a hot one (thermal) slows down at ~88 C."""
    active = np.minimum(active, 1.0)
    power = 90 + (limit_w - 90) * 0.93 * active * clock ** 2
    temperature = 33 + temperature_offset + 36 * active
    slowed = clock < base_clock - 0.01
    hot = np.logical_and(slowed, thermal)
    capped = np.logical_and(slowed, np.logical_not(thermal))
    temperature = np.where(hot, np.maximum(temperature, 88 + temperature_offset / 3),
                           temperature)
    power = np.where(capped, np.maximum(power, limit_w * 0.985 * np.minimum(active / 0.9, 1)),
                     power)
    return power, temperature, slowed


def trace_fields(tr: Trace) -> dict[str, np.ndarray]:
    return {k: getattr(tr, k) for k in TRACE_FIELDS if getattr(tr, k) is not None}

CLK_TCK = 100
SECTOR = 512
PID_BASE = 200_000
MEM_TOTAL = 2 * 2**40  # 2 TiB host memory
PAGE = 4096


def trainer_pid(gpu: int) -> int:
    return PID_BASE + gpu * 100


def uplink_sysfs(p) -> tuple[str, str]:
    """A shared switch uplink's sysfs link speed and width."""
    gen, width = uplink_link(p)
    return f"{GTS[gen]:.1f} GT/s PCIe", str(width)


def disk_names(p) -> list[str]:
    n = max(p.storage_devices, 1)
    if p.storage_kind == "sata":
        return [f"sd{chr(ord('b') + i)}" for i in range(n)]
    if p.storage_kind == "network":
        return [f"vd{chr(ord('b') + i)}" for i in range(n)]
    return [f"nvme{i}n1" for i in range(n)]


def nvme_link(p) -> tuple[int, int]:
    """The PCIe generation (x4) of a simulated NVMe drive: the slowest whose link carries its
    share of the node's storage bandwidth (drives read at ~85-95% of their link)."""
    per = storage_throughput(p) / max(p.storage_devices, 1)
    for gen in (3, 4, 5):
        if 0.85 * capacity(gen, 4) >= per:
            return gen, 4
    return 5, 4


def probed_ceilings(p, gpu_links: list[float | None]) -> dict:
    """What `agentd probe` would have measured on the simulated node."""
    per = storage_throughput(p) / max(p.storage_devices, 1)
    return {
        "version": 1, "source": "simulation",
        "storage": {d: {"source": "measured", "seq_read_bytes_per_second": per,
                        "rand_read_bytes_per_second": per,
                        "rand_read_iops": per / max(p.request_bytes, 1.0)}
                    for d in disk_names(p)},
        "h2d": {str(i): {"source": "measured", "pinned_bytes_per_second": p.pcie_bandwidth,
                         "pageable_bytes_per_second": p.pcie_bandwidth * 0.5,
                         "link_bytes_per_second": link}
                for i, link in enumerate(gpu_links)},
        "cpu": {"source": "measured", "cores": float(p.cores)},
    }


def link_for(copy_bandwidth: float) -> tuple[int, int]:
    """The PCIe generation and width whose capacity a pinned copy reaches ~80% of."""
    options = [(gen, w) for gen in (3, 4, 5) for w in (4, 8, 16)]
    return min(options, key=lambda gw: abs(capacity(*gw) * 0.8 - copy_bandwidth))


class History:
    """The simulator's cumulative counters over the last `keep_s` seconds, and the means to
    read any of them at any time (linear interpolation between 10 ms steps). Fed by its own
    Simulator, or (feed) by the ClusterHistory of the job the node is part of."""

    def __init__(self, sim: Simulator | None, keep_s: float = 60.0, chunk_s: float = 1.0,
                 feed: "ClusterHistory | None" = None, dt: float | None = None):
        self.sim = sim
        self.feed = feed
        self.keep = int(keep_s / (dt or sim.dt))
        self.chunk_s = chunk_s
        self.lock = threading.Lock()
        self.t = np.zeros(0)
        self.data: dict[str, np.ndarray] = {}

    def extend_to(self, t: float) -> None:
        if self.feed is not None:
            self.feed.extend_to(t)
            return
        with self.lock:
            while self.sim.now < t + self.chunk_s:
                tr = self.sim.run(self.chunk_s)
                self._append(tr.t, trace_fields(tr))

    def append(self, t: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        """Add a chunk: times of its steps and each counter's values at them."""
        with self.lock:
            self._append(t, fields)

    def _append(self, t: np.ndarray, fields: dict) -> None:
        if not self.data:
            # Time 0: every counter at zero.
            self.t = np.concatenate(([0.0], t))
            self.data = {k: np.concatenate((np.zeros((1,) + v.shape[1:]), v))
                         for k, v in fields.items()}
            return
        self.t = np.concatenate((self.t, t))[-self.keep:]
        for k, v in fields.items():
            self.data[k] = np.concatenate((self.data[k], v))[-self.keep:]

    def at(self, key: str, t: float):
        return self.snapshot(t, (key,))[key]

    def snapshot(self, t: float, keys=None) -> dict:
        """Every counter (or those named) at time t, from one lookup."""
        self.extend_to(t)
        with self.lock:
            ts = self.t
            keys = keys or self.data.keys()
            if t <= ts[0]:
                return {k: self.data[k][0] for k in keys}
            i = int(np.searchsorted(ts, t))
            if i >= len(ts):
                return {k: self.data[k][-1] for k in keys}
            w = (t - ts[i - 1]) / (ts[i] - ts[i - 1])
            return {k: self.data[k][i - 1] + (self.data[k][i] - self.data[k][i - 1]) * w
                    for k in keys}

    def between(self, key: str, t0: float, t1: float):
        return self.at(key, t1) - self.at(key, t0)


def device_info(node_name: str, index: int, pcie_bandwidth: float) -> DeviceInfo:
    """GPU `index` of the node named `node_name`: its UUID (unique per node name), bus id,
    PCIe link, as the fake NVML reports them."""
    gen, width = link_for(pcie_bandwidth)
    return DeviceInfo(
        index=index,
        uuid="GPU-" + str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, f"{node_name}-gpu-{index}")),
        pci_bus_id=f"00000000:{0x18 + 0x10 * index:02X}:00.0",
        minor=index,
        pcie_gen=gen, pcie_width=width, pcie_max_gen=gen, pcie_max_width=width,
        util_sample_period_s=1 / 6,
    )


class SimulatedGpu:
    """One GPU of the simulated node, as the fake NVML library asks about it."""

    def __init__(self, node: "SimulatedNode", index: int):
        self.node = node
        self.index = index
        p = node.scenario.job
        self.info = device_info(node.scenario.node_name, index, p.pcie_bandwidth)
        # A node of a multi-node job: its GPUs' own clocks, temperatures and faults.
        spec = getattr(node, "spec", None)
        self.spec = spec
        self.base_clock = spec.clocks[index] if spec is not None and spec.clocks else 1.0
        self.temperature_offset = spec.temperature_offset_c[index] \
            if spec is not None and spec.temperature_offset_c else 0.0
        self.dram_factor = spec.dram_factor[index] if spec is not None and spec.dram_factor \
            else 1.0
        self.remapped = spec.remapped_rows.get(index) if spec is not None else None
        # When its compute is slowed at normal clocks (a degraded GPU): from then on its
        # remapped rows show and its DRAM works harder.
        self.slowed = [(ep.start_s, ep.end_s) for ep in p.episodes if ep.compute_factor != 1
                       and (not ep.gpus or index in ep.gpus)]
        self.lost_at = None
        self.xid_events: list[tuple[float, int]] = []
        for ev in node.scenario.events:
            if ev.gpu == index:
                if ev.xid:
                    self.xid_events.append((ev.at_s, ev.xid))
                if ev.lost:
                    self.lost_at = ev.at_s

    def busy_between(self, t0: float, t1: float) -> float:
        if t1 <= t0:
            return 0.0
        return float(self.node.history.between("busy", t0, t1)[self.index]) / (t1 - t0)

    def activity_between(self, t0: float, t1: float) -> dict[str, float]:
        h = self.node.history
        span = max(t1 - t0, 1e-9)
        sm = float(h.between("sm_active", t0, t1)[self.index]) / span
        busy = float(h.between("busy", t0, t1)[self.index]) / span
        if self.spec is not None:
            spin = float(h.between("collective_wait", t0, t1)[self.index]) / span
            dram = self.dram_factor if self._slowed_at(t1) else 1.0
            return {k: float(v) for k, v in job_gpu_activity(
                sm, busy, spin, self.node.scenario.job.sm_active_when_computing,
                dram).items()}
        return {"sm_active": sm, "sm_occupancy": sm * 0.6, "tensor_active": sm * 0.7,
                "dram_active": busy * 0.35}

    def _slowed_at(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.slowed)

    def remapped_rows(self, t: float) -> tuple[int, int, int, int]:
        """(correctable, uncorrectable, pending, failure) rows remapped at time t."""
        if self.remapped is not None and any(a <= t for a, _ in self.slowed):
            return self.remapped
        return self.info.remapped

    def pcie_bytes(self, t: float) -> tuple[int, int]:
        snap = self.node.history.snapshot(t, ("pcie_rx", "pcie_tx"))
        rx = float(snap["pcie_rx"][self.index])
        tx = float(snap["pcie_tx"][self.index])
        base = 2**40  # counters have run since boot
        # TX: checkpoints' device-to-host copies, plus small traffic (results, losses).
        return base + int(rx * 0.02 + tx), base + int(rx)

    def nvlink_bytes(self, t: float) -> tuple[int, int]:
        v = int(float(self.node.history.at("nvlink", t)[self.index]))
        return v, v

    def state(self, t: float) -> DeviceState:
        if self.spec is not None:
            return self._job_node_state(t)
        h = self.node.history
        recent = self.busy_between(max(t - 1.0, 0.0), t) if t > 0 else 0.0
        clock = float(h.at("clock_factor", t)[self.index]) if t > 0 else 1.0
        reasons = 0
        if recent < 0.01:
            reasons |= N.nvmlClocksEventReasonGpuIdle
        if clock < 0.99:
            reasons |= N.nvmlClocksEventReasonSwPowerCap
        return DeviceState(
            memory_used=int(0.82 * self.info.memory_total),
            sm_clock_mhz=int(self.info.sm_clock_max_mhz * clock),
            power_mw=int((90 + 560 * recent * clock) * 1000),
            temperature_c=int(38 + 30 * recent),
            clock_event_reasons=reasons,
            pcie_gen=self.info.pcie_gen if recent > 0 else 1,
            pcie_width=16,
        )

    def _job_node_state(self, t: float) -> DeviceState:
        """A GPU of a multi-node job: power and temperature follow its compute
        (job_gpu_gauges); a clock below its normal reports power cap or thermal slowdown."""
        h = self.node.history
        t0 = max(t - 1.0, 0.0)
        recent = self.busy_between(t0, t) if t > 0 else 0.0
        clock = float(h.at("clock_factor", t)[self.index]) if t > 0 else self.base_clock
        active = 0.0
        if t > t0:
            a = self.activity_between(t0, t)
            active = a["tensor_active"] / (0.7 * self.node.scenario.job.sm_active_when_computing)
        thermal = self.spec.throttle_reason == "hw_thermal"
        power, temperature, slowed = job_gpu_gauges(
            active, clock, self.base_clock, thermal, self.temperature_offset,
            self.info.power_limit_mw / 1000)
        reasons = N.nvmlClocksEventReasonGpuIdle if recent < 0.01 else 0
        if slowed:
            reasons |= (N.nvmlClocksEventReasonHwThermalSlowdown |
                        N.nvmlClocksEventReasonHwSlowdown) if thermal else \
                N.nvmlClocksEventReasonSwPowerCap
        return DeviceState(
            memory_used=int(0.82 * self.info.memory_total),
            sm_clock_mhz=int(self.info.sm_clock_max_mhz * clock),
            power_mw=int(float(power) * 1000),
            temperature_c=int(temperature),
            clock_event_reasons=reasons,
            pcie_gen=self.info.pcie_gen if recent > 0 else 1,
            pcie_width=16,
        )

    def processes(self, t: float) -> list[GpuProcess]:
        sm = self.busy_between(max(t - 1.0, 0.0), t) if t > 0 else 0.0
        return [GpuProcess(self.node.trainer_pid(self.index), int(0.8 * self.info.memory_total),
                           sm)]

    def xids(self, t0: float, t1: float) -> list[tuple[float, int]]:
        return [(t, x) for t, x in self.xid_events if t0 < t <= t1]


class ClusterHistory:
    """The histories of a multi-node job's nodes, fed together: asked for any node's counters
    at time t, it runs the whole job (ClusterSimulator) ahead in chunks and hands each node
    its part, so every node sees the same collectives on the same clock."""

    def __init__(self, sim, keep_s: float = 20.0, chunk_s: float = 1.0):
        from agentd.sim.cluster import NET_FIELDS

        self.sim = sim  # a ClusterSimulator
        self.chunk_s = chunk_s
        self.lock = threading.Lock()
        self._net_fields = NET_FIELDS
        self.nodes = [History(None, keep_s, chunk_s, feed=self, dt=sim.dt) for _ in sim.sims]

    def extend_to(self, t: float) -> None:
        with self.lock:
            while self.sim.now < t + self.chunk_s:
                ct = self.sim.run(self.chunk_s)
                for k, h in enumerate(self.nodes):
                    fields = trace_fields(ct.nodes[k])
                    fields.update({f"net.{f}": ct.net[k][f] for f in self._net_fields})
                    h.append(ct.t, fields)


class SimulatedNode:
    """The whole node: history, fake GPUs, and the /proc and /sys trees agentd reads.

    A node of a multi-node job: cluster (a ClusterHistory) and index (the node's position
    in the job); its NodeSpec gives its host name, identity, hardware and faults."""

    def __init__(self, scenario: Scenario, root: str | None = None, clock=time.time,
                 dt: float = 0.01, *, cluster: ClusterHistory | None = None, index: int = 0,
                 t0: float | None = None):
        self.scenario = scenario
        self.spec = None
        self.hostname: str | None = None  # None: the machine's (a node served alone)
        self.pynvml = None  # None: the process's pynvml module
        if cluster is not None:
            self.spec = cluster.sim.spec.nodes[index]
            self.sim = cluster.sim.sims[index]
            self.history = cluster.nodes[index]
            self.hostname = self.spec.name
            from agentd.gpu.fake import private_pynvml

            self.pynvml = private_pynvml(f"{index}")
        else:
            self.sim = Simulator(scenario.job, dt=dt)
            self.history = History(self.sim)
        self.clock = clock
        self.t0 = clock() if t0 is None else t0  # the job's nodes share one time 0
        # tmpfs when there is one: the tree is rewritten 20 times a second.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
            else None
        self._owns_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="agentd-sim-", dir=shm)
        self._writes = 0
        self.procfs = os.path.join(self.root, "proc")
        self.sysfs = os.path.join(self.root, "sys")
        self.varlog = os.path.join(self.root, "varlog")
        self._net_written: dict[str, str] = {}  # sysfs file -> text last written (RDMA)
        self.gpus = [SimulatedGpu(self, i) for i in range(scenario.job.gpus)]
        p = scenario.job
        self.devices = disk_names(p)
        self._write_static()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- identities ---------------------------------------------------------------------------

    def trainer_pid(self, gpu: int) -> int:
        return trainer_pid(gpu)

    def worker_pids(self, gpu: int) -> list[int]:
        return [self.trainer_pid(gpu) + 1 + w for w in range(self.scenario.job.workers_per_gpu)]

    def now(self) -> float:
        return self.clock() - self.t0

    def ceilings(self) -> dict | None:
        """The probe's state on this node, when the scenario says it was probed."""
        p = self.scenario.job
        if not p.probed:
            return None
        return probed_ceilings(p, [capacity(g.info.pcie_max_gen, g.info.pcie_max_width)
                                   for g in self.gpus])

    def nvml_library(self) -> FakeNvmlLibrary:
        lib = FakeNvmlLibrary(self.gpus, clock=self.clock, pynvml_module=self.pynvml)
        lib.t0 = self.t0  # the library's time 0 is the simulation's
        return lib

    def install_nvml(self) -> FakeNvmlLibrary:
        """Put this node's fake library under its pynvml module (the process's own for a
        node served alone, the node's private one for a node of a job)."""
        from agentd.gpu.fake import install

        return install(self.nvml_library(), self.pynvml)

    # --- the trees ----------------------------------------------------------------------------

    def _put(self, rel: str, text: str) -> None:
        path = os.path.join(self.root, rel)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # readers never see a half-written file

    def _write_static(self) -> None:
        p = self.scenario.job
        os.makedirs(self.varlog, exist_ok=True)
        os.makedirs(os.path.join(self.procfs, "pressure"), exist_ok=True)
        os.makedirs(os.path.join(self.procfs, "net"), exist_ok=True)
        os.makedirs(os.path.join(self.procfs, "self"), exist_ok=True)
        self._put("proc/self/mountstats", "device /dev/md0 mounted on /data with fstype xfs\n")
        # sysfs: the GPUs and NVMe drives under PCIe switches (two GPUs and one drive each),
        # so the topology sampler sees which of them share an uplink.
        switches = max((p.gpus + p.gpus_per_switch - 1) // p.gpus_per_switch, 1)
        speed, lanes = uplink_sysfs(p) if p.shared_uplink_bandwidth else ("32.0 GT/s PCIe", "16")
        for sw in range(switches):
            b0 = 0x15 + 0x20 * sw
            root = f"sys/devices/pci0000:{b0:02x}/0000:{b0:02x}:01.0"
            usp = f"{root}/0000:{b0 + 1:02x}:00.0"
            self._pci(root, "0x060400", "0x8086", "32.0 GT/s PCIe", 16)
            self._pci(usp, "0x060400", "0x1000", speed, int(lanes))
            for k in range(p.gpus_per_switch):
                gpu = sw * p.gpus_per_switch + k
                if gpu >= p.gpus:
                    break
                dsp = f"{usp}/0000:{b0 + 2:02x}:0{k}.0"
                self._pci(dsp, "0x060400", "0x1000", "32.0 GT/s PCIe", 16)
                self._pci(f"{dsp}/0000:{0x18 + 0x10 * gpu:02x}:00.0", "0x030200", "0x10de",
                          "32.0 GT/s PCIe", 16)
            if sw < len(self.devices) and p.storage_kind == "nvme":
                dev = self.devices[sw]
                dsp = f"{usp}/0000:{b0 + 2:02x}:0{p.gpus_per_switch}.0"
                nvme = f"{dsp}/0000:{b0 + 4:02x}:00.0"
                self._pci(dsp, "0x060400", "0x1000", "32.0 GT/s PCIe", 16)
                gen, width = nvme_link(p)
                self._pci(nvme, "0x010802", "0x144d", f"{GTS[gen]:.1f} GT/s PCIe", width)
                ns = f"{nvme}/nvme/nvme{sw}/{dev}"
                os.makedirs(os.path.join(self.root, ns, "queue"), exist_ok=True)
                self._put(f"{ns}/queue/rotational", "0\n")
                os.makedirs(os.path.join(self.root, "sys/block"), exist_ok=True)
                link = os.path.join(self.root, "sys/block", dev)
                if not os.path.islink(link):
                    os.symlink(os.path.relpath(os.path.join(self.root, ns),
                                               os.path.dirname(link)), link)
        on_switches = switches if p.storage_kind == "nvme" else 0
        for dev in self.devices[on_switches:]:
            d = f"sys/devices/virtual/block/{dev}"
            os.makedirs(os.path.join(self.root, d, "queue"), exist_ok=True)
            self._put(f"{d}/queue/rotational", "0\n")
            link = os.path.join(self.root, "sys/block", dev)
            if not os.path.islink(link):
                os.symlink(os.path.relpath(os.path.join(self.root, d), os.path.dirname(link)),
                           link)
        # The trainer processes and their workers, in the job's cgroup.
        cgroup = self.spec.cgroup if self.spec is not None else "/system.slice/train.service"
        for gpu in range(p.gpus):
            tp = self.trainer_pid(gpu)
            for pid in [tp, *self.worker_pids(gpu)]:
                os.makedirs(os.path.join(self.procfs, str(pid), "task", str(pid)), exist_ok=True)
                self._put(f"proc/{pid}/cgroup", f"0::{cgroup}\n")
                self._put(f"proc/{pid}/comm", "python3\n" if pid == tp else "pt_data_worker\n")
                kids = " ".join(map(str, self.worker_pids(gpu))) + " " if pid == tp else ""
                self._put(f"proc/{pid}/task/{pid}/children", kids)
        if self.spec is not None:
            self._write_static_job_node()

    def _write_static_job_node(self) -> None:
        """A job's node: the kubelet's log entries that name its pod, its network
        interfaces' speeds, and its RDMA ports (what stays fixed; counters in write())."""
        spec = self.spec
        if spec.pod is not None:
            namespace, pod, uid = spec.pod
            os.makedirs(os.path.join(self.varlog, "pods", f"{namespace}_{pod}_{uid}",
                                     "trainer"), exist_ok=True)
            os.makedirs(os.path.join(self.varlog, "containers"), exist_ok=True)
            link = os.path.join(self.varlog, "containers",
                                f"{pod}_{namespace}_trainer-{spec.container_id}.log")
            if not os.path.islink(link):
                os.symlink(f"/var/log/pods/{namespace}_{pod}_{uid}/trainer/0.log", link)
        for dev, mbps in (("eth0", 25000), ("ib0", 400000)):
            os.makedirs(os.path.join(self.sysfs, "class", "net", dev), exist_ok=True)
            self._put(f"sys/class/net/{dev}/speed", f"{mbps}\n")
        for r, nic in enumerate(spec.nics):
            base = f"sys/class/infiniband/{nic.device}"
            os.makedirs(os.path.join(self.root, base, "ports", "1", "counters"), exist_ok=True)
            self._put(f"{base}/board_id", "MT_0000000838\n")
            self._put(f"{base}/fw_ver", "28.39.1002\n")
            self._put(f"{base}/hca_type", "MT4129\n")
            self._put(f"{base}/node_type", "1: CA\n")
            port = f"{base}/ports/1"
            self._put(f"{port}/link_layer", "InfiniBand\n")
            self._put(f"{port}/state", "4: ACTIVE\n")
            self._put(f"{port}/phys_state", "5: LinkUp\n")
            for name in IB_ZERO:
                self._put(f"{port}/counters/{name}", "0\n")
        self._write_network(0.0, {f"net.{f}": np.zeros(len(spec.nics))
                                  for f in set(IB_COUNTERS.values())}
                            | {"net.rate": np.array([n.rate for n in spec.nics], float)})

    def _write_network(self, t: float, snap: dict) -> None:
        """The RDMA ports' counters (port_xmit_data and port_rcv_data in units of 4 bytes,
        as the spec has them) and rate; the management and IPoIB interfaces' counters."""
        from agentd.sim.cluster_scenario import ib_rate_text

        spec = self.spec
        for r, nic in enumerate(spec.nics):
            port = f"sys/class/infiniband/{nic.device}/ports/1"
            values = {"rate": ib_rate_text(float(snap["net.rate"][r]))}
            for name, key in IB_COUNTERS.items():
                v = float(snap[f"net.{key}"][r])
                values[f"counters/{name}"] = str(int(v / 4 if name.endswith("_data") else v))
            for rel, text in values.items():
                path = f"{port}/{rel}"
                if self._net_written.get(path) != text:
                    self._put(path, text + "\n")
                    self._net_written[path] = text
        # The management interface: its own traffic, and the dataset's reads when the data
        # lives on a network volume; IPoIB: a trickle (the fabric's traffic is RDMA).
        mgmt = MGMT_BYTES_PER_S * t
        if self.scenario.job.storage_kind == "network":
            mgmt += float(snap.get("storage_read", 0.0))
        ipoib = 2e4 * t
        self._put("proc/net/dev",
                  "Inter-|   Receive                                                |  Transmit\n"
                  " face |bytes    packets errs drop fifo frame compressed multicast|bytes    "
                  "packets errs drop fifo colls carrier compressed\n"
                  f"  eth0: {int(mgmt)} {int(mgmt / 1400)} 0 0 0 0 0 0 {int(mgmt * 0.3)} "
                  f"{int(mgmt * 0.3 / 1400)} 0 0 0 0 0 0\n"
                  f"   ib0: {int(ipoib)} {int(ipoib / 2044)} 0 0 0 0 0 0 {int(ipoib)} "
                  f"{int(ipoib / 2044)} 0 0 0 0 0 0\n")

    def _pci(self, path: str, cls: str, vendor: str, speed: str, width: int) -> None:
        os.makedirs(os.path.join(self.root, path), exist_ok=True)
        for k, v in {"class": cls, "vendor": vendor, "numa_node": "0",
                     "current_link_speed": speed, "current_link_width": str(width),
                     "max_link_speed": speed, "max_link_width": str(width)}.items():
            self._put(f"{path}/{k}", v + "\n")
        os.makedirs(os.path.join(self.root, "sys/bus/pci/devices"), exist_ok=True)
        link = os.path.join(self.root, "sys/bus/pci/devices", os.path.basename(path))
        if not os.path.islink(link):
            os.symlink(os.path.relpath(os.path.join(self.root, path), os.path.dirname(link)),
                       link)

    def write(self, t: float | None = None) -> None:
        """Write every changing file for simulation time t (default: now)."""
        t = self.now() if t is None else t
        h = self.history
        p = self.scenario.job
        g = p.gpus
        snap = h.snapshot(t)
        before = h.snapshot(max(t - 0.1, 0.0), ("stall", "io_wait", "io_blocked"))
        at = snap.__getitem__
        worker_cpu, trainer_cpu = at("worker_cpu"), at("trainer_cpu")
        stalled = (snap["stall"] - before["stall"]) > 0.05  # per GPU, over the last 100 ms
        io_recent = float(snap["io_wait"] - before["io_wait"]) > 0
        # /proc/stat: each GPU's workers on their own cores, trainers on the next ones.
        cores = max(int(p.cores), 1)
        busy = np.zeros(cores)
        for i in range(g):
            for w in range(p.workers_per_gpu):
                busy[(i * p.workers_per_gpu + w) % cores] += worker_cpu[i] / p.workers_per_gpu
            busy[(g * p.workers_per_gpu + i) % cores] += trainer_cpu[i]
        busy += float(at("cpu_other")) / cores  # other processes' (a CPU hog's) time
        iowait_total = float(np.sum(at("io_blocked")))  # core-seconds waiting on reads
        lines = []
        per_core = []
        for c in range(cores):
            user = min(int(busy[c] * CLK_TCK), int(t * CLK_TCK))
            iowait = int(iowait_total / cores * CLK_TCK)
            idle = max(int(t * CLK_TCK) - user - iowait, 0)
            per_core.append((user, 0, 0, idle, iowait, 0, 0, 0))
        total = [sum(v[k] for v in per_core) for k in range(8)]
        lines.append("cpu  " + " ".join(map(str, total)) + " 0 0")
        lines += [f"cpu{c} " + " ".join(map(str, v)) + " 0 0" for c, v in enumerate(per_core)]
        lines += ["ctxt 1000000", "btime 1700000000", "processes 5000",
                  f"procs_running {int(sum(busy) / max(t, 1e-9)) + 1}",
                  f"procs_blocked {int(stalled.sum()) if io_recent else 0}"]
        self._put("proc/stat", "\n".join(lines) + "\n")
        # /proc/diskstats: reads spread evenly over the data devices.
        nd = len(self.devices)
        rd, ops = float(at("storage_read")) / nd, float(at("storage_ops")) / nd
        busy_ms = float(at("storage_busy")) * 1000 / 1  # every device busy alike
        weighted = float(at("storage_weighted")) * 1000 / nd
        written = float(at("write")) / nd
        recent = float(snap["storage_weighted"] - h.at("storage_weighted", max(t - 0.01, 0))) \
            / 0.01 / nd
        rows = []
        for k, dev in enumerate(self.devices):
            rows.append(f" 259 {k} {dev} {int(ops)} 0 {int(rd / SECTOR)} "
                        f"{int(weighted)} {int(written / 2**20)} 0 "
                        f"{int(written / SECTOR)} {int(written / 2e9 * 1000)} {int(recent)} "
                        f"{int(busy_ms)} {int(weighted)} 0 0 0 0 0 0")
        self._put("proc/diskstats", "\n".join(rows) + "\n")
        # /proc/pressure
        io_us = int(float(at("io_wait")) * 1e6)
        full_us = int(float(at("io_full")) * 1e6)
        cpu_us = int(float(at("cpu_wait")) * 1e6)
        mem_us = int(float(at("mem_wait")) * 1e6)
        for res, some, full in (("cpu", cpu_us, 0), ("io", io_us, full_us),
                                ("memory", mem_us, mem_us // 3)):
            self._put(f"proc/pressure/{res}",
                      f"some avg10=0.00 avg60=0.00 avg300=0.00 total={some}\n"
                      f"full avg10=0.00 avg60=0.00 avg300=0.00 total={full}\n")
        # Memory and the page cache: when the dataset stops fitting, re-reads are refaults.
        cached = MEM_TOTAL // 2 if not self._cache_drop() or t < self.scenario.onset_s else \
            MEM_TOTAL // 3
        refaults = int(float(at("storage_read")) / PAGE) if self._cache_drop() and \
            t >= self.scenario.onset_s else 0
        self._put("proc/meminfo",
                  f"MemTotal: {MEM_TOTAL // 1024} kB\nMemFree: {MEM_TOTAL // 1024 // 20} kB\n"
                  f"MemAvailable: {(MEM_TOTAL - MEM_TOTAL // 4) // 1024} kB\n"
                  f"Cached: {cached // 1024} kB\nDirty: 0 kB\nWriteback: 0 kB\n"
                  f"SwapTotal: 0 kB\nSwapFree: 0 kB\n")
        self._put("proc/vmstat", f"pgmajfault 10\npgscan_kswapd {refaults * 2}\n"
                  f"pgsteal_kswapd {refaults}\nworkingset_refault_file {refaults}\n")
        if self.spec is not None:
            if self._writes % 5 == 0:  # twice a second: the network sampler reads at 1 Hz
                self._write_network(t, snap)
        else:
            self._write_net_dev(float(at("nvlink").sum())
                                if p.collective_bandwidth < 1e11 else 0.0)
        # The processes: a trainer per GPU and its data-loader workers. /proc/PID/io is read
        # once a second by the process sampler: rewrite it at about that pace.
        self._writes += 1
        with_io = self._writes % 10 == 1
        self._write_processes(snap, before, with_io)

    def _write_net_dev(self, net: float) -> None:
        self._put("proc/net/dev",
                  "Inter-|   Receive                                                |  Transmit\n"
                  " face |bytes    packets errs drop fifo frame compressed multicast|bytes    "
                  "packets errs drop fifo colls carrier compressed\n"
                  f"  eth0: {int(net)} {int(net / 4096)} 0 0 0 0 0 0 {int(net)} "
                  f"{int(net / 4096)} 0 0 0 0 0 0\n")

    def _write_processes(self, snap: dict, before: dict, with_io: bool) -> None:
        p = self.scenario.job
        worker_cpu, trainer_cpu = snap["worker_cpu"], snap["trainer_cpu"]
        gpu_read, cache_read = snap["gpu_read"], snap["cache_read"]
        for i in range(p.gpus):
            tp = self.trainer_pid(i)
            wp = self.worker_pids(i)
            self._proc(tp, "python3", 1, trainer_cpu[i], 0.0, 0.0, "S", with_io)
            # Workers waiting for reads over the last 100 ms sleep in D state.
            n_d = int(round(float(snap["io_blocked"][i] - before["io_blocked"][i]) / 0.1))
            for k, pid in enumerate(wp):
                self._proc(pid, "pt_data_worker", tp, worker_cpu[i] / len(wp),
                           gpu_read[i] / len(wp), (gpu_read[i] + cache_read[i]) / len(wp),
                           "D" if k < n_d else "R", with_io)

    def _cache_drop(self) -> bool:
        return any(ep.cache_hit is not None and ep.cache_hit < self.scenario.job.cache_hit
                   for ep in self.scenario.job.episodes)

    def _proc(self, pid: int, comm: str, ppid: int, cpu_s: float, read: float, rchar: float,
              state: str, with_io: bool = True) -> None:
        ticks = int(cpu_s * CLK_TCK)
        self._put(f"proc/{pid}/stat",
                  f"{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0 {ticks} 0 "
                  f"0 0 20 0 4 0 {pid} 4000000000 250000 18446744073709551615 0 0 0 0 0 0 0 0 "
                  f"0 0 0 0 17 0 0 0\n")
        if not with_io:
            return
        self._put(f"proc/{pid}/io",
                  f"rchar: {int(rchar)}\nwchar: 0\nsyscr: {int(rchar / 2**20)}\nsyscw: 0\n"
                  f"read_bytes: {int(read)}\nwrite_bytes: 0\ncancelled_write_bytes: 0\n")

    # --- the writer thread ----------------------------------------------------------------------

    def start(self, hz: float = 10.0) -> None:
        self.write()
        self._thread = threading.Thread(target=self._loop, args=(1.0 / hz,), daemon=True,
                                        name="sim-writer")
        self._thread.start()

    def _loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.write()
            except OSError:
                pass  # the tree went away (shutting down)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
