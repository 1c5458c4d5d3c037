"""One detector per bottleneck class (../shared/DESIGN.md). Each is a pure function of the
window's measurements (an Evidence) and returns Findings: subject, window, confidence, the
evidence as numbers, the expected gain, and what to change. Healthy compute-bound work gives
none. Thresholds are named constants; their reasons are beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agentd.analysis import features as F
from agentd.analysis.findings import Finding, gain_from_stall, severity_for
from agentd.analysis.signals import Signals, coverage, nanmean

# A GPU loses at least this share of its time to waiting before an input cause is named:
# 5% of step time is TensorFlow's "moderately input-bound"; NVML's integer-percent samples
# and step-to-step noise make 4% the lowest level told apart from healthy jitter.
MIN_STALL = 0.04
MIN_SPIN = 0.08  # busy-but-not-computing share before collectives are named a cause
IDLE_BUSY = 0.02  # utilization under which an allocated GPU counts as idle
IDLE_MIN_SECONDS = 30.0
IDLE_MEMORY = 2**30  # a process holding at least 1 GiB of device memory "holds" the GPU
THROTTLE_SHARE = 0.2  # throttle reasons active this share of the time
THROTTLE_CLOCK = 0.92  # and SM clock below this share of its maximum
STRAGGLER_MARGIN = 0.08  # computes this much more of the time than its peers' median
# Power and thermal clock-event reasons (bits of gpu.throttle, NVML's order).
THROTTLE_BITS = {2: "sw_power_cap", 3: "hw_slowdown", 5: "sw_thermal_slowdown",
                 6: "hw_thermal_slowdown", 7: "hw_power_brake_slowdown"}


@dataclass
class Evidence:
    """What the window shows, measured once and shared by the detectors."""

    sig: Signals
    node: str
    t0: float
    t1: float
    gpus: list[str]
    busy: dict[str, float]
    compute: dict[str, float | None]  # share of time computing (from SM activity)
    stall: dict[str, float]  # share of (non-checkpoint) time without a kernel
    storage: dict
    cpu: dict[str, dict]
    pcie: dict[str, dict]
    uplink: dict[str, dict | None]
    memory: dict
    period: dict[str, tuple[float | None, float | None]]
    coarse: bool
    notes: list[str] = field(default_factory=list)

    def subject(self, gpus: list[str]) -> dict:
        sub: dict = {"node": self.node, "gpus": [int(g) if g.isdigit() else g for g in gpus]}
        procs = self.sig.meta.get("processes", {})
        # Keyed by root pid (the window), or by job (Prometheus: per-job series, no pids).
        owners = [dict(({"pid": int(pid)} if str(pid).isdigit() else {}),
                       **{k: v for k, v in info.items() if k != "gpus" and v})
                  for pid, info in procs.items()
                  if set(map(str, info.get("gpus", []))) & set(gpus)]
        if owners:
            sub["processes"] = owners
        return sub


def measure(sig: Signals, node: str = "") -> Evidence:
    gpus = sig.gpus()
    mask = ~F.writes_dominate(sig)
    busy, compute, stall, period, cpu, pcie, uplink = {}, {}, {}, {}, {}, {}, {}
    coarse = sig.resolution > 2.0
    for g in gpus:
        b = sig.get("gpu.busy", g)
        exact = sig.get("gpu.busy_time", g)
        # The held utilization aliases with periodic steps; busy_time's mean is exact.
        level = exact if exact is not None and coverage(exact) > 0.5 else b
        busy[g], compute[g] = F.compute_fraction(level, sig.get("gpu.sm_active", g), coarse)
        stall[g] = max(0.0, 1.0 - nanmean(level[mask])) if mask.any() else float("nan")
        period[g] = _period(sig, g)
        cpu[g] = F.cpu_state(sig, g, mask)
        pcie[g] = F.pcie_state(sig, g, mask)
        uplink[g] = F.uplink_state(sig, g)
    refault = nanmean(sig.get("mem.refault")) * 4096
    ev = Evidence(
        sig=sig, node=node or sig.node or "node", t0=float(sig.t[0]) if len(sig.t) else 0.0,
        t1=float(sig.t[-1]) if len(sig.t) else 0.0, gpus=gpus, busy=busy, compute=compute,
        stall=stall, storage=F.storage_state(sig, mask), cpu=cpu, pcie=pcie, uplink=uplink,
        memory={"refault_bytes_per_second": refault, "psi_memory": nanmean(sig.get("psi.memory")),
                "cached_bytes": nanmean(sig.get("mem.cached"))},
        period=period, coarse=sig.resolution > 2.0)
    if ev.coarse:
        ev.notes.append(
            f"samples every {sig.resolution:.0f} s: stalls shorter than that average out; step "
            "period, idle gaps and the overlap of reads with copies cannot be resolved")
    if gpus and all(c is None for c in compute.values()):
        ev.notes.append("no SM activity (GPM or DCGM profiling): time spent in collectives "
                        "counts as busy in NVML utilization, so communication waits and "
                        "stragglers are seen only through their traffic")
    return ev


def _period(sig: Signals, g: str) -> tuple[float | None, float | None]:
    """The step period of a GPU, or (None, None) when the samples cannot resolve it."""
    if sig.resolution > 1.0:
        return None, None
    rx = sig.get("gpu.pcie_rx", g)
    if rx is not None and coverage(rx) >= 0.9:
        counted = F.period_from_bursts(rx, sig.resolution)
        if counted is not None:
            return counted, None
    # Otherwise the autocorrelation of utilization, trusted only for periods several samples
    # long: NVML's 1/6 s samples alias anything shorter.
    busy = sig.get("gpu.busy", g)
    if busy is None or coverage(busy) < 0.9:
        return None, None
    period, jitter, strength = F.step_period(busy, sig.resolution, min_s=0.2)
    if period is None or period < max(5 * sig.resolution, 1.0) or strength < 0.3:
        return None, None
    return period, jitter


def _confidence(base: float, ev: Evidence, needs_fine: bool = False) -> float:
    c = base
    if ev.coarse and needs_fine:
        c *= 0.6
    return round(min(max(c, 0.05), 0.99), 2)


def _margin(value: float, threshold: float, span: float) -> float:
    """0.5 at the threshold, rising to ~1 at threshold + span."""
    return 0.5 + 0.5 * min(max((value - threshold) / span, 0.0), 1.0)


def _starved(ev: Evidence) -> list[str]:
    return [g for g in ev.gpus if ev.stall[g] == ev.stall[g] and ev.stall[g] >= MIN_STALL
            and not _is_idle(ev, g)]


def _is_idle(ev: Evidence, g: str) -> bool:
    return ev.busy[g] == ev.busy[g] and ev.busy[g] < IDLE_BUSY


def _fmt_gbs(x: float) -> str:
    return f"{x / 1e9:.2f} GB/s" if x == x else "n/a"


# --- GPUs allocated but idle ------------------------------------------------------------------


def idle_allocated(ev: Evidence) -> list[Finding]:
    idle = []
    for g in ev.gpus:
        mem = nanmean(ev.sig.get("gpu.mem_used", g))
        held = mem == mem and mem >= IDLE_MEMORY
        procs = [p for p, i in ev.sig.meta.get("processes", {}).items()
                 if g in map(str, i.get("gpus", []))]
        span = ev.t1 - ev.t0 + ev.sig.resolution
        if _is_idle(ev, g) and (held or procs) and span >= IDLE_MIN_SECONDS:
            idle.append((g, mem))
    if not idle:
        return []
    gpus = [g for g, _ in idle]
    mem = sum(m for _, m in idle if m == m)
    span = ev.t1 - ev.t0 + ev.sig.resolution
    # A short pause (loading a checkpoint, an evaluation elsewhere) is not yet a problem;
    # minutes of it are. Alerting rules add their own `for:` on top.
    severity = "critical" if span >= 600 else ("warning" if span >= 120 else "info")
    return [Finding(
        kind="idle_allocated", subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1,
        confidence=_confidence(0.95, ev), severity=severity,
        summary=f"{len(gpus)} GPU(s) hold {mem / 2**30:.0f} GiB of memory but ran kernels "
                f"{max(ev.busy[g] for g in gpus) * 100:.1f}% of the time for "
                f"{ev.t1 - ev.t0:.0f} s",
        evidence={"gpus_idle": len(gpus), "memory_held_bytes": mem,
                  "max_busy": max(ev.busy[g] for g in gpus), "seconds": ev.t1 - ev.t0},
        gain={"busy_now": max(ev.busy[g] for g in gpus), "busy_after": float("nan"),
              "gpus_reclaimable": len(gpus), "speedup": 1.0 + len(gpus)},
        advice=["End the idle job or notebook, or release its GPUs: they are allocated "
                "and unavailable to anyone else.",
                "Scheduler side: reclaim GPUs idle longer than a threshold (Slurm "
                "--time limits, Kubernetes idle culling for notebooks)."],
        stall_fraction=1.0,
    )]


# --- input pipeline causes ----------------------------------------------------------------------


def _input_finding(ev: Evidence, kind: str, gpus: list[str], confidence: float, summary: str,
                   evidence: dict, advice: list[str]) -> Finding:
    stall = float(np.mean([ev.stall[g] for g in gpus]))
    busy = float(np.mean([ev.busy[g] for g in gpus]))
    periods = [ev.period[g][0] for g in gpus if ev.period[g][0]]
    if periods:
        evidence = {**evidence, "step_period_seconds": float(np.median(periods))}
    return Finding(kind=kind, subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1,
                   confidence=confidence, severity=severity_for(stall), summary=summary,
                   evidence={"stall_fraction": stall, "gpu_busy": busy, **evidence},
                   gain=gain_from_stall(busy, stall), advice=advice, stall_fraction=stall)


def memory_pressure(ev: Evidence, gpus: list[str]) -> tuple[float, Finding] | None:
    m, s = ev.memory, ev.storage
    refault, read = m["refault_bytes_per_second"], s["read_bytes_per_second"]
    if refault != refault or read != read or read <= 0:
        return None
    share = refault / read
    if share < 0.3:
        return None
    # Refaults explain a storage (or shared-link) saturation: the cause outranks the symptom.
    score = 2.0 + min(share, 1.0)
    return score, _input_finding(
        ev, "memory_pressure", gpus, _confidence(0.5 + 0.4 * min(share, 1.0), ev),
        f"{share * 100:.0f}% of storage reads re-fetch pages the cache evicted "
        f"({_fmt_gbs(refault)} of {_fmt_gbs(read)}); the GPUs wait for them",
        {"refault_bytes_per_second": refault, "read_bytes_per_second": read,
         "refault_share": share, "psi_memory": m["psi_memory"],
         "page_cache_bytes": m["cached_bytes"]},
        ["The dataset no longer fits in the page cache: free host memory (other jobs, "
         "oversized pinned buffers), add RAM, or stage the data to local NVMe.",
         "Read each sample once per epoch in a shuffled-shard layout (WebDataset, TFRecord) "
         "so the cache is not thrashed by random re-reads."])


def shared_link(ev: Evidence, gpus: list[str]) -> tuple[float, Finding] | None:
    links = [ev.uplink[g] for g in gpus if ev.uplink[g]]
    hot = [u for u in links if u["saturated"]]
    if not hot:
        return None
    u = max(hot, key=lambda x: x["utilization"])
    affected = [g for g in gpus if ev.uplink[g] and ev.uplink[g]["switch"] == u["switch"]]
    if not affected:
        return None
    # Contention on the uplink explains slow reads and slow copies: it outranks both.
    return 1.5 + min(u["utilization"], 1.0), _input_finding(
        ev, "shared_link", affected, _confidence(0.55 + 0.4 * min(u["utilization"], 1.0), ev),
        f"NVMe reads and GPU copies behind PCIe switch {u['switch']} use "
        f"{u['utilization'] * 100:.0f}% of its {_fmt_gbs(u['capacity_bytes_per_second'])} uplink",
        {"switch": u["switch"], "uplink_utilization": u["utilization"],
         "uplink_bytes_per_second": u["capacity_bytes_per_second"],
         "disks": ",".join(u["disks"])},
        [f"Reads from {', '.join(u['disks']) or 'the NVMe drive'} and copies to GPUs "
         f"{', '.join(map(str, u['gpus']))} share one switch uplink: read the data from a drive "
         "behind another switch or a CPU root port, or stage it in host memory first.",
         "Check that the uplink trains at its maximum generation and width "
         "(lspci -vv: LnkSta against LnkCap)."])


def input_storage(ev: Evidence, gpus: list[str]) -> tuple[float, Finding] | None:
    s = ev.storage
    if not s["saturated"]:
        return None
    cpu_sat = [ev.cpu[g] for g in gpus if ev.cpu[g]["saturated"]]
    score = min(s["score"], 1.0) - (0.3 if cpu_sat else 0.0)
    dev = ", ".join(s["disks"]) or "the data volume"
    return score, _input_finding(
        ev, "input_storage", gpus,
        _confidence(_margin(s["score"], 0.8, 0.2) * (0.8 if cpu_sat else 1.0), ev),
        f"storage cannot keep up: {dev} read {_fmt_gbs(s['read_bytes_per_second'])}, busy "
        f"{s['busy'] * 100:.0f}% of the time with {s['queue']:.1f} requests queued; the "
        "data-loader CPU is not saturated",
        {"read_bytes_per_second": s["read_bytes_per_second"], "disk_busy": s["busy"],
         "disk_queue": s["queue"], "await_seconds": s["await_seconds"], "psi_io": s["psi_io"],
         "devices": dev,
         "loader_cpu_saturation": float(np.nanmax([ev.cpu[g].get("worker_saturation", np.nan)
                                                   for g in gpus] or [np.nan]))},
        [f"{dev} is the limit: stage the dataset on local NVMe or in memory, or use a faster "
         "volume; at this stall a ~{:.1f}x faster read path removes it.".format(
             1 / max(1 - float(np.mean([ev.stall[g] for g in gpus])), 0.05)),
         "Read fewer, larger objects (sharded WebDataset/TFRecord files) and keep more "
         "requests in flight (more DataLoader workers or prefetch); compress samples "
         "(e.g. JPEG instead of raw) if the CPU has headroom."])


def input_cpu(ev: Evidence, gpus: list[str]) -> tuple[float, Finding] | None:
    sat = [g for g in gpus if ev.cpu[g]["saturated"]]
    if not sat:
        return None
    c = ev.cpu[sat[0]]
    ws = c.get("worker_saturation", float("nan"))
    ns = c["node_saturation"]
    detail = (f"data-loader workers use {c['tree_cores']:.1f} of {c['workers']:.0f} cores "
              f"({ws * 100:.0f}%)" if ws == ws else
              f"the node's CPUs are {ns * 100:.0f}% busy")
    idle_cores = (c["node_cores"] - c["node_cores_busy"]) if ns == ns else float("nan")
    storage_penalty = 0.3 if ev.storage["saturated"] else 0.0
    advice = ["Preprocessing cannot keep up: move decoding and augmentation to the GPU "
              "(NVIDIA DALI, torchvision.io.decode_jpeg on CUDA), or cache decoded samples.",
              "Use cheaper transforms or a faster decoder (pillow-simd, libjpeg-turbo)."]
    if idle_cores == idle_cores and idle_cores >= 2 and ws == ws:
        advice.insert(0, f"{idle_cores:.0f} cores are idle: raise DataLoader num_workers "
                         f"(now about {c['workers']:.0f} per GPU).")
    return min(c["score"], 1.0) - storage_penalty, _input_finding(
        ev, "input_cpu", gpus,
        _confidence(_margin(c["score"], 0.8, 0.2) * (1.0 if ws == ws else 0.75), ev),
        f"CPU preprocessing cannot keep up: {detail}; storage is not saturated",
        {"loader_cores": c.get("tree_cores", float("nan")),
         "loader_workers": c.get("workers", float("nan")), "loader_saturation": ws,
         "node_cpu_saturation": ns, "psi_cpu": c["psi_cpu"],
         "disk_busy": ev.storage["busy"]},
        advice)


def h2d_pcie(ev: Evidence, gpus: list[str]) -> tuple[float, Finding] | None:
    sat = [g for g in gpus if ev.pcie[g]["saturated"]]
    if not sat:
        return None
    p = ev.pcie[sat[0]]
    util = p["utilization"]
    pageable = util < 0.7  # the link is always busy yet far below its capacity
    advice = ["Copies to the GPU take all the time between steps: send compact data "
              "(uint8 images, not float32; decode and normalise on the GPU)."]
    if pageable:
        advice.insert(0, "The link runs at {:.0f}% of its capacity while always busy: copies "
                         "come from pageable memory. Use pinned memory (DataLoader "
                         "pin_memory=True) and non_blocking copies.".format(util * 100))
    advice.append("Check the link trains at its maximum generation and width "
                  "(agentd_gpu_pcie_link_generation against ..._max_generation).")
    return min(p["score"], 1.0), _input_finding(
        ev, "h2d_pcie", gpus, _confidence(_margin(p["duty"], 0.85, 0.15), ev, needs_fine=True),
        f"host-to-device copies keep PCIe busy {p['duty'] * 100:.0f}% of the time at "
        f"{_fmt_gbs(p['rx_bytes_per_second'])} on a {_fmt_gbs(p['capacity_bytes_per_second'])} "
        "link",
        {"pcie_rx_bytes_per_second": p["rx_bytes_per_second"],
         "pcie_capacity_bytes_per_second": p["capacity_bytes_per_second"],
         "pcie_duty": p["duty"], "pcie_utilization": util, "likely_pageable": pageable},
        advice)


def io_h2d_serialized(ev: Evidence, gpus: list[str]) -> tuple[float, Finding] | None:
    """Starved though no stage is saturated: reads, preprocessing and copies run one after
    another with compute instead of overlapping it (no prefetch)."""
    sig = ev.sig
    corr_cpu = []
    corr_rx = []
    for g in gpus:
        tree = ev.cpu[g].get("tree")
        if tree is not None:
            corr_cpu.append(F.correlation(sig.get("proc.cpu", str(tree)), sig.get("gpu.busy", g)))
        corr_rx.append(F.correlation(sig.get("gpu.pcie_rx", g), sig.get("gpu.busy", g)))
    cc = float(np.nanmean(corr_cpu)) if corr_cpu and not np.all(np.isnan(corr_cpu)) \
        else float("nan")
    cr = float(np.nanmean(corr_rx)) if corr_rx and not np.all(np.isnan(corr_rx)) \
        else float("nan")
    anti = [c for c in (cc, cr) if c == c]
    support = -min(anti) if anti else 0.0
    conf = _confidence(0.5 + 0.4 * min(max(support, 0.0) / 0.5, 1.0), ev, needs_fine=True)
    return 0.4 + 0.2 * max(support, 0.0), _input_finding(
        ev, "io_h2d_serialized", gpus, conf,
        "the GPUs wait between steps though storage, CPU and PCIe all have headroom: the "
        "next batch is fetched only when the step needs it" + (
            f" (loader CPU and GPU activity alternate: correlation {cc:+.2f})" if cc == cc
            else ""),
        {"loader_busy_correlation": cc, "pcie_busy_correlation": cr,
         "disk_busy": ev.storage["busy"],
         "loader_saturation": float(np.nanmax([ev.cpu[g].get("worker_saturation", np.nan)
                                               for g in gpus] or [np.nan])),
         "pcie_duty": float(np.nanmax([ev.pcie[g]["duty"] for g in gpus] or [np.nan]))},
        ["Overlap loading with compute: DataLoader(num_workers=N, prefetch_factor=2, "
         "pin_memory=True, persistent_workers=True) and copies with non_blocking=True; "
         "tf.data: .prefetch(tf.data.AUTOTUNE).",
         "Prefetch the next batch to the GPU on a side CUDA stream while the current step "
         "runs."])


INPUT_DETECTORS = (memory_pressure, shared_link, input_storage, input_cpu, h2d_pcie)


def input_causes(ev: Evidence) -> list[Finding]:
    """For starved GPUs, the best-evidenced cause; GPUs with the same cause form one finding."""
    starved = _starved(ev)
    if not starved:
        return []
    candidates = []
    for det in INPUT_DETECTORS:
        got = det(ev, starved)
        if got is not None:
            candidates.append(got)
    if not candidates:
        got = io_h2d_serialized(ev, starved)
        if got is not None:
            candidates.append(got)
    if not candidates:
        return []
    candidates.sort(key=lambda sf: -sf[0])
    return [candidates[0][1]]


# --- communication, stragglers, throttling ---------------------------------------------------------


def _spin(ev: Evidence, g: str) -> float | None:
    c = ev.compute[g]
    if c is None:
        return None
    return max(ev.busy[g] - c, 0.0)


def straggler(ev: Evidence) -> list[Finding]:
    """One GPU computes while its peers, done with their share, spin at the collective."""
    gpus = [g for g in ev.gpus if ev.compute[g] is not None and not _is_idle(ev, g)]
    if len(gpus) < 2:
        return []
    comp = {g: ev.compute[g] for g in gpus}
    slowest = max(gpus, key=lambda g: comp[g])
    others = [g for g in gpus if g != slowest]
    med = float(np.median([comp[g] for g in others]))
    spins = [_spin(ev, g) for g in others]
    spin = float(np.median(spins))
    if comp[slowest] - med < STRAGGLER_MARGIN or spin < MIN_SPIN:
        return []
    ratio = comp[slowest] / max(med, 1e-3)
    recovered = max(spin - (_spin(ev, slowest) or 0.0), 0.0)
    clock = nanmean(ev.sig.get("gpu.sm_clock", slowest)) / max(
        nanmean(ev.sig.get("gpu.sm_clock_max", slowest)), 1.0)
    f = Finding(
        kind="straggler", subject=ev.subject([slowest]), t0=ev.t0, t1=ev.t1,
        confidence=_confidence(_margin(comp[slowest] - med, STRAGGLER_MARGIN, 0.15), ev),
        severity=severity_for(recovered),
        summary=f"GPU {slowest} computes {ratio:.2f}x as long per step as its peers; the other "
                f"{len(others)} wait {spin * 100:.0f}% of the time at each collective",
        evidence={"straggler_compute_fraction": comp[slowest], "peers_compute_fraction": med,
                  "peers_wait_fraction": spin, "straggler_clock_ratio": clock,
                  "peers_waiting": len(others)},
        gain={**gain_from_stall(float(np.mean([ev.busy[g] for g in gpus])), recovered),
              "busy_now": med, "busy_after": min(comp[slowest], 1.0)},
        advice=[f"Find out why GPU {slowest} is slower: its clocks and throttle reasons, "
                "PCIe link width, ECC and remapped rows, a noisy neighbour on its CPU socket.",
                "Until then, run the job on GPUs without it: every step waits for the "
                "slowest rank."],
        stall_fraction=recovered)
    return [f]


def comm_wait(ev: Evidence) -> list[Finding]:
    """Most GPUs spend a large share of busy time in collectives (spinning or moving data),
    with no one GPU holding the others back."""
    gpus = [g for g in ev.gpus if ev.compute[g] is not None and not _is_idle(ev, g)]
    if not gpus:
        return []
    spins = {g: _spin(ev, g) for g in gpus}
    waiting = [g for g in gpus if spins[g] >= MIN_SPIN]
    if len(waiting) < max(1, int(0.75 * len(gpus))):
        return []
    comp = [ev.compute[g] for g in gpus]
    if max(comp) - float(np.median(comp)) >= STRAGGLER_MARGIN:
        return []  # a straggler, reported as such
    spin = float(np.mean([spins[g] for g in waiting]))
    traffic = sum(nanmean(ev.sig.get("gpu.nvlink_rx", g)) for g in waiting
                  if ev.sig.get("gpu.nvlink_rx", g) is not None)
    net = sum(nanmean(ev.sig.get("net.rx", d)) for d in ev.sig.subjects("net.rx")) + sum(
        nanmean(ev.sig.get("rdma.rx", d)) for d in ev.sig.subjects("rdma.rx"))
    busy = float(np.mean([ev.busy[g] for g in waiting]))
    if ev.coarse and not (traffic > 0 or net > 0):
        return []  # coarse SM activity alone cannot tell waiting from light kernels
    return [Finding(
        kind="comm_wait", subject=ev.subject(waiting), t0=ev.t0, t1=ev.t1,
        confidence=_confidence(_margin(spin, MIN_SPIN, 0.2), ev, needs_fine=True),
        severity=severity_for(spin),
        summary=f"{spin * 100:.0f}% of the time the GPUs are in collectives, not computing "
                f"(NVML reads {busy * 100:.0f}% busy, SM activity says otherwise)",
        evidence={"collective_fraction": spin, "gpu_busy": busy,
                  "compute_fraction": float(np.mean([ev.compute[g] for g in waiting])),
                  "nvlink_rx_bytes_per_second": traffic,
                  "network_rx_bytes_per_second": net},
        gain={**gain_from_stall(busy, spin),
              "busy_now": float(np.mean([ev.compute[g] for g in waiting])),
              "busy_after": min(float(np.mean([ev.compute[g] for g in waiting])) /
                                max(1 - spin, 0.05), 1.0)},
        advice=["Overlap communication with the backward pass (DDP bucket_cap_mb, FSDP "
                "prefetch) and communicate less often (gradient accumulation).",
                "Check the collectives use NVLink/NVSwitch and the fastest network path "
                "(NCCL_DEBUG=INFO, topology), and that no peer node is slower."],
        stall_fraction=spin)]


def throttled(ev: Evidence) -> list[Finding]:
    hits = []
    for g in ev.gpus:
        bits = ev.sig.get("gpu.throttle", g)
        clock = ev.sig.get("gpu.sm_clock", g)
        cmax = nanmean(ev.sig.get("gpu.sm_clock_max", g))
        if bits is None:
            continue
        have = ~np.isnan(bits)  # a slow-loop signal: one sample in ten on the fast grid
        if have.sum() < 5:
            continue
        b = bits[have].astype(np.int64)
        mask = sum(1 << k for k in THROTTLE_BITS)
        active = (b & mask) != 0
        share = float(active.mean())
        clock_s = clock[have] if clock is not None else None
        ratio = nanmean(clock_s[active]) / cmax if clock_s is not None and cmax == cmax and \
            active.any() else float("nan")
        if share >= THROTTLE_SHARE and ratio == ratio and ratio < THROTTLE_CLOCK:
            reasons = sorted({THROTTLE_BITS[k] for k in THROTTLE_BITS
                              if ((b >> k) & 1)[active].mean() > 0.2})
            hits.append((g, share, ratio, reasons))
    if not hits:
        return []
    gpus = [h[0] for h in hits]
    share = float(np.mean([h[1] for h in hits]))
    ratio = float(np.mean([h[2] for h in hits]))
    reasons = sorted({r for h in hits for r in h[3]})
    busy = float(np.mean([ev.busy[g] for g in gpus]))
    comp = [ev.compute[g] for g in gpus if ev.compute[g] is not None]
    computing = float(np.mean(comp)) if comp else busy
    # Compute at full clocks would take `ratio` of the time it takes now.
    recovered = computing * share * (1 - ratio)
    return [Finding(
        kind="throttled", subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1,
        confidence=_confidence(_margin(share, THROTTLE_SHARE, 0.5) * 0.95, ev),
        severity=severity_for(recovered),
        summary=f"SM clocks at {ratio * 100:.0f}% of maximum for {share * 100:.0f}% of the "
                f"time ({', '.join(reasons)})",
        evidence={"throttled_share": share, "clock_ratio": ratio, "reasons": ",".join(reasons),
                  "power_watts": float(np.mean([nanmean(ev.sig.get("gpu.power", g))
                                                for g in gpus])),
                  "temperature_celsius": float(np.mean([nanmean(ev.sig.get("gpu.temperature", g))
                                                        for g in gpus]))},
        gain={**gain_from_stall(busy, recovered)},
        advice=["Power cap or heat slows these GPUs: check cooling and airflow, fan and "
                "inlet temperatures, and power limits (nvidia-smi -q -d PERFORMANCE,POWER).",
                "If one node runs hot, compare with its peers and open a hardware ticket: a "
                "throttled GPU also slows every peer that synchronises with it."],
        stall_fraction=recovered)]


NODE_DETECTORS = (idle_allocated, input_causes, throttled, straggler, comm_wait)
