"""One GPU holds its peers back. Two shapes:
- it computes longest (SM/tensor activity, robustly above its peers') while the peers,
  done with their share, wait in the collective;
- it idles with its memory held while its peers read busy but draw little power or use few
  SMs: they spin in a collective waiting for it (a synchronous checkpoint or logging on
  rank 0, host-side work on one rank). Most of the job's GPU time is then lost."""

from __future__ import annotations

import numpy as np

from agentd.analysis.evidence import IDLE_MEMORY, Evidence, held_forward
from agentd.analysis.signals import nanmean
from agentd.analysis.findings import Finding, gain_from_stall, severity_for
from agentd.analysis.stats import robust

MARGIN = 0.08  # works this much (relative) harder per busy second than its peers ...
Z = 4.0  # ... and this many robust standard deviations above them
SPREAD = 0.04  # the natural spread of peers' SM activity, relative (MAD floor)
MIN_SPIN = 0.05  # the peers wait at least this share of their time
IDLE_MARGIN = 0.02  # the straggler idles no more than its peers (it is never waiting)
POWER_MARGIN = 0.15  # without SM activity: draws this much (relative) more per busy second
POWER_SPREAD = 0.05  # ... the natural spread of peers' power at the same work (MAD floor)
# ... or 10% more, beyond a 3% spread, where its power is also steady while every peer's
# swings: it computes throughout, they alternate between computing and spinning each step
# (a hotter, leakier GPU at the same work draws more, but swings as its peers do).
STEADY_MARGIN = 0.10
STEADY_SPREAD = 0.03
STEADY = 0.6  # its power's standard deviation at most this share of the peers' (median)
SPIN_SHARE = 0.3  # a GPU spinning in a collective draws about this share of its computing
#                   power (an H100: ~155 W spinning, ~550 W computing)
BLOCKED_IDLE = 0.1  # the blocked rank's utilization while it holds the others back
BLOCKED_SHARE = 0.05  # ... for this share of the job's time
BLOCKED_SECONDS = 20.0  # ... and at least this long
# Many short waits (a checkpoint or an evaluation is one long one) point at the rank's input.
SHORT_WAITS = 10
SHORT_WAIT_SECONDS = 15.0
# One rank holds the job back only if its peers wait whenever it idles, and no other rank
# does the same: ranks starving on an input they share (one drive, the page cache) each idle
# in turn while the rest wait. On the robustness suite's kept data a single blocking rank
# (a synchronous checkpoint, one rank's slow loader) had its peers waiting through 61-100%
# of its idle time and the other ranks blocked for 0% of its blocked time; ranks sharing a
# slow drive or a squeezed page cache: 24-45%, or the others blocked 36-117% as long.
HELD = 0.5  # the peers spin through at least this share of the rank's idle time ...
SHARED = 0.25  # ... and the other ranks, together, are blocked under this share as long
PEERS_BUSY = 0.8
SPIN_POWER = 0.6  # spinning peers draw at most this share of what they draw computing
COMPUTE_POWER = 0.6  # computing draws at least this share of the power limit
SPIN_SM = 0.3


def _held_power(ev: Evidence, g: str) -> np.ndarray | None:
    return held_forward(ev.sig.get("gpu.power", g), max(int(round(3.0 / ev.sig.resolution)), 1))


def _computing_power(ev: Evidence, power: dict[str, np.ndarray | None]) -> float | None:
    """What the job's GPUs draw while they compute: the 90th percentile of their power while
    busy, at least COMPUTE_POWER of their limit (a job that spins all window long never shows
    its computing power)."""
    drawn, limits = [], []
    for g, p in power.items():
        if p is None:
            continue
        s = ev.gpus[g]
        busy = np.nan_to_num(s.busy) >= PEERS_BUSY
        drawn += list(np.asarray(p, dtype=float)[busy & np.isfinite(p)])
        if s.power_limit:
            limits.append(s.power_limit)
    level = float(np.percentile(drawn, 90)) if drawn else float("nan")
    floor = COMPUTE_POWER * float(np.median(limits)) if limits else float("nan")
    ref = np.nanmax([level, floor]) if drawn or limits else float("nan")
    return float(ref) if ref == ref and ref > 0 else None


def _spinning(ev: Evidence, g: str, power: np.ndarray | None,
              computing_power: float | None) -> np.ndarray:
    """Per sample: busy for NVML, yet few SMs active (where SM activity is measured), or,
    without it, far less power drawn than the job's GPUs draw computing."""
    sig, s = ev.sig, ev.gpus[g]
    hold = max(int(round(3.0 / sig.resolution)), 1)
    busy = np.nan_to_num(s.busy) >= PEERS_BUSY
    sm = held_forward(sig.get("gpu.sm_active", g), hold)
    if sm is not None and np.isfinite(sm).any():
        # SM activity says what the GPU does; power only follows the kernels' intensity (a
        # light model computes at 40% of the limit).
        return busy & (np.nan_to_num(sm, nan=1.0) < SPIN_SM * np.maximum(
            np.nan_to_num(s.busy), 1e-3))
    if power is None or computing_power is None:
        return np.zeros(len(busy), dtype=bool)
    return busy & (np.nan_to_num(power, nan=np.inf) <= SPIN_POWER * computing_power)


