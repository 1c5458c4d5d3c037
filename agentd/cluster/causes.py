"""Per job: the node that holds the others back, and the physics that says why.

In a data-parallel job every rank waits at each collective for the slowest. So the node that
holds the job back is told by what differs between its peers and it, per window, robustly:

  computes longer   its compute activity (tensor pipes, else SMs) robustly above its peers'
                    (>= 8% and 4 spreads): they finish their share and spin in the collective
     at lower clocks   -> throttled (power at its limit, or hot: the evidence says which)
     at normal clocks  -> slow_gpu (more compute time per step: remapped rows, a weak GPU)
  idles before the collective   its GPUs' busy share robustly below its peers' (>= 5 points
                    and 4 spreads): only its GPUs wait for input while the others spin
     its disk or CPU saturated (and robustly above its peers') -> input_starved
     nothing seen      -> straggler (info: the mechanism is not in these signals)
  a slow or lossy link   a ring all-reduce moves the same bytes on every node, so bytes/s do
                    not single it out: the slowest port's rate robustly below its peers', or
                    link errors and recoveries where the peers have none -> slow_link (its
                    ring neighbour's transmit waits and the port's utilisation corroborate)

No activity metric (dcgm-exporter without profiling, agentd without GPM): a node whose clocks
are robustly under its peers' is throttled, and a slower GPU at normal clocks cannot be seen.

Gain: the job runs at that node's pace, so healing it shortens every step by its lead:
  computes longer   (1 - comm) x (1 - 1/rho), rho = its activity over its peers' (clocks
                    when no activity), comm = the job's share of time in transfers
  idles             its busy share's deficit against its peers'
  slow link         the slow port's share of time transferring x (1 - its rate / peers')
A lossy link at full rate costs what its retransmissions cost, which no counter measures:
it is reported with its error rates and no gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agentd.analysis.findings import Finding, gain_from_stall, severity_for
from agentd.cluster.data import Fleet, _quiet
from agentd.cluster.peers import peers, windowed

# Natural spread between healthy peers (floors of the robust spread) and the lines a node
# must cross: a relative or absolute gap, and a robust z.
ACT_FLOOR, ACT_GAP = 0.03, 0.08
CLOCK_FLOOR, CLOCK_GAP, CLOCK_CAUSE = 0.02, 0.08, 0.05
BUSY_FLOOR, BUSY_GAP = 0.015, 0.05
RATE_FLOOR, RATE_GAP = 0.01, 0.10
Z = 4.0
Z_CAUSE = 3.0  # a cause's signal, once the node is known to hold the job back
DISK_BUSY, PSI, CPU_BUSY = 0.85, 0.15, 0.9
ERRORS_PER_SECOND = 0.05  # symbol / receive / integrity errors (3 a minute)
POWER_AT_LIMIT, HOT = 0.95, 85.0
MIN_PEERS = 3  # nodes of a job with data in a window, for a robust median


@dataclass
class Options:
    window_steps: int = 5  # the analysis window, in base steps
    min_windows: int = 1  # windows a deviation must be seen in
    group_min_nodes: int = MIN_PEERS


def _w(fleet: Fleet, fam: str, rows, k: int, host: bool = False) -> np.ndarray | None:
    src = fleet.host if host else fleet.gpu
    if fam not in src:
        return None
    x = src[fam][rows]
    return windowed(x, k) if np.isfinite(x).any() else None


def _at(mask: np.ndarray, x: np.ndarray | None) -> float:
    if x is None:
        return float("nan")
    v = x[mask]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def analyze_job(fleet: Fleet, job: str, members: list[int], opts: Options,
                detail=None) -> tuple[list[Finding], dict]:
    """Findings for one job (members: indices into fleet.members) and its summary."""
    k = opts.window_steps
    ni = fleet.node_index()
    nodes = [fleet.members[m].node for m in members]
    rows = [ni[n] for n in nodes]
    M = len(members)
    W = k * fleet.step
    gpus = sum(fleet.members[m].gpus for m in members)
    g = {f: _w(fleet, f, members, k) for f in fleet.gpu}
    h = {f: _w(fleet, f, rows, k, host=True) for f in fleet.host}
    summary = {"job": job, "nodes": M, "gpus": gpus,
               "identity": fleet.members[members[0]].identity}
    with _quiet():
        for f, key in (("busy_avg", "busy"), ("act_max", "activity"), ("clock_min", "clock_hz")):
            if g.get(f) is not None:
                summary[key] = float(np.nanmedian(g[f]))
    if M < opts.group_min_nodes:
        summary["note"] = (f"{M} node(s): too few to compare (a robust median needs "
                           f"{opts.group_min_nodes})")
        return [], summary
    # The job's share of time in transfers, from its ports' utilisation (0 when unknown:
    # the gains below are then upper bounds).
    util = h.get("net_util")
    with _quiet():
        comm = np.clip(np.nan_to_num(np.nanmedian(util, axis=0)), 0, 0.9) if util is not None \
            else np.zeros(len(fleet.t))
    if util is not None:
        summary["transfer_share"] = float(np.nanmedian(comm))
    out: list[Finding] = []
    flags: dict[tuple[int, str], np.ndarray] = {}
    info: dict[tuple[int, str], dict] = {}

    act, clock, busy = g.get("act_max"), g.get("clock_min"), g.get("busy_min")
    pa = peers(act, ACT_FLOOR) if act is not None else None
    pc = peers(clock, CLOCK_FLOOR) if clock is not None else None
    pb = peers(busy, 0.0, BUSY_FLOOR) if busy is not None else None
    enough = None
    for p in (pa, pc, pb):
        if p is not None:
            enough = p.count >= opts.group_min_nodes if enough is None else \
                enough | (p.count >= opts.group_min_nodes)
    if enough is None:
        return [], summary

    # --- computes longer: throttled or a slower GPU --------------------------------------------
    if pa is not None:
        longer = (pa.rel >= ACT_GAP) & (pa.z >= Z) & enough
        if pc is not None:
            slow_clock = (pc.rel <= -CLOCK_CAUSE) & (pc.z <= -Z_CAUSE)
        else:
            slow_clock = np.zeros_like(longer)
        flags_thr = longer & slow_clock
        flags_slow = longer & ~slow_clock
        with np.errstate(all="ignore"):
            rho = act / pa.median
        loss = (1 - comm) * (1 - 1 / rho)
        for i in range(M):
            flags[(i, "throttled")] = flags_thr[i]
            flags[(i, "slow_gpu")] = flags_slow[i]
            info[(i, "throttled")] = info[(i, "slow_gpu")] = {
                "loss": loss[i], "basis": f"{fleet.activity} activity", "value": act[i],
                "peers": pa.median, "z": pa.z[i], "rel": pa.rel[i], "family": "act_max"}
    elif pc is not None:
        low = (pc.rel <= -CLOCK_GAP) & (pc.z <= -Z) & enough
        with np.errstate(all="ignore"):
            rho = pc.median / clock
        loss = (1 - comm) * (1 - 1 / rho)
        for i in range(M):
            flags[(i, "throttled")] = low[i]
            info[(i, "throttled")] = {"loss": loss[i], "basis": "SM clock", "value": clock[i],
                                      "peers": pc.median, "z": pc.z[i], "rel": pc.rel[i],
                                      "family": "clock_min"}

    # --- idles before the collective: starved input ---------------------------------------------
    if pb is not None:
        idles = (pb.median - busy >= BUSY_GAP) & (pb.z <= -Z) & enough
        cause = np.zeros_like(idles)
        why: dict[str, np.ndarray] = {}
        for fam, line, floor, label in (("disk_busy", DISK_BUSY, 0.05, "storage"),
                                        ("psi_io", PSI, 0.03, "storage"),
                                        ("cpu_busy", CPU_BUSY, 0.05, "cpu"),
                                        ("psi_cpu", PSI, 0.03, "cpu")):
            x = h.get(fam)
            if x is None:
                continue
            p = peers(x, 0.0, floor)
            hit = (x >= line) & (p.z >= Z_CAUSE)
            why[fam] = hit
            cause |= hit
        loss = pb.median - busy
        for i in range(M):
            flags[(i, "input_starved")] = idles[i] & cause[i]
            flags[(i, "straggler")] = idles[i] & ~cause[i]
            base = {"loss": loss[i], "basis": "busy share", "value": busy[i],
                    "peers": pb.median, "z": pb.z[i], "rel": pb.rel[i], "family": "busy_min",
                    "why": {f: m[i] for f, m in why.items()}}
            info[(i, "input_starved")] = info[(i, "straggler")] = base

    # --- a slow or lossy link ----------------------------------------------------------------
    rate, errs, rec, wait = (h.get(f) for f in ("net_rate", "net_errors", "net_recover",
                                                 "net_wait"))
    if rate is not None or errs is not None or rec is not None:
        degraded = np.zeros((M, len(fleet.t)), dtype=bool)
        pr = None
        if rate is not None:
            pr = peers(rate, RATE_FLOOR)
            degraded = (pr.rel <= -RATE_GAP) & (pr.z <= -Z) & (pr.count >= opts.group_min_nodes)
        lossy = np.zeros_like(degraded)
        if errs is not None:
            pe = peers(errs, 0.0, 0.01)
            lossy |= (errs >= ERRORS_PER_SECOND) & (pe.z >= Z)
        if rec is not None:
            with _quiet():
                peers_rec = np.nanmedian(rec, axis=0) * W
            lossy |= (rec * W >= 1.0) & (peers_rec < 0.5)
        pw = peers(wait, 0.25, 1.0) if wait is not None else None
        with np.errstate(all="ignore"):
            if rate is not None and util is not None:
                loss = util * np.clip(1 - rate / pr.median, 0, 1)
            else:
                loss = np.full(degraded.shape, np.nan)
        for i in range(M):
            flags[(i, "slow_link")] = degraded[i] | lossy[i]
            info[(i, "slow_link")] = {
                "loss": np.where(degraded[i], loss[i], np.nan), "basis": "link",
                "degraded": degraded[i], "lossy": lossy[i],
                "value": rate[i] if rate is not None else None,
                "peers": pr.median if pr is not None else None, "family": "net_rate",
                "wait_z": pw.z if pw is not None else None}

    # --- findings ----------------------------------------------------------------------------
    for (i, kind), mask in flags.items():
        if mask.sum() < opts.min_windows:
            continue
        out.append(_finding(fleet, job, members, i, kind, mask, info[(i, kind)], h, g, opts,
                            nodes, gpus, detail))
    out = _one_cause_per_node(out)
    return out, summary


def _one_cause_per_node(findings: list[Finding]) -> list[Finding]:
    """A node holds the job back for one reason at a time on the GPU side (it computes longer
    or it idles): keep the better-evidenced of the two; a link is independent of both."""
    best: dict[tuple[str, str], Finding] = {}
    rest = []
    for f in findings:
        if f.kind == "slow_link":
            rest.append(f)
            continue
        key = (f.subject["job"], f.subject["node"])
        cur = best.get(key)
        score = (f.evidence.get("windows", 0), f.stall_fraction)
        if cur is None or score > (cur.evidence.get("windows", 0), cur.stall_fraction):
            best[key] = f
    return list(best.values()) + rest


def _covered(mask: np.ndarray, k: int) -> np.ndarray:
    """Base steps inside any flagged window."""
    out = np.zeros(len(mask), dtype=bool)
    for i in np.flatnonzero(mask):
        out[max(i - k + 1, 0): i + 1] = True
    return out


def _finding(fleet: Fleet, job: str, members: list[int], i: int, kind: str, mask: np.ndarray,
             inf: dict, h: dict, g: dict, opts: Options, nodes: list[str], gpus: int,
             detail) -> Finding:
    k = opts.window_steps
    m = fleet.members[members[i]]
    node = m.node
    t = fleet.t
    first = int(np.flatnonzero(mask)[0])
    cov = _covered(mask, k)
    seconds = float(cov.sum() * fleet.step)
    t0, t1 = float(t[cov][0] - fleet.step), float(t[cov][-1])
    loss = _at(mask, inf.get("loss"))
    loss = float(np.clip(loss, 0, 0.95)) if loss == loss else float("nan")
    value, peer = _at(mask, inf.get("value")), _at(mask, inf.get("peers")) \
        if inf.get("peers") is not None else float("nan")
    if inf.get("peers") is not None and np.ndim(inf["peers"]) == 1:
        peer = _at(mask, inf["peers"])
    ev: dict = {"windows": int(mask.sum()), "first_seen": float(t[first]),
                "seconds": seconds, "peers": len(members) - 1, "job_gpus": gpus}
    if inf.get("z") is not None:
        ev["robust_z"] = _at(mask, inf["z"])
        ev["relative_gap"] = _at(mask, inf["rel"])
    conf = 0.8
    host_at = {f: _at(mask, x[i]) if x is not None else None for f, x in h.items()}
    gpu_at = {f: _at(mask, x[i]) if x is not None else None for f, x in g.items()}
    clock_max = fleet.clock_max.get(node)
    subject_gpus: list[str] = []
    advice: list[str] = []
    if kind in ("throttled", "slow_gpu"):
        basis = inf["basis"]
        ev.update({"activity": value, "peers_activity": peer, "basis": basis,
                   "clock_hz": gpu_at.get("clock_min"),
                   "clock_ratio_of_max": gpu_at.get("clock_min") / clock_max
                   if clock_max and gpu_at.get("clock_min") else None})
        if inf["family"] == "clock_min":
            ev = {**ev, "clock_hz": value, "peers_clock_hz": peer}
            ev.pop("activity")
            ev.pop("peers_activity")
            conf = 0.6
        pc = g.get("clock_min")
        if pc is not None:
            with _quiet():
                ev["peers_clock_hz"] = _at(mask, np.nanmedian(pc, axis=0))
        reasons = []
        power, temp, thr = gpu_at.get("power_max"), gpu_at.get("temp_max"), \
            gpu_at.get("throttle_max")
        if thr is not None and thr == thr and thr >= 0.2:
            reasons.append("clock-event reasons (power/thermal)")
        if power is not None and power == power and power >= POWER_AT_LIMIT:
            reasons.append(f"power at {power * 100:.0f}% of its limit")
        if temp is not None and temp == temp and temp >= HOT:
            reasons.append(f"die at {temp:.0f} C")
        ev.update({"power_ratio": power, "temperature_celsius": temp, "throttle_share": thr})
        if kind == "throttled":
            ratio = (ev.get("clock_hz") or np.nan) / (ev.get("peers_clock_hz") or np.nan)
            what = f"SM clocks {(1 - ratio) * 100:.0f}% under its peers'" if ratio == ratio \
                else "SM clocks under its peers'"
            summary = (f"{node} computes {value / peer:.2f}x as long as its peers at "
                       f"{what}" if inf["family"] == "act_max" else
                       f"{node} runs {what}") + (f" ({', '.join(reasons)})" if reasons else "")
            mechanism = "computes longer at lower clocks while its peers wait" \
                if inf["family"] == "act_max" else "clocks robustly under its peers'"
            if not reasons:
                conf = min(conf, 0.7)
            advice = [f"Check cooling, fans and inlet temperature of {node}, and its power "
                      "limits (nvidia-smi -q -d PERFORMANCE,POWER,TEMPERATURE).",
                      "Until it is fixed, drain it from the job's nodes: every step of the "
                      "job waits for it."]
            family = "clock_min"
        else:
            health = fleet.gpu_health.get(node) or {}
            summary = (f"{node} computes {value / peer:.2f}x as long as its peers at normal "
                       "clocks")
            if health:
                summary += " (" + ", ".join(f"{k} {v:g}" for k, v in health.items()) + ")"
                ev["gpu_health"] = health
            mechanism = "more compute time per step at normal clocks while its peers wait"
            advice = [f"Check {node}'s GPUs for remapped rows, ECC errors and XIDs "
                      "(nvidia-smi -q -d ROW_REMAPPER,ECC), the PCIe link width, and run "
                      "dcgmi diag -r 3 on it.",
                      "Until it is fixed, drain it from the job's nodes: every step of the "
                      "job waits for it."]
            family = "act_max"
        subject_gpus = _which_gpus(detail, node, "act_max" if inf["family"] == "act_max"
                                   else family, t0, t1, peer, higher=inf["family"] == "act_max")
        if kind == "throttled" and inf["family"] == "act_max" and detail is not None:
            slow = _which_gpus(detail, node, "clock_min", t0, t1,
                               ev.get("peers_clock_hz") or float("nan"), higher=False)
            subject_gpus = sorted(set(subject_gpus) | set(slow), key=lambda s: (len(s), s))
    elif kind in ("input_starved", "straggler"):
        ev.update({"busy": value, "peers_busy": peer})
        seen = [f for f, hit in (inf.get("why") or {}).items() if hit[mask].any()]
        storage = any(f in ("disk_busy", "psi_io") for f in seen)
        cpu = any(f in ("cpu_busy", "psi_cpu") for f in seen)
        for f in ("disk_busy", "psi_io", "cpu_busy", "psi_cpu"):
            if host_at.get(f) is not None:
                ev[f] = host_at[f]
                with _quiet():
                    ev["peers_" + f] = _at(mask, np.nanmedian(h[f], axis=0))
        if kind == "input_starved":
            what = " and ".join(x for x, y in (("storage", storage), ("CPU", cpu)) if y)
            ev["mechanism_detail"] = what
            summary = (f"{node}'s GPUs idle {(peer - value) * 100:.0f} points more than its "
                       f"peers' before each collective, its {what} saturated")
            mechanism = f"only its GPUs wait for input; its {what} saturated"
            advice = [f"`agentd diagnose --prometheus URL --node {node}` names the input "
                      "cause on that node (reads at the drive's ceiling, the loader's "
                      "workers saturated) and what to change.",
                      "Data-parallel jobs run at the slowest loader's pace: give that node "
                      "the same storage and CPUs as its peers, or stage its shard locally."]
        else:
            conf = 0.3
            summary = (f"{node}'s GPUs idle {(peer - value) * 100:.0f} points more than its "
                       "peers' before each collective; no saturated disk or CPU is seen")
            mechanism = "only its GPUs idle; the cause is not in these signals"
            daemon = node if ":" in node else f"{node}:9445"
            advice = [f"`agentd diagnose --daemon http://{daemon}` (10 Hz) or a profile "
                      "of that rank shows what it waits for: host-side work, a slow "
                      "network filesystem, a noisy neighbour."]
        subject_gpus = _which_gpus(detail, node, "busy_min", t0, t1, peer, higher=False)
    else:  # slow_link
        deg, lossy = inf["degraded"][mask].any(), inf["lossy"][mask].any()
        ev.update({"port_rate_bytes_per_second": host_at.get("net_rate"),
                   "peers_port_rate_bytes_per_second": peer,
                   "port_utilisation": host_at.get("net_util"),
                   "errors_per_second": host_at.get("net_errors"),
                   "recoveries_per_window": (host_at.get("net_recover") or 0.0) *
                   opts.window_steps * fleet.step if host_at.get("net_recover") is not None
                   else None})
        wz = inf.get("wait_z")
        if wz is not None:
            with _quiet():
                zz = np.nanmedian(np.where(mask[None, :], wz, np.nan), axis=1)
            neigh = [nodes[j] for j in np.argsort(-np.nan_to_num(zz)) if j != i and
                     zz[j] == zz[j] and zz[j] >= Z][:2]
            if neigh:
                ev["neighbours_waiting"] = neigh
        parts = []
        if deg:
            parts.append(f"its slowest port runs at {host_at['net_rate'] * 8 / 1e9:.0f} Gb/s "
                         f"where its peers' run at {peer * 8 / 1e9:.0f} Gb/s")
        if lossy:
            span = opts.window_steps * fleet.step  # a window under a minute: the demo's
            parts.append(f"its ports count {ev['errors_per_second'] or 0:.1f} link errors/s "
                         f"and {ev['recoveries_per_window'] or 0:.0f} link recoveries per "
                         + (f"{span / 60:.0f} min" if span >= 60 else f"{span:.0f} s"))
        if ev.get("neighbours_waiting"):
            parts.append(f"{', '.join(ev['neighbours_waiting'])} wait to send (transmit "
                         "wait)")
        summary = f"{node}'s link slows the job's collectives: " + "; ".join(parts)
        mechanism = ("port trained down" if deg else "") + (" and " if deg and lossy else "") + \
            ("link errors and recoveries" if lossy else "")
        conf = 0.8 if deg else 0.7
        advice = [f"Check {node}'s cables and transceivers (ibstat, ibdiagnet, mlxlink): a "
                  "port below its rate or counting symbol errors and link recoveries.",
                  "Every rank of a ring all-reduce waits for the slowest link: drain the node "
                  "or move the job until the link is fixed."]
    gain = gain_from_stall(float("nan"), loss if loss == loss else 0.0)
    gain.pop("busy_now", None)
    gain.pop("busy_after", None)
    if loss != loss:
        gain = {"step_time_change": None, "speedup": None,
                "note": "a lossy link's cost (retransmissions) is not in the counters"}
    lost_hours = (loss if loss == loss else 0.0) * gpus * seconds / 3600
    gain["job_gpu_hours_lost"] = lost_hours
    severity = severity_for(loss, conf) if loss == loss else \
        ("warning" if conf >= 0.5 else "info")
    if kind == "straggler":
        severity = "info"
    subject = {"node": node, "gpus": subject_gpus, "job": job, **m.identity}
    f = Finding(kind=kind, subject=subject, t0=t0, t1=t1, confidence=conf, severity=severity,
                summary=summary, mechanism=mechanism, evidence=ev, gain=gain, advice=advice,
                stall_fraction=loss if loss == loss else 0.0)
    return f


def _which_gpus(detail, node: str, family: str, t0: float, t1: float, peer: float,
                higher: bool) -> list[str]:
    """The node's GPUs that carry the deviation: past half-way from the peers' value to the
    most deviant GPU's."""
    if detail is None or peer != peer:
        return []
    vals = detail(node, family, t0, t1)
    if not vals:
        return []
    extreme = max(vals.values()) if higher else min(vals.values())
    mid = peer + 0.5 * (extreme - peer)
    out = [gpu for gpu, v in vals.items() if (v >= mid if higher else v <= mid)]
    return sorted(out, key=lambda s: (len(s), s))
