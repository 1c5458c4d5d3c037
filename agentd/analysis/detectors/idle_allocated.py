"""GPUs allocated but idle: a job holds device memory (or a process is attributed to the
GPU) and no kernel runs, for long enough to matter, up to now. A GPU that holds no memory runs no job:
its idle time is spare capacity, reported in the report's summary, never a finding."""

from __future__ import annotations

import numpy as np

from agentd.analysis.evidence import IDLE_MEMORY, Evidence, held_forward
from agentd.analysis.findings import Finding

IDLE_BUSY = 0.02  # utilization under which a held GPU counts as idle
IDLE_MIN_SECONDS = 30.0
WARN_SECONDS, CRITICAL_SECONDS = 120.0, 600.0
# Share of the board's power limit over which a GPU is doing work: idle with memory held,
# an H100 SXM draws 70-130 W of 700 W and a PCIe card ~50 W of 350 W (10-19%).
ACTIVE_POWER = 0.3


def _current_run(mask: np.ndarray, known: np.ndarray) -> tuple[int, int]:
    """(start, length) of the run of True that lasts to the last known sample: the GPU is
    idle now. (An idle stretch followed by kernels was a pause or a start-up: the allocation
    is in use again.)"""
    last = np.flatnonzero(known)
    if not len(last) or not mask[last[-1]]:
        return 0, 0
    end = last[-1] + 1
    before = np.flatnonzero(~mask[:end] & known[:end])
    start = int(before[-1]) + 1 if len(before) else int(last[0])
    return start, end - start


def _kernels(sig, g: str, power_limit: float | None) -> np.ndarray:
    """Samples where a series other than the held utilization shows kernels: the busy time
    the driver credited (exact; dcgm-exporter's GR_ENGINE_ACTIVE), SM activity, or power
    over ACTIVE_POWER of the board's limit. The held utilization is one reading of the
    driver's last 1/6 s: a GPU computing half of every step can read 0 at several scrapes in
    a row when its step aliases with the scrape."""
    out = np.zeros(len(sig.t), dtype=bool)
    for name in ("gpu.busy_time", "gpu.sm_active"):
        x = sig.get(name, g)
        if x is not None:
            out |= np.nan_to_num(np.asarray(x, dtype=float)) >= IDLE_BUSY
    power = sig.get("gpu.power", g)
    if power is not None and power_limit:
        out |= np.nan_to_num(np.asarray(power, dtype=float)) >= ACTIVE_POWER * power_limit
    return out


def detect(ev: Evidence) -> list[Finding]:
    sig = ev.sig
    procs = sig.meta.get("processes", {}) or {}
    hits = []
    for g, s in ev.gpus.items():
        if s.lost:
            continue
        attributed = any(g in map(str, i.get("gpus", [])) for i in procs.values())
        if s.held_known:
            mem = sig.get("gpu.mem_used", g)
            held = np.nan_to_num(held_forward(mem, max(int(12 / sig.resolution), 1)), nan=0.0) \
                >= IDLE_MEMORY
        elif attributed:
            held = np.isfinite(s.busy)
        else:
            continue  # no evidence a job holds it: spare, not allocated
        idle = held & np.isfinite(s.busy) & (s.busy < IDLE_BUSY) & ~_kernels(sig, g, s.power_limit)
        start, length = _current_run(idle, np.isfinite(s.busy))
        seconds = length * sig.resolution
        if seconds >= IDLE_MIN_SECONDS and length >= 3:
            run = s.busy[start:start + length]
            hits.append((g, seconds, float(np.nanmax(run)), s.memory))
    if not hits:
        return []
    gpus = [h[0] for h in hits]
    seconds = min(h[1] for h in hits)
    mem = sum(h[3] for h in hits if h[3] == h[3])
    peak = max(h[2] for h in hits)
    severity = "critical" if seconds >= CRITICAL_SECONDS else (
        "warning" if seconds >= WARN_SECONDS else "info")
    share = seconds / max(ev.sig.duration, seconds)
    return [Finding(
        kind="idle_allocated", subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1, confidence=0.95,
        severity=severity,
        summary=(f"{len(gpus)} GPU(s) hold {mem / 2**30:.0f} GiB of memory but ran no kernel "
                 f"(peak {peak * 100:.0f}%) for {seconds:.0f} s" if mem else
                 f"{len(gpus)} GPU(s) are attributed to a process but ran no kernel for "
                 f"{seconds:.0f} s"),
        mechanism="device memory held with no kernel running",
        evidence={"gpus_idle": len(gpus), "memory_held_bytes": mem, "max_busy": peak,
                  "idle_seconds": seconds},
        gain={"busy_now": peak, "busy_after": None, "gpus_reclaimable": len(gpus),
              "speedup": None},
        advice=["End the idle job or notebook, or release its GPUs: they are allocated and "
                "unavailable to anyone else.",
                "Scheduler side: reclaim GPUs idle longer than a threshold (Slurm --time "
                "limits, Kubernetes idle culling for notebooks)."],
        stall_fraction=share)]
