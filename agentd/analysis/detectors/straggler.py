"""One GPU holds its peers back. Two shapes:
- it computes longest (SM/tensor activity, robustly above its peers') while the peers,
  done with their share, wait in the collective;
- it idles with its memory held while its peers read busy but draw little power or use few
  SMs: they spin in a collective waiting for it (a synchronous checkpoint or logging on
  rank 0, host-side work on one rank). Most of the job's GPU time is then lost."""

from __future__ import annotations

import numpy as np

from agentd.analysis.evidence import IDLE_MEMORY, Evidence
from agentd.analysis.findings import Finding, gain_from_stall, severity_for
from agentd.analysis.stats import robust

MARGIN = 0.08  # works this much (relative) harder per busy second than its peers ...
Z = 4.0  # ... and this many robust standard deviations above them
SPREAD = 0.04  # the natural spread of peers' SM activity, relative (MAD floor)
MIN_SPIN = 0.05  # the peers wait at least this share of their time
BLOCKED_IDLE = 0.1  # the blocked rank's busy share
PEERS_BUSY = 0.8
SPIN_POWER = 0.45  # peers draw at most this share of the power limit: not computing
SPIN_SM = 0.3


def _blocked_rank(ev: Evidence, gpus: list[str]) -> Finding | None:
    idle = [g for g in gpus if ev.gpus[g].busy_mean == ev.gpus[g].busy_mean
            and ev.gpus[g].busy_mean < BLOCKED_IDLE and ev.gpus[g].held_known
            and ev.gpus[g].memory == ev.gpus[g].memory and ev.gpus[g].memory >= IDLE_MEMORY]
    busy = [g for g in gpus if ev.gpus[g].busy_mean == ev.gpus[g].busy_mean
            and ev.gpus[g].busy_mean >= PEERS_BUSY]
    if len(idle) != 1 or len(busy) < 2 or len(idle) + len(busy) < len(gpus) - 1:
        return None
    g0 = idle[0]
    spinning, how = [], ""
    for g in busy:
        s = ev.gpus[g]
        if s.sm_mean is not None and s.sm_mean < SPIN_SM * s.busy_mean:
            spinning.append(g)
            how = "few SMs active"
        elif s.power is not None and s.power_limit and s.power <= SPIN_POWER * s.power_limit:
            spinning.append(g)
            how = how or "low power"
    if len(spinning) < max(2, int(0.75 * len(busy))):
        return None
    s0 = ev.gpus[g0]
    powers = [ev.gpus[g].power for g in spinning if ev.gpus[g].power is not None]
    limits = [ev.gpus[g].power_limit for g in spinning if ev.gpus[g].power_limit]
    # No GPU of the job computes: the idle rank idles, its peers wait for it.
    lost = (s0.idle.mean + len(spinning) * float(np.mean([ev.gpus[g].busy_mean
                                                          for g in spinning]))) / len(gpus)
    return Finding(
        kind="straggler", subject=ev.subject([g0]), t0=ev.t0, t1=ev.t1, confidence=0.8,
        severity=severity_for(lost, 0.8),
        summary=(f"GPU {g0} idles with {s0.memory / 2**30:.0f} GiB held while its "
                 f"{len(spinning)} peers read {np.mean([ev.gpus[g].busy_mean for g in busy]) * 100:.0f}% "
                 f"busy but spin in a collective ({how}"
                 + (f": {np.mean(powers):.0f} W of {np.mean(limits):.0f} W" if powers and
                    limits else "") + f"): the job is held back by GPU {g0}"),
        mechanism="one rank idles with memory held while its peers spin",
        evidence={"blocked_gpu_busy": s0.busy_mean, "peers_spinning": len(spinning),
                  "peers_busy": float(np.mean([ev.gpus[g].busy_mean for g in busy])),
                  "peers_power_watts": float(np.mean(powers)) if powers else None,
                  "power_limit_watts": float(np.mean(limits)) if limits else None,
                  "job_gpu_time_lost": lost},
        gain={"busy_now": s0.busy_mean, "busy_after": None, "speedup": None,
              "job_gpu_time_lost": lost},
        advice=[f"Find what GPU {g0}'s rank does while the others wait: a synchronous "
                "checkpoint or evaluation, logging or metric reduction on rank 0, host-side "
                "work on one rank (py-spy dump on that process).",
                "Make checkpoints asynchronous (torch.distributed.checkpoint async_save), "
                "move logging off the critical path, and give every rank the same work."],
        stall_fraction=lost)


def detect(ev: Evidence) -> list[Finding]:
    gpus = ev.job_gpus()
    if len(gpus) < 2:
        return []
    blocked = _blocked_rank(ev, gpus)
    if blocked is not None:
        return [blocked]
    # How hard each GPU works while NVML calls it busy: SM activity per busy second. Ranks
    # of one data-parallel job run the same kernels, so they match unless some wait in a
    # collective (a few SMs) for one that computes longer.
    comp = {g: ev.gpus[g].sm_mean / ev.gpus[g].busy_mean for g in gpus
            if ev.gpus[g].sm_mean is not None and ev.gpus[g].busy_mean == ev.gpus[g].busy_mean
            and ev.gpus[g].busy_mean >= 0.3}
    basis = "SM activity per busy second"
    if len(comp) < 2:
        return []
    slowest = max(comp, key=comp.get)
    others = [g for g in comp if g != slowest]
    peers = robust([comp[g] for g in others],
                   SPREAD * max(float(np.median([comp[g] for g in others])), 0.05))
    gap = (comp[slowest] - peers.median) / max(comp[slowest], 1e-3)
    if gap < MARGIN or peers.z(comp[slowest]) < Z:
        return []
    s = ev.gpus[slowest]
    # The peers compute the same work in less time and wait the rest of the step.
    wait = float(np.median([ev.gpus[g].busy_mean * (1 - comp[g] / comp[slowest])
                            for g in others]))
    if wait < MIN_SPIN:
        return []
    ratio = comp[slowest] / max(peers.median, 1e-3)
    clock = (s.clock / s.clock_max) if s.clock and s.clock_max else None
    return [Finding(
        kind="straggler", subject=ev.subject([slowest]), t0=ev.t0, t1=ev.t1,
        confidence=0.8, severity=severity_for(wait, 0.8),
        summary=f"GPU {slowest} computes {ratio:.2f}x as long as its peers; the other "
                f"{len(others)} wait {wait * 100:.0f}% of the time in collectives",
        mechanism=f"one GPU's {basis} robustly above its peers' while they wait",
        evidence={"straggler_compute": comp[slowest], "peers_compute": peers.median,
                  "robust_z": peers.z(comp[slowest]), "peers_wait_fraction": wait,
                  "straggler_clock_ratio": clock, "peers_waiting": len(others),
                  "basis": basis},
        gain=gain_from_stall(float(np.mean([ev.gpus[g].busy_mean for g in gpus])), wait),
        advice=[f"Find out why GPU {slowest} is slower: its clocks and throttle reasons, PCIe "
                "link width, ECC errors and remapped rows, a noisy neighbour on its CPU "
                "socket.",
                "Until then, run the job on GPUs without it: every step waits for the slowest "
                "rank."],
        stall_fraction=wait)]
