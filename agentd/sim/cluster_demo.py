"""`agentd demo --cluster`: a simulated multi-node job served node by node (serve.py), with
its nodes side by side live, and which node holds the job back once the planted problem
starts.

Each row is one node, from what its own daemon has (its high-rate window and its /metrics
counters: nothing of the simulation's truth) over the last few seconds, as the per-node
summaries the cluster analysis compares (agentd/cluster/data.py names them alike):

    busy_min     lowest GPU busy share (NVML utilization)
    act_max      highest compute activity (tensor cores; NCCL's spin uses none)
    clock_min    lowest SM clock (Hz)
    power_max    highest power over its limit
    temp_max     hottest GPU (C)
    throttle_max largest share of samples with a power or thermal clock event
    disk_busy    busiest disk's busy share      cpu_busy   busy CPUs over all CPUs
    psi_io, psi_cpu  pressure stall shares
    net_rate     slowest RDMA port's rate       net_tx     RDMA bytes/s sent
    net_errors   link errors per second         net_recover  recoveries and downs per second
    net_wait     transmit-wait ticks per second

The verdict is the cluster analysis' (agentd/cluster: analyze_fleet, the same code `agentd
diagnose --prometheus URL --cluster` runs on Prometheus' per-node summaries), run on these rows
as they come (cluster_verdict: each refresh's rows are one base step of a Fleet, analysed over
a short window); the node's GPUs it names come from the same rows per GPU. The demo has no
comparison of its own: what it prints is what that analysis concludes.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import replace

import numpy as np

from agentd.cluster.groups import job_of
from agentd.daemon.config import Config, _default_collectors
from agentd.sim.demo import live

THROTTLE_BITS = 0x4 | 0x8 | 0x20 | 0x40 | 0x80  # power cap, HW/thermal slowdowns, brake
# Per-GPU values the analysis asks for (its `detail`) to name the node's GPUs behind a
# finding: its family -> the window's key.
DETAIL = {"act_max": "tensor_active", "clock_min": "sm_clock", "busy_min": "busy"}


def _column(ring, key: str, since: float) -> np.ndarray:
    if ring is None:
        return np.zeros(0)
    _, v = ring.column(key, since)
    return v[np.isfinite(v)]


class NodeView:
    """One node's summaries, from its daemon, over the last `span` seconds."""

    RECOVERIES = ("link_error_recovery", "link_downed")  # agentd_rdma_port_errors_total types

    def __init__(self, daemon, span: float = 5.0):
        self.daemon = daemon
        self.span = span
        self.host = daemon.sim_node.hostname
        self._history: deque = deque(maxlen=64)  # (monotonic time, {family: counter sum})
        self._per_gpu: dict = {}  # DETAIL's families -> {gpu: value}, from the last summary
        self._clock_max: float | None = None

    def _series(self, sampler: str) -> list:
        st = self.daemon.runner(sampler)
        if st is None or not st.available:
            return []
        try:
            return st.sampler.series()
        except Exception:  # a sampler between runs: none this time
            return []

    def summary(self, now: float) -> dict[str, float]:
        since = now - self.span
        rings = self.daemon.window.rings()
        gpu, cpu, storage, pressure = (rings.get(k) for k in ("gpu", "cpu", "storage",
                                                              "pressure"))
        n = self.daemon.sim_node.scenario.job.gpus
        out: dict[str, float] = {}
        per = {k: [_column(gpu, f"gpu.{k}:{i}", since) for i in range(n)]
               for k in ("busy", "tensor_active", "sm_clock", "power", "power_limit",
                         "temperature", "throttle")}
        mean = lambda vs: [float(v.mean()) for v in vs if len(v)]  # noqa: E731
        self._per_gpu = {fam: {str(i): float(v.mean()) for i, v in enumerate(per[key])
                               if len(v)} for fam, key in DETAIL.items()}
        top = [_column(gpu, f"gpu.sm_clock_max:{i}", since) for i in range(n)]
        self._clock_max = max((float(v.max()) for v in top if len(v)), default=None)
        if mean(per["busy"]):
            out["busy_min"] = min(mean(per["busy"]))
            out["busy_avg"] = float(np.mean(mean(per["busy"])))
        if mean(per["tensor_active"]):
            out["act_max"] = max(mean(per["tensor_active"]))
        if mean(per["sm_clock"]):
            out["clock_min"] = min(mean(per["sm_clock"]))
        if mean(per["power"]) and mean(per["power_limit"]):
            out["power_max"] = max(p / lim for p, lim in zip(mean(per["power"]),
                                                             mean(per["power_limit"])))
        if mean(per["temperature"]):
            out["temp_max"] = max(mean(per["temperature"]))
        shares = [float(((v.astype(np.int64) & THROTTLE_BITS) > 0).mean())
                  for v in per["throttle"] if len(v)]
        if shares:
            out["throttle_max"] = max(shares)
        disks = [float(_column(storage, f"disk.busy:{d}", since).mean())
                 for d in self.daemon.sim_node.devices
                 if len(_column(storage, f"disk.busy:{d}", since))]
        if disks:
            out["disk_busy"] = max(disks)
        busy, count = _column(cpu, "cpu.busy:", since), _column(cpu, "cpu.count:", since)
        if len(busy) and len(count):
            out["cpu_busy"] = float(busy.mean() / max(count.mean(), 1))
        for fam, key in (("psi_io", "psi.io:"), ("psi_cpu", "psi.cpu:")):
            v = _column(pressure, key, since)
            if len(v):
                out[fam] = float(v.mean())
        self._network(out)
        return out

    def _network(self, out: dict) -> None:
        series = self._series("network")
        rates = [v for name, _, v in series if name == "agentd_rdma_port_speed_bytes"]
        if rates:
            out["net_rate"] = min(rates)
        errors = [(labels[-1], v) for name, labels, v in series
                  if name == "agentd_rdma_port_errors_total"]
        sent = {labels: v for name, labels, v in series
                if name == "agentd_rdma_transmit_bytes_total"}
        speed = {labels: v for name, labels, v in series
                 if name == "agentd_rdma_port_speed_bytes"}
        sums = {"net_errors": sum(v for kind, v in errors if kind not in self.RECOVERIES),
                "net_recover": sum(v for kind, v in errors if kind in self.RECOVERIES),
                "net_wait": sum(v for name, _, v in series
                                if name == "agentd_rdma_transmit_wait_total"),
                **{("tx",) + port: v for port, v in sent.items()}}
        now = time.monotonic()
        self._history.append((now, sums))
        old = next(((t, s) for t, s in self._history if now - t <= self.span + 1.5),
                    self._history[0])
        span = now - old[0]
        if span > 0.5:
            for fam in ("net_errors", "net_recover", "net_wait"):
                out[fam] = max(sums[fam] - old[1][fam], 0.0) / span
            tx = {port: max(v - old[1].get(("tx",) + port, v), 0.0) / span
                  for port, v in sent.items()}
            out["net_tx"] = sum(tx.values())
            util = [tx[p] / speed[p] for p in tx if speed.get(p)]
            if util:
                out["net_util"] = max(util)

    def identity(self) -> dict:
        """The node's GPU model and top SM clock (from its GPU sampler), and the latest
        summary's per-GPU values (DETAIL) for the analysis to name the GPUs behind a
        finding."""
        out: dict = {"gpus": dict(self._per_gpu)}
        st = self.daemon.runner("gpu")
        try:
            names = {g.get("name") for g in st.sampler.meta().get("gpus", {}).values()}
        except Exception:  # no GPU sampler (yet): no model
            names = set()
        if len(names) == 1 and None not in names:
            out["model"] = names.pop()
        if self._clock_max:
            out["clock_max"] = self._clock_max
        return out

    def finding(self) -> str:
        """The node's own rolling analysis' first finding, if any."""
        report = self.daemon.analysis.current()
        findings = getattr(report, "findings", None)
        if findings is None and isinstance(report, dict):
            findings = report.get("findings")
        if not findings:
            return "-"
        f = findings[0]
        return f.get("kind", "?") if isinstance(f, dict) else getattr(f, "kind", "?")


