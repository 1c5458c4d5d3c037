"""A timeline read the way agentd's samplers read a real node, written as an agentd recording.

What each sampler sees (agentd/samplers/*.py, agentd/gpu/nvml.py), from the hardware's own
counters rather than from the timeline's exact values:
- gpu (0.1 s, its own thread): the driver's utilization buffer holds one integer percent per
  1/6 s period; each read takes the samples that arrived since the last one (none when the
  previous arrived less than 0.9 period ago), gpu.busy is their mean (held while none
  arrives), gpu.busy_time the kernel time they credit per second of tick, gpu.util_sample
  and gpu.util_sample_age their mean and the age of their periods' middle. PCIe bytes
  (cumulative, bytes) and NVLink (cumulative, KiB) are differenced per tick. GPM activity
  (Hopper only) is the mean over >= 0.195 s between two GPM samples. Every 10th tick: memory,
  SM clock, power (the driver's 1 s average), enforced limit, temperature, throttle reasons.
- cpu (0.1 s): /proc/stat jiffies (USER_HZ 100) per mode, differenced.
- storage (0.1 s): /proc/diskstats sectors, completed requests, ms reading/writing, io_ms
  (time with a request in flight) and weighted ms (Little's law), differenced.
- process (0.1 s): per tree, jiffies of the trainer (the root) and of the whole tree, members,
  members in D state (an instant); /proc/PID/io read_bytes and rchar on 1 s ticks.
- memory, pressure, network (1 s): MemAvailable, Cached, refaults; PSI totals (us);
  interface and RDMA port bytes.
"""

from __future__ import annotations

import numpy as np

from bench.robustness.hardware import pcie_link
from bench.robustness.pwc import Pwc
from bench.robustness.timeline import Timeline

FAST, SLOW = 0.1, 1.0
HZ = 100  # USER_HZ


def combine(fn, *parts: Pwc) -> Pwc:
    """fn of several functions' levels, on the union of their breakpoints."""
    b = np.unique(np.concatenate([p.b for p in parts]))
    mid = (b[:-1] + b[1:]) / 2
    return Pwc(b, fn(*[p.at(mid) for p in parts]))


def ticks(start: float, end: float, interval: float, rng: np.random.Generator) -> np.ndarray:
    """A sampler loop's wall-clock ticks: on the interval, a few ms late, now and then one
    skipped when a run overran."""
    n = int((end - start) / interval)
    t = start + np.arange(n) * interval + rng.gamma(2.0, 0.0015, n)
    overrun = rng.random(n) < 0.002
    t = t[~overrun]
    return np.maximum.accumulate(t)


def host_signals(tl: Timeline, rng: np.random.Generator) -> dict[str, Pwc]:
    """Node-wide quantities derived from the timeline's segments."""
    n = tl.node
    h = tl.host
    bg = n.background_cores
    user = h["cpu_user"].map(lambda v: v + bg * 0.7)
    read_total = None
    for d in tl.disks.values():
        read_total = d["read"] if read_total is None else combine(np.add, read_total, d["read"])
    system = combine(lambda s, r: s + bg * 0.3 + r / 12e9, h["cpu_system"], read_total)
    blocked = h["blocked"]
    iowait = combine(lambda b, u, s: np.minimum(b, np.maximum(n.cores - u - s, 0)) * 0.9,
                     blocked, user, system)
    psi_io = blocked.map(lambda v: (v >= 0.5).astype(float))
    busy = combine(np.add, user, system)
    psi_io_full = combine(lambda b, u: (b >= 0.5) * np.clip(1.0 - u, 0, 1), blocked, busy)
    f_cpu = getattr(tl, "f_cpu", 1.0)
    psi_cpu = h["decoding"].map(
        lambda v: np.where(v > 0, min(max(1 - 1 / f_cpu, 0.0), 1.0), 0.0) + 0.004)
    psi_mem = h["psi_mem"].map(lambda v: np.minimum(v, 1.0))
    return {"user": user, "system": system, "iowait": iowait, "busy": busy,
            "psi_io": psi_io, "psi_io_full": psi_io_full, "psi_cpu": psi_cpu,
            "psi_mem": psi_mem, "blocked": blocked, "refault": h["refault"]}


