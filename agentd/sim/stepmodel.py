"""The multi-node job one training step at a time, vectorised over every rank: the fast
path behind the OpenMetrics writer for fleets (a 512-node, 4,096-GPU hour in seconds, where
the 10 ms ClusterSimulator would take hours).

Per step k and rank (node n, GPU g), with the node's input pipeline buffering up to Q
batches that it refills at r_n batches/s (its slowest input stage: storage, CPU or PCIe):

    wait     w   = (1 - q) / r_n  if fewer than one batch is ready, else 0   (input stall)
    compute  c   = compute_s * slow / clock * max(1 + jitter * z, 0.2)      (z ~ N(0, 1))
    arrive   a   = w + c
    release  R   = max over every rank of the job of a                     (the barrier)
    step     E   = R + collective_s (the transfer at the slowest link's pace, cluster.py)
    spin         = R - a          busy for NVML, SMs nearly idle

the physics of ClusterSimulator (agentd/sim/cluster.py) at the granularity of a step, with
the same conversions into counters: SM activity (sm_active_when_computing while computing,
0.05 spinning, 0.1 in the collective), RDMA ports (port_increments), storage, CPU and
pressure as the node's /proc files say them. What it leaves out: the sub-step pipeline
(copies and reads interleaving within a step), checkpoints, evaluation phases and idle
episodes (a scenario with them is refused: use ClusterSimulator). tests/test_cluster_sim.py
checks its means against ClusterSimulator's on every planted cause.

    model = StepModel(spec, seed=3)
    out = model.run(t_scrape, t_before, util_lo, util_hi)   # seconds since the start
"""

from __future__ import annotations

import numpy as np

from agentd.sim.cluster import (BACKGROUND_XMIT_WAIT, ClusterSpec, collective_time,
                                link_state, port_increments, rail_transfer)
from agentd.sim.model import storage_throughput
from agentd.sim.scrapes import GPU_CUM, HOST_CUM, PORT_CUM

SPIN_SM, COMM_SM = 0.05, 0.1  # SM activity spinning at the barrier, and in the collective


