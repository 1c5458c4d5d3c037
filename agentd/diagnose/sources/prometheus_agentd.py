"""agentd's own metrics in a Prometheus server, mapped back into its signals.

Counters become rates (irate over the last scrape interval at the default step, so the mean
over the range is exact); gauges are averaged over each step. Identities (GPU models, jobs,
shared PCIe uplinks) come from the info series at the range end.

/metrics carries process trees summed per job (agentd/jobs.py), not per pid: each job becomes
one "tree" of the analysis (subject "label=value,..."), its CPU, reads and members divided by
its number of trees (the mean tree: a data-parallel job runs one alike tree per GPU), on the
GPUs where the job holds memory. Where the daemon also exports the job's trees per GPU (CPU,
the trainers' CPU, members), each of those GPUs gets its tree of its own ("JOB,gpu=N").

The daemon's rolling analysis (agentd_finding_*, analysed at 10 Hz) becomes the daemon.finding*
signals (agentd/analysis/daemon_view.py): what it said at each step, and where it served no
current report (no agentd_gpu_stall_ratio then), that it said nothing.
"""

from __future__ import annotations

import numpy as np

from agentd.analysis.signals import Signals
from agentd.jobs import JOB_LABELS
from agentd.diagnose.sources import SourceError
from agentd.diagnose.sources.promclient import (Grid, NodeSelector, PromClient, PrometheusSource,
                                                scrape_interval, window, with_matchers)

# signal, metric, label of the subject, counter?
SERIES = (
    ("gpu.busy_time", "agentd_gpu_busy_seconds_total", "gpu", True),
    ("gpu.sm_active", "agentd_gpu_sm_active_seconds_total", "gpu", True),
    ("gpu.tensor_active", "agentd_gpu_tensor_active_seconds_total", "gpu", True),
    ("gpu.dram_active", "agentd_gpu_dram_active_seconds_total", "gpu", True),
    ("gpu.pcie_rx", "agentd_gpu_pcie_rx_bytes_total", "gpu", True),
    ("gpu.pcie_tx", "agentd_gpu_pcie_tx_bytes_total", "gpu", True),
    ("gpu.nvlink_rx", "agentd_gpu_nvlink_rx_bytes_total", "gpu", True),
    ("gpu.nvlink_tx", "agentd_gpu_nvlink_tx_bytes_total", "gpu", True),
    ("gpu.pcie_capacity", "agentd_gpu_pcie_link_capacity_bytes_per_second", "gpu", False),
    ("gpu.mem_used", "agentd_gpu_memory_used_bytes", "gpu", False),
    ("gpu.sm_clock", "agentd_gpu_sm_clock_hertz", "gpu", False),
    ("gpu.sm_clock_max", "agentd_gpu_sm_clock_max_hertz", "gpu", False),
    ("gpu.power", "agentd_gpu_power_watts", "gpu", False),
    ("gpu.power_limit", "agentd_gpu_power_limit_watts", "gpu", False),
    ("gpu.temperature", "agentd_gpu_temperature_celsius", "gpu", False),
    ("disk.read", "agentd_disk_read_bytes_total", "device", True),
    ("disk.write", "agentd_disk_written_bytes_total", "device", True),
    ("disk.read_ops", "agentd_disk_reads_completed_total", "device", True),
    ("disk.busy", "agentd_disk_io_time_seconds_total", "device", True),
    ("disk.queue", "agentd_disk_io_time_weighted_seconds_total", "device", True),
    ("net.rx", "agentd_network_receive_bytes_total", "device", True),
    ("net.tx", "agentd_network_transmit_bytes_total", "device", True),
    ("rdma.rx", "agentd_rdma_receive_bytes_total", "device", True),
    ("rdma.tx", "agentd_rdma_transmit_bytes_total", "device", True),
    ("mem.refault", "agentd_memory_file_refaults_total", None, True),
    ("mem.available", "agentd_memory_available_bytes", None, False),
    ("mem.cached", "agentd_memory_cached_bytes", None, False),
    ("cpu.procs_blocked", "agentd_cpu_procs_blocked", None, False),
)


def per_step(metric: str, sel: str, counter: bool, fn: str, win: str, step: float) -> str:
    """The query of a series' value per step: a counter's rate (`fn` over `win`), a gauge's
    mean over the step."""
    if counter:
        return f"{fn}({metric}{sel}[{win}])"
    return f"avg_over_time({metric}{sel}[{window(step)}])"