def disk_model(tl: Timeline, name: str) -> dict[str, Pwc]:
    """Queue depth, busy share and request latency of a drive from its served rates: the
    service time of one request at queue depth 1, inflated as the drive nears its ceiling
    (an M/M/1-like knee), queue by Little's law (capped by what the readers keep in flight),
    busy = P(at least one request in flight)."""
    d = tl.node.drive(name)
    m = tl.disks[name]
    req = m["request"]
    ceiling = d.read_ceiling(req)
    service = d.latency + req / d.seq_read
    blocked = tl.host["blocked"]

    def queue_fn(read, ops, wops, blk):
        rho = np.clip(read / ceiling, 0, 0.995)
        wait = service * (1 + rho ** 2 / (1 - rho))
        q = np.minimum(ops * wait, np.maximum(blk * 4, 1.0)) + wops * 0.0004
        return q

    queue = combine(queue_fn, m["read"], m["read_ops"], m["write_ops"], blocked)
    busy = queue.map(lambda q: 1 - np.exp(-q))
    return {"queue": queue, "busy": busy}


def gpu_rows(tl: Timeline, g: int, t: np.ndarray, rng: np.random.Generator,
             gpm: bool) -> dict[str, np.ndarray]:
    """The gpu sampler's window columns for one GPU at tick times t (NaN where absent)."""
    b = tl.node.board
    p = tl.gpu[g]
    n = len(t)
    lost_t = tl.lost.get(g, np.inf)
    out = {k: np.full(n, np.nan) for k in ("busy", "busy_time", "util_sample",
                                           "util_sample_age", "pcie_rx", "pcie_tx",
                                           "nvlink_rx", "nvlink_tx", "sm_active",
                                           "sm_occupancy", "tensor_active", "dram_active",
                                           "mem_used", "sm_clock", "sm_clock_max", "power",
                                           "power_limit", "temperature", "throttle",
                                           "pcie_capacity")}
    period = b.util_period
    phase = rng.uniform(0, period)
    tau = np.arange(tl.start - 5 + phase, tl.end + period, period)
    tau = tau + rng.normal(0, 20e-6, len(tau))
    util = np.round(100 * p["kernel"].mean(tau - period, tau))
    util = np.nan_to_num(util)
    visible = tau + 0.004  # the driver publishes a sample a few ms after its period ends
    # --- utilization: agentd's read of the sample buffer -------------------------------------
    last_ts = None
    last_seen = -np.inf
    last_busy = None
    offset = np.inf
    j = 0
    prev_tick = None
    for k, now in enumerate(t):
        if now >= lost_t:
            break
        tick = now - prev_tick if prev_tick is not None else None
        prev_tick = now
        busy_s = covered = 0.0
        newest = None
        if last_ts is None:
            # First read: the buffer's history predates us; start from its newest sample.
            while j < len(tau) and visible[j] <= now:
                j += 1
            if j:
                last_ts = tau[j - 1]
                last_seen = now
                last_busy = util[j - 1] / 100
            continue
        if now - last_seen >= 0.9 * period:
            fresh = []
            while j < len(tau) and visible[j] <= now:
                dt = tau[j] - last_ts
                busy_s += util[j] / 100 * min(dt, period * 1.5)
                covered += dt
                newest = util[j] / 100
                last_ts = tau[j]
                fresh.append(j)
                j += 1
            if newest is not None:
                last_seen = now
                # The driver's clock mapped onto ours by the smallest lag seen so far.
                offset = min(offset, now - tau[fresh[-1]])
                out["util_sample"][k] = float(np.mean(util[fresh])) / 100
                out["util_sample_age"][k] = now - (float(np.mean(tau[fresh])) + offset) + \
                    period / 2
        if covered > 0:
            last_busy = busy_s / covered
        elif now - last_seen > 2.0:
            last_busy = 0.0
        if last_busy is not None:
            out["busy"][k] = last_busy
        if tick:
            out["busy_time"][k] = busy_s / tick
    alive = t < lost_t
    # --- counters: PCIe bytes, NVLink KiB, differenced per tick --------------------------------
    for key, unit in (("pcie_rx", 1.0), ("pcie_tx", 1.0), ("nvlink_rx", 1024.0),
                      ("nvlink_tx", 1024.0)):
        cum = np.floor(p[key].integral(t) / unit) * unit
        rate = np.diff(cum) / np.diff(t)
        out[key][1:] = rate
        out[key][~alive] = np.nan
    # --- GPM (Hopper): means between samples >= 0.195 s apart ---------------------------------
    if gpm:
        prev = None
        for k, now in enumerate(t):
            if now >= lost_t:
                break
            if prev is not None and now - prev < 0.195:
                continue
            if prev is not None:
                sm = float(p["sm"].mean(prev, now))
                out["sm_active"][k] = sm
                out["sm_occupancy"][k] = min(sm * 0.55, 1.0)
                out["tensor_active"][k] = float(p["tensor"].mean(prev, now))
                out["dram_active"][k] = float(p["dram"].mean(prev, now))
            prev = now
    # --- slow ticks ------------------------------------------------------------------------------
    slow = np.zeros(n, dtype=bool)
    slow[::10] = True
    slow &= alive
    ts = t[slow]
    power = p["power"].mean(ts - 1.0, ts) * rng.normal(1, 0.008, len(ts))
    out["power"][slow] = np.round(power, 3)
    out["mem_used"][slow] = p["mem"].at(ts) + rng.normal(0, 2**20, len(ts)).round() * (
        p["mem"].at(ts) > 2**30)
    clock = p["clock"].at(ts)
    out["sm_clock"][slow] = np.round(clock / 15e6) * 15e6
    cap = tl.node.extras.get("power_cap", {}).get(g, b.power_limit_w)
    out["power_limit"][slow] = cap
    out["throttle"][slow] = p["throttle"].at(ts)
    out["sm_clock_max"][slow] = b.sm_clock_max_hz
    out["pcie_capacity"][slow] = pcie_link(b.pcie_generation, b.pcie_width)
    # Temperature: inlet + thermal resistance x power, smoothed over ~20 s.
    inlet = tl.node.extras.get("inlet_c", 28.0)
    theta = tl.node.extras.get("theta", {}).get(g, 0.058)
    sec = np.arange(tl.start - 120, tl.end + 1, 1.0)
    pw = p["power"].mean(sec - 1, sec)
    pw = np.nan_to_num(pw, nan=b.power_idle_w)
    sm_t = np.empty_like(pw)
    acc = pw[0]
    for i, x in enumerate(pw):
        acc += (x - acc) / 20.0
        sm_t[i] = acc
    temp = inlet + theta * np.interp(ts, sec, sm_t)
    out["temperature"][slow] = np.round(temp)
    return out


