"""What a window shows, measured once and shared by the detectors: per GPU (is a job on it,
how much of that time it ran no kernel, computed, or waited in a collective; its step period),
per data loader (its process tree's CPU against its workers, time blocked on I/O), the
node's storage against its ceilings, PCIe per GPU and per shared uplink and direction, page
cache, CPU. Pure: arrays in, numbers out.

A signal the source lacks stays None here, never zero: `missing` names the families the
detectors will not be able to judge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from agentd.analysis import limits as L
from agentd.analysis import periodicity as P
from agentd.analysis.signals import Signals, nanmean
from agentd.analysis.stats import NONE, Estimate, estimate
from agentd.gpu import models

IDLE_MEMORY = 2**30  # a process holding >= 1 GiB of device memory holds the GPU
# Below this no job runs on the GPU, unless a process is attributed to it: drivers report
# ~0.5 GiB in use on an H100 with no process at all (reserved memory, contexts).
NO_JOB_MEMORY = 2**30
# Checkpoints: node writes or device-to-host copies dominate while the GPU idles.
CHECKPOINT_WRITE = 100e6
CHECKPOINT_D2H = 1e9
# Computing vs waiting in a collective, from SM activity at fine resolution: the SM level
# per unit of busy time must show two states this far apart to be told apart.
TWO_STATES = 2.5
# ... and the lower state must be a collective's: NCCL's kernels keep a few SMs (tens of
# CTAs of an H100's 132) active while they move bytes or spin (0.03-0.12 of them in the
# robustness suite's model). A lower state above this is lighter kernels (an evaluation
# phase, an optimizer step), or samples that mix computing with waiting so evenly that
# the waiting's own level is not seen: either way, how much is waiting cannot be read.
COLLECTIVE_SM = 0.25
QUANT_SE = 0.003  # NVML integer-percent samples: the resolution of a busy mean


@dataclass
class GpuState:
    gpu: str
    busy: np.ndarray  # per sample: share of the sample a kernel ran
    exact: bool  # from credited kernel time / DCGM engine activity (else a held sample)
    present: np.ndarray  # a job holds the GPU
    held_known: bool  # memory or a process says so (else assumed)
    memory: float  # mean bytes held while present
    benign: np.ndarray  # checkpoint samples
    idle_aligned: np.ndarray  # per sample, idle share on the driver's own timeline
    idle: Estimate  # share of job time without a kernel (checkpoints excluded)
    busy_mean: float
    compute: Estimate | None  # share of job time computing (SM activity)
    spin: Estimate | None  # share of job time busy in a collective, not computing
    sm_mean: float | None
    tensor_mean: float | None
    power: float | None
    power_limit: float | None
    clock: float | None  # mean SM clock while busy (Hz)
    clock_max: float | None
    period: P.Period | None
    period_note: str
    lost: bool
    seconds: float  # job time in the window

    @property
    def lost_share(self) -> float:
        """Share of job time not computing: idle, and waiting in collectives when known."""
        i = self.idle.mean if self.idle.n else 0.0
        return i + (self.spin.mean if self.spin is not None and self.spin.n else 0.0)


@dataclass
class Loader:
    """A GPU's data loader: the process tree of the process that holds the GPU."""

    pid: str
    cores: Estimate  # CPU of the tree, in cores
    members: float  # processes in the tree, mean over the job's time (nan: not sampled)
    workers: float  # processes besides the trainer (at least one)
    saturation: Estimate  # cores / workers
    max_member: Estimate  # CPU of the busiest member (a single-worker loader pegs it at 1)
    blocked: Estimate  # processes in D state / members
    read: float  # bytes/s the tree read from storage
    cpu: np.ndarray | None  # per sample, for alternation with the GPU


@dataclass
class Disk:
    name: str
    read: Estimate  # bytes/s
    read_ops: float
    request_bytes: float | None
    limit: L.Limit
    utilization: Estimate  # read / limit
    queue: float
    await_s: float
    busy: float


@dataclass
class Link:
    gpu: str
    rx: Estimate  # host to device, bytes/s
    tx: Estimate
    capacity: float | None  # usable bytes/s of the link per direction
    pinned: L.Limit
    pageable: L.Limit
    rx_in_gaps: float  # mean rx over samples where the GPU idled
    rx_series: np.ndarray | None


@dataclass
class Uplink:
    switch: str
    capacity: float
    gpus: list[str]
    disks: list[str]
    down: Estimate  # GPUs' copies (+ disk writes), bytes/s
    up: Estimate  # disk reads (+ GPUs' device-to-host), bytes/s