class AgentdPrometheusSource(PrometheusSource):
    name = "prometheus (agentd)"

    def read(self) -> Signals:
        c = self.client
        nodes = NodeSelector(c, self.node, self.end)
        base = nodes.for_metric("agentd_gpu_busy_seconds_total")
        if base is None:
            raise SourceError(f"Prometheus at {c.url} holds no agentd GPU series for node "
                              f"{self.node!r} in the hour before the range end")
        scrape = scrape_interval(c, "agentd_gpu_busy_seconds_total", base, self.end)
        step = self.step or scrape or 15.0
        grid = Grid(self.start, self.end, step)
        # irate over 3 steps: the rate between the last two samples (one scrape interval
        # at the default step). At a step longer than the scrape, rate() over the step.
        fine = scrape is not None and step <= scrape * 1.5
        win = window(step * (3 if fine else 1))
        fn = "irate" if fine else "rate"
        ch: dict[str, np.ndarray] = {}
        meta: dict = {"node": self.node, "scrape_interval_seconds": scrape, "missing": []}

        def fetch(key: str, query: str, label: str | None) -> None:
            for s in c.query_range(query, self.start, self.end, step):
                subject = s["metric"].get(label, "") if label else ""
                ch[key.format(subject)] = grid.place(s.get("values", []))

        for signal, metric, label, counter in SERIES:
            sel = nodes.for_metric(metric)
            if sel is None:
                continue
            by = f" by ({label})" if label else ""
            fetch(signal + ":{}", f"max{by} ({per_step(metric, sel, counter, fn, win, step)})",
                  label)
        # The held utilization: the busy rate is the exact mean; gpu.busy is the same here.
        for k in [k for k in ch if k.startswith("gpu.busy_time:")]:
            ch["gpu.busy:" + k.split(":", 1)[1]] = ch[k].copy()
        sel = nodes.for_metric("agentd_cpu_seconds_total")
        if sel is not None:  # all CPUs, per mode (per core only with --collector.cpu.per-core)
            busy = with_matchers(sel, 'mode!~"idle|iowait|steal"')
            iowait = with_matchers(sel, 'mode="iowait"')
            fetch("cpu.busy:{}", f"sum({fn}(agentd_cpu_seconds_total{busy}[{win}]))", None)
            fetch("cpu.iowait:{}", f"sum({fn}(agentd_cpu_seconds_total{iowait}[{win}]))", None)
        online = nodes.for_metric("agentd_cpu_online")
        if online is not None:
            fetch("cpu.count:{}", f"max(agentd_cpu_online{online})", None)
        psel = nodes.for_metric("agentd_pressure_waiting_seconds_total")
        if psel is not None:
            for res in ("io", "cpu", "memory"):
                some = with_matchers(psel, 'resource="%s",kind="some"' % res)
                fetch(f"psi.{res}:{{}}",
                      f"max({fn}(agentd_pressure_waiting_seconds_total{some}[{win}]))", None)
        self._throttle(ch, nodes, grid, step, fn, win)
        self._findings(ch, nodes, grid, step)
        meta["processes"] = self._jobs(ch, nodes, grid, step, fn, win)
        meta["gpus"] = self._gpus(nodes)
        meta["shared_uplinks"] = self._shared_uplinks(nodes)
        ceilings = self._ceilings(nodes)
        if ceilings:
            meta["ceilings"] = ceilings
        lost = nodes.for_metric("agentd_gpu_lost")
        if lost is not None:
            meta["gpus_lost"] = sorted(
                s["metric"].get("gpu", "") for s in c.query(
                    f"last_over_time(agentd_gpu_lost{lost}[1h]) == 1", at=self.end))
        if not any(k.startswith("gpu.busy:") for k in ch) and not meta.get("gpus_lost"):
            raise SourceError(f"Prometheus at {c.url} holds no GPU utilization for node "
                              f"{self.node!r} between {self.start:.0f} and {self.end:.0f}")
        return Signals(grid.t, ch, step, source=self.name, node=self.node, meta=meta)

    def _throttle(self, ch, nodes, grid, step, fn, win) -> None:
        """Throttle reasons as bits, from the share of each step the reason was active."""
        from agentd.gpu.backend import CLOCK_EVENT_REASONS

        sel = nodes.for_metric("agentd_gpu_clock_event_seconds_total")
        if sel is None:
            return
        by_gpu: dict[str, np.ndarray] = {}
        for s in self.client.query_range(
                f"max by (gpu, reason) ({fn}(agentd_gpu_clock_event_seconds_total{sel}[{win}]))",
                self.start, self.end, step):
            m = s["metric"]
            if m.get("reason") not in CLOCK_EVENT_REASONS:
                continue
            share = grid.place(s.get("values", []))
            g = m.get("gpu", "")
            bits = by_gpu.setdefault(g, np.zeros(len(grid.t)))
            bits += (np.nan_to_num(share) >= 0.5) * (1 << CLOCK_EVENT_REASONS.index(m["reason"]))
        for g, b in by_gpu.items():
            ch[f"gpu.throttle:{g}"] = b

    def _findings(self, ch, nodes, grid, step) -> None:
        """The daemon's findings, counted per scrape in each step (daemon_view.py sums the
        counts over the range, so a longer step changes nothing): the node's scrapes, those
        that served a current report (agentd_gpu_stall_ratio present), and per (kind, GPU)
        the severest served, the reports that named it (at warning or worse, and at all)
        and the stall they claimed. A duplicate scrape (two jobs) counts once; a series'
        value counts (0 or NaN: not named); counts and stalls are bounded by the reports.
        The first step, whose window reaches back before the range, is left out."""
        from agentd.analysis.findings import SEVERITIES

        sel = nodes.for_metric("agentd_gpu_stall_ratio")
        fsel = nodes.for_metric("agentd_finding_active")
        base = nodes.for_metric("agentd_gpu_busy_seconds_total")
        if sel is None or fsel is None or base is None:
            return
        c = self.client
        win = window(step)
        inside = grid.t - step >= self.start - 1e-6

        def per(query: str) -> list[tuple[dict, np.ndarray]]:
            return [(s["metric"], np.where(inside, grid.place(s.get("values", [])), np.nan))
                    for s in c.query_range(query, self.start, self.end, step)]

        def one(query: str) -> np.ndarray:
            got = per(query)
            return np.nan_to_num(got[0][1]) if got else np.zeros(len(grid.t))

        scrapes = one(f"max(count_over_time(agentd_gpu_busy_seconds_total{base}[{win}]))")
        reports = np.minimum(one(f"max(count_over_time(agentd_gpu_stall_ratio{sel}[{win}]))"),
                             np.maximum(scrapes, 0))
        if not reports.any():
            return
        reported = reports > 0
        level: dict[str, np.ndarray] = {}
        for m, v in per(f"max by (kind, gpu, severity) "
                        f"(max_over_time(agentd_finding_active{fsel}[{win}])) > 0"):
            if m.get("severity") not in SEVERITIES or not m.get("kind"):
                continue
            sub = f"{m['kind']}@{m.get('gpu', '')}"
            on = np.isfinite(v) & reported
            lev = level.setdefault(sub, np.where(reported, 0.0, np.nan))
            lev[on] = np.maximum(lev[on], SEVERITIES.index(m["severity"]) + 1)
        if not level:
            return
        ch["daemon.scrapes:"] = scrapes
        ch["daemon.reports:"] = reports
        for sub, lev in level.items():
            ch[f"daemon.finding:{sub}"] = lev

        def counted(signal: str, query: str, most: dict[str, np.ndarray] | None = None
                    ) -> dict[str, np.ndarray]:
            """Per (kind, GPU): the query's per-step sum, between 0 and the step's reports
            (or `most`'s), 0 where none."""
            out = {sub: np.zeros(len(grid.t)) for sub in level}
            for m, v in per(query):
                sub = f"{m.get('kind', '')}@{m.get('gpu', '')}"
                if sub in out:
                    cap = reports if most is None else most[sub]
                    out[sub] = np.clip(np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0),
                                       0.0, cap)
            for sub, v in out.items():
                ch[f"{signal}:{sub}"] = v
            return out

        def named(matchers: str) -> str:
            sel_ = with_matchers(fsel, matchers) if matchers else fsel
            return ("sum by (kind, gpu) (max by (kind, gpu, severity) "
                    f"(sum_over_time(agentd_finding_active{sel_}[{win}])))")

        counted("daemon.finding_warned", named('severity=~"warning|critical"'))
        times = counted("daemon.finding_named", named(""))
        ssel = nodes.for_metric("agentd_finding_stall_ratio")
        if ssel is not None:
            counted("daemon.finding_stall", "max by (kind, gpu) (sum_over_time("
                    f"agentd_finding_stall_ratio{ssel}[{win}]))", most=times)
        csel = nodes.for_metric("agentd_finding_confidence_ratio")
        if csel is not None:
            for m, v in per(f"max by (kind, gpu) (avg_over_time("
                            f"agentd_finding_confidence_ratio{csel}[{win}]))"):
                sub = f"{m.get('kind', '')}@{m.get('gpu', '')}"
                if sub in level:
                    ch[f"daemon.finding_confidence:{sub}"] = np.clip(v, 0.0, 1.0)

    def _jobs(self, ch, nodes, grid, step, fn, win) -> dict:
        """Per job: the mean tree's signals (proc.*:JOB) and the job's GPUs (meta)."""
        sel = nodes.for_metric("agentd_process_trees")
        if sel is None:
            return {}
        c = self.client
        by = f"by ({', '.join(JOB_LABELS)})"

        def key(m: dict) -> str:
            return ",".join(f"{k}={m[k]}" for k in JOB_LABELS if m.get(k))

        def per_job(query: str) -> dict[str, np.ndarray]:
            return {key(s["metric"]): grid.place(s.get("values", []))
                    for s in c.query_range(query, self.start, self.end, step)}

        trees = per_job(f"max {by} "
                        f"({per_step('agentd_process_trees', sel, False, fn, win, step)})")
        for signal, metric, counter in (
                ("proc.cpu", "agentd_process_cpu_seconds_total", True),
                ("proc.root_cpu", "agentd_process_root_cpu_seconds_total", True),
                ("proc.read", "agentd_process_read_bytes_total", True),
                ("proc.members", "agentd_process_members", False),
                ("proc.blocked", "agentd_process_blocked", False)):
            inner = per_step(metric, sel, counter, fn, win, step)
            for job, values in per_job(f"max {by} ({inner})").items():
                if job in trees:
                    with np.errstate(invalid="ignore", divide="ignore"):
                        ch[f"{signal}:{job}"] = values / trees[job]
        jobs: dict[str, dict] = {}
        for s in c.query(f"last_over_time(agentd_process_trees{sel}[5m])", at=self.end):
            m = s["metric"]
            jobs[key(m)] = {"gpus": [], **{k: m[k] for k in JOB_LABELS if m.get(k)}}
        msel = nodes.for_metric("agentd_gpu_process_memory_used_bytes")
        if msel is not None:
            for s in c.query(f"last_over_time(agentd_gpu_process_memory_used_bytes{msel}[5m])"
                             " > 0", at=self.end):
                m = s["metric"]
                g = m.get("gpu", "")
                if key(m) in jobs and g.isdigit() and int(g) not in jobs[key(m)]["gpus"]:
                    jobs[key(m)]["gpus"].append(int(g))
        for info in jobs.values():
            info["gpus"].sort()
        self._per_gpu_trees(ch, jobs, nodes, grid, step, fn, win, key)
        return jobs

    def _per_gpu_trees(self, ch, jobs, nodes, grid, step, fn, win, key) -> None:
        """Where the daemon exports a job's trees per GPU (agentd_gpu_process_*), each GPU it
        covers gets its own tree ("JOB,gpu=N"): one rank's loader is seen apart from the
        job's mean tree, which keeps the GPUs no per-GPU series covers. Reads and blocked
        members stay the job's mean tree's."""
        sel = nodes.for_metric("agentd_gpu_process_cpu_seconds_total")
        if sel is None:
            return
        by = f"by (gpu, {', '.join(JOB_LABELS)})"
        per: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for signal, metric, counter in (
                ("proc.cpu", "agentd_gpu_process_cpu_seconds_total", True),
                ("proc.root_cpu", "agentd_gpu_process_root_cpu_seconds_total", True),
                ("proc.members", "agentd_gpu_process_members", False)):
            inner = per_step(metric, sel, counter, fn, win, step)
            for s in self.client.query_range(f"max {by} ({inner})", self.start, self.end,
                                             step):
                m = s["metric"]
                per.setdefault((key(m), m.get("gpu", "")), {})[signal] = \
                    grid.place(s.get("values", []))
        for (job, g), series in sorted(per.items()):
            info = jobs.get(job)
            if info is None or not g.isdigit() or int(g) not in info["gpus"] or \
                    "proc.cpu" not in series or "proc.members" not in series:
                continue
            tree = f"{job},gpu={g}"
            for signal, values in series.items():
                ch[f"{signal}:{tree}"] = values
            for signal in ("proc.read", "proc.blocked"):
                if f"{signal}:{job}" in ch:
                    ch[f"{signal}:{tree}"] = ch[f"{signal}:{job}"]
            jobs[tree] = {**info, "gpus": [int(g)]}
            info["gpus"] = [x for x in info["gpus"] if x != int(g)]
        for job in [j for j, info in jobs.items() if not info["gpus"]]:
            del jobs[job]
            for k in [k for k in ch if k.startswith("proc.") and k.split(":", 1)[1] == job]:
                del ch[k]

    def _ceilings(self, nodes: NodeSelector) -> dict | None:
        """What `agentd probe` measured, from the ceiling gauges the daemon exported (their
        latest values in the range, or in the day before it)."""
        from agentd.probe import state

        look = f"{max(int(self.end - self.start), 0) + 86400}s"
        rows = []
        for metric in (state.MEASURED_AT, state.STORAGE_BYTES, state.STORAGE_OPS,
                       state.H2D_BYTES, state.CPU_CORES):
            sel = nodes.for_metric(metric, lookback=look)
            if sel is None:
                continue
            for s in self.client.query(f"last_over_time({metric}{sel}[{look}])", at=self.end):
                try:
                    rows.append((metric, s["metric"], float(s["value"][1])))
                except (KeyError, IndexError, TypeError, ValueError):
                    continue
        try:
            return state.from_series(rows, host=self.node)
        except state.StateError:
            return None

    def _gpus(self, nodes: NodeSelector) -> dict:
        sel = nodes.for_metric("agentd_gpu_info")
        if sel is None:
            return {}
        out = {}
        for s in self.client.query(f"last_over_time(agentd_gpu_info{sel}[1h])", at=self.end):
            m = s["metric"]
            out[m.get("gpu", "")] = {"uuid": m.get("uuid", ""), "name": m.get("name", ""),
                                     "pci_bus_id": m.get("pci_bus_id", "")}
        return out

    def _shared_uplinks(self, nodes: NodeSelector) -> list[dict]:
        c = self.client
        gsel = nodes.for_metric("agentd_gpu_info")
        usel = nodes.for_metric("agentd_pcie_shared_uplink")
        if gsel is None or usel is None:
            return []
        gpus = {}
        for s in c.query(f"last_over_time(agentd_gpu_info{gsel}[1h])", at=self.end):
            m = s["metric"]
            try:
                gpus[m.get("pci_bus_id", "").lower()[-12:]] = int(m.get("gpu", "-1"))
            except ValueError:
                continue
        disks = {}
        dsel = nodes.for_metric("agentd_disk_info")
        if dsel is not None:
            for s in c.query(f"last_over_time(agentd_disk_info{dsel}[1h])", at=self.end):
                m = s["metric"]
                if m.get("pci_address"):
                    disks[m["pci_address"]] = m.get("device", "")
        capacity: dict[str, float] = {}
        csel = nodes.for_metric("agentd_pcie_uplink_capacity_bytes_per_second")
        if csel is not None:
            for s in c.query("last_over_time(agentd_pcie_uplink_capacity_bytes_per_second"
                             f"{csel}[1h])", at=self.end):
                try:
                    capacity[s["metric"].get("switch", "")] = float(s["value"][1])
                except (KeyError, IndexError, TypeError, ValueError):
                    continue
        links: dict[str, dict] = {}
        for s in c.query(f"last_over_time(agentd_pcie_shared_uplink{usel}[1h])", at=self.end):
            m = s["metric"]
            link = links.setdefault(m.get("switch", ""), {
                "switch": m.get("switch", ""), "gpus": [], "disks": [],
                "uplink_bytes_per_second": capacity.get(m.get("switch", ""), 0.0)})
            g = gpus.get(m.get("gpu_address", ""))
            if g is not None and g not in link["gpus"]:
                link["gpus"].append(g)
            d = disks.get(m.get("nvme_address", ""))
            if d and d not in link["disks"]:
                link["disks"].append(d)
        return list(links.values())


def detect(client: PromClient, node: str, at: float) -> str:
    """"agentd" when the server holds agentd's metrics for the node, else "exporters"."""
    return "agentd" if NodeSelector(client, node, at).for_metric(
        "agentd_gpu_busy_seconds_total") else "exporters"
