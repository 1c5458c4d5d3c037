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

The verdict is the cluster analysis' (agentd/cluster, what `agentd diagnose --prometheus
URL --cluster` runs on Prometheus' per-node summaries), run on these rows as they come
(cluster_verdict: the rows of each refresh are one step of a Fleet); where this build has
no agentd.cluster, the demo's own robust peer comparison of the latest rows (peer_verdict).
Either takes the history [(time, {host: {family: value}}), ...] and returns
[{"host", "cause", "summary"}], worst first; a function set as CLUSTER_VERDICT replaces
them.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections import deque
from dataclasses import replace

import numpy as np

from agentd.daemon.config import Config, _default_collectors
from agentd.sim.demo import live

# A replacement verdict: [(time, {host: {family: value}}), ...] -> [{"host", "cause",
# "summary"}, ...], worst first.
CLUSTER_VERDICT = None
GPU_FAMILIES = ("busy_min", "busy_avg", "act_max", "clock_min", "power_max", "temp_max",
                "throttle_max")
HOST_FAMILIES = ("disk_busy", "psi_io", "psi_cpu", "cpu_busy", "net_rate", "net_util",
                 "net_tx", "net_errors", "net_recover", "net_wait")

THROTTLE_BITS = 0x4 | 0x8 | 0x20 | 0x40 | 0x80  # power cap, HW/thermal slowdowns, brake
MAD_SCALE = 1.4826


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
        if mean(per["busy"]):
            out["busy_min"] = min(mean(per["busy"]))
            out["busy_avg"] = float(np.mean(mean(per["busy"])))
        if mean(per["tensor_active"]):
            out["act_max"] = max(mean(per["tensor_active"]))
            out["act_gpu"] = float(int(np.argmax(mean(per["tensor_active"]))))
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


def _robust(values: dict[str, float], floor_rel: float = 0.0, floor_abs: float = 0.0
            ) -> tuple[dict[str, float], float]:
    """z of each value against the others' median and MAD (at least the floors)."""
    v = np.array(list(values.values()), dtype=float)
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * MAD_SCALE
    sigma = max(mad, floor_abs, floor_rel * abs(med), 1e-12)
    return {h: (x - med) / sigma for h, x in values.items()}, med


def cluster_verdict(history: list[tuple[float, dict]], job: dict, gpus: int,
                    window_s: float = 15.0) -> list[dict]:
    """The cluster analysis (agentd/cluster: robust peer comparison per family, causes by
    their physics) on the rows as they came: each refresh one step of a Fleet, analysed
    over window_s. job: the job's labels (e.g. {"slurm_job_id": "4242"})."""
    from agentd.cluster.causes import Options
    from agentd.cluster.data import Fleet, Member
    from agentd.cluster.report import analyze_fleet

    history = [h for h in history if h[0] >= history[-1][0] - 4 * window_s]
    if len(history) < 2:
        return []
    t = np.array([h[0] for h in history])
    step = float(np.median(np.diff(t)))
    hosts = list(history[-1][1])
    key = ",".join(f"{k}={v}" for k, v in job.items())
    col = lambda fam, host: [r.get(host, {}).get(fam, np.nan)  # noqa: E731
                             for _, r in history]
    gpu = {f: np.array([col(f, h) for h in hosts], dtype=float) for f in GPU_FAMILIES}
    host = {f: np.array([col(f, h) for h in hosts], dtype=float) for f in HOST_FAMILIES}
    fleet = Fleet(t=t, step=step, nodes=hosts,
                  members=[Member(key, h, gpus, dict(job)) for h in hosts],
                  gpu={f: a for f, a in gpu.items() if np.isfinite(a).any()},
                  host={f: a for f, a in host.items() if np.isfinite(a).any()},
                  source="agentd demo", activity="tensor",
                  models={h: "NVIDIA H100 80GB HBM3" for h in hosts},
                  clock_max={h: 1980e6 for h in hosts})
    report = analyze_fleet(fleet, Options(window_steps=max(int(round(window_s / step)), 1)))
    latest = t[-1] - step
    return [{"host": f.subject.get("node", "?"), "cause": f.kind, "summary": f.summary}
            for f in report.findings
            if f.severity in ("warning", "critical") and f.t1 >= latest]


def peer_verdict(history: list[tuple[float, dict]]) -> list[dict]:
    """Which node deviates from its peers in the latest rows, and the physics that says
    why; worst first. Floors: what healthy nodes' natural spread can reach (clocks a few
    percent, a few points of busy or compute time), so a healthy job gets no finding."""
    rows = history[-1][1] if history else {}
    if len(rows) < 3:
        return []
    have = lambda fam: {h: r[fam] for h, r in rows.items() if fam in r}  # noqa: E731
    found = []
    clock, act, busy = have("clock_min"), have("act_max"), have("busy_min")
    zc, mc = _robust(clock, floor_rel=0.04) if len(clock) >= 3 else ({}, 0.0)
    za, ma = _robust(act, floor_rel=0.06, floor_abs=0.02) if len(act) >= 3 else ({}, 0.0)
    zb, mb = _robust(busy, floor_abs=0.04) if len(busy) >= 3 else ({}, 0.0)
    for h, r in rows.items():
        if zc.get(h, 0) < -3 and r.get("throttle_max", 0) > 0.3:
            found.append({"host": h, "cause": "throttled", "score": -zc[h], "summary": (
                f"its GPUs run at {r['clock_min'] / mc:.0%} of their peers' clocks "
                f"(clock events {r['throttle_max']:.0%} of the time) and compute "
                f"{r.get('act_max', float('nan')):.0%} of the time, their peers "
                f"{ma:.0%}: the others wait for it at every all-reduce")})
        elif za.get(h, 0) > 3 and zc.get(h, 0) > -2:
            found.append({"host": h, "cause": "slow_gpu", "score": za[h], "summary": (
                f"GPU {int(r.get('act_gpu', 0))} computes {r['act_max']:.0%} of the time at "
                f"normal clocks, its peers' busiest {ma:.0%}: a slower GPU the others wait "
                "for")})
        if zb.get(h, 0) < -3:
            why = []
            if r.get("disk_busy", 0) > 0.9:
                why.append(f"its disk {r['disk_busy']:.0%} busy")
            if r.get("cpu_busy", 0) > 0.9 or r.get("psi_cpu", 0) > 0.2:
                why.append(f"its CPUs {r.get('cpu_busy', 0):.0%} busy")
            found.append({"host": h, "cause": "input", "score": -zb[h], "summary": (
                f"its GPUs idle {1 - r['busy_min']:.0%} of the time (peers "
                f"{1 - mb:.0%}) waiting for input before the all-reduce" +
                (f": {', '.join(why)}" if why else ""))})
    rate, errors = have("net_rate"), have("net_errors")
    if len(rate) >= 3:
        zr, mr = _robust(rate, floor_rel=0.05)
        for h, z in zr.items():
            if z < -3:
                found.append({"host": h, "cause": "network", "score": -z, "summary": (
                    f"its RDMA port runs at {rate[h] * 8 / 1e9:.0f} Gb/s, its peers' at "
                    f"{mr * 8 / 1e9:.0f}: every ring through it moves at that pace")})
    if len(errors) >= 3:
        others = sorted(errors.values())
        for h, e in errors.items():
            if e >= 1.0 and e > 20 * max(np.median(others), 0.05):
                found.append({"host": h, "cause": "network", "score": 10 + math.log10(e),
                              "summary": f"its RDMA link counts {e:.0f} errors/s "
                              "(peers none): packets resent, collectives slower"})
    found.sort(key=lambda f: -f["score"])
    return found


def _fmt(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else \
        format(v * scale, fmt)


def default_verdict():
    """The cluster analysis when this build has it, else the demo's peer comparison; and
    how to name it."""
    if CLUSTER_VERDICT is not None:
        return CLUSTER_VERDICT, "the verdict set as CLUSTER_VERDICT"
    if importlib.util.find_spec("agentd.cluster") is None:
        return peer_verdict, ("the demo's peer comparison of these rows; `agentd diagnose "
                              "--prometheus URL --cluster` is the authority")
    return None, ("agentd's cluster analysis on these rows, as `agentd diagnose "
                  "--prometheus URL --cluster` runs it on Prometheus' summaries")


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
    verdict, source = default_verdict()
    ident = {"slurm_job_id": cs.job_id} if cs.scheduler == "slurm" else \
        {"namespace": cs.nodes[0].namespace, "pod": cs.job_id}
    try:
        found = verdict(history) if verdict else cluster_verdict(history, ident, cs.spec.gpus)
    except Exception as e:  # the analysis failing must not stop the demo
        found = []
        lines.append(f"the verdict failed: {type(e).__name__}: {e}")
    if found:
        f = found[0]
        lines.append(f"Holding the job back: {f['host']} ({f['cause']}): "
                     f"{f['summary'].rstrip('.')}.")
    else:
        lines.append("Holding the job back: no node stands out from its peers.")
    lines.append(f"  ({source})")
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
