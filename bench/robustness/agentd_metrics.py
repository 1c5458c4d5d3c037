"""A timeline as agentd's own /metrics would have exposed it, scraped by Prometheus at 1-30 s.

The daemon's counters integrate what its samplers read each tick (agentd/samplers/*.py: the
busy time the driver's utilization samples credit, PCIe bytes, GPM activity times the span it
covers, jiffies, diskstats, PSI microseconds, per-job process CPU and reads); its gauges are
the latest reading. So the series here are built from the same 10 Hz sampler model as the
recordings (`sampling.sample_groups`, drawn with their own random stream), integrated the
way the daemon integrates them, and read at each scrape as the daemon would serve them: the
counters as of the sampler's last tick before the scrape, the gauges at their last reading.

What is exported follows the catalog (agentd/catalog.py) and what `agentd diagnose
--prometheus` reads (agentd/diagnose/sources/prometheus_agentd.py): GPU busy, GPM activity,
PCIe and NVLink bytes, memory, clocks, power, limit, temperature, clock-event seconds per
reason; CPU seconds per mode and online CPUs; PSI; disks; network; memory; per-job process
trees (agentd/jobs.py labels, counters including ended trees) and, per GPU and job, the
trees' CPU and members; GPU and disk identities, the
PCIe switches GPUs share with drives, lost GPUs, and the ceilings `agentd probe` measured
where the case has them.

The daemon also serves its rolling analysis (agentd/daemon/rolling.py): every 10 s it looks
at the last 60 s of its 10 Hz window and, as its Schedule decides (a GPU's busy share, SM
activity, clock or power moved, a warning held, 30 s since the last run), analyses it
(agentd.analysis.core.analyze_rolling, run here on the same sampler model the counters
integrate) or keeps the last report; exported as agentd_finding_* and agentd_gpu_stall_ratio
by the daemon's own finding_series() while the
report is current (three intervals). `rolling_looks` replays those looks (the suite's own
rolling score uses it too); `daemon_reports` keeps them once per case; `agentd_series`
serves them at each scrape.
"""

from __future__ import annotations

import numpy as np

from bench.robustness.exporters import OpenMetrics, _offset, scrape_times
from bench.robustness.timeline import Timeline

# window signal -> (metric, label key); label key "gpu", "device" or "" (node-wide)
GPU_COUNTERS = {
    "busy_time": "agentd_gpu_busy_seconds_total",
    "sm_active": "agentd_gpu_sm_active_seconds_total",
    "sm_occupancy": "agentd_gpu_sm_occupancy_seconds_total",
    "tensor_active": "agentd_gpu_tensor_active_seconds_total",
    "dram_active": "agentd_gpu_dram_active_seconds_total",
    "pcie_rx": "agentd_gpu_pcie_rx_bytes_total",
    "pcie_tx": "agentd_gpu_pcie_tx_bytes_total",
    "nvlink_rx": "agentd_gpu_nvlink_rx_bytes_total",
    "nvlink_tx": "agentd_gpu_nvlink_tx_bytes_total",
}
GPU_GAUGES = {
    "mem_used": "agentd_gpu_memory_used_bytes",
    "sm_clock": "agentd_gpu_sm_clock_hertz",
    "sm_clock_max": "agentd_gpu_sm_clock_max_hertz",
    "power": "agentd_gpu_power_watts",
    "power_limit": "agentd_gpu_power_limit_watts",
    "temperature": "agentd_gpu_temperature_celsius",
    "pcie_capacity": "agentd_gpu_pcie_link_capacity_bytes_per_second",
}
DISK_COUNTERS = {
    "read": "agentd_disk_read_bytes_total",
    "write": "agentd_disk_written_bytes_total",
    "read_ops": "agentd_disk_reads_completed_total",
    "busy": "agentd_disk_io_time_seconds_total",
    "queue": "agentd_disk_io_time_weighted_seconds_total",
}
PROC_COUNTERS = {
    "cpu": "agentd_process_cpu_seconds_total",
    "root_cpu": "agentd_process_root_cpu_seconds_total",
    "read": "agentd_process_read_bytes_total",
    "rchar": "agentd_process_read_chars_total",
}
PSI = {"psi.cpu:": ("cpu", "some"), "psi.io:": ("io", "some"), "psi.io_full:": ("io", "full"),
       "psi.memory:": ("memory", "some")}


