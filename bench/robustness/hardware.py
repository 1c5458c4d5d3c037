"""The hardware of a training node, from public specifications and what people measure.

Figures (per board; ranges are drawn per case):
- H100 SXM5 80GB: 700 W board limit, 1980 MHz max SM clock, PCIe 5.0 x16 (63 GB/s per
  direction on the wire; cudaMemcpy from pinned memory reaches ~50-55 GB/s, from pageable
  memory 10-20 GB/s, bounded by the CPU's staging copy), NVLink 4 (450 GB/s per direction;
  NCCL all-reduce bus bandwidth ~350-480 GB/s on 8 GPUs). Power: ~70 W idle with no
  process, ~75-90 W holding memory with no kernels, ~130-170 W while NCCL kernels spin
  waiting for a peer, 450-690 W computing (dense bf16 GEMMs reach the limit).
- A100 SXM4 80GB: 400 W, 1410 MHz, PCIe 4.0 x16 (~25 GB/s pinned, 8-12 GB/s pageable),
  NVLink 3 (~230 GB/s bus bandwidth); ~55 W idle, ~60-70 W holding memory, ~90-110 W
  spinning, 250-390 W computing.
- NVML utilization: the percent of each driver sample period (1/6 s on these boards) in
  which a kernel ran, kept in a buffer with microsecond timestamps.
- NVMe data-centre drives (PCIe 4.0 U.2, e.g. 7 GB/s sequential, 1-1.5 M random 4 KiB IOPS,
  ~80-100 us at queue depth 1); a drive reports ~100% "busy" (io_ticks) as soon as one
  request is in flight all the time, so busy says nothing about headroom.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Board:
    name: str  # as NVML and dcgm-exporter's modelName report it
    memory_total: float
    sm_clock_max_hz: float
    power_limit_w: float
    power_idle_w: float  # no process, no memory held
    power_held_w: float  # a process holds memory, no kernel runs
    power_spin_w: float  # NCCL kernels spinning in a collective
    power_compute_w: float  # dense training compute at the max clock
    pcie_generation: int
    pcie_width: int
    pinned_h2d: float  # bytes/s a pinned cudaMemcpy reaches
    pageable_h2d: float  # bytes/s from pageable memory
    nvlink_busbw: float  # NCCL all-reduce bus bandwidth, bytes/s per GPU
    util_period: float = 1 / 6


def pcie_link(generation: int, width: int) -> float:
    gts = {3: 8.0, 4: 16.0, 5: 32.0}[generation]
    return gts * 1e9 * 128 / 130 / 8 * width


def h100(rng: np.random.Generator) -> Board:
    return Board("NVIDIA H100 80GB HBM3", 81559 * MIB, 1980e6, 700.0,
                 power_idle_w=rng.uniform(66, 74), power_held_w=rng.uniform(75, 90),
                 power_spin_w=rng.uniform(140, 165), power_compute_w=rng.uniform(500, 640),
                 pcie_generation=5, pcie_width=16, pinned_h2d=rng.uniform(48e9, 55e9),
                 pageable_h2d=rng.uniform(10e9, 18e9), nvlink_busbw=rng.uniform(340e9, 420e9))


def a100(rng: np.random.Generator) -> Board:
    return Board("NVIDIA A100-SXM4-80GB", 81920 * MIB, 1410e6, 400.0,
                 power_idle_w=rng.uniform(52, 58), power_held_w=rng.uniform(60, 70),
                 power_spin_w=rng.uniform(90, 110), power_compute_w=rng.uniform(280, 370),
                 pcie_generation=4, pcie_width=16, pinned_h2d=rng.uniform(22e9, 25e9),
                 pageable_h2d=rng.uniform(7e9, 11e9), nvlink_busbw=rng.uniform(200e9, 235e9))


@dataclass(frozen=True)
class Drive:
    name: str  # block device, e.g. nvme0n1
    model: str
    pci_address: str
    seq_read: float  # bytes/s ceiling for large reads
    rand_read_iops: float
    write: float  # bytes/s ceiling for writes
    latency: float  # seconds per request at queue depth 1 (small reads)

    def read_ceiling(self, request_bytes: float) -> float:
        """Bytes/s the drive delivers for reads of this size with enough in flight."""
        return min(self.seq_read, self.rand_read_iops * request_bytes)


def nvme(rng: np.random.Generator, index: int, address: str) -> Drive:
    return Drive(f"nvme{index}n1", rng.choice(["SAMSUNG MZWLR7T6HALA-00007",
                                                "KCM6DRUL7T68", "INTEL SSDPF2KX076TZ"]),
                 address, seq_read=rng.uniform(6.2e9, 7.0e9),
                 rand_read_iops=rng.uniform(0.9e6, 1.5e6), write=rng.uniform(3.0e9, 4.2e9),
                 latency=rng.uniform(70e-6, 110e-6))


@dataclass
class Switch:
    address: str  # the switch's upstream port
    gpus: list[int]
    drives: list[str]
    uplink: float  # bytes/s per direction


@dataclass
class Node:
    host: str
    board: Board
    gpus: int
    cores: int
    memory_total: float
    drives: list[Drive]
    switches: list[Switch]
    gpu_bus_ids: list[str]
    uuids: list[str]
    nics: list[str]  # RDMA devices, one per GPU on a multi-node fabric
    nic_rate: float  # bytes/s per NIC port
    netdev: str = "eth0"
    background_cores: float = 0.4  # daemons, kubelet, monitoring
    extras: dict = field(default_factory=dict)

    def switch_of(self, gpu: int) -> Switch | None:
        for s in self.switches:
            if gpu in s.gpus:
                return s
        return None

    def drive(self, name: str) -> Drive:
        return next(d for d in self.drives if d.name == name)


def make_node(rng: np.random.Generator, host: str, board: str = "h100", gpus: int = 8,
              drives: int = 2) -> Node:
    b = h100(rng) if board == "h100" else a100(rng)
    # A DGX-like layout: pairs of GPUs behind one PCIe switch, NVMe drives beside some of them.
    buses = [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb][:gpus]
    bus_ids = [f"00000000:{x:02X}:00.0" for x in buses]
    ds = [nvme(rng, i, f"0000:{buses[2 * i % gpus] + 3:02x}:00.0") for i in range(drives)]
    uplink = pcie_link(b.pcie_generation, 16) * rng.uniform(0.86, 0.92)  # after protocol
    switches = []
    for s in range(max(gpus // 2, 1)):
        members = list(range(2 * s, min(2 * s + 2, gpus)))
        sw_drives = [d.name for i, d in enumerate(ds) if i == s]
        switches.append(Switch(f"0000:{buses[2 * s] - 2:02x}:00.0", members, sw_drives, uplink))
    uuids = ["GPU-" + "-".join(rng.bytes(n).hex() for n in (4, 2, 2, 2, 6)) for _ in range(gpus)]
    cores = int(rng.choice([96, 112, 128, 192, 224]))
    return Node(host, b, gpus, cores, float(rng.choice([1024, 2048])) * GIB, ds, switches,
                bus_ids, uuids, [f"mlx5_{i}" for i in range(gpus)], 400e9 / 8)
