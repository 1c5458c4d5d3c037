"""What a multi-node job's exporters would have shown at each scrape: ClusterScrapes, the
one input of the OpenMetrics writers (agentd/sim/openmetrics.py), from either simulation:

    scrapes_from_trace(scenario, trace, interval, start)   the 10 ms ClusterSimulator's run
    scrapes_from_steps(scenario, seconds, interval, start)  the step model (stepmodel.py):
                                                            a 512-node hour in seconds

Both hand assemble() the same cumulative counters (GPU_CUM per GPU, HOST_CUM per node,
PORT_CUM per RDMA port: the simulator's Trace and NET_FIELDS names) at each scrape, the GPUs'
counters one second before it (for power and temperature, which follow the last second's
compute) and NVML's last utilization sample; assemble() applies the same conversions the
simulated node's /proc, /sys and fake NVML do (agentd/sim/node.py), so a backfilled series
reads what a scraped daemon or exporter on that node would have.

ClusterScrapes (every array's first axis is the scrape):
    t              [S] Unix seconds
    gpu[field]     [S, N, G]  counters since the start: busy_s, sm_active_s, sm_occupancy_s,
                   tensor_active_s, dram_active_s, pcie_rx_bytes, pcie_tx_bytes,
                   nvlink_bytes (each way); gauges: util (NVML's last sample, 0..1, whole
                   percent), clock (share of the maximum SM clock), power_w, temperature_c,
                   slowed (1 while a clock-event reason holds the clock down), and the rows
                   remapped: remapped_correctable, remapped_uncorrectable
    host[field]    [S, N]     counters: disk_read_bytes, disk_reads, disk_io_s (busy),
                   disk_weighted_s, disk_written_bytes, cpu_user_s, cpu_iowait_s, cpu_idle_s
                   (core-seconds, all cores), psi_io_s, psi_io_full_s, psi_cpu_s, psi_mem_s,
                   job_cpu_s, job_read_bytes, job_rchar_bytes (the job's process trees),
                   eth_rx_bytes, eth_tx_bytes, ib_rx_bytes, ib_tx_bytes (IPoIB)
    port[field]    [S, N, P]  NET_FIELDS counters (tx_bytes, rx_bytes, tx_packets,
                   rx_packets, xmit_wait, symbol_error, rcv_errors, link_error_recovery,
                   link_downed, goodput_bytes) and the rate gauge (bytes/s)
    nodes          [N] NodeLabels: host, GPUs' identities, disks, NICs, cores, job labels
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agentd.gpu.fake.library import DeviceInfo
from agentd.sim.cluster import NET_FIELDS, ClusterTrace
from agentd.sim.node import (MEM_TOTAL, MGMT_BYTES_PER_S, device_info, disk_names,
                             job_gpu_activity, job_gpu_gauges)

UTIL_PERIOD = 1 / 6  # the driver's utilization sample period (the fake NVML's)
GPU_CUM = ("busy", "sm_active", "collective_wait", "pcie_rx", "pcie_tx", "nvlink")
HOST_CUM = ("storage_read", "storage_ops", "storage_busy", "storage_weighted", "write",
            "worker_cpu", "trainer_cpu", "cpu_other", "io_blocked", "io_wait", "io_full",
            "cpu_wait", "mem_wait", "gpu_read", "cache_read")
PORT_CUM = tuple(f for f in NET_FIELDS if f != "rate")
IPOIB_BYTES_PER_S = 2e4


@dataclass
class NodeLabels:
    """Who a node and its parts are, as the exporters label them."""

    host: str
    gpus: list[DeviceInfo]
    disks: list[str]
    nics: list[str]
    cores: int
    job: dict[str, str]  # agentd's job labels that are set (slurm_job_id, or namespace/pod/
    #                      container/pod_uid)
    pod: dict[str, str] = field(default_factory=dict)  # dcgm-exporter's k8s labels, if a pod
    hpc_job: str = ""  # dcgm-exporter's HPC job label (Slurm)
    members: int = 0  # processes in the job's trees (trainers and workers)
    thermal: bool = False  # its clock events are thermal (else power cap)


@dataclass
class ClusterScrapes:
    t: np.ndarray
    interval: float
    nodes: list[NodeLabels]
    gpu: dict[str, np.ndarray]
    host: dict[str, np.ndarray]
    port: dict[str, np.ndarray]
    # Per job: {"scenario", "job", "scheduler", "hosts", "cause" ("healthy" or the planted
    # one), and for a planted fault "node", "host", "gpus", "onset" (Unix seconds) and the
    # cause's parameters (ClusterScenario.fault)}.
    truth: list[dict] = field(default_factory=list)


def node_labels(cs) -> list[NodeLabels]:
    """The nodes of a ClusterScenario as their exporters name them."""
    out = []
    for node, ident in zip(cs.spec.nodes, cs.nodes):
        p = node.params
        gpus = [device_info(node.name, i, p.pcie_bandwidth) for i in range(p.gpus)]
        if ident.pod:
            job = {"namespace": ident.namespace, "pod": ident.pod, "container": "trainer"}
            pod = dict(job)
        else:
            job = {"slurm_job_id": ident.slurm_job_id} if ident.slurm_job_id else \
                {"systemd_unit": "train.service"}
            pod = {}
        out.append(NodeLabels(node.name, gpus, disk_names(p), [n.device for n in node.nics],
                              max(int(p.cores), 1), job, pod, ident.slurm_job_id,
                              p.gpus * (1 + p.workers_per_gpu),
                              node.throttle_reason == "hw_thermal"))
    return out


def job_truth(cs, start: float) -> dict:
    """What a job is and what was planted in it, for checking an analysis."""
    truth = {"scenario": cs.name, "job": cs.job_id, "scheduler": cs.scheduler,
             "hosts": [n.name for n in cs.nodes], "cause": cs.cause}
    if cs.fault:
        truth.update({k: v for k, v in cs.fault.items() if k != "onset_s"})
        truth["onset"] = start + cs.onset_s
    return truth


def util_edges(t_rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (seconds since the start) of NVML's last complete utilization sample
    at each time: what dcgm-exporter's DCGM_FI_DEV_GPU_UTIL reads."""
    end = np.floor(t_rel / UTIL_PERIOD + 1e-9) * UTIL_PERIOD
    return np.maximum(end - UTIL_PERIOD, 0.0), end