def sample_groups(tl: Timeline, rng: np.random.Generator, t0: float, t1: float,
                  gpm: bool | None = None) -> dict[str, dict]:
    """The window's rings (agentd.daemon.window format) over [t0, t1)."""
    node = tl.node
    gpm = node.board.pcie_generation >= 5 if gpm is None else gpm
    groups: dict[str, dict] = {}
    # --- gpu ---
    t = ticks(t0, t1, FAST, rng)
    cols: dict[str, np.ndarray] = {}
    for g in range(node.gpus):
        for key, v in gpu_rows(tl, g, t, rng, gpm).items():
            cols[f"gpu.{key}:{g}"] = v
    groups["gpu"] = _group(t, cols, FAST)
    # --- cpu ---
    hs = host_signals(tl, rng)
    t = ticks(t0, t1, FAST, rng)
    total = np.floor(node.cores * HZ * (t - t0 + 1000.0))
    cum = {m: np.floor(hs[m].integral(t) * HZ) for m in ("user", "system", "iowait")}
    dt_j = np.diff(total)
    scale = node.cores / np.where(dt_j > 0, dt_j, np.nan)
    cols = {}
    du, dsys, dio = (np.diff(cum[m]) for m in ("user", "system", "iowait"))
    cols["cpu.busy:"] = np.r_[np.nan, (du + dsys) * scale]
    cols["cpu.user:"] = np.r_[np.nan, du * scale]
    cols["cpu.system:"] = np.r_[np.nan, dsys * scale]
    cols["cpu.iowait:"] = np.r_[np.nan, dio * scale]
    cols["cpu.steal:"] = np.r_[np.nan, np.zeros(len(t) - 1)]
    # The busiest core: a trainer's main thread spinning in cudaStreamSynchronize or a
    # decoding worker keeps one at 100%; else the node's mean.
    busiest = hs["busy"].mean(t - FAST, t) / node.cores
    for p in tl.procs.values():
        busiest = np.maximum(busiest, np.minimum(p["cpu"].mean(t - FAST, t), 1.0))
    core_q = np.round(np.clip(busiest, 0, 1) * 10) / 10
    cols["cpu.max_core:"] = np.r_[np.nan, core_q[1:]]
    cols["cpu.count:"] = np.r_[np.nan, np.full(len(t) - 1, float(node.cores))]
    cols["cpu.procs_blocked:"] = np.r_[np.nan, np.round(hs["blocked"].at(t[1:])) +
                                       (rng.random(len(t) - 1) < 0.05)]
    groups["cpu"] = _group(t, cols, FAST)
    # --- storage ---
    t = ticks(t0, t1, FAST, rng)
    cols = {}
    dtt = np.diff(t)
    for name, m in tl.disks.items():
        dm = disk_model(tl, name)
        sectors = np.floor(m["read"].integral(t) / 512) * 512
        wsect = np.floor(m["write"].integral(t) / 512) * 512
        reads = np.floor(m["read_ops"].integral(t))
        writes = np.floor(m["write_ops"].integral(t))
        io_ms = np.floor(dm["busy"].integral(t) * 1000)
        wms = np.floor(dm["queue"].integral(t) * 1000)
        ops = np.diff(reads) + np.diff(writes)
        cols[f"disk.read:{name}"] = np.r_[np.nan, np.diff(sectors) / dtt]
        cols[f"disk.write:{name}"] = np.r_[np.nan, np.diff(wsect) / dtt]
        cols[f"disk.read_ops:{name}"] = np.r_[np.nan, np.diff(reads) / dtt]
        cols[f"disk.busy:{name}"] = np.r_[np.nan, np.minimum(np.diff(io_ms) / 1e3 / dtt, 1.0)]
        cols[f"disk.queue:{name}"] = np.r_[np.nan, np.diff(wms) / 1e3 / dtt]
        with np.errstate(invalid="ignore", divide="ignore"):
            aw = np.where(ops > 0, np.diff(wms) / 1e3 / ops, np.nan)
        cols[f"disk.await:{name}"] = np.r_[np.nan, aw]
    groups["storage"] = _group(t, cols, FAST)
    # --- process ---
    t = ticks(t0, t1, FAST, rng)
    cols = {}
    for pid, p in tl.procs.items():
        a, b = tl.proc_life[pid]
        # Found on the first slow tick after its GPU context shows; gone at exit.
        vis = (t >= a + 2.0) & (t < b)
        if not vis.any():
            continue
        first = np.flatnonzero(vis)[0]
        first += (10 - first % 10) % 10
        vis[:first + 1] = False  # the first read of a tree only sets its baseline
        # Jiffies counted per process: the trainer's and its workers' each whole.
        root_j = np.floor(p["root"].integral(t) * HZ)
        jiff = root_j + np.floor((p["cpu"].integral(t) - p["root"].integral(t)) * HZ)
        dtt = np.r_[np.nan, np.diff(t)]
        cpu = np.r_[np.nan, np.diff(jiff)] / HZ / dtt
        members = np.round(p["members"].at(t))
        root = np.r_[np.nan, np.diff(root_j)] / HZ / dtt
        col = {
            f"proc.cpu:{pid}": cpu,
            f"proc.root_cpu:{pid}": root,
            f"proc.max_member_cpu:{pid}": np.minimum(cpu, np.round(
                np.minimum(p["cpu"].mean(t - FAST, t), 1.0) * 10) / 10),
            f"proc.members:{pid}": members,
            f"proc.blocked:{pid}": np.round(p["blocked"].at(t)),
        }
        slow_idx = np.flatnonzero(vis & (np.arange(len(t)) % 10 == 0))
        rd = np.full(len(t), np.nan)
        rc = np.full(len(t), np.nan)
        for a_i, b_i in zip(slow_idx[:-1], slow_idx[1:]):
            span = t[b_i] - t[a_i]
            rd[b_i] = np.floor(p["read"].between(t[a_i], t[b_i]) / 4096) * 4096 / span
            rc[b_i] = p["rchar"].between(t[a_i], t[b_i]) / span
        col[f"proc.read:{pid}"] = rd
        col[f"proc.rchar:{pid}"] = rc
        for k, v in col.items():
            v = np.array(v, dtype=float)
            v[~vis] = np.nan
            cols[k] = v
    groups["process"] = _group(t, cols, FAST)
    # --- memory, pressure, network (1 s) ---
    t = ticks(t0, t1, SLOW, rng)
    mem = node_memory(tl, t)
    refaults = np.floor(hs["refault"].integral(t))
    groups["memory"] = _group(t, {
        "mem.available:": mem["available"], "mem.cached:": mem["cached"],
        "mem.refault:": np.r_[np.nan, np.diff(refaults) / np.diff(t)]}, SLOW)
    t = ticks(t0, t1, SLOW, rng)
    cols = {}
    for key, sig in (("psi.cpu:", "psi_cpu"), ("psi.io:", "psi_io"),
                     ("psi.io_full:", "psi_io_full"), ("psi.memory:", "psi_mem")):
        us = np.floor(hs[sig].integral(t) * 1e6)
        cols[key] = np.r_[np.nan, np.clip(np.diff(us) / 1e6 / np.diff(t), 0, 1)]
    groups["pressure"] = _group(t, cols, SLOW)
    t = ticks(t0, t1, SLOW, rng)
    cols = {}
    eth = Pwc.constant(tl.start, tl.end, 2.5e5)
    for key, p in ((f"net.rx:{node.netdev}", eth), (f"net.tx:{node.netdev}", eth)):
        cols[key] = np.r_[np.nan, np.diff(np.floor(p.integral(t))) / np.diff(t)]
    for nic, p in tl.net.items():
        for d in ("rx", "tx"):
            # port_rcv_data / port_xmit_data count 4-byte words.
            cum = np.floor(p[d].integral(t) / 4) * 4
            cols[f"rdma.{d}:{nic}/1"] = np.r_[np.nan, np.diff(cum) / np.diff(t)]
    groups["network"] = _group(t, cols, SLOW)
    return groups