def cluster_verdict(history: list[tuple[float, dict]], job: dict, gpus: int,
                    identity: dict | None = None, window_s: float = 15.0) -> list[dict]:
    """The cluster analysis (agentd/cluster/report.py analyze_fleet: robust peer comparison
    per family, causes by their physics) on the rows as they came: each refresh one base step
    of a Fleet, analysed over window_s. history: [(time, {host: {family: value}}), ...];
    job: the job's labels (e.g. {"slurm_job_id": "4242"}); identity: {host: {"model",
    "clock_max", "gpus": {family: {gpu: value}}}} from the nodes' daemons. Returns the
    ongoing warning and critical findings, ranked as the analysis ranks them, as
    [{"host", "gpus", "cause" (the finding's kind), "severity", "summary"}]."""
    from agentd.cluster.causes import Options
    from agentd.cluster.data import GPU_FAMILIES, NODE_FAMILIES, Fleet, Member
    from agentd.cluster.report import analyze_fleet

    history = [h for h in history if h[0] >= history[-1][0] - 4 * window_s]
    if len(history) < 2:
        return []
    identity = identity or {}
    t = np.array([h[0] for h in history])
    step = float(np.median(np.diff(t)))
    hosts = list(history[-1][1])
    key = ",".join(f"{k}={v}" for k, v in job.items())
    col = lambda fam, host: [r.get(host, {}).get(fam, np.nan)  # noqa: E731
                             for _, r in history]
    gpu = {f: np.array([col(f, h) for h in hosts], dtype=float) for f in GPU_FAMILIES}
    host = {f: np.array([col(f, h) for h in hosts], dtype=float) for f in NODE_FAMILIES}
    fleet = Fleet(t=t, step=step, nodes=hosts,
                  members=[Member(key, h, gpus, dict(job)) for h in hosts],
                  gpu={f: a for f, a in gpu.items() if np.isfinite(a).any()},
                  host={f: a for f, a in host.items() if np.isfinite(a).any()},
                  source="agentd demo", activity="tensor" if np.isfinite(gpu["act_max"]).any() else "",
                  models={h: identity[h]["model"] for h in hosts
                          if identity.get(h, {}).get("model")},
                  clock_max={h: identity[h]["clock_max"] for h in hosts
                             if identity.get(h, {}).get("clock_max")})

    def detail(node: str, family: str, t0: float, t1: float) -> dict:
        return identity.get(node, {}).get("gpus", {}).get(family, {})

    report = analyze_fleet(fleet, Options(window_steps=max(int(round(window_s / step)), 1)),
                           detail)
    latest = t[-1] - step
    return [{"host": f.subject.get("node", "?"), "gpus": f.subject.get("gpus") or [],
             "cause": f.kind, "severity": f.severity, "summary": f.summary}
            for f in report.findings
            if f.severity in ("warning", "critical") and f.t1 >= latest]