def integrate(t: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """A counter at each tick from a per-tick rate column: each finite value times the span
    since the column's previous finite value (a tick, or the GPM/slow interval it covers)."""
    ok = np.isfinite(rate)
    inc = np.zeros(len(t))
    idx = np.flatnonzero(ok)
    if len(idx) > 1:
        inc[idx[1:]] = rate[idx[1:]] * np.diff(t[idx])
    return np.cumsum(inc)


def at_scrapes(t: np.ndarray, values: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """What a scrape at each of `ts` serves: the value as of the last tick before it."""
    i = np.searchsorted(t, ts, side="right") - 1
    out = np.full(len(ts), np.nan)
    ok = i >= 0
    out[ok] = values[i[ok]]
    return out


def held(values: np.ndarray) -> np.ndarray:
    """A gauge between its readings: the last finite value carried forward."""
    ok = np.isfinite(values)
    idx = np.where(ok, np.arange(len(values)), -1)
    idx = np.maximum.accumulate(idx)
    out = np.full(len(values), np.nan)
    out[idx >= 0] = values[idx[idx >= 0]]
    return out


ANALYSIS_EVERY = 10.0  # the daemon's defaults: agentd/daemon/config.py analysis_interval ...
ANALYSIS_MAX_EVERY = 30.0  # ... analysis_max_interval ...
ANALYSIS_WINDOW = 60.0  # ... and analysis_window
ANALYSIS_FIRST = 30.0  # its first run waits for half a window (rolling.py _loop)


def rolling_looks(sig, start: float, end: float, every: float = ANALYSIS_EVERY,
                  window: float = ANALYSIS_WINDOW, max_every: float = ANALYSIS_MAX_EVERY,
                  first: float | None = None):
    """The daemon's looks at its window (rolling.RollingAnalysis.look) over Signals `sig`,
    as `agentd run` started at `start` makes them: yields (time, Report, ran) for each look
    up to `end`, the report being the one in force after it (the last run's, when the look
    skipped; None before any run). The daemon's own Schedule and levels decide."""
    from agentd.analysis.core import analyze_rolling
    from agentd.daemon.rolling import LEVELS, Schedule, levels

    sched = Schedule(every, max_every)
    report = None
    keys = [(signal, g) for signal in LEVELS for g in sig.subjects(signal)]
    t = start + (min(window / 2, ANALYSIS_FIRST) if first is None else first)
    while t <= end:
        part = sig.slice(t - window, t)
        seen = levels({k: (part.t, v) for k in keys if (v := part.get(*k)) is not None},
                      t - every)
        quiet = None if report is None else \
            {"findings": [{"severity": f.severity} for f in report.findings]}
        ran = False
        if sched.due(t, seen, quiet):
            sched.begin()
            report = None
            if len(part.t) >= 10:  # rolling.MIN_ROWS
                report = analyze_rolling(part, node=sig.node)
                sched.ran(t, seen)
                ran = True
        yield t, report, ran
        t += every


def daemon_reports(groups: dict[str, dict], meta: dict, start: float, end: float,
                   every: float = ANALYSIS_EVERY, window: float = ANALYSIS_WINDOW
                   ) -> list[tuple[float, dict, bool]]:
    """The daemon's rolling analysis over the sampler model's window, as `agentd run` started
    at `start` runs it: (time of the look, Report.to_json() in force, whether it ran) for
    each look up to `end` that has a report."""
    from agentd.analysis.signals import from_groups

    node = meta.get("node", "")
    sig = from_groups(groups, step=0.1, source="window", node=node, meta=meta)
    out = []
    last = doc = None
    for t, report, ran in rolling_looks(sig, start, end, every, window):
        if report is None:
            continue
        if report is not last:
            last, doc = report, report.to_json()
        out.append((t, doc, ran))
    return out


def _analysis_series(reports: list[tuple[float, dict, bool]], meta: dict, ts: np.ndarray,
                     every: float, om: OpenMetrics, base: str) -> None:
    """What each scrape serves of the rolling analysis: the latest report while current (no
    older than three intervals, rolling.STALE_RUNS), through the daemon's finding_series."""
    from agentd.daemon.rolling import STALE_RUNS, finding_series

    if not reports:
        return
    uuids = {g: info["uuid"] for g, info in meta["gpus"].items()}
    runs = np.array([t for t, _, _ in reports])
    served: dict[tuple[str, str], np.ndarray] = {}
    cache: dict[int, list] = {}  # by report: the looks that skipped the run share theirs
    for k, at in enumerate(ts):
        i = int(np.searchsorted(runs, at, side="right")) - 1
        if i < 0 or at - runs[i] > STALE_RUNS * every:
            continue
        r = reports[i][1]
        rows = cache.get(id(r))
        if rows is None:
            rows = finding_series(r["findings"], uuids)
            for g in r["gpus"]:
                if isinstance(g.get("stall"), (int, float)):
                    gid = str(g.get("gpu"))
                    rows.append(("agentd_gpu_stall_ratio", (gid, uuids.get(gid, "")),
                                 float(g["stall"])))
            cache[id(r)] = rows
        for name, values, v in rows:
            keys = {"agentd_finding_active": ("kind", "severity", "gpu", "uuid"),
                    "agentd_gpu_stall_ratio": ("gpu", "uuid")}.get(name, ("kind", "gpu", "uuid"))
            lab = _labels(dict(zip(keys, values)))
            served.setdefault((name, (lab + "," if lab else "") + base),
                              np.full(len(ts), np.nan))[k] = v
    for (name, labels), v in served.items():
        om.add(name, "gauge", name, labels, ts, v)
    ran = np.cumsum([r for _, _, r in reports]).astype(float)
    at = np.searchsorted(runs, ts, side="right") - 1
    om.add("agentd_analysis_runs_total", "counter", "runs", base, ts,
           np.where(at >= 0, ran[np.maximum(at, 0)], 0.0))


def _labels(d: dict) -> str:
    return ",".join(f'{k}="{v}"' for k, v in d.items() if v != "")


def agentd_series(tl: Timeline, groups: dict[str, dict], meta: dict, a: float, b: float,
                  every: float, rng: np.random.Generator, om: OpenMetrics, host: str,
                  reports: list[tuple[float, dict]] | None = None) -> None:
    """Append one node's agentd /metrics samples over [a, b] to `om`; `groups` and `meta`
    are the sampler model's window (sampling.sample_groups) and recording meta over it;
    `reports` the rolling analysis' runs (daemon_reports; None: no agentd_finding_* served,
    as from a daemon whose analysis process keeps failing)."""
    from agentd.gpu.backend import CLOCK_EVENT_REASONS
    from agentd.jobs import JOB_LABELS, Attribution, job_labels
    from agentd.probe.state import series as ceiling_series

    node = tl.node
    base = f'instance="{host}:9101",job="agentd"'
    ts = scrape_times(a, b, every, rng)

    def col(group: str, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        g = groups.get(group)
        if g is None or name not in g["columns"]:
            return None
        return g["t"], np.asarray(g["values"][:, g["columns"].index(name)], dtype=float)

    def counter(metric: str, labels: str, t: np.ndarray, cum: np.ndarray, until: float,
                offset_key: str) -> None:
        v = at_scrapes(t, cum, ts) + _offset(host + offset_key)
        keep = ts < until
        om.add(metric, "counter", metric, labels, ts[keep], v[keep])

    def gauge(metric: str, labels: str, t: np.ndarray, v: np.ndarray, until: float) -> None:
        s = at_scrapes(t, held(v), ts)
        keep = ts < until
        om.add(metric, "gauge", metric, labels, ts[keep], s[keep])

    # --- GPUs ---
    for g in range(node.gpus):
        info = meta["gpus"][str(g)]
        gl = _labels({"gpu": str(g), "uuid": info["uuid"]})
        lost = tl.lost.get(g, np.inf)
        om.add("agentd_gpu_info", "gauge", "agentd_gpu_info",
               _labels({"gpu": str(g), "uuid": info["uuid"], "name": info["name"],
                        "pci_bus_id": info["pci_bus_id"], "utilization_source": "samples",
                        "UUID": info["uuid"], "device": f"nvidia{g}", "hostname": node.host})
               + "," + base, ts, np.ones(len(ts)))
        om.add("agentd_gpu_lost", "gauge", "agentd_gpu_lost", gl + "," + base, ts,
               (ts >= lost).astype(float))
        for key, metric in GPU_COUNTERS.items():
            c = col("gpu", f"gpu.{key}:{g}")
            if c is not None and np.isfinite(c[1]).any():
                counter(metric, gl + "," + base, c[0], integrate(*c), lost, f"{metric}{g}")
        for key, metric in GPU_GAUGES.items():
            c = col("gpu", f"gpu.{key}:{g}")
            if c is not None and np.isfinite(c[1]).any():
                gauge(metric, gl + "," + base, c[0], c[1], lost)
        c = col("gpu", f"gpu.throttle:{g}")
        if c is not None:
            t, bits = c
            for i, reason in enumerate(CLOCK_EVENT_REASONS):
                active = np.where(np.isfinite(bits), (np.nan_to_num(bits).astype(np.int64)
                                                      >> i) & 1, np.nan)
                counter("agentd_gpu_clock_event_seconds_total",
                        f'{gl},reason="{reason}",{base}', t, integrate(t, active), lost,
                        f"clk{g}{reason}")
    # --- jobs: process trees summed per job, counters keeping ended trees ---
    procs = meta.get("processes", {})
    jobs: dict[tuple, list[str]] = {}
    for pid, p in procs.items():
        a_ = Attribution(systemd_unit=p.get("systemd_unit", ""),
                         container_id=p.get("container_id", ""), pod_uid=p.get("pod_uid", ""),
                         slurm_job_id=p.get("slurm_job_id", ""))
        # Each pod its own name (the daemon reads them from the kubelet's log links).
        k8s = ("training", f"trainer-{a_.pod_uid[:8]}-0", "pytorch") if a_.pod_uid else None
        jobs.setdefault(job_labels(a_, p.get("comm", ""), k8s), []).append(pid)
    pg = groups.get("process")

    def summed(key: str, pids: list[str]) -> np.ndarray:
        """A counter of the trees' `proc.KEY` together (ended trees keep what they counted)."""
        total = np.zeros(len(pg["t"]))
        for pid in pids:
            c = col("process", f"proc.{key}:{pid}")
            if c is not None:
                total += integrate(*c)
        return total

    def live_gauge(metric: str, labels: str, v: np.ndarray, live: np.ndarray) -> None:
        """A gauge served only while one of its trees lives (the daemon drops it after)."""
        s_ = at_scrapes(pg["t"], np.where(live, v, np.nan), ts)
        ok = np.isfinite(s_)
        om.add(metric, "gauge", metric, labels, ts[ok], s_[ok])

    def members_of(pids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(trees alive, their members, their blocked members) per process tick."""
        alive, members, blocked = (np.zeros(len(pg["t"])) for _ in range(3))
        for pid in pids:
            c = col("process", f"proc.members:{pid}")
            if c is None:
                continue
            alive += np.isfinite(c[1])
            members += np.nan_to_num(c[1])
            cb = col("process", f"proc.blocked:{pid}")
            if cb is not None:
                blocked += np.nan_to_num(cb[1])
        return alive, members, blocked

    for job, pids in jobs.items():
        jl = _labels(dict(zip(JOB_LABELS, job))) + "," + base
        if pg is None:
            continue
        t = pg["t"]
        for key, metric in PROC_COUNTERS.items():
            counter(metric, jl, t, summed(key, pids), np.inf, metric + jl)
        alive, members, blocked = members_of(pids)
        for metric, v in (("agentd_process_trees", alive), ("agentd_process_members", members),
                          ("agentd_process_blocked", blocked)):
            live_gauge(metric, jl, v, alive > 0)
        # Per GPU and job: the CPU and members of the job's trees there (under each tree's
        # first GPU), counters keeping ended trees, members while one lives.
        on_gpu: dict[int, list[str]] = {}
        for pid in pids:
            if procs[pid].get("gpus"):
                on_gpu.setdefault(min(procs[pid]["gpus"]), []).append(pid)
        for gpu, gpids in sorted(on_gpu.items()):
            lab = _labels({"gpu": str(gpu), "uuid": meta["gpus"][str(gpu)]["uuid"]}) + "," + jl
            for key, metric in (("cpu", "agentd_gpu_process_cpu_seconds_total"),
                                ("root_cpu", "agentd_gpu_process_root_cpu_seconds_total")):
                counter(metric, lab, t, summed(key, gpids), np.inf, metric + lab)
            alive, members, _ = members_of(gpids)
            live_gauge("agentd_gpu_process_members", lab, members, alive > 0)
        # Device memory the job holds, per GPU, while one of its trees on that GPU lives
        # (one series per job and GPU, whichever of the job's processes holds it).
        live_on: dict[int, np.ndarray] = {}
        for pid in pids:
            c = col("process", f"proc.members:{pid}")
            if c is None:
                continue
            live = at_scrapes(c[0], np.isfinite(c[1]).astype(float), ts) > 0
            for gpu in procs[pid].get("gpus", []):
                live_on[gpu] = live_on.get(gpu, np.zeros(len(ts), bool)) | live
        for gpu, live in sorted(live_on.items()):
            m = col("gpu", f"gpu.mem_used:{gpu}")
            if m is None:
                continue
            mem = at_scrapes(m[0], held(m[1]), ts)
            keep = live & np.isfinite(mem) & (ts < tl.lost.get(gpu, np.inf))
            om.add("agentd_gpu_process_memory_used_bytes", "gauge", "memory",
                   _labels({"gpu": str(gpu), "uuid": meta["gpus"][str(gpu)]["uuid"]}) +
                   "," + jl, ts[keep], mem[keep])
    # --- host ---
    for name in tl.disks:
        d = meta["disks"].get(name, {})
        om.add("agentd_disk_info", "gauge", "agentd_disk_info",
               _labels({"device": name, "model": d.get("model", ""), "rotational": "0",
                        "pci_address": d.get("pci_address", "")}) + "," + base,
               ts, np.ones(len(ts)))
        for key, metric in DISK_COUNTERS.items():
            c = col("storage", f"disk.{key}:{name}")
            if c is not None:
                counter(metric, f'device="{name}",{base}', c[0], integrate(*c), np.inf,
                        metric + name)
    c = col("cpu", "cpu.count:")
    if c is not None:
        t, count = c
        gauge("agentd_cpu_online", base, t, count, np.inf)
        parts = {}
        for mode in ("user", "system", "iowait"):
            cm = col("cpu", f"cpu.{mode}:")
            if cm is not None:
                parts[mode] = integrate(*cm)
        parts["idle"] = integrate(t, count) - sum(parts.values())
        for mode, cum in parts.items():
            counter("agentd_cpu_seconds_total", f'mode="{mode}",{base}', t, cum, np.inf,
                    "cpu" + mode)
    c = col("cpu", "cpu.procs_blocked:")
    if c is not None:
        gauge("agentd_cpu_procs_blocked", base, c[0], c[1], np.inf)
    for key, (res, kind) in PSI.items():
        c = col("pressure", key)
        if c is not None:
            counter("agentd_pressure_waiting_seconds_total",
                    f'resource="{res}",kind="{kind}",{base}', c[0], integrate(*c), np.inf,
                    "psi" + key)
    for key, metric, kind in (("mem.available:", "agentd_memory_available_bytes", "gauge"),
                              ("mem.cached:", "agentd_memory_cached_bytes", "gauge"),
                              ("mem.refault:", "agentd_memory_file_refaults_total", "counter")):
        c = col("memory", key)
        if c is None:
            continue
        if kind == "gauge":
            gauge(metric, base, c[0], c[1], np.inf)
        else:
            counter(metric, base, c[0], integrate(*c), np.inf, metric)
    net = groups.get("network")
    if net is not None:
        for name in net["columns"]:
            kind, dev = name.split(":", 1)
            nic, _, port = dev.partition("/")
            metric, labels = {
                "net.rx": ("agentd_network_receive_bytes_total", f'device="{dev}"'),
                "net.tx": ("agentd_network_transmit_bytes_total", f'device="{dev}"'),
                "rdma.rx": ("agentd_rdma_receive_bytes_total", f'device="{nic}",port="{port}"'),
                "rdma.tx": ("agentd_rdma_transmit_bytes_total", f'device="{nic}",port="{port}"'),
            }.get(kind, (None, None))
            if metric is not None:
                c = col("network", name)
                counter(metric, f"{labels},{base}", c[0], integrate(*c), np.inf, metric + dev)
    # --- topology: GPUs and drives behind one PCIe switch ---
    for s in meta.get("shared_uplinks", []):
        om.add("agentd_pcie_uplink_capacity_bytes_per_second", "gauge", "uplink",
               f'switch="{s["switch"]}",{base}', ts,
               np.full(len(ts), float(s["uplink_bytes_per_second"])))
        for gpu in s["gpus"]:
            bus = meta["gpus"][str(gpu)]["pci_bus_id"].lower()[-12:]
            for disk in s["disks"]:
                nvme = meta["disks"].get(disk, {}).get("pci_address", "")
                om.add("agentd_pcie_shared_uplink", "gauge", "shared",
                       _labels({"gpu_address": bus, "nvme_address": nvme,
                                "switch": s["switch"]}) + "," + base, ts, np.ones(len(ts)))
    # --- ceilings `agentd probe` measured ---
    if meta.get("ceilings"):
        from agentd.catalog import METRICS

        names = {m.name: m.labels for m in METRICS}
        doc = {**meta["ceilings"], "measured_at": a - 86400.0}
        for metric, values, v in ceiling_series(doc):
            lab = _labels(dict(zip(names[metric], values)))
            om.add(metric, "gauge", metric, (lab + "," if lab else "") + base, ts,
                   np.full(len(ts), v))
    # --- the rolling analysis ---
    if reports:
        _analysis_series(reports, meta, ts, ANALYSIS_EVERY, om, base)