def node_memory(tl: Timeline, t: np.ndarray) -> dict[str, np.ndarray]:
    """MemAvailable and Cached: the jobs' anonymous memory, the page cache holding what the
    loaders read (up to what is left), the kernel's reserve."""
    n = tl.node
    anon = np.full(len(t), 8e9)
    for pid, (a, b) in tl.proc_life.items():
        anon += ((t >= a) & (t < b)) * n.extras.get("rss_per_rank", 24e9)
    anon += n.extras.get("anon_extra", 0.0)
    cache_cap = np.maximum(n.memory_total - anon - 4e9, 1e9)
    cached = np.minimum(n.extras.get("dataset_cached", 200e9), cache_cap)
    # The page cache is reclaimable: it counts as available.
    available = np.minimum(n.memory_total - anon - 2e9, n.memory_total - 8e9)
    return {"available": np.maximum(available, 0.5e9), "cached": cached}


def _group(t: np.ndarray, cols: dict[str, np.ndarray], interval: float) -> dict:
    names = list(cols)
    values = np.column_stack([np.asarray(cols[c], dtype=np.float32) for c in names]) \
        if names else np.zeros((len(t), 0), np.float32)
    return {"interval": interval, "t": np.asarray(t, dtype=float), "columns": names,
            "values": values}


