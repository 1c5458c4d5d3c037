"""Fleet: what a cluster source reads, one row per (job, node) and per node on one time grid.

Every family is a per-node summary over that node's GPUs of the job (or over the node, for
host families), one value per base step (the mean over the step, or the rate over it for a
counter). NaN marks a step without data; a family a source lacks is absent (not zero), and
`missing` says what that costs.

GPU families, per member (a job on a node), aggregated over the job's GPUs on the node
(power_max, temp_max and throttle_max only explain a finding: the Prometheus source fills
them for the flagged nodes alone, NaN elsewhere):
    busy_min     lowest busy share (NVML utilization or DCGM graphics-engine activity)
    busy_avg     mean busy share
    act_max      highest compute activity: tensor-pipe activity (NCCL's spin loops use no
                 tensor cores) or else SM activity; the rank that computes longest
    clock_min    lowest SM clock (Hz)
    power_max    highest power draw over the enforced limit (ratio)
    temp_max     hottest die (celsius)
    throttle_max largest share of time a power or thermal clock-event reason was active

Host families, per node:
    disk_busy    busiest whole block device (share of time with I/O in flight)
    psi_io       share of time some task waited for I/O (pressure stall information)
    psi_cpu      share of time some task waited for a CPU
    cpu_busy     busy CPU time over the node's CPUs (ratio)
    net_rate     slowest RDMA port's rate (bytes/s)
    net_util     busiest RDMA port's bytes sent over its rate: the share of time it needs
                 to move them, i.e. the job's time in transfers on that port
    net_tx       bytes/s sent over RDMA ports (summed; synthetic fleets only: no detector
                 reads it, so the Prometheus source does not fetch it)
    net_errors   link errors per second (symbol, receive, integrity errors; summed)
    net_recover  link error recoveries and link-downed events per second (summed)
    net_wait     transmit-wait ticks per second: data to send, no credits (summed)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GPU_FAMILIES = ("busy_min", "busy_avg", "act_max", "clock_min", "power_max", "temp_max",
                "throttle_max")
NODE_FAMILIES = ("disk_busy", "psi_io", "psi_cpu", "cpu_busy", "net_rate", "net_util",
                 "net_tx", "net_errors", "net_recover", "net_wait")


@dataclass
class Member:
    """A job on a node: `gpus` of its GPUs there."""

    job: str  # groups.job_of key, or groups.ALL_NODES
    node: str
    gpus: int
    identity: dict = field(default_factory=dict)  # the labels behind the job key
    labels: dict = field(default_factory=dict)  # other labels seen (namespace, user, model)


@dataclass
class Fleet:
    t: np.ndarray  # [T] end of each base step, Unix seconds
    step: float  # seconds per base step
    nodes: list[str]
    members: list[Member]
    gpu: dict[str, np.ndarray]  # family -> [M, T]
    host: dict[str, np.ndarray]  # family -> [N, T]
    source: str = ""
    activity: str = ""  # what act_max measures: "tensor", "sm" or "" (absent)
    models: dict[str, str] = field(default_factory=dict)  # node -> GPU model name
    clock_max: dict[str, float] = field(default_factory=dict)  # node -> max SM clock (Hz)
    gpu_health: dict[str, dict] = field(default_factory=dict)  # node -> remapped rows, XIDs
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    price_per_gpu_hour: dict[str, float] = field(default_factory=dict)  # model or "" -> price
    stats: dict = field(default_factory=dict)  # queries, series, bytes, seconds (the source)

    def node_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.nodes)}

    def jobs(self) -> dict[str, list[int]]:
        """job key -> member indices (in node order)."""
        out: dict[str, list[int]] = {}
        for i, m in enumerate(self.members):
            out.setdefault(m.job, []).append(i)
        return out

    def check(self) -> "Fleet":
        T, M, N = len(self.t), len(self.members), len(self.nodes)
        for k, a in self.gpu.items():
            assert a.shape == (M, T), (k, a.shape, (M, T))
        for k, a in self.host.items():
            assert a.shape == (N, T), (k, a.shape, (N, T))
        return self


def merge_rows(rows: list[tuple[str, str, dict, dict, dict[str, np.ndarray], int]],
               nodes: list[str], T: int) -> tuple[list[Member], dict[str, np.ndarray]]:
    """Members from per-(node, job) rows, several rows of one job on one node (two pods of
    one workload) merged: minima of minima, maxima of maxima, means weighted by GPUs.

    rows: (job key, node, identity, labels, {family: [T]}, gpus)."""
    by: dict[tuple[str, str], list] = {}
    for job, node, ident, labels, fam, gpus in rows:
        by.setdefault((job, node), []).append((ident, labels, fam, gpus))
    order = {n: i for i, n in enumerate(nodes)}
    keys = sorted(by, key=lambda k: (k[0], order.get(k[1], 1 << 30)))
    members, out = [], {f: np.full((len(keys), T), np.nan) for f in GPU_FAMILIES}
    for i, key in enumerate(keys):
        parts = by[key]
        gpus = sum(p[3] for p in parts)
        labels: dict = {}
        for p in parts:
            labels.update({k: v for k, v in p[1].items() if v})
        members.append(Member(key[0], key[1], gpus, parts[0][0], labels))
        for f in GPU_FAMILIES:
            rows_f = [p[2][f] for p in parts if f in p[2]]
            if not rows_f:
                continue
            stack = np.vstack(rows_f)
            with np.errstate(all="ignore"), _quiet():
                if f.endswith("_min"):
                    out[f][i] = np.nanmin(stack, axis=0)
                elif f.endswith("_max"):
                    out[f][i] = np.nanmax(stack, axis=0)
                else:
                    w = np.array([p[3] for p in parts if f in p[2]], dtype=float)[:, None]
                    ok = np.isfinite(stack)
                    out[f][i] = np.where(ok.any(axis=0), np.nansum(stack * w, axis=0) /
                                         np.maximum((ok * w).sum(axis=0), 1e-12), np.nan)
    return members, {f: a for f, a in out.items() if np.isfinite(a).any()}


class _quiet:
    """Silence numpy's all-NaN-slice warnings: a step without data is expected."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)
        return self

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)