@dataclass
class Evidence:
    sig: Signals
    node: str
    t0: float
    t1: float
    coarse: bool  # samples too far apart to see steps, gaps or overlap
    gpus: dict[str, GpuState]
    loaders: dict[str, Loader]  # by GPU
    disks: dict[str, Disk]  # data disks (those carrying the reads)
    psi_io: Estimate
    psi_io_full: Estimate
    psi_cpu: Estimate
    psi_memory: Estimate
    iowait: float
    cpu_busy: Estimate  # node cores busy
    cpu_limit: L.Limit
    links: dict[str, Link]
    uplinks: list[Uplink]
    refault: Estimate  # bytes/s of file pages read again after eviction
    read_total: Estimate  # bytes/s from the data disks
    nfs_read: float
    network_rx: float
    nvlink_rx: dict[str, float]
    checkpoint_share: float
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lost_gpus: list[str] = field(default_factory=list)
    jobs: list[list[str]] = field(default_factory=list)  # GPUs by job (peer groups)

    def peer_groups(self) -> list[list[str]]:
        """The job GPUs grouped by job: peers compared with each other run the same step."""
        live = set(self.job_gpus())
        return [[g for g in group if g in live] for group in self.jobs
                if len([g for g in group if g in live]) >= 2]

    def job_gpus(self) -> list[str]:
        """GPUs a job holds for a meaningful part of the window."""
        return [g for g, s in self.gpus.items() if not s.lost and s.seconds >= 5 * max(
            self.sig.resolution, 1.0) and s.present.any()]

    def subject(self, gpus: list[str]) -> dict:
        sub: dict = {"node": self.node, "gpus": [int(g) if g.isdigit() else g for g in gpus]}
        procs = self.sig.meta.get("processes", {}) or {}
        # Keyed by root pid (the window), or by job (Prometheus: per-job series, no pids).
        owners = [dict(({"pid": int(pid)} if str(pid).isdigit() else {}),
                       **{k: v for k, v in info.items() if k != "gpus" and v})
                  for pid, info in procs.items()
                  if set(map(str, info.get("gpus", []))) & set(gpus)]
        # One entry per owner: a job read from Prometheus as one tree per GPU is one job.
        unique = [o for i, o in enumerate(owners) if o not in owners[:i]]
        if unique:
            sub["processes"] = unique
        idents = (self.sig.meta.get("gpus") or {})
        uuids = [idents.get(g, {}).get("uuid") or idents.get(g, {}).get("UUID") for g in gpus]
        if any(uuids):
            sub["uuids"] = [u or "" for u in uuids]
        return sub


def held_forward(x: np.ndarray | None, limit: int) -> np.ndarray | None:
    """A slow signal on the fast grid, held forward up to `limit` samples."""
    if x is None:
        return None
    x = np.asarray(x, dtype=float)
    ok = np.isfinite(x)
    if not ok.any():
        return x
    idx = np.where(ok, np.arange(len(x)), -1)
    idx = np.maximum.accumulate(idx)
    out = np.where(idx >= 0, x[np.clip(idx, 0, None)], np.nan)
    age = np.arange(len(x)) - idx
    return np.where(age <= limit, out, np.nan)


def gpu_model(sig: Signals, g: str) -> models.GpuModel | None:
    """The GPU's model (agentd.gpu.models) from its name in the source's identities."""
    ident = (sig.meta.get("gpus") or {}).get(g) or {}
    return models.lookup(ident.get("name") or ident.get("modelName"))


def _mean_where(x: np.ndarray | None, mask: np.ndarray) -> float:
    if x is None or not mask.any():
        return float("nan")
    return nanmean(np.asarray(x, dtype=float)[mask])