def meta(tl: Timeline, ceilings: dict | None = None) -> dict:
    node = tl.node
    out = {
        "node": node.host,
        "fast_interval": FAST,
        "gpus": {str(i): {"uuid": node.uuids[i], "name": node.board.name,
                          "pci_bus_id": node.gpu_bus_ids[i], "lost": i in tl.lost}
                 for i in range(node.gpus)},
        "processes": {},
        # Whole block devices (the storage sampler) joined with their PCIe link (topology):
        # NVMe data-centre drives on PCIe 4.0 x4.
        "disks": {d.name: {"model": str(d.model), "rotational": "0", "pci_address": d.pci_address,
                           "link_bytes_per_second": pcie_link(4, 4)} for d in node.drives},
        "shared_uplinks": [
            {"switch": s.address, "uplink_bytes_per_second": s.uplink, "gpus": list(s.gpus),
             "disks": list(s.drives)} for s in node.switches if s.drives and s.gpus],
    }
    for j in tl.jobs:
        for i, r in enumerate(j.gpus):
            pid = j.pid + 37 * i
            a, b = tl.proc_life[pid]
            if b <= tl.start or a >= tl.end:
                continue
            out["processes"][str(pid)] = {
                "gpus": [r], "comm": j.comm,
                "systemd_unit": j.attribution.get("systemd_unit", ""),
                "container_id": j.attribution.get("container_id", ""),
                "pod_uid": j.attribution.get("pod_uid", ""),
                "slurm_job_id": j.attribution.get("slurm_job_id", "")}
    if ceilings:
        out["ceilings"] = ceilings
    return out


