"""GPUs wait on collective communication: at fine resolution SM activity shows two states
(computing, and a few SMs in a collective), most GPUs spend a significant share of their
time in the second, collective traffic flows (NVLink, network, RDMA), and no GPU stands out
as the one the others wait for. Without SM activity this cannot be seen: NVML counts a
spinning NCCL kernel as busy."""

from __future__ import annotations

import numpy as np

from agentd.analysis.detectors.common import confidence, margin
from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding, gain_from_stall, severity_for

# Some collective time is normal scaling (an all-reduce not fully hidden under backward):
# named from this share of the time on, significantly.
MIN_SPIN = 0.15
TRAFFIC_NVLINK = 1e8  # bytes/s per GPU
TRAFFIC_NETWORK = 1e7


FLOWING = 0.5  # share of the collective time with bytes moving, for the fabric to be slow


STEP_SAMPLES = 3  # samples a step must span for the per-sample test to see inside it


def _flowing(ev: Evidence, g: str) -> float | None:
    """Share of a GPU's time in collectives during which NVLink bytes flow (at a tenth of
    their usual peak or more). A slow fabric moves bytes throughout; a wait for a late peer
    spins idle, then moves them in a burst. None where NVLink is not sampled finely; nan
    where the steps are not seen to span several samples: then each sample holds computing,
    waiting and the burst alike, and reads "flowing" whatever holds the collective up
    (ranks waiting for each other's CPU-bound loaders, 30-80 ms steps, read as a slow
    fabric at critical)."""
    rx = ev.sig.get("gpu.nvlink_rx", g)
    sm = ev.sig.get("gpu.sm_active", g)
    s = ev.gpus[g]
    if rx is None or sm is None or s.compute is None:
        return None
    if s.period is None or s.period.seconds < STEP_SAMPLES * ev.sig.resolution:
        return float("nan")
    rx = np.asarray(rx, dtype=float)
    busy = np.nan_to_num(s.busy)
    ok = np.isfinite(rx) & np.isfinite(sm) & (busy >= 0.5) & s.present
    if ok.sum() < 20:
        return None
    per = np.asarray(sm, dtype=float)[ok] / busy[ok]
    lo, hi = np.quantile(per, [0.05, 0.95])
    collective = per < (lo + hi) / 2
    if collective.sum() < 10:
        return None
    peak = float(np.quantile(rx[ok], 0.95))
    if peak <= 0:
        return None
    return float((rx[ok][collective] >= 0.1 * peak).mean())


def detect(ev: Evidence, exclude: set[str]) -> list[Finding]:
    if ev.coarse:
        return []
    out = []
    for group in ev.peer_groups():
        out += _job(ev, [g for g in group if g not in exclude])
    return out


def _job(ev: Evidence, gpus: list[str]) -> list[Finding]:
    if len(gpus) < 2:
        return []
    # Most of the job's GPUs must be seen waiting: a GPU whose two states could not be told
    # apart counts as not waiting (two of eight are no job-wide collective wait).
    waiting = [g for g in gpus if ev.gpus[g].spin is not None and
               ev.gpus[g].spin.mean >= MIN_SPIN and ev.gpus[g].spin.lo >= MIN_SPIN * 2 / 3]
    if len(waiting) < max(1, int(0.75 * len(gpus))):
        return []
    nvlink = float(np.mean([ev.nvlink_rx.get(g, 0.0) for g in waiting]))
    traffic = (nvlink == nvlink and nvlink >= TRAFFIC_NVLINK) or \
        ev.network_rx >= TRAFFIC_NETWORK
    if not traffic:
        return []
    # Within a node (NVLink, sampled at the fast rate): are bytes moving while the GPUs sit
    # in the collective? (Across nodes the network is sampled once a second: not judged.)
    flowing = [f for g in waiting if (f := _flowing(ev, g)) is not None] \
        if ev.network_rx < TRAFFIC_NETWORK else []
    if flowing and sum(f != f for f in flowing) * 2 > len(flowing):
        return []  # steps too short to tell a slow fabric from a wait for late peers
    flowing = [f for f in flowing if f == f]
    if flowing and float(np.median(flowing)) < FLOWING:
        # The GPUs wait in the collective for a late peer, the bytes then move in a burst:
        # the collective is not what is slow (a cause upstream of it went unseen).
        return []
    spin = float(np.mean([ev.gpus[g].spin.mean for g in waiting]))
    busy = float(np.mean([ev.gpus[g].busy_mean for g in waiting]))
    comp = float(np.mean([ev.gpus[g].compute.mean for g in waiting]))
    conf = confidence(0.8 * margin(spin, MIN_SPIN, 0.2), ev, needs_fine=True)
    return [Finding(
        kind="comm_wait", subject=ev.subject(waiting), t0=ev.t0, t1=ev.t1, confidence=conf,
        severity=severity_for(spin, conf),
        summary=f"{spin * 100:.0f}% of the time the GPUs are in collectives, not computing "
                f"(NVML reads {busy * 100:.0f}% busy; SM activity shows {comp * 100:.0f}% "
                "computing)",
        mechanism="SM activity at the collective level with collective traffic flowing",
        evidence={"collective_fraction": spin, "gpu_busy": busy, "compute_fraction": comp,
                  "nvlink_rx_bytes_per_second": nvlink,
                  "network_rx_bytes_per_second": ev.network_rx},
        gain={**gain_from_stall(busy, spin), "busy_now": comp,
              "busy_after": min(comp / max(1 - spin, 0.05), 1.0)},
        advice=["Overlap communication with the backward pass (DDP bucket_cap_mb, FSDP "
                "prefetch) and communicate less often (gradient accumulation).",
                "Check the collectives use NVLink/NVSwitch and the fastest network path "
                "(NCCL_DEBUG=INFO, topology), and that no peer node is slower."],
        stall_fraction=spin)]