def measure(sig: Signals, node: str = "") -> Evidence:
    n = len(sig.t)
    res = sig.resolution
    coarse = res > 2.0
    hold = max(int(round(3.0 / res)), 1)
    meta = sig.meta or {}
    ceilings = meta.get("ceilings") if isinstance(meta.get("ceilings"), dict) else None
    missing: list[str] = []
    notes: list[str] = list(meta.get("notes", []) or [])

    # --- checkpoints: writes or device-to-host copies dominate ------------------------------
    writes = _sum(sig, "disk.write")
    reads = _sum(sig, "disk.read")
    ckpt = np.zeros(n, dtype=bool)
    if writes is not None:
        ckpt |= (writes > CHECKPOINT_WRITE) & (writes > np.nan_to_num(reads))

    gpus: dict[str, GpuState] = {}
    lost_meta = {str(g) for g, i in (meta.get("gpus") or {}).items()
                 if isinstance(i, dict) and i.get("lost")}
    lost_meta |= {str(g) for g in meta.get("gpus_lost", []) or []}
    lost_meta |= {str(g) for g in meta.get("gpus_absent_at_end", []) or []}
    names = sorted(set(sig.gpus()) | set(sig.subjects("gpu.busy_time")),
                   key=lambda s: (len(s), s))
    for g in names:
        gpus[g] = _gpu_state(sig, g, ckpt, hold, coarse, g in lost_meta)
    for g in sorted(lost_meta - set(gpus), key=lambda s: (len(s), s)):
        # Known to the source but without a single sample in the window: lost before it.
        gpus[g] = _gpu_state(sig, g, ckpt, hold, coarse, True)
    lost = [g for g, s in gpus.items() if s.lost]

    # --- storage ------------------------------------------------------------------------------
    disk_meta = meta.get("disks") if isinstance(meta.get("disks"), dict) else {}
    job_mask = np.zeros(n, dtype=bool)
    for s in gpus.values():
        if not s.lost:
            job_mask |= s.present
    if not job_mask.any():
        job_mask = np.ones(n, dtype=bool)
    active = job_mask & ~ckpt
    disks: dict[str, Disk] = {}
    if sig.has("disk.read"):
        rates = {d: nanmean(sig.get("disk.read", d)) for d in sig.subjects("disk.read")}
        total = sum(v for v in rates.values() if v == v)
        for d, v in rates.items():
            if not (total > 0 and v == v and v >= 0.1 * total):
                continue
            read = sig.get("disk.read", d)
            ops = nanmean(_pick(sig.get("disk.read_ops", d), active))
            est = estimate(_pick(read, active))
            req = est.mean / ops if ops == ops and ops > 0 else None
            lim = L.storage_limit(d, ceilings, disk_meta, req)
            util = Estimate(est.mean / lim.value, est.se / lim.value, est.n) if lim.known \
                else NONE
            disks[d] = Disk(d, est, ops, req, lim, util,
                            nanmean(_pick(sig.get("disk.queue", d), active)),
                            nanmean(_pick(sig.get("disk.await", d), active)),
                            nanmean(_pick(sig.get("disk.busy", d), active)))
    else:
        missing.append("storage (disk reads)")
    read_total = estimate(_pick(reads, active)) if reads is not None else NONE

    def psi(name: str) -> Estimate:
        x = held_forward(sig.get(name), hold)
        return estimate(_pick(x, active)) if x is not None else NONE

    psi_io, psi_io_full, psi_cpu, psi_mem = (psi("psi.io"), psi("psi.io_full"),
                                             psi("psi.cpu"), psi("psi.memory"))
    refault = held_forward(sig.get("mem.refault"), hold)
    refault_est = estimate(_pick(refault * 4096, active)) if refault is not None else NONE

    # --- CPU ----------------------------------------------------------------------------------
    cores = nanmean(sig.get("cpu.count"))
    cpu_busy = estimate(_pick(sig.get("cpu.busy"), active)) if sig.has("cpu.busy") else NONE
    if not sig.has("cpu.busy"):
        missing.append("host CPU")
    loaders: dict[str, Loader] = {}
    procs = meta.get("processes") or {}
    if not procs and not sig.has("proc.cpu"):
        missing.append("data-loader process trees")
    for pid, info in procs.items():
        for g in map(str, info.get("gpus", []) or []):
            if g in gpus and g not in loaders:
                ld = _loader(sig, str(pid), active, hold)
                if ld is not None:
                    loaders[g] = ld

    # --- PCIe ---------------------------------------------------------------------------------
    links: dict[str, Link] = {}
    for g, s in gpus.items():
        rx = sig.get("gpu.pcie_rx", g)
        if rx is None or s.lost:
            continue
        cap = _capacity(sig, g)
        pinned, pageable = L.h2d_limits(g, ceilings, cap)
        m = s.present & ~s.benign
        gaps = m & (s.busy < 0.5)
        links[g] = Link(g, estimate(_pick(rx, m)), estimate(_pick(sig.get("gpu.pcie_tx", g), m)),
                        cap, pinned, pageable, _mean_where(rx, gaps),
                        np.asarray(rx, dtype=float))
    if gpus and not links:
        missing.append("PCIe bytes")
    uplinks = []
    for u in meta.get("shared_uplinks", []) or []:
        cap = u.get("uplink_bytes_per_second") or 0
        try:
            cap = float(cap)
        except (TypeError, ValueError):
            cap = 0.0
        ug = [str(x) for x in u.get("gpus", []) if str(x) in links]
        ud = [d for d in u.get("disks", []) if sig.get("disk.read", d) is not None]
        if not cap or not ug:
            continue
        down = sum(np.nan_to_num(sig.get("gpu.pcie_rx", g)) for g in ug)
        down = down + sum(np.nan_to_num(sig.get("disk.write", d)) for d in ud)
        up = sum(np.nan_to_num(sig.get("disk.read", d)) for d in ud) + sum(
            np.nan_to_num(sig.get("gpu.pcie_tx", g)) for g in ug)
        uplinks.append(Uplink(str(u.get("switch", "")), cap, ug, ud,
                              estimate(_pick(np.asarray(down, dtype=float), active)),
                              estimate(_pick(np.asarray(up, dtype=float), active))))

    nv = {g: nanmean(sig.get("gpu.nvlink_rx", g)) for g in gpus if sig.get("gpu.nvlink_rx", g)
          is not None}
    net = sum(nanmean(sig.get("net.rx", d)) for d in sig.subjects("net.rx")) + sum(
        nanmean(sig.get("rdma.rx", d)) for d in sig.subjects("rdma.rx"))
    nfs = sum(nanmean(sig.get("nfs.read", m)) for m in sig.subjects("nfs.read")) \
        if sig.has("nfs.read") else float("nan")
    ev = Evidence(
        sig=sig, node=node or sig.node or str(meta.get("node", "")) or "node",
        t0=float(sig.t[0]) if n else 0.0, t1=float(sig.t[-1]) if n else 0.0, coarse=coarse,
        gpus=gpus, loaders=loaders, disks=disks, psi_io=psi_io, psi_io_full=psi_io_full,
        psi_cpu=psi_cpu, psi_memory=psi_mem,
        iowait=nanmean(_pick(sig.get("cpu.iowait"), active)), cpu_busy=cpu_busy,
        cpu_limit=L.cpu_limit(ceilings, cores if cores == cores else None), links=links,
        uplinks=uplinks, refault=refault_est, read_total=read_total, nfs_read=nfs,
        network_rx=net, nvlink_rx=nv,
        checkpoint_share=float((ckpt & job_mask).sum() / max(job_mask.sum(), 1)),
        missing=missing, notes=notes, lost_gpus=lost)
    if not any(s.compute is not None for s in gpus.values()) and gpus:
        if sig.has("gpu.sm_active") and coarse:
            ev.notes.append(f"SM activity averaged over {sig.resolution:g} s cannot tell "
                            "computing from waiting in collectives")
        elif sig.has("gpu.sm_active"):
            ev.notes.append("SM activity shows no level of its own for collective waits "
                            "(computing and waiting not told apart)")
        else:
            ev.missing.append("SM activity resolving compute from collective waits")
    ev.jobs = job_groups(meta, gpus, nv)
    return ev


