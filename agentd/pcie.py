"""PCIe link capacity: transfer rate per lane after line encoding, times the lanes.

One place for the arithmetic that NVML's generation/width (the gpu sampler) and sysfs's
"16.0 GT/s PCIe" strings (the topology sampler) both need.
"""

from __future__ import annotations

import re

GENERATION_GTS = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0, 7: 128.0}


def lane_bytes(gts: float) -> float:
    """Usable bytes/s per lane per direction at `gts` gigatransfers per second."""
    if gts <= 5.0:
        efficiency = 8 / 10  # 8b/10b (gen 1-2)
    elif gts <= 32.0:
        efficiency = 128 / 130  # 128b/130b (gen 3-5)
    else:
        efficiency = 242 / 256  # FLIT mode (gen 6+)
    return gts * 1e9 * efficiency / 8


def capacity(generation: int | None, width: int | None) -> float | None:
    """Bytes/s per direction of a link of this generation and width (None if unknown)."""
    if not generation or not width or generation not in GENERATION_GTS:
        return None
    return lane_bytes(GENERATION_GTS[generation]) * width


def sysfs_capacity(speed: str | None, width: str | None) -> float | None:
    """Bytes/s per direction from sysfs 'current_link_speed' ('16.0 GT/s PCIe') and
    'current_link_width' ('16')."""
    if not speed or not width:
        return None
    m = re.match(r"\s*([\d.]+)\s*GT/s", speed)
    if not m or not width.strip().isdigit() or int(width) <= 0:
        return None
    return lane_bytes(float(m.group(1))) * int(width)
