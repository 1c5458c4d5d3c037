"""The limits a detector compares achieved rates with: measured ceilings first (`agentd probe`,
carried in meta["ceilings"]), then documented per-device-class defaults, else "unknown"
(and the detector lowers its confidence and says so). Busy time is never a limit: an NVMe
drive reads ~100% busy at half its throughput.

Per-device-class defaults (docs/analysis.md lists them):
- NVMe: 85% of its PCIe link (the link from sysfs, meta["disks"][dev]["link_bytes_per_second"])
  for sequential reads; unknown without the link (drives span 1.5-14 GB/s).
- SATA/SAS SSD (not rotational, sd*): 530 MB/s; 90,000 IOPS.
- Rotational disks: 200 MB/s sequential; 150 IOPS.
- Virtual disks (vd*, xvd*), device-mapper, md, network filesystems: unknown.
GPU capacities (PCIe link, maximum SM clock, power limit) come from the source, then from
the GPU model table (agentd/gpu/models.py), then from peers of the same model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SMALL_REQUEST = 128 * 1024  # below this mean request size, reads are IOPS-bound
NVME_LINK_SHARE = 0.85
DEFAULTS = {  # device class -> (sequential bytes/s, random IOPS)
    "ssd": (530e6, 90_000.0),
    "hdd": (200e6, 150.0),
}
# Host-to-device copies: pinned memory reaches ~80% of the link's usable rate, pageable
# memory about half of that (a staging copy through a pinned bounce buffer).
PINNED_SHARE = 0.80
PAGEABLE_SHARE = 0.40


@dataclass(frozen=True)
class Limit:
    value: float | None
    source: str  # "measured", "nominal", "default", "unknown"
    basis: str  # how it was obtained, for the evidence

    @property
    def known(self) -> bool:
        return self.value is not None and self.value > 0

    def to_json(self) -> dict:
        return {"value": self.value, "source": self.source, "basis": self.basis}


UNKNOWN = Limit(None, "unknown", "no measured ceiling and no default for this device class")


def device_class(name: str, info: dict | None) -> str:
    info = info or {}
    if name.startswith("nvme"):
        return "nvme"
    rot = str(info.get("rotational", "")).strip()
    if re.match(r"^(sd|hd)[a-z]+$", name):
        if rot == "1":
            return "hdd"
        if rot == "0":
            return "ssd"
    return "unknown"


def storage_limit(device: str, ceilings: dict | None, disks: dict | None,
                  request_bytes: float | None) -> Limit:
    """Read bytes/s the device can deliver for requests of this mean size."""
    small = request_bytes is not None and request_bytes == request_bytes and \
        0 < request_bytes < SMALL_REQUEST
    measured = ((ceilings or {}).get("storage") or {}).get(device)
    if isinstance(measured, dict):
        seq = _num(measured.get("seq_read_bytes_per_second"))
        rand_bw = _num(measured.get("rand_read_bytes_per_second"))
        iops = _num(measured.get("rand_read_iops"))
        src = str(measured.get("source") or "measured")
        if small and iops and request_bytes:
            value = min(iops * request_bytes, seq or float("inf"))
            return Limit(value, src, f"{iops:,.0f} IOPS x {request_bytes / 1024:.0f} KiB "
                                     "requests (agentd probe)")
        if seq:
            return Limit(seq, src, "sequential O_DIRECT reads (agentd probe)")
        if rand_bw:
            return Limit(rand_bw, src, "random O_DIRECT reads (agentd probe)")
    info = (disks or {}).get(device) or {}
    klass = device_class(device, info)
    if klass == "nvme":
        link = _num(info.get("link_bytes_per_second"))
        if link:
            return Limit(NVME_LINK_SHARE * link, "nominal",
                         f"{NVME_LINK_SHARE:.0%} of its PCIe link ({link / 1e9:.1f} GB/s)")
        return Limit(None, "unknown", "NVMe drive without a measured ceiling or a known link "
                                      "(run agentd probe)")
    if klass in DEFAULTS:
        seq, iops = DEFAULTS[klass]
        if small and request_bytes:
            return Limit(min(iops * request_bytes, seq), "default",
                         f"{klass.upper()} default, {iops:,.0f} IOPS")
        return Limit(seq, "default", f"{klass.upper()} default")
    return UNKNOWN


def h2d_limits(gpu: str, ceilings: dict | None, link: float | None) -> tuple[Limit, Limit]:
    """(pinned, pageable) host-to-device copy rates of one GPU."""
    measured = ((ceilings or {}).get("h2d") or {}).get(str(gpu))
    pinned = pageable = None
    if isinstance(measured, dict) and measured.get("source", "measured") == "measured":
        p, q = _num(measured.get("pinned_bytes_per_second")), \
            _num(measured.get("pageable_bytes_per_second"))
        pinned = Limit(p, "measured", "pinned copies (agentd probe)") if p else None
        pageable = Limit(q, "measured", "pageable copies (agentd probe)") if q else None
    if link:
        pinned = pinned or Limit(PINNED_SHARE * link, "nominal",
                                 f"{PINNED_SHARE:.0%} of the {link / 1e9:.1f} GB/s link")
        pageable = pageable or Limit(PAGEABLE_SHARE * link, "nominal",
                                     f"{PAGEABLE_SHARE:.0%} of the link (pageable)")
    return pinned or UNKNOWN, pageable or UNKNOWN


def cpu_limit(ceilings: dict | None, node_cores: float | None) -> Limit:
    measured = (ceilings or {}).get("cpu") or {}
    cores = _num(measured.get("cores")) if isinstance(measured, dict) else None
    if cores:
        return Limit(cores, str(measured.get("source") or "measured"),
                     f"{cores:g} cores available to the trainer (agentd probe)")
    if node_cores:
        return Limit(node_cores, "nominal", f"the node's {node_cores:g} online CPUs")
    return UNKNOWN


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and f > 0 and f != float("inf") else None