_POD_SUFFIX = re.compile(r"(-[0-9a-f]{8,10})?-[a-z0-9]{5}$|-\d+$")


def job_groups(meta: dict, gpus: dict[str, GpuState],
               nvlink: dict[str, float] | None = None) -> list[list[str]]:
    """GPUs by the job that holds them: the process' Slurm job, pod, container or unit (or a
    dcgm-exporter pod's owner); a GPU that computes without exchanging anything over NVLink
    is in no collective with the others; GPUs whose step periods clearly differ run
    different jobs."""
    key: dict[str, str] = {}
    for pid, info in (meta.get("processes") or {}).items():
        k = next((str(info[f]) for f in ("slurm_job_id", "pod_uid", "container_id",
                                          "systemd_unit") if info.get(f)), "")
        for g in map(str, info.get("gpus", []) or []):
            key.setdefault(g, k)
    for g, info in (meta.get("gpus") or {}).items():
        if str(g) not in key and isinstance(info, dict) and info.get("pod"):
            owner = _POD_SUFFIX.sub("", str(info["pod"]))
            key[str(g)] = f"{info.get('namespace', '')}/{owner}"
    groups: dict[str, list[str]] = {}
    for g in gpus:
        groups.setdefault(key.get(g, ""), []).append(g)
    out = []
    for members in groups.values():
        for part in _split_by_collective(members, gpus, nvlink or {}):
            out += _split_by_period(part, gpus)
    return out