def _fmt(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else \
        format(v * scale, fmt)


def render(job, views: list[NodeView], now: float, started: float,
           history: list | None = None) -> str:
    cs = job.scenario
    who = f"Slurm job {cs.job_id}" if cs.scheduler == "slurm" else \
        f"Kubernetes job {cs.job_id} in {cs.nodes[0].namespace}"
    first, last = job.addresses[0], job.addresses[-1].rsplit(":", 1)[1]
    lines = [f"agentd demo --cluster: simulated job '{cs.name}' ({who}): "
             f"{len(views)} nodes x {cs.spec.gpus} GPUs, t = {now - started:.0f} s",
             f"  {cs.description}",
             f"  serving http://{first}..{last}/metrics  (Ctrl-C to stop)", "",
             f"{'node':<13}{'busy':>6}{'compute':>9}{'clock':>7}{'power':>7}{'temp':>6}"
             f"{'disk':>6}{'CPU':>6}{'RDMA tx':>9}{'rate':>6}{'err/s':>7}{'wait/s':>8}"
             "  node's own finding",
             f"{'':<13}{'min':>6}{'max':>9}{'MHz':>7}{'max':>7}{'C':>6}{'busy':>6}{'busy':>6}"
             f"{'GB/s':>9}{'Gb/s':>6}"]
    rows = {}
    for v in views:
        r = v.summary(now)
        rows[v.host] = r
        lines.append(
            f"{v.host:<13}{_fmt(r.get('busy_min'), '>5.0%')}{'':1}"
            f"{_fmt(r.get('act_max'), '>8.0%')}{'':1}{_fmt(r.get('clock_min'), '>6.0f', 1e-6)}"
            f"{'':1}{_fmt(r.get('power_max'), '>6.0%')}{'':1}{_fmt(r.get('temp_max'), '>5.0f')}"
            f"{'':1}{_fmt(r.get('disk_busy'), '>5.0%')}{'':1}{_fmt(r.get('cpu_busy'), '>5.0%')}"
            f"{'':1}{_fmt(r.get('net_tx'), '>8.2f', 1e-9)}{'':1}"
            f"{_fmt(r.get('net_rate'), '>5.0f', 8e-9)}{'':1}{_fmt(r.get('net_errors'), '>6.0f')}"
            f"{'':1}{_fmt(r.get('net_wait'), '>7.0f')}  {v.finding()}")
    lines.append("")
    history = [] if history is None else history
    history.append((now, rows))
    del history[:-240]
    node = cs.nodes[0]
    _, ident = job_of({"slurm_job_id": node.slurm_job_id, "namespace": node.namespace,
                       "pod": node.pod})
    try:
        found = cluster_verdict(history, ident, cs.spec.gpus,
                                {v.host: v.identity() for v in views})
    except Exception as e:  # the analysis failing must not stop the demo
        found = []
        lines.append(f"the cluster analysis failed: {type(e).__name__}: {e}")
    if found:
        f = found[0]
        gpus = f" GPU {', '.join(f['gpus'])}" if f["gpus"] else ""
        lines.append(f"Holding the job back: {f['host']}{gpus} ({f['cause']}, "
                     f"{f['severity']}): {f['summary'].rstrip('.')}.")
        for f in found[1:]:
            lines.append(f"  also: {f['host']} ({f['cause']}, {f['severity']})")
    else:
        lines.append("Holding the job back: no node stands out from its peers.")
    lines.append("  (agentd's cluster analysis on these rows, as `agentd diagnose --prometheus "
                 "URL --cluster` runs it on Prometheus' per-node summaries)")
    if cs.fault:
        when = "from" if now - started < cs.onset_s else "since"
        lines.append(f"  planted (the simulation's truth, for checking): {cs.fault['host']} "
                     f"{cs.cause} {when} {cs.onset_s:.0f} s")
    return "\n".join(lines)


def run_cluster_demo(scenario: str, seed: int | None, listen: str, seconds: float | None,
                     nodes: int | None = None, gpus: int | None = None,
                     onset_s: float | None = None, out=sys.stdout) -> int:
    """Serve and show the simulated job for `seconds` (None or 0: until Ctrl-C)."""
    from agentd.sim.cluster_scenario import load, with_onset
    from agentd.sim.serve import SimulatedJob, check_servable

    cs = load(scenario, seed, nodes, gpus)
    check_servable(len(cs.spec.nodes), cs.spec.gpus, "--nodes/--gpus")
    if onset_s is not None:
        cs = with_onset(cs, onset_s)
    cfg = replace(Config(collectors=_default_collectors()), listen_address=listen,
                  log_level="warning")
    job = SimulatedJob(cs, cfg)
    job.start()
    views = [NodeView(d) for d in job.daemons]
    started = job.nodes[0].t0
    history: list = []
    try:
        return live(lambda: render(job, views, time.time(), started, history), seconds, out)
    finally:
        job.stop()