def ceilings_for(tl: Timeline) -> dict:
    """What `agentd probe` would have measured on this node (meta["ceilings"])."""
    node = tl.node
    b = node.board
    req = {name: m["request"] for name, m in tl.disks.items()}
    return {
        "version": 1,
        "storage": {d.name: {"source": "measured", "seq_read_bytes_per_second": d.seq_read,
                             "rand_read_bytes_per_second": d.read_ceiling(req[d.name]),
                             "rand_read_iops": d.rand_read_iops} for d in node.drives},
        "h2d": {str(i): {"source": "measured", "pinned_bytes_per_second": b.pinned_h2d,
                         "pageable_bytes_per_second": b.pageable_h2d,
                         "link_bytes_per_second": pcie_link(b.pcie_generation, b.pcie_width)}
                for i in range(node.gpus)},
        "cpu": {"source": "measured", "cores": float(node.cores)},
    }


def drop(groups: dict[str, dict], meta_: dict, variant: str) -> tuple[dict, dict]:
    """A recording with some signals removed, as on nodes where a source is missing."""
    prefixes = {"no_sm": ("gpu.sm_active:", "gpu.sm_occupancy:", "gpu.tensor_active:",
                          "gpu.dram_active:"),
                "no_pcie": ("gpu.pcie_rx:", "gpu.pcie_tx:")}.get(variant, ())
    out = {}
    for name, g in groups.items():
        if variant == "no_proc" and name == "process":
            continue
        keep = [i for i, c in enumerate(g["columns"]) if not c.startswith(prefixes)]
        out[name] = {**g, "columns": [g["columns"][i] for i in keep],
                     "values": g["values"][:, keep]}
    m = dict(meta_)
    if variant == "no_proc":
        m["processes"] = {}
    return out, m


def write_recording(path: str, groups: dict[str, dict], meta_: dict,
                    chunk_seconds: float = 60.0) -> None:
    """The stream `agentd record` writes: the magic line, then length-prefixed npz chunks."""
    from agentd.daemon.window import groups_to_npz
    from agentd.diagnose.sources.recording import MAGIC, chunk

    t_min = min(float(g["t"][0]) for g in groups.values() if len(g["t"]))
    t_max = max(float(g["t"][-1]) for g in groups.values() if len(g["t"]))
    with open(path, "wb") as f:
        f.write(MAGIC)
        a = t_min
        while a <= t_max:
            b = a + chunk_seconds
            part = {}
            for name, g in groups.items():
                keep = (g["t"] >= a) & (g["t"] < b)
                if keep.any():
                    part[name] = {**g, "t": g["t"][keep], "values": g["values"][keep]}
            if part:
                f.write(chunk(groups_to_npz(part, meta_)))
            a = b
