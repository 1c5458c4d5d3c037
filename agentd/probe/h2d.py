"""Host-to-device copy ceilings per GPU: pinned and pageable bandwidth where a CUDA runtime is
at hand (torch: the `h2d` extra, or the one the node's training already has), otherwise the
PCIe link's nominal rate from NVML.

Copies of growing size (1 MiB to 256 MiB) are timed with CUDA events until the rate stops
growing; the plateau is the ceiling. A GPU's settings are never changed: this only allocates
memory and copies into it, and frees it afterwards. GPUs are matched to NVML's indexes (the
ones agentd's metrics use) by UUID, since CUDA numbers devices in its own order.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Callable

MIB = 1 << 20
SIZES = (1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB)


class H2dError(Exception):
    """A GPU could not be measured (one line)."""


@dataclass(frozen=True)
class Gpu:
    index: int  # NVML's
    uuid: str
    link_bytes_per_second: float | None


def nvml_gpus() -> list[Gpu]:
    """The GPUs NVML lists, with their link capacity at the maximum generation and width;
    [] without a driver."""
    from agentd.gpu.nvml import NvmlBackend
    from agentd.pcie import capacity
    from agentd.samplers.base import Unavailable

    try:
        backend = NvmlBackend()
        ids = backend.open()
    except Unavailable:
        return []
    try:
        return [Gpu(g.index, g.uuid, capacity(g.pcie_max_generation, g.pcie_max_width))
                for g in ids]
    finally:
        backend.close()


def plateau(points: list[tuple[int, float]], tolerance: float = 0.05) -> float | None:
    """The rate copies settle at: from the first size whose rate is within `tolerance` of the
    best, the median of the rates from there on (larger copies amortise the fixed cost of a
    copy; past that, more size changes nothing)."""
    points = sorted((s, r) for s, r in points if r and r > 0)
    if not points:
        return None
    best = max(r for _, r in points)
    first = next(i for i, (_, r) in enumerate(points) if r >= best * (1 - tolerance))
    tail = sorted(r for _, r in points[first:])
    mid = len(tail) // 2
    return tail[mid] if len(tail) % 2 else (tail[mid - 1] + tail[mid]) / 2


def _uuid_str(u) -> str:
    if u is None:
        return ""
    s = str(u)
    return s if s.startswith("GPU-") else f"GPU-{s}"


class _Torch:
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch

    def available(self) -> bool:
        return bool(self.torch.cuda.is_available())

    def devices(self) -> list[str]:
        return [_uuid_str(getattr(self.torch.cuda.get_device_properties(i), "uuid", None))
                for i in range(self.torch.cuda.device_count())]

    def rate(self, device: int, size: int, pinned: bool, seconds: float) -> float:
        torch = self.torch
        dev = torch.device("cuda", device)
        src = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        src.fill_(1)
        dst = torch.empty(size, dtype=torch.uint8, device=dev)
        try:
            with torch.cuda.device(dev):
                dst.copy_(src, non_blocking=pinned)  # warm-up
                torch.cuda.synchronize(dev)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                copies, elapsed = 0, 0.0
                t_end = time.monotonic() + seconds
                while copies < 3 or time.monotonic() < t_end:
                    start.record()
                    dst.copy_(src, non_blocking=pinned)
                    end.record()
                    end.synchronize()
                    elapsed += start.elapsed_time(end) / 1e3
                    copies += 1
            return size * copies / elapsed if elapsed > 0 else 0.0
        finally:
            del src, dst
            torch.cuda.empty_cache()


def runtime():
    """torch with a CUDA device (the `h2d` extra, or the trainer's own), or None."""
    # NVML numbers GPUs in PCI order; make CUDA do the same (UUIDs still decide).
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        rt = _Torch()
        return rt if rt.available() else None
    except Exception:  # a broken install is no runtime
        return None


def measure(gpus: list[Gpu], rt, budget: float,
            on_step: Callable[[str], None] | None = None) -> tuple[dict, list[str]]:
    """({nvml index: entry}, failures). With a runtime, each GPU it can see is measured,
    pinned and pageable; the others (and all of them without one) get the nominal link
    rate."""
    out: dict[str, dict] = {}
    failures: list[str] = []
    by_uuid: dict[str, int] = {}  # NVML's UUID -> CUDA's device number
    if rt is not None:
        try:
            cuda = [u.lower() for u in rt.devices()]
        except Exception as e:
            cuda = []
            failures.append(f"h2d: {rt.name} cannot list devices: {e}")
        by_uuid = {g.uuid: cuda.index(g.uuid.lower()) for g in gpus
                   if g.uuid.lower() in cuda}
        if not by_uuid and cuda:
            if len(cuda) == len(gpus) and not os.environ.get("CUDA_VISIBLE_DEVICES"):
                # No UUID matched (a runtime that formats them otherwise): both sides
                # number the same GPUs in PCI order (CUDA_DEVICE_ORDER above).
                by_uuid = {g.uuid: k for k, g in enumerate(sorted(gpus, key=lambda g: g.index))}
            else:
                failures.append(f"h2d: cannot tell which of {rt.name}'s {len(cuda)} devices "
                                f"is which of NVML's {len(gpus)}: not measured")
    seen = [g for g in gpus if g.uuid in by_uuid]
    per_copy = max(0.05, min(0.3, budget / max(len(seen), 1) / (2 * len(SIZES)) / 1.5))
    for g in gpus:
        entry = {"source": "nominal", "uuid": g.uuid, "pinned_bytes_per_second": None,
                 "pageable_bytes_per_second": None,
                 "link_bytes_per_second": g.link_bytes_per_second}
        if g in seen:
            try:
                rates = {}
                for pinned in (True, False):
                    points = []
                    for size in SIZES:
                        if on_step is not None:
                            on_step(f"GPU {g.index} {'pinned' if pinned else 'pageable'} "
                                    f"{size // MIB} MiB")
                        points.append((size, rt.rate(by_uuid[g.uuid], size, pinned, per_copy)))
                    rates[pinned] = plateau(points)
                entry.update(source="measured", pinned_bytes_per_second=rates[True],
                             pageable_bytes_per_second=rates[False], runtime=rt.name)
            except Exception as e:  # out of memory, a busy GPU: the others still count
                failures.append(f"h2d: GPU {g.index}: {type(e).__name__}: {e}")
        if entry["source"] == "nominal" and entry["link_bytes_per_second"] is None:
            continue  # nothing known about this GPU
        out[str(g.index)] = entry
    return out, failures