def _blocked_rank(ev: Evidence, gpus: list[str]) -> Finding | None:
    """Episodes where one rank idles with its memory held while its peers spin."""
    sig = ev.sig
    hold = max(int(round(12.0 / sig.resolution)), 1)
    power = {g: _held_power(ev, g) for g in gpus}
    computing = _computing_power(ev, power)
    spin = {g: _spinning(ev, g, power[g], computing) for g in gpus}
    job = np.zeros(len(sig.t), dtype=bool)
    for g in gpus:
        job |= ev.gpus[g].present
    found = []
    for g0 in gpus:
        s0 = ev.gpus[g0]
        mem = held_forward(sig.get("gpu.mem_used", g0), hold)
        if mem is None:
            continue
        idle = s0.present & (np.nan_to_num(s0.busy, nan=1.0) < BLOCKED_IDLE) & \
            (np.nan_to_num(mem) >= IDLE_MEMORY)
        peers = [g for g in gpus if g != g0]
        if outside_collective(ev, g0, peers):
            continue  # idle in a job of its own (a notebook), not holding theirs back
        waiting = np.sum([spin[g] for g in peers], axis=0)
        blocked = idle & (waiting >= max(2, int(np.ceil(0.75 * len(peers)))))
        share = float(blocked.sum() / max(job.sum(), 1))
        seconds = float(blocked.sum() * sig.resolution)
        held = float(blocked.sum() / max(idle.sum(), 1))
        found.append((g0, share, seconds, blocked, peers, held))
    found.sort(key=lambda c: -c[1])
    if not found or found[0][1] < BLOCKED_SHARE or found[0][2] < BLOCKED_SECONDS:
        return None
    g0, share, seconds, blocked, peers, held = found[0]
    if held < HELD:
        # Most of the time it idles its peers do not wait for it: they compute, or idle on
        # their own (a shared input), so it is not what holds them back.
        return None
    if sum(c[1] for c in found[1:]) >= SHARED * share:
        # Other ranks also idle while the rest wait: the ranks take turns on an input they
        # share (one drive, the page cache), and no single rank holds the job back.
        return None
    s0 = ev.gpus[g0]
    spinning = [g for g in peers if spin[g][blocked].mean() >= 0.5]
    power = [nanmean(held_forward(sig.get("gpu.power", g), 30)[blocked]) for g in spinning
             if sig.get("gpu.power", g) is not None]
    power = [p for p in power if p == p]
    limits = [ev.gpus[g].power_limit for g in spinning if ev.gpus[g].power_limit]
    # While it idles, no GPU of the job computes: the rank idles, its peers wait for it.
    lost = share * (1 + len(spinning)) / len(gpus)
    edges = np.diff(np.concatenate(([0], blocked.astype(np.int8), [0])))
    episodes = int((edges == 1).sum())
    how = (f"{np.mean(power):.0f} W of {np.mean(limits):.0f} W" if power and limits else
           "few SMs active")
    return Finding(
        kind="straggler", subject=ev.subject([g0]), t0=ev.t0, t1=ev.t1, confidence=0.8,
        severity=severity_for(lost, 0.8),
        summary=(f"GPU {g0} idled with {s0.memory / 2**30:.0f} GiB held for {seconds:.0f} s "
                 f"({episodes} episode(s), {share * 100:.0f}% of the job's time) while its "
                 f"{len(spinning)} peers read busy but spun in a collective ({how}): the job "
                 f"was held back by GPU {g0}"),
        mechanism="one rank idles with memory held while its peers spin",
        evidence={"blocked_seconds": seconds, "blocked_share": share, "episodes": episodes,
                  "peers_spinning": len(spinning),
                  "peers_power_watts": float(np.mean(power)) if power else None,
                  "power_limit_watts": float(np.mean(limits)) if limits else None,
                  "job_gpu_time_lost": lost},
        gain={"busy_now": s0.busy_mean, "busy_after": None, "speedup": 1 / max(1 - share, 0.05),
              "job_gpu_time_lost": lost},
        advice=[f"Find what GPU {g0}'s rank does while the others wait: a synchronous "
                "checkpoint or evaluation, logging or metric reduction on rank 0, host-side "
                "work on one rank (py-spy dump on that process).",
                "Make checkpoints asynchronous (torch.distributed.checkpoint async_save), "
                "move logging off the critical path, and give every rank the same work."]
        + ([f"{episodes} short waits ({seconds / episodes:.0f} s each) point at that rank's "
            "input: its data loader or its reads falling behind. Compare its loader's CPU "
            "and reads with its peers' (agentd's process metrics carry both)."]
           if episodes >= SHORT_WAITS and seconds / episodes <= SHORT_WAIT_SECONDS else []),
        stall_fraction=lost)


