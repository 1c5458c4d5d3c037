"""PCIe topology from sysfs: where each GPU, NVMe drive and network adapter hangs (root port,
switch), each link's capacity, and which GPUs and NVMe drives share a switch's uplink.

A GPU and an NVMe drive behind one switch share its upstream link: when their summed traffic
pins that link, the drive looks slow and the copies look slow, though neither is. Telling that
apart from a slow disk needs this map.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from agentd.paths import read_optional
from agentd.pcie import sysfs_capacity
from agentd.samplers.base import Row, Sampler, Unavailable

BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
NVIDIA, AMD = "0x10de", "0x1002"


def classify(pci_class: str, vendor: str) -> str | None:
    c = pci_class.strip().lower()
    if c.startswith("0x0108"):
        return "nvme"
    if c.startswith(("0x0302", "0x0300", "0x0380")) and vendor.strip().lower() in (NVIDIA, AMD):
        return "gpu"
    if c.startswith(("0x0200", "0x0207")):
        return "nic"
    return None


@dataclass(frozen=True)
class PciDevice:
    address: str
    kind: str
    name: str  # block device or interface name(s), "" for GPUs
    bridges: tuple[str, ...]  # root port first, the device's own downstream port last
    numa_node: str
    capacity: float | None
    max_capacity: float | None

    @property
    def root_port(self) -> str:
        return self.bridges[0] if self.bridges else ""

    @property
    def switch(self) -> str:
        """The upstream port of the switch the device hangs under ('' when none)."""
        return self.bridges[-2] if len(self.bridges) >= 3 else ""


def read_topology(sysfs: str) -> list[PciDevice]:
    devices_dir = os.path.join(sysfs, "bus", "pci", "devices")
    out = []
    for addr in sorted(os.listdir(devices_dir)):
        d = os.path.join(devices_dir, addr)
        kind = classify(read_optional(os.path.join(d, "class")) or "",
                        read_optional(os.path.join(d, "vendor")) or "")
        if kind is None:
            continue
        real = os.path.realpath(d)
        chain = [p for p in real.split(os.sep) if BDF.match(p)]
        bridges = tuple(chain[:-1])
        names: list[str] = []
        if kind == "nvme":
            for ctrl in sorted(_listdir(os.path.join(d, "nvme"))):
                names += sorted(n for n in _listdir(os.path.join(d, "nvme", ctrl))
                                if re.fullmatch(r"nvme\d+(c\d+)?n\d+", n))
        elif kind == "nic":
            names = sorted(_listdir(os.path.join(d, "net"))) + sorted(
                _listdir(os.path.join(d, "infiniband")))

        def attr(name: str, d: str = d) -> str | None:
            return read_optional(os.path.join(d, name))

        out.append(PciDevice(
            address=addr,
            kind=kind,
            name=",".join(names),
            bridges=bridges,
            numa_node=(attr("numa_node") or "-1").strip(),
            capacity=sysfs_capacity(attr("current_link_speed"), attr("current_link_width")),
            max_capacity=sysfs_capacity(attr("max_link_speed"), attr("max_link_width")),
        ))
    return out


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def upsysfs_capacity(sysfs: str, bridge: str) -> float | None:
    d = os.path.join(sysfs, "bus", "pci", "devices", bridge)
    return sysfs_capacity(read_optional(os.path.join(d, "current_link_speed")),
                         read_optional(os.path.join(d, "current_link_width")))


class TopologySampler(Sampler):
    name = "topology"
    help = "PCIe placement of GPUs, NVMe drives and NICs; links and shared switch uplinks"
    default_rate = "slow"
    default_interval = 60.0  # the topology changes only on hot-plug
    window_columns = 0  # static: nothing for the window

    def open(self) -> None:
        self._dir = self.ctx.paths.sys("bus", "pci", "devices")
        if not os.path.isdir(self._dir):
            raise Unavailable(f"{self._dir} is absent (no PCI bus, or sysfs not mounted)")
        self.devices: list[PciDevice] = []

    def sample(self, now: float, slow: bool) -> Row:
        sysfs = self.ctx.paths.sysfs
        devices = read_topology(sysfs)
        gauges = []
        for dev in devices:
            # One series per name (an adapter's netdev and RDMA device, a drive's
            # namespaces): no lists in labels.
            for name in dev.name.split(",") if dev.name else [""]:
                gauges.append(("agentd_pcie_device_info", (dev.address, dev.kind, name,
                                                           dev.root_port, dev.switch,
                                                           dev.numa_node), 1.0))
            if dev.capacity:
                gauges.append(("agentd_pcie_link_capacity_bytes_per_second", (dev.address,),
                               dev.capacity))
            if dev.max_capacity:
                gauges.append(("agentd_pcie_link_max_capacity_bytes_per_second", (dev.address,),
                               dev.max_capacity))
        shared_switches = set()
        for gpu in (d for d in devices if d.kind == "gpu" and d.switch):
            for nvme in (d for d in devices if d.kind == "nvme" and d.switch == gpu.switch):
                gauges.append(("agentd_pcie_shared_uplink",
                               (gpu.address, nvme.address, gpu.switch), 1.0))
                shared_switches.add(gpu.switch)
        for switch in sorted(shared_switches):
            cap = upsysfs_capacity(sysfs, switch)
            if cap:
                gauges.append(("agentd_pcie_uplink_capacity_bytes_per_second", (switch,), cap))
        self.out.replace_gauges("topology", gauges)
        self.devices = devices
        return {}

    def meta(self) -> dict:
        """Switches that carry both GPUs and NVMe drives, with their uplink capacity."""
        sysfs = self.ctx.paths.sysfs
        switches: dict[str, dict] = {}
        for d in self.devices:
            if d.kind in ("gpu", "nvme") and d.switch:
                s = switches.setdefault(d.switch, {"switch": d.switch, "gpu_addresses": [],
                                                   "disks": []})
                if d.kind == "gpu":
                    s["gpu_addresses"].append(d.address)
                else:
                    s["disks"] += [n for n in d.name.split(",") if n]
        shared = [s for s in switches.values() if s["gpu_addresses"] and s["disks"]]
        for s in shared:
            s["uplink_bytes_per_second"] = upsysfs_capacity(sysfs, s["switch"])
        links = {d.address: d.capacity for d in self.devices if d.capacity}
        return {"pcie_switches": shared, "pcie_links": links}