class StepModel:
    def __init__(self, spec: ClusterSpec, seed: int = 0):
        spec.check()
        for node in spec.nodes:
            p = node.params
            if p.checkpoint_every_s or p.eval_every_s or p.prefetch_depth <= 0 or any(
                    ep.idle or ep.checkpoint_bytes or ep.cache_hit is not None
                    for ep in p.episodes):
                raise ValueError(f"{node.name}: the step model has no checkpoints, evaluation "
                                 "phases, idle or cache episodes, or serialized loading; use "
                                 "ClusterSimulator")
        self.spec = spec
        self.rng = np.random.default_rng([seed, 17])
        nodes = spec.nodes
        self.n, self.g = len(nodes), spec.gpus
        self.nics = len(nodes[0].nics)
        par = [n.params for n in nodes]
        col = lambda f: np.array([f(p) for p in par], dtype=float)  # noqa: E731
        self.compute_s = col(lambda p: p.compute_s)[:, None]
        self.jitter = col(lambda p: p.compute_jitter)[:, None]
        self.sm_c = col(lambda p: p.sm_active_when_computing)[:, None]
        self.h2d = col(lambda p: p.h2d_bytes_per_step)[:, None]
        self.cps = col(lambda p: p.cpu_seconds_per_step)
        self.batch_bytes = col(lambda p: p.batch_size * p.sample_bytes)
        self.workers = col(lambda p: p.workers_per_gpu)
        self.cores = col(lambda p: p.cores)
        self.trainer = col(lambda p: p.trainer_cores)
        self.request = col(lambda p: max(p.request_bytes, 1.0))
        self.latency = col(lambda p: p.storage_latency_s)
        self.depth = col(lambda p: p.storage_queue_depth)
        self.capacity = col(lambda p: p.workers_per_gpu + 2 * p.prefetch_depth + 1)[:, None]
        self.storage = col(storage_throughput)
        self.copy_bw = col(lambda p: p.pcie_bandwidth * (1.0 if p.pinned else 0.5))
        self.base_clock = np.array([n.clocks or [1.0] * self.g for n in nodes])
        self.straggle = np.ones((self.n, self.g))
        for k, p in enumerate(par):
            if 0 <= p.straggler_gpu < self.g:
                self.straggle[k, p.straggler_gpu] = p.straggler_factor
        self.nvlink_bytes = spec.nvlink_bytes_per_gpu()
        self.moved = spec.network_bytes_per_gpu() * np.array(
            spec.rail_gpus(self.nics), dtype=float)[None, :].repeat(self.n, axis=0)
        rng = np.random.default_rng(spec.seed + 7919)  # ports' natural congestion, as
        self.background = BACKGROUND_XMIT_WAIT * rng.uniform(0.5, 1.5, (self.n, self.nics))
        self.edges = sorted({e for n in nodes for ep in n.params.episodes
                             for e in (ep.start_s, ep.end_s)} |
                            {e for ep in spec.link_episodes for e in (ep.start_s, ep.end_s)})

    # --- conditions -----------------------------------------------------------------------

    def conditions(self, t: float) -> dict:
        """Everything that holds between two episode edges, at time t."""
        clock = self.base_clock.copy()
        slow = self.straggle.copy()
        f_storage, f_cpu = np.ones(self.n), np.ones(self.n)
        for k, node in enumerate(self.spec.nodes):
            for ep in node.params.episodes:
                if ep.start_s <= t < ep.end_s:
                    gpus = list(ep.gpus) or slice(None)
                    clock[k, gpus] *= ep.clock_factor
                    slow[k, gpus] *= ep.compute_factor
                    f_storage[k] *= ep.storage_factor
                    f_cpu[k] *= ep.cpu_factor
        cache = np.array([n.params.cache_hit for n in self.spec.nodes])
        sb = self.batch_bytes * (1 - cache)
        g = self.g
        with np.errstate(divide="ignore"):
            storage_rate = np.where(sb > 0, self.storage * f_storage / g / np.maximum(sb, 1e-9),
                                    np.inf)
        spare = np.maximum(self.cores * f_cpu - g * self.trainer, 0.1)
        cpu_rate = np.minimum(self.workers, spare / g) / self.cps
        h2d_rate = self.copy_bw / self.h2d[:, 0]
        rates = np.stack((storage_rate, cpu_rate, h2d_rate))
        links = link_state(self.spec, t)
        comm, _ = collective_time(self.spec, links.goodput)
        inc = port_increments(links, self.moved, rail_transfer(self.spec, links, self.moved),
                              self.background)
        return {"clock": clock, "slow": slow, "rate": rates.min(axis=0),
                "binding": rates.argmin(axis=0), "sb": sb, "cache": cache, "spare": spare,
                "f_cpu": f_cpu, "neighbour": self.storage * (1 - f_storage), "links": links,
                "comm": comm, "ports": inc}

    # --- the run ------------------------------------------------------------------------------

    def run(self, t_scrape: np.ndarray, t_before: np.ndarray, util_lo: np.ndarray,
            util_hi: np.ndarray) -> dict:
        """Counters at the requested times (seconds since the start, each array sorted):
        cum (GPU_CUM [S,N,G], HOST_CUM [S,N], PORT_CUM [S,N,P]) at t_scrape; before (busy,
        SM activity, collective wait) at t_before; util_lo and util_hi (busy time at the
        edges of NVML's last sample); clock [S,N,G] and rate [S,N,P] at t_scrape."""
        n, g, nics = self.n, self.g, self.nics
        S = len(t_scrape)
        cum = {k: np.zeros((S, n, g)) for k in GPU_CUM}
        cum.update({k: np.zeros((S, n)) for k in HOST_CUM})
        cum.update({k: np.zeros((S, n, nics)) for k in PORT_CUM})
        before = {k: np.zeros((len(t_before), n, g)) for k in ("busy", "sm_active",
                                                                "collective_wait")}
        out = {"cum": cum, "before": before, "util_lo": np.zeros((len(util_lo), n, g)),
               "util_hi": np.zeros((len(util_hi), n, g)), "clock": np.zeros((S, n, g)),
               "rate": np.zeros((S, n, nics))}
        queries = sorted([(t, 0, j) for j, t in enumerate(t_scrape)] +
                         [(t, 1, j) for j, t in enumerate(t_before)] +
                         [(t, 2, j) for j, t in enumerate(util_lo)] +
                         [(t, 3, j) for j, t in enumerate(util_hi)])
        gpu = {k: np.zeros((n, g)) for k in GPU_CUM}
        host = {k: np.zeros(n) for k in HOST_CUM}
        port = {k: np.zeros((n, nics)) for k in PORT_CUM}
        q = np.zeros((n, g))  # batches ready or in the pipeline's buffers
        s = 0.0
        qi = 0
        edge_i = 0
        cond = self.conditions(0.0)
        downed: set[int] = set()
        while qi < len(queries):
            while edge_i < len(self.edges) and self.edges[edge_i] <= s:
                edge_i += 1
                cond = self.conditions(s)
                self._link_downed(s, port, downed)
            step = self._step(q, cond)
            end = s + step["E"]
            while qi < len(queries) and queries[qi][0] < end:
                t, kind, j = queries[qi]
                self._query(t - s, kind, j, step, cond, gpu, host, port, out)
                qi += 1
            for k, v in step["gpu"].items():
                gpu[k] += v
            for k, v in step["host"].items():
                host[k] += v
            for k in PORT_CUM:
                port[k] += cond["ports"].get(k, 0.0)
            q = step["q"]
            s = end
        return out

    def _link_downed(self, t: float, port: dict, done: set) -> None:
        """A link retraining to a lower rate goes down and up once (as ClusterSimulator)."""
        for e, ep in enumerate(self.spec.link_episodes):
            if ep.rate_factor < 1 and ep.start_s <= t < ep.end_s and e not in done:
                done.add(e)
                nics = slice(None) if ep.nic < 0 else ep.nic
                port["link_downed"][ep.node, nics] += 1
                port["link_error_recovery"][ep.node, nics] += 1

    def _step(self, q: np.ndarray, cond: dict) -> dict:
        z = self.rng.standard_normal((self.n, self.g))
        c = self.compute_s * cond["slow"] / cond["clock"] * np.maximum(1 + self.jitter * z, 0.2)
        r = cond["rate"][:, None]
        need = q < 1 - 1e-9
        w = np.where(need, (1 - q) / r, 0.0)
        q_after = np.where(need, 0.0, q - 1.0)
        a = w + c
        R = float(a.max())
        comm = cond["comm"]
        E = R + comm
        fill = q_after + r * (E - w)
        q_new = np.minimum(fill, self.capacity)
        produced = r * w + (q_new - q_after)  # batches the pipeline delivered in the step
        never_full = fill <= self.capacity  # the pipeline ran flat out all step
        spin = R - a
        gpu = {"busy": E - w, "sm_active": self.sm_c * c + SPIN_SM * spin + COMM_SM * comm,
               "collective_wait": spin, "pcie_rx": np.broadcast_to(self.h2d, (self.n, self.g)),
               "pcie_tx": np.zeros((self.n, self.g)),
               "nvlink": np.full((self.n, self.g), self.nvlink_bytes)}
        return {"w": w, "c": c, "a": a, "R": R, "E": E, "comm": comm, "q": q_new,
                "gpu": gpu, "host": self._host(produced, never_full.all(axis=1), E, cond)}

    def _host(self, produced: np.ndarray, flat_out: np.ndarray, E: float, cond: dict) -> dict:
        """A node's storage, CPU and pressure counters over a step of E seconds, as the
        simulator counts them (agentd/sim/model.py _commit)."""
        g = self.g
        batches = produced.sum(axis=1)
        job_read = batches * cond["sb"]
        total_read = job_read + cond["neighbour"] * E
        storage_bound = flat_out & (cond["binding"] == 0)
        in_flight = np.where(storage_bound, np.minimum(self.depth, g * self.workers),
                             np.minimum(self.depth, job_read / E / self.request * self.latency))
        busy_frac = np.where(job_read > 0, np.minimum(in_flight, 1.0), 0.0)
        worker_cpu = batches * self.cps
        prep_cores = worker_cpu / E
        blocked = np.where(storage_bound, np.maximum(
            self.workers[:, None] - produced * self.cps[:, None] / E, 0.0).sum(axis=1) * E, 0.0)
        demand = g * self.workers
        active = np.minimum(worker_cpu / (np.minimum(demand, cond["spare"]) * E), 1.0)
        return {
            "storage_read": total_read, "storage_ops": total_read / self.request,
            "storage_busy": busy_frac * E, "storage_weighted": in_flight * E,
            "write": np.zeros(self.n), "worker_cpu": worker_cpu,
            "trainer_cpu": g * self.trainer * E, "cpu_other": self.cores * (1 - cond["f_cpu"]) * E,
            "io_blocked": blocked, "io_wait": busy_frac * E,
            "io_full": busy_frac * E * np.maximum(0.0, 1.0 - prep_cores),
            "cpu_wait": active * E * np.maximum(0.0, 1 - cond["spare"] / demand),
            "mem_wait": np.zeros(self.n), "gpu_read": job_read,
            "cache_read": batches * self.batch_bytes * cond["cache"],
        }

    def _query(self, e: float, kind: int, j: int, step: dict, cond: dict, gpu: dict,
               host: dict, port: dict, out: dict) -> None:
        """The counters e seconds into the step (before its increments are added)."""
        w, c, a, R, E, comm = (step[k] for k in ("w", "c", "a", "R", "E", "comm"))
        busy = gpu["busy"] + np.clip(e - w, 0.0, E - w)
        if kind == 2 or kind == 3:
            out["util_lo" if kind == 2 else "util_hi"][j] = busy
            return
        spin = np.clip(e - a, 0.0, R - a)
        in_comm = min(max(e - R, 0.0), comm)
        sm = gpu["sm_active"] + self.sm_c * np.clip(e - w, 0.0, c) + SPIN_SM * spin + \
            COMM_SM * in_comm
        if kind == 1:
            b = out["before"]
            b["busy"][j], b["sm_active"][j] = busy, sm
            b["collective_wait"][j] = gpu["collective_wait"] + spin
            return
        cum = out["cum"]
        cum["busy"][j], cum["sm_active"][j] = busy, sm
        cum["collective_wait"][j] = gpu["collective_wait"] + spin
        share = e / E  # the step's flows, spread evenly over it
        done = in_comm / comm if comm > 0 else 0.0
        for k in ("pcie_rx", "pcie_tx"):
            cum[k][j] = gpu[k] + step["gpu"][k] * share
        cum["nvlink"][j] = gpu["nvlink"] + step["gpu"]["nvlink"] * done
        for k in HOST_CUM:
            cum[k][j] = host[k] + step["host"][k] * share
        for k in PORT_CUM:
            cum[k][j] = port[k] + cond["ports"].get(k, 0.0) * done
        out["clock"][j] = cond["clock"]
        out["rate"][j] = cond["links"].rate