def detect(ev: Evidence) -> list[Finding]:
    out = []
    for gpus in ev.peer_groups():
        blocked = _blocked_rank(ev, gpus)
        if blocked is not None:
            out.append(blocked)
        else:
            out += _slowest(ev, gpus)
    return out


def _power_swing(ev: Evidence, g: str) -> float:
    """Standard deviation of the GPU's power readings over its job time (nan: none)."""
    p = ev.sig.get("gpu.power", g)
    if p is None:
        return float("nan")
    s = ev.gpus[g]
    x = np.asarray(p, dtype=float)[s.present & ~s.benign]
    x = x[np.isfinite(x)]
    return float(np.std(x)) if len(x) >= 30 else float("nan")


def _steady_above(ev: Evidence, slowest: str, others: list[str], gap: float,
                  z: float) -> bool:
    """Without SM activity, a smaller power gap still names the straggler when its power is
    steady while every peer's swings (each step they compute, then spin waiting for it)."""
    if gap < STEADY_MARGIN or z < Z:
        return False
    mine = _power_swing(ev, slowest)
    theirs = [_power_swing(ev, g) for g in others]
    if mine != mine or any(x != x for x in theirs):
        return False
    return mine <= STEADY * float(np.median(theirs)) and mine < min(theirs)


OWN_TRAFFIC = 0.1  # a rank moves at least this share of its peers' collective traffic


def outside_collective(ev: Evidence, g: str, others: list[str]) -> bool:
    """The GPU takes no part in its peers' collective: where NVLink traffic is measured, its
    peers move bytes and it moves next to none (a single-GPU job beside a data-parallel
    one, on a node whose jobs no label separates). A straggler holds back a collective it
    is in."""
    mine = ev.nvlink_rx.get(g)
    theirs = [ev.nvlink_rx[o] for o in others if o in ev.nvlink_rx]
    if mine is None or mine != mine or len(theirs) < len(others) / 2:
        return False
    peers = float(np.median(theirs))
    return peers > 1e8 and mine < OWN_TRAFFIC * peers


def _slowest(ev: Evidence, gpus: list[str]) -> list[Finding]:
    # How hard each GPU works while NVML calls it busy: SM activity per busy second. Ranks
    # of one data-parallel job run the same kernels, so they match unless some wait in a
    # collective (a few SMs) for one that computes longer.
    busy = {g: ev.gpus[g].busy_mean for g in gpus
            if ev.gpus[g].busy_mean == ev.gpus[g].busy_mean and ev.gpus[g].busy_mean >= 0.3}
    comp = {g: ev.gpus[g].sm_mean / b for g, b in busy.items() if ev.gpus[g].sm_mean is not None}
    basis, margin, spread, spin_share = "SM activity per busy second", MARGIN, SPREAD, 0.0
    if len(comp) < 3:
        # Without SM activity (an A100's own samplers have no GPM): power per busy second.
        # A GPU spinning in a collective still draws SPIN_SHARE of its computing power, and
        # GPUs of one model differ by a few percent at the same work: a wider margin.
        comp = {g: ev.gpus[g].power / b for g, b in busy.items() if ev.gpus[g].power}
        basis, margin, spread, spin_share = ("power per busy second", POWER_MARGIN,
                                             POWER_SPREAD, SPIN_SHARE)
    if len(comp) < 3:
        # One peer has no spread to compare with (its MAD is 0): at least two are needed.
        return []
    slowest = max(comp, key=comp.get)
    others = [g for g in comp if g != slowest]
    if outside_collective(ev, slowest, others):
        return []
    level = max(float(np.median([comp[g] for g in others])), 0.05)
    peers = robust([comp[g] for g in others], spread * level)
    gap = (comp[slowest] - peers.median) / max(comp[slowest], 1e-3)
    if gap < margin or peers.z(comp[slowest]) < Z:
        if basis != "power per busy second" or not _steady_above(
                ev, slowest, others, gap, robust([comp[g] for g in others],
                                                 STEADY_SPREAD * level).z(comp[slowest])):
            return []
        basis = "power per busy second, steady while its peers' swings"
    # One GPU stands out, not a group: a second GPU closer to it than to the rest means two
    # kinds of work (two jobs on the node that no job label separates, a model split unevenly
    # across its ranks), not one rank that holds back identical peers.
    second = max(comp[g] for g in others)
    if (comp[slowest] - second) / max(comp[slowest], 1e-3) < gap / 2:
        return []
    s = ev.gpus[slowest]
    # A GPU that computes slower never waits: idling more than its peers, it waits for
    # something of its own (its input), and the harder work per busy second is its peers'
    # spin at the collective, not its slowness.
    peers_idle = float(np.median([ev.gpus[g].idle.mean for g in others]))
    if s.idle.n and s.idle.mean > peers_idle + IDLE_MARGIN:
        return []
    # The peers compute the same work in less time and wait the rest of the step.
    wait = float(np.median([ev.gpus[g].busy_mean * (1 - comp[g] / comp[slowest])
                            for g in others])) / (1 - spin_share)
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