NO_COLLECTIVE = 10e6  # bytes/s over NVLink; a data-parallel rank moves its gradients (GB/s)
COMPUTING_SM = 0.1  # SM activity of a GPU that computes (one spinning in NCCL: ~0.03)
COMPUTING_POWER = 0.4  # without SM activity: power over its limit (spinning: ~0.2-0.25)


def _computes(s: GpuState) -> bool:
    if s.sm_mean is not None:
        return s.sm_mean == s.sm_mean and s.sm_mean >= COMPUTING_SM
    return bool(s.power and s.power_limit and s.power >= COMPUTING_POWER * s.power_limit)


def _split_by_collective(members: list[str], gpus: dict[str, GpuState],
                         nvlink: dict[str, float]) -> list[list[str]]:
    """GPUs that one label groups (a sweep of single-GPU runs under one unit or Slurm job)
    but that compute without moving a byte over NVLink, where NVLink is measured, take part
    in no collective on this node: each is a job of its own, nobody's peer. Ranks of one
    data-parallel job exchange their gradients every step (GB/s); ranks stuck together in a
    collective move nothing but do not compute either, so they stay together."""
    if len(members) < 2:
        return [members]
    alone = [g for g in members if g in nvlink and nvlink[g] == nvlink[g]
             and nvlink[g] < NO_COLLECTIVE and _computes(gpus[g])]
    if not alone:
        return [members]
    rest = [g for g in members if g not in alone]
    return ([rest] if rest else []) + [[g] for g in alone]


SAME_JOB_PERIOD = 1.05


def _split_by_period(members: list[str], gpus: dict[str, GpuState]) -> list[list[str]]:
    timed = sorted((gpus[g].period.seconds, g) for g in members if gpus[g].period is not None)
    untimed = [g for g in members if gpus[g].period is None]
    if len(timed) < 2:
        return [members]
    # Ranks of one data-parallel job step together: their periods agree within ~2% (the
    # robustness suite's jobs: at most 1.8%). A group spans at most SAME_JOB_PERIOD from its
    # shortest period, so independent jobs whose periods merely chain (0.50, 0.55, 0.60 s)
    # are never peers.
    parts, cur, first = [], [timed[0][1]], timed[0][0]
    for p1, g in timed[1:]:
        if p1 > first * SAME_JOB_PERIOD:
            parts.append(cur)
            cur, first = [], p1
        cur.append(g)
    parts.append(cur)
    parts.sort(key=len, reverse=True)
    if len(parts) == 1:
        parts[0] += untimed
    else:
        # Several jobs, told apart by their periods: a GPU without one could belong to any
        # (or to none: a job of its own). It is nobody's peer.
        parts += [[g] for g in untimed]
    return parts


def _sum(sig: Signals, signal: str) -> np.ndarray | None:
    if not sig.has(signal):
        return None
    return np.asarray(sum(np.nan_to_num(sig.get(signal, d)) for d in sig.subjects(signal)),
                      dtype=float)


def _pick(x: np.ndarray | None, mask: np.ndarray) -> np.ndarray | None:
    if x is None:
        return None
    x = np.asarray(x, dtype=float)
    return x[mask] if len(x) == len(mask) else x


def _capacity(sig: Signals, g: str) -> float | None:
    cap = nanmean(sig.get("gpu.pcie_capacity", g))
    if cap == cap and cap > 0:
        return cap
    peers = [nanmean(sig.get("gpu.pcie_capacity", p)) for p in sig.subjects("gpu.pcie_capacity")]
    peers = [c for c in peers if c == c and c > 0]
    return float(np.median(peers)) if peers else None