def _slowed_factor(cs, t_rel: np.ndarray) -> np.ndarray:
    """[S, N, G] each GPU's DRAM factor while its compute is slowed at normal clocks."""
    nodes = cs.spec.nodes
    out = np.ones((len(t_rel), len(nodes), nodes[0].params.gpus))
    for k, node in enumerate(nodes):
        if not node.dram_factor:
            continue
        for ep in node.params.episodes:
            if ep.compute_factor == 1:
                continue
            on = (t_rel >= ep.start_s) & (t_rel < ep.end_s)
            for g in (ep.gpus or range(node.params.gpus)):
                out[on, k, g] = node.dram_factor[g]
    return out


def assemble(cs, t_rel: np.ndarray, start: float, interval: float, cum: dict,
             before: dict, util: np.ndarray, clock: np.ndarray, rate: np.ndarray
             ) -> ClusterScrapes:
    """ClusterScrapes from the simulation's counters at the scrapes (t_rel, seconds since
    the start): cum (GPU_CUM [S,N,G], HOST_CUM [S,N], PORT_CUM [S,N,P]), before (GPU_CUM one
    second earlier), util [S,N,G] (NVML's last sample), clock [S,N,G], rate [S,N,P]."""
    spec = cs.spec
    nodes = node_labels(cs)
    sm_c = np.array([n.params.sm_active_when_computing for n in spec.nodes])[None, :, None]
    base_clock = np.array([n.clocks or [1.0] * spec.gpus for n in spec.nodes])[None]
    temp_off = np.array([n.temperature_offset_c or [0.0] * spec.gpus
                         for n in spec.nodes])[None]
    thermal = np.array([n.throttle_reason == "hw_thermal" for n in spec.nodes])[None, :, None]
    dram = _slowed_factor(cs, t_rel)

    # Activity: tensor and DRAM from each interval's shares (as GPM integrates them).
    dt = np.diff(np.concatenate(([0.0], t_rel)))[:, None, None]
    d = {k: np.diff(cum[k], axis=0, prepend=0.0) / dt for k in ("busy", "sm_active",
                                                              "collective_wait")}
    act = job_gpu_activity(d["sm_active"], d["busy"], d["collective_wait"], sm_c, dram)
    gpu = {
        "busy_s": cum["busy"], "sm_active_s": cum["sm_active"],
        "sm_occupancy_s": cum["sm_active"] * 0.6,
        "tensor_active_s": np.cumsum(act["tensor_active"] * dt, axis=0),
        "dram_active_s": np.cumsum(act["dram_active"] * dt, axis=0),
        "pcie_rx_bytes": cum["pcie_rx"], "pcie_tx_bytes": cum["pcie_rx"] * 0.02 + cum["pcie_tx"],
        "nvlink_bytes": cum["nvlink"], "util": util, "clock": clock,
    }
    # Power and temperature follow the last second's compute.
    span = np.minimum(t_rel, 1.0)[:, None, None]
    last = job_gpu_activity(*((cum[k] - before[k]) / np.maximum(span, 1e-9)
                              for k in ("sm_active", "busy", "collective_wait")), sm_c)
    active = last["tensor_active"] / (0.7 * sm_c)
    power, temp, slowed = job_gpu_gauges(active, clock, base_clock, thermal, temp_off, 700.0)
    gpu.update(power_w=power, temperature_c=temp, slowed=slowed.astype(float))
    rows = np.zeros((len(t_rel), len(spec.nodes), spec.gpus, 2))
    for k, node in enumerate(spec.nodes):
        for g, r in node.remapped_rows.items():
            since = min((ep.start_s for ep in node.params.episodes if ep.compute_factor != 1
                         and (not ep.gpus or g in ep.gpus)), default=0.0)
            rows[t_rel >= since, k, g] = r[:2]
    gpu["remapped_correctable"], gpu["remapped_uncorrectable"] = rows[..., 0], rows[..., 1]

    # The node: as its /proc files say (agentd/sim/node.py SimulatedNode.write).
    cores = np.array([n.cores for n in nodes], dtype=float)[None]
    t_col = t_rel[:, None]
    user = cum["worker_cpu"] + cum["trainer_cpu"] + cum["cpu_other"]
    iowait = cum["io_blocked"]
    network_storage = np.array([n.params.storage_kind == "network"
                                for n in spec.nodes])[None]
    eth = MGMT_BYTES_PER_S * t_col + np.where(network_storage, cum["storage_read"], 0.0)
    host = {
        "disk_read_bytes": cum["storage_read"], "disk_reads": cum["storage_ops"],
        "disk_io_s": cum["storage_busy"], "disk_weighted_s": cum["storage_weighted"],
        "disk_written_bytes": cum["write"],
        "cpu_user_s": user, "cpu_iowait_s": iowait,
        "cpu_idle_s": np.maximum(t_col * cores - user - iowait, 0.0),
        "psi_io_s": cum["io_wait"], "psi_io_full_s": cum["io_full"],
        "psi_cpu_s": cum["cpu_wait"], "psi_mem_s": cum["mem_wait"],
        "job_cpu_s": cum["worker_cpu"] + cum["trainer_cpu"],
        "job_read_bytes": cum["gpu_read"], "job_rchar_bytes": cum["gpu_read"] + cum["cache_read"],
        "eth_rx_bytes": eth, "eth_tx_bytes": eth * 0.3,
        "ib_rx_bytes": IPOIB_BYTES_PER_S * t_col * np.ones_like(eth),
        "ib_tx_bytes": IPOIB_BYTES_PER_S * t_col * np.ones_like(eth),
        "mem_available_bytes": np.full_like(eth, MEM_TOTAL * 0.75),
        "mem_cached_bytes": np.full_like(eth, MEM_TOTAL / 2),
    }
    port = {f: cum[f] for f in PORT_CUM}
    port["rate"] = rate
    return ClusterScrapes(start + t_rel, interval, nodes, gpu, host, port,
                          [job_truth(cs, start)])


