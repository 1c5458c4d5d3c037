"""Input bound by CPU preprocessing: the starved GPU's data-loader workers use all the cores
they can (their process tree, the trainer itself left out), or, where the GPU's process tree
is not seen (a source without agentd's process sampler), the node's cores are saturated with
tasks waiting for CPU (pressure). A loader seen with headroom is not CPU-bound, however busy
the rest of the node is: a saturated node whose GPUs' loaders have idle cores is other
work's, and the GPUs' gaps stay unexplained (core.py says the node was saturated)."""

from __future__ import annotations

import numpy as np

from agentd.analysis.detectors.common import confidence, input_finding, margin, \
    trainer_alone
from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding
from agentd.analysis.stats import estimate

WORKERS_SATURATED = 0.85  # workers' cores over their count (lower 95% bound)
NODE_SATURATED = 0.95  # the node's (or the trainer's cgroup's) cores busy
PSI_CPU = 0.2


def _workers_saturation(ev: Evidence, g: str) -> tuple[float, float, str]:
    """(saturation, its lower bound, how it was measured) of a GPU's loader."""
    ld = ev.loaders.get(g)
    if ld is None or not ld.saturation.n:
        return float("nan"), float("nan"), ""
    root = ev.sig.get("proc.root_cpu", ld.pid)
    if root is not None:
        workers_cpu = np.asarray(ld.cpu, dtype=float) - np.asarray(root, dtype=float)
        mask = np.zeros(len(workers_cpu), dtype=bool)
        for s in ev.gpus.values():
            mask |= s.present & ~s.benign
        est = estimate(workers_cpu[mask] / ld.workers)
        return est.mean, est.lo, "workers"
    # Without the trainer's own CPU: count it as one more member (a conservative guess).
    members = ld.workers + 1
    return ld.cores.mean / members, (ld.cores.mean - 1.645 * ld.cores.se) / members, "tree"


def tree_seen(ev: Evidence, g: str) -> bool:
    """The GPU's process tree was sampled: its loader's CPU is known."""
    ld = ev.loaders.get(g)
    return ld is not None and bool(ld.saturation.n)


def node_saturated(ev: Evidence) -> tuple[float, float]:
    """(share of the node's cores busy, share of time tasks waited for a CPU); nan where
    not measured."""
    node_cap = ev.cpu_limit.value
    node_sat = ev.cpu_busy.mean / node_cap if ev.cpu_busy.n and node_cap else float("nan")
    psi = ev.psi_cpu.mean if ev.psi_cpu.n else float("nan")
    return node_sat, psi


def detect(ev: Evidence, starved: list[str]) -> list[Finding]:
    if not starved:
        return []
    hits = {}
    for g in starved:
        sat, lo, how = _workers_saturation(ev, g)
        threshold = WORKERS_SATURATED if how == "workers" else WORKERS_SATURATED - 0.05
        if sat == sat and lo >= threshold - 0.05 and sat >= threshold:
            hits[g] = (sat, how)
    node_sat, psi = node_saturated(ev)
    if hits:
        gpus = sorted(hits, key=lambda g: (len(g), g))
        g0 = gpus[0]
        ld = ev.loaders[g0]
        sat = float(sum(h[0] for h in hits.values()) / len(hits))
        how = hits[g0][1]
        conf = (0.85 if how == "workers" else 0.7) * margin(sat, WORKERS_SATURATED, 0.1)
        idle_cores = ev.cpu_limit.value - ev.cpu_busy.mean if ev.cpu_busy.n and \
            ev.cpu_limit.known else float("nan")
        advice = ["Preprocessing cannot keep up: move decoding and augmentation to the GPU "
                  "(NVIDIA DALI, torchvision.io.decode_jpeg on CUDA), or cache decoded "
                  "samples.",
                  "Use cheaper transforms or a faster decoder (pillow-simd, libjpeg-turbo)."]
        if idle_cores == idle_cores and idle_cores >= 2:
            advice.insert(0, f"{idle_cores:.0f} cores are idle: raise DataLoader num_workers "
                             f"(now about {ld.workers:.0f} per GPU).")
        return [input_finding(
            ev, "input_cpu", gpus, confidence(conf, ev),
            f"the data loader's {ld.workers:.0f} worker(s) use {sat * 100:.0f}% of their "
            "cores",
            f"CPU preprocessing cannot keep up: the loader's workers run at {sat * 100:.0f}% "
            f"of {ld.workers:.0f} core(s) while the GPU waits",
            {"loader_saturation": sat, "loader_workers": ld.workers,
             "loader_cores": ld.cores.mean, "node_cpu_saturation": node_sat,
             "psi_cpu": psi}, advice)]
    # A trainer without workers loads its own batches, between steps: that serial loop is
    # the mechanism (io_h2d_serialized), whoever else keeps the node's cores busy. A loader
    # whose workers were measured, with headroom, is not what the saturation starves.
    loaded_by_workers = [g for g in starved if not trainer_alone(ev, g) and not tree_seen(ev, g)]
    if loaded_by_workers and node_sat == node_sat and node_sat >= NODE_SATURATED and \
            psi == psi and psi >= PSI_CPU:
        conf = 0.65 * margin(node_sat, NODE_SATURATED, 0.04)
        return [input_finding(
            ev, "input_cpu", loaded_by_workers, confidence(conf, ev),
            f"the node's {ev.cpu_limit.value:g} cores are {node_sat * 100:.0f}% busy with "
            f"tasks waiting for CPU {psi * 100:.0f}% of the time",
            f"CPU cannot keep up: {node_sat * 100:.0f}% of {ev.cpu_limit.value:g} cores busy, "
            f"tasks wait for a CPU {psi * 100:.0f}% of the time",
            {"node_cpu_saturation": node_sat, "psi_cpu": psi,
             "cores": ev.cpu_limit.value, "cores_source": ev.cpu_limit.source},
            ["The node's CPUs are saturated: fewer or cheaper transforms, GPU decoding "
             "(DALI), or fewer jobs on this node.",
             "Without the data-loader process trees (agentd's process sampler) the loader "
             "itself cannot be told from other CPU users."])]
    return []