def _gpu_state(sig: Signals, g: str, ckpt: np.ndarray, hold: int, coarse: bool,
               lost_flag: bool) -> GpuState:
    n = len(sig.t)
    held_util = sig.get("gpu.busy", g)
    exact_series = sig.get("gpu.busy_time", g)
    exact = exact_series is not None and np.isfinite(exact_series).mean() > 0.5
    # Per sample: the held utilization (0..1); for means: the kernel time credited per tick
    # (exact over any window, but a single tick may credit more than its length).
    level = np.asarray(held_util if held_util is not None else exact_series
                       if exact_series is not None else np.full(n, np.nan), dtype=float)
    level = np.clip(level, 0.0, 1.0)
    credit = np.asarray(exact_series, dtype=float) if exact else level
    busy = level
    known = np.isfinite(credit) | np.isfinite(level)
    # A GPU that stopped reporting before the window's end fell off the bus (or its job's
    # exporter died): treat a tail of missing samples after data as lost when flagged.
    lost = lost_flag
    mem = held_forward(sig.get("gpu.mem_used", g), hold * 4)
    held_known = mem is not None and np.isfinite(mem).any()
    attributed = any(g in map(str, i.get("gpus", []) or [])
                     for i in (sig.meta.get("processes") or {}).values())
    if held_known:
        present = known & (np.nan_to_num(mem, nan=np.inf) >= NO_JOB_MEMORY)
        if attributed:
            present |= known & (np.nan_to_num(mem, nan=np.inf) > 0)
    elif attributed or (known.any() and nanmean(credit) >= 0.02):
        present = known.copy()
    else:
        # No memory reading, no process, no kernel: nothing says a job is there.
        present = np.zeros(n, dtype=bool)
    memory = _mean_where(mem, present) if held_known else float("nan")
    tx = sig.get("gpu.pcie_tx", g)
    idle_now = present & (np.nan_to_num(busy, nan=1.0) < 0.5)
    seed = ckpt & idle_now
    if tx is not None:
        rx = np.nan_to_num(sig.get("gpu.pcie_rx", g)) if sig.get("gpu.pcie_rx", g) is not None \
            else np.zeros(n)
        seed |= idle_now & (np.nan_to_num(tx) > CHECKPOINT_D2H) & (np.nan_to_num(tx) > 2 * rx)
    benign = _runs_touching(idle_now, seed)
    # Start-up (the job holds memory before its first kernel: loading the model, building
    # the loader) and teardown are not stalls: judge the job from its first step to its last.
    started, ended = _edges(present, level, sig.resolution)
    benign |= started | ended
    m = present & ~benign
    idle = estimate(1.0 - credit[m], floor_se=QUANT_SE) if m.any() else NONE
    if idle.n:
        idle = Estimate(min(max(idle.mean, 0.0), 1.0), idle.se, idle.n)
    sm = sig.get("gpu.sm_active", g)
    compute = spin = None
    sm_mean = tensor_mean = None
    if sm is not None and np.isfinite(sm).any():
        sm_mean = _mean_where(sm, m)
        if not coarse:
            compute, spin = _unmix(np.asarray(sm, dtype=float), busy, m)
    tensor = sig.get("gpu.tensor_active", g)
    if tensor is not None and np.isfinite(tensor).any():
        tensor_mean = _mean_where(tensor, m)
    power = held_forward(sig.get("gpu.power", g), hold)
    power_mean = _mean_where(power, m) if power is not None else None
    limit = nanmean(sig.get("gpu.power_limit", g))
    if not limit == limit:
        model = gpu_model(sig, g)
        limit = model.power_limit_watts if model else float("nan")
    clock = held_forward(sig.get("gpu.sm_clock", g), hold)
    busy_m = m & (busy >= 0.5)
    clock_mean = _mean_where(clock, busy_m) if clock is not None else None
    cmax = nanmean(sig.get("gpu.sm_clock_max", g))
    period, note = _period(sig, g, busy, coarse,
                           present & ~(started | ended) & (np.nan_to_num(level) >= 0.05))
    aligned = _aligned_idle(sig, g, busy)
    return GpuState(
        gpu=g, busy=busy, exact=exact, present=present, held_known=held_known, memory=memory,
        benign=benign, idle_aligned=aligned, idle=idle, busy_mean=1.0 - idle.mean if idle.n else float("nan"),
        compute=compute, spin=spin,
        sm_mean=sm_mean, tensor_mean=tensor_mean,
        power=power_mean if power_mean == power_mean else None,
        power_limit=limit if limit == limit and limit > 0 else None,
        clock=clock_mean if clock_mean == clock_mean else None,
        clock_max=cmax if cmax == cmax and cmax > 0 else None,
        period=period, period_note=note, lost=lost,
        seconds=float(present.sum() * sig.resolution))