def concat(parts: list[ClusterScrapes]) -> ClusterScrapes:
    """Several jobs' scrapes (same times, same GPUs and NICs per node) as one fleet's."""
    first = parts[0]
    for p in parts[1:]:
        if len(p.t) != len(first.t) or p.interval != first.interval or \
                p.gpu["busy_s"].shape[2] != first.gpu["busy_s"].shape[2] or \
                p.port["rate"].shape[2] != first.port["rate"].shape[2]:
            raise ValueError("a fleet's jobs need the same scrapes, GPUs and NICs per node")
    join = lambda key: {k: np.concatenate([getattr(p, key)[k] for p in parts], axis=1)  # noqa
                        for k in getattr(first, key)}
    return ClusterScrapes(first.t, first.interval, [n for p in parts for n in p.nodes],
                          join("gpu"), join("host"), join("port"),
                          [t for p in parts for t in p.truth])


def scrape_times(seconds: float, interval: float) -> np.ndarray:
    """Scrape times in seconds since the start (the first one interval in)."""
    if not interval > 0 or not seconds >= interval:
        raise ValueError("the run must last at least one scrape interval")
    return np.arange(interval, seconds + 1e-9, interval)


def _interp(ts: np.ndarray, a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Cumulative array a [steps, ...] (zero at time 0) at times t, linearly."""
    flat = a.reshape(len(a), -1)
    ts0 = np.concatenate(([0.0], ts))
    flat = np.vstack((np.zeros((1, flat.shape[1])), flat))
    i = np.clip(np.searchsorted(ts0, t, side="right"), 1, len(ts0) - 1)
    w = ((t - ts0[i - 1]) / np.maximum(ts0[i] - ts0[i - 1], 1e-12))[:, None]
    out = flat[i - 1] + (flat[i] - flat[i - 1]) * np.clip(w, 0, 1)
    return out.reshape((len(t),) + a.shape[1:])


def scrapes_from_trace(cs, ct: ClusterTrace, interval: float = 15.0,
                       start: float = 1.7e9) -> ClusterScrapes:
    """The scrapes of a ClusterSimulator run (ct from its start): exact, 10 ms resolution."""
    t_rel = scrape_times(float(ct.t[-1]), interval)
    tr = ct.nodes

    def stack(key: str, times: np.ndarray, per_gpu: bool) -> np.ndarray:
        cols = [_interp(ct.t, getattr(n, key), times) for n in tr]
        return np.stack(cols, axis=1) if per_gpu else np.stack(
            [c.sum(axis=1) if c.ndim > 1 else c for c in cols], axis=1)

    cum = {k: stack(k, t_rel, True) for k in GPU_CUM}
    host_per_gpu = {"worker_cpu", "trainer_cpu", "io_blocked", "gpu_read", "cache_read"}
    cum.update({k: stack(k, t_rel, False) for k in HOST_CUM})
    for k in host_per_gpu:
        cum[k] = stack(k, t_rel, False)
    for f in PORT_CUM:
        cum[f] = np.stack([_interp(ct.t, net[f], t_rel) for net in ct.net], axis=1)
    before = {k: stack(k, np.maximum(t_rel - 1.0, 0.0), True) for k in GPU_CUM}
    lo, hi = util_edges(t_rel)
    busy_hi, busy_lo = stack("busy", hi, True), stack("busy", lo, True)
    util = np.round((busy_hi - busy_lo) / UTIL_PERIOD * 100) / 100
    idx = np.clip(np.searchsorted(ct.t, t_rel + 1e-9) - 1, 0, len(ct.t) - 1)
    clock = np.stack([n.clock_factor[idx] for n in tr], axis=1)
    rate = np.stack([net["rate"][idx] for net in ct.net], axis=1)
    return assemble(cs, t_rel, start, interval, cum, before, util, clock, rate)


def scrapes_from_steps(cs, seconds: float, interval: float = 15.0, start: float = 1.7e9,
                       seed: int | None = None) -> ClusterScrapes:
    """The scrapes of the step model's run (agentd/sim/stepmodel.py): every training step
    of every rank, vectorised; for jobs and spans the 10 ms simulator would take hours on."""
    from agentd.sim.stepmodel import StepModel

    t_rel = scrape_times(seconds, interval)
    model = StepModel(cs.spec, seed=cs.spec.seed if seed is None else seed)
    lo, hi = util_edges(t_rel)
    out = model.run(t_rel, np.maximum(t_rel - 1.0, 0.0), lo, hi)
    util = np.round((out["util_hi"] - out["util_lo"]) / UTIL_PERIOD * 100) / 100
    return assemble(cs, t_rel, start, interval, out["cum"], out["before"], util,
                    out["clock"], out["rate"])


def summary(sc: ClusterScrapes) -> dict:
    """Sizes, for benchmarks: scrapes, nodes, GPUs, ports, seconds covered."""
    s, n, g = sc.gpu["busy_s"].shape
    return {"scrapes": s, "nodes": n, "gpus": n * g, "ports": n * sc.port["rate"].shape[2],
            "seconds": s * sc.interval, "interval": sc.interval}