def _runs_touching(idle: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The whole of each idle run that a checkpoint sample falls in or next to. A trainer
    that checkpoints stops computing for the whole save: it serializes the state into the page
    cache (no disk write yet), then the flush or fsync writes it at once; the write counter
    shows only the flush, one sample (rates are credited to the tick after)."""
    if not seed.any():
        return seed.copy()
    near = seed.copy()
    near[1:] |= seed[:-1]
    near[:-1] |= seed[1:]
    # Number the idle runs; a run is benign when any of its samples is near a seed.
    starts = idle & ~np.concatenate(([False], idle[:-1]))
    run_id = np.cumsum(starts) * idle
    hit = np.unique(run_id[near & idle])
    hit = hit[hit > 0]
    return np.isin(run_id, hit) & idle


EDGE_SECONDS = 30.0  # an idle run this long at a job's start or end is start-up / teardown


def _edges(present: np.ndarray, level: np.ndarray, res: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """(start-up, teardown) masks: a job's idle time before its first kernel and after its
    last, when the job starts or ends in the window or the run is long."""
    n = len(present)
    none = np.zeros(n, dtype=bool)
    active = np.flatnonzero(present & (np.nan_to_num(level) >= 0.05))
    if not len(active) or not present.any():
        return none, none
    idx = np.arange(n)
    held = np.flatnonzero(present)
    lead = present & (idx < active[0])
    tail = present & (idx > active[-1])
    long = EDGE_SECONDS / max(res, 1e-9)
    started = lead if (held[0] > 0 or lead.sum() >= long) else none
    ended = tail if (held[-1] < n - 1 or tail.sum() >= long) else none
    return started, ended


def _aligned_idle(sig: Signals, g: str, level: np.ndarray) -> np.ndarray:
    """Idle share per sample placed where the driver measured it: its samples' own times
    (gpu.util_sample/_age) interpolated onto the grid. The held utilization lags the truth by
    up to a sample period, which blurs any alignment with what the host did meanwhile."""
    smp, age = sig.get("gpu.util_sample", g), sig.get("gpu.util_sample_age", g)
    if smp is None or age is None:
        return 1.0 - level
    ok = np.isfinite(smp) & np.isfinite(age)
    if ok.sum() < 10:
        return 1.0 - level
    ts = sig.t[ok] - age[ok]
    order = np.argsort(ts)
    centre = sig.t - sig.resolution / 2
    out = 1.0 - np.interp(centre, ts[order], smp[ok][order])
    return np.where(np.isfinite(level), out, np.nan)


def _unmix(sm: np.ndarray, busy: np.ndarray, m: np.ndarray
           ) -> tuple[Estimate | None, Estimate | None]:
    """(computing share, collective share) of job time from SM activity at fine resolution.

    Each sample's SM activity mixes computing (SMs at level hi) and waiting in a collective
    (a few SMs: level lo): sm = c*hi + (busy - c)*lo. The two levels are the upper and lower
    envelopes of SM activity per unit of busy time over well-busy samples; unless they are
    clearly apart (TWO_STATES), the two cannot be told apart and both stay unknown."""
    ok = m & np.isfinite(sm) & np.isfinite(busy)
    well = ok & (busy >= 0.8)
    if well.sum() < 20:
        return None, None
    per = sm[well] / busy[well]
    hi = float(np.quantile(per, 0.95))
    lo = float(np.quantile(per, 0.05))
    if hi < 0.05:
        return None, None
    if hi < TWO_STATES * max(lo, 0.01) or lo > COLLECTIVE_SM:
        # One state: SM activity varies with the kernels, not between computing and
        # waiting; how much is waiting cannot be read off it (peers may still tell). Nor
        # when the lower state keeps a third of the SMs busy: a healthy node's rolling
        # analysis took its evaluation phases (0.35 of the SMs per busy second) and a
        # healthy 64-node job's light per-step kernels (0.38) for 25-40% of the time in
        # collectives, at critical.
        return None, None
    c = np.clip((sm[ok] - busy[ok] * lo) / (hi - lo), 0.0, busy[ok])
    comp = estimate(c, floor_se=QUANT_SE)
    return comp, estimate(busy[ok] - c, floor_se=QUANT_SE)


SCRAPED = 0.5  # seconds between samples from which only counted copies give a period


def _period(sig: Signals, g: str, busy: np.ndarray, coarse: bool,
            span: np.ndarray | None = None) -> tuple[P.Period | None, str]:
    """The GPU's step period from every series that carries it, over the job's span (from
    its first step to its last: not the idle before a job starts or after it ends)."""
    if coarse:
        return None, f"samples every {sig.resolution:g} s cannot resolve steps"
    lo, hi = 0, len(sig.t)
    if span is not None and span.sum() >= 2:
        idx = np.flatnonzero(span)  # the samples with a kernel: after the first, to the last
        if idx[0] > 0 or idx[-1] < len(span) - 1:
            lo, hi = int(idx[0]) + 1, int(idx[-1]) + 1
    times = sig.t[lo:hi]

    def series(name: str) -> np.ndarray | None:  # this GPU's, over the span (a view)
        x = sig.get(name, g)
        return None if x is None else x[lo:hi]

    cands: list[P.Period | None] = []
    dts: dict[str, float] = {}
    sample = series("gpu.util_sample")
    age = series("gpu.util_sample_age")
    if sample is not None and age is not None:
        ok = np.isfinite(sample) & np.isfinite(age)
        if ok.sum() >= 64:
            t = times[ok] - age[ok]
            dt = float(np.median(np.diff(np.sort(t)))) if ok.sum() > 1 else sig.resolution
            dts["driver samples"] = dt
            cands.append(P.find_period(t, sample[ok], "driver samples"))
    rx = series("gpu.pcie_rx")
    if rx is not None and np.isfinite(rx).mean() <= 0.9:
        rx = None  # too few ticks to count copies or search them
    if rx is not None:
        bursts = P.period_from_bursts(rx, sig.resolution)
        if bursts is not None and bursts.rel_width <= P.MAX_REL_WIDTH:
            return bursts, ""
    if sig.resolution >= SCRAPED and "driver samples" not in dts:
        # Every series at one scrape interval: steps under two intervals (most steps, at
        # 1 s) alias into false, longer periods that all the series agree on.
        return None, (f"samples every {sig.resolution:g} s: a step shorter than two of them "
                      "would alias into a false, longer period")
    if rx is not None:
        ok = np.isfinite(rx)
        dts["pcie"] = sig.resolution
        cands.append(P.find_period(times[ok], rx[ok], "pcie"))
    sm = series("gpu.sm_active")
    if sm is not None:
        ok = np.isfinite(sm)
        if ok.sum() >= 64:
            t = times[ok]
            dts["sm activity"] = float(np.median(np.diff(t)))
            cands.append(P.find_period(t, sm[ok], "sm activity"))
    if not dts:
        return None, "no series with its own timing (driver samples, PCIe, SM activity)"
    period, why = P.resolve([c for c in cands if c is not None], dts)
    if period is None:
        return None, why
    # Steps bunched by waits (two batches ready at once, then a long wait): the activity
    # repeats, but each cycle holds several steps of unequal length. Counted in copies, or,
    # without PCIe counters, in gaps of the held utilization.
    if rx is not None:
        steps, what = P.copies_per_cycle(rx, sig.resolution, period.seconds), \
            "host-to-device copies"
    else:
        steps, what = P.gaps_per_cycle(busy[lo:hi], sig.resolution, period.seconds), \
            "gaps between kernels"
    if steps is not None and steps >= P.STEPS_PER_CYCLE:
        return None, (f"the activity repeats every {period.seconds:.3g} s with about "
                      f"{steps:.1f} {what} in each: steps of unequal length, no one step "
                      "period")
    if rx is None:
        # Only a cycle that spans several of the driver's samples has busy samples clear of
        # its gap: a step of two or three samples touches its gap in most of them.
        sample = max(sig.resolution, dts.get("driver samples", 0.0))
        hidden = P.hidden_gaps(busy[lo:hi]) if period.seconds >= P.CLEAR_SAMPLES * sample \
            else None
        if hidden is not None and hidden >= P.HIDDEN_GAPS:
            return None, (f"the activity repeats every {period.seconds:.3g} s, but its busy "
                          f"stretches idle {hidden * 100:.0f}% in gaps shorter than a sample: "
                          "a cycle may hold several steps")
    return period, why


def _loader(sig: Signals, pid: str, active: np.ndarray, hold: int) -> Loader | None:
    cpu = sig.get("proc.cpu", pid)
    if cpu is None:
        return None
    members = nanmean(_pick(sig.get("proc.members", pid), active))
    workers = max(members - 1, 1.0) if members == members else 1.0
    cores = estimate(_pick(cpu, active))
    sat = Estimate(cores.mean / workers, cores.se / workers, cores.n) if cores.n else NONE
    mm = sig.get("proc.max_member_cpu", pid)
    blocked = sig.get("proc.blocked", pid)
    mem_n = sig.get("proc.members", pid)
    if blocked is not None and mem_n is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.asarray(blocked, dtype=float) / np.maximum(np.asarray(mem_n, dtype=float)
                                                                 - 1, 1)
        blocked_est = estimate(_pick(frac, active))
    else:
        blocked_est = NONE
    read = held_forward(sig.get("proc.read", pid), hold * 2)
    return Loader(pid, cores, members, workers, sat,
                  estimate(_pick(mm, active)) if mm is not None else NONE, blocked_est,
                  nanmean(_pick(read, active)) if read is not None else float("nan"),
                  np.asarray(cpu, dtype=float))
