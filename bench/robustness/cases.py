"""The cases: nodes with a known cause of GPU idleness (or none), each drawn from a seed.

Every case names its true class ("healthy" or one of the analysis' classes), the kinds a
right answer may carry (`accept`), the GPUs whose time the cause costs (`gpus`) and the ones
it comes from (`origin`), and which timeline causes count as its stall. The truth itself
(stall fraction, idle share, step period per GPU) is measured on the generated timeline over
the analysed window, never set by hand.

Parameters are drawn per seed inside ranges that keep each case what it says it is (a
"healthy NVMe at 50-70% of its ceiling" stays within 50-70%); everything else varies.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from bench.robustness import hardware as H
from bench.robustness.timeline import (HW_THERMAL, SW_POWER_CAP, SW_THERMAL, Job, Loader,
                                       Timeline, generate, truth_fractions)

MB = 1e6
GB = 1e9
LEAD = 150.0  # seconds generated before the analysed window (loader warm-up, rate() lookback)


@dataclass
class Case:
    name: str
    klass: str
    description: str
    node: H.Node
    jobs: list[Job]
    window: tuple[float, float]
    stall_causes: tuple[str, ...] = ()
    gpus: list[int] = field(default_factory=list)  # whose time the cause costs
    origin: list[int] = field(default_factory=list)  # where it comes from
    accept: tuple[str, ...] = ()
    ceilings: bool = False
    seed: int = 0

    @property
    def healthy(self) -> bool:
        return self.klass == "healthy"


@dataclass
class Truth:
    klass: str
    accept: tuple[str, ...]
    gpus: list[int]
    origin: list[int]
    stall_fraction: float  # share of the affected GPUs' time lost to the cause
    idle_fraction: dict[int, float]  # per GPU: share of the window no kernel ran
    step_period: dict[int, float | None]  # per GPU: median training step (None: no steps)
    causes: dict[int, dict[str, float]]


def measure(case: Case, tl: Timeline) -> Truth:
    w0, w1 = case.window
    fr = truth_fractions(tl, w0, w1)
    scope = case.gpus or list(range(case.node.gpus))
    stall = 0.0
    if not case.healthy:
        stall = float(np.mean([sum(fr[g].get(c, 0.0) for c in case.stall_causes)
                               for g in scope]))
    idle = {}
    period: dict[int, float | None] = {}
    for g in range(case.node.gpus):
        end = min(w1, tl.lost.get(g, w1))
        idle[g] = float(1 - tl.gpu[g]["kernel"].mean(w0, end)) if end > w0 else 1.0
        st = np.array([s for s in tl.steps[g] if w0 <= s <= end])
        period[g] = float(np.median(np.diff(st))) if len(st) >= 6 else None
    return Truth(case.klass, case.accept or (case.klass,), scope, case.origin or scope, stall,
                 idle, period, fr)


# --- building blocks -------------------------------------------------------------------------

def _host(rng: np.random.Generator, i: int) -> str:
    style = rng.integers(3)
    if style == 0:
        return f"gpu-{rng.choice(list('abcdef'))}{i:02d}"
    if style == 1:
        return f"dgx-h100-{i:03d}.rack{rng.integers(1, 9)}.cluster.example"
    return f"node{i:04d}"


def _attribution(rng: np.random.Generator) -> dict:
    kind = rng.integers(3)
    if kind == 0:
        return {"systemd_unit": "slurmstepd.scope", "slurm_job_id": str(rng.integers(1e5, 1e6))}
    if kind == 1:
        return {"container_id": rng.bytes(32).hex(),
                "pod_uid": "-".join(rng.bytes(n).hex() for n in (4, 2, 2, 2, 6))}
    return {"systemd_unit": "train.service"}


def loader(rng, step: float, workers: int, util: float, drive: str, batch_bytes: float,
           cache_hit: float = 0.97, request: float = 256 * 1024) -> Loader:
    """A loader whose workers are busy `util` of the time at this step period."""
    return Loader(workers=workers, batch_cpu=step * workers * util, batch_bytes=batch_bytes,
                  cache_hit=cache_hit, drive=drive, request=request)


def train(rng, node: H.Node, gpus: list[int], step: float, *, workers: int | None = None,
          util: float | None = None, batch_bytes: float | None = None,
          cache_hit: float = 0.97, pid: int | None = None, **kw) -> Job:
    """A healthy data-parallel job with ~`step` seconds per step: ordinary 2-4% host gaps,
    fed loaders, small pinned copies, an all-reduce mostly hidden under backward."""
    gap = step * rng.uniform(0.02, 0.04)
    opt = step * rng.uniform(0.03, 0.06)
    n = len(gpus)
    grad = rng.uniform(0.5, 4.0) * GB if n > 1 else 0.0
    exposed = (2 * grad * (n - 1) / n / node.board.nvlink_busbw) * 0.2 if n > 1 else 0.0
    compute = max(step - gap - opt - exposed - step * 0.01, step * 0.5)
    workers = workers if workers is not None else int(rng.integers(4, 9))
    util = util if util is not None else rng.uniform(0.2, 0.5)
    batch_bytes = batch_bytes if batch_bytes is not None else rng.uniform(2, 40) * MB
    drive = node.drives[0].name
    job = Job(gpus=list(gpus),
              loaders={r: loader(rng, step, workers, util, drive, batch_bytes, cache_hit)
                       for r in gpus},
              compute=compute, host_gap=gap, optimizer=opt,
              h2d_bytes=step * node.board.pinned_h2d * rng.uniform(0.002, 0.006),
              sm=rng.uniform(0.7, 0.92), tensor=rng.uniform(0.3, 0.6), dram=rng.uniform(0.2, 0.5),
              grad_bytes=grad, mem_used=rng.uniform(0.55, 0.95) * node.board.memory_total,
              pid=pid or int(rng.integers(2000, 90000)), attribution=_attribution(rng),
              jitter=rng.uniform(0.01, 0.03))
    for k, v in kw.items():
        setattr(job, k, v)
    return job


def _node(rng, i, board=None, **kw) -> H.Node:
    return H.make_node(rng, _host(rng, i), board or ("h100" if rng.random() < 0.7 else "a100"),
                       **kw)


# --- the cases ---------------------------------------------------------------------------------
# Each builder takes (rng, index, window start, window length) and returns a Case.

def healthy_llm(rng, i, w0, span):
    node = _node(rng, i, "h100")
    step = rng.uniform(0.8, 3.0)
    job = train(rng, node, list(range(8)), step, batch_bytes=rng.uniform(1, 8) * MB,
                eval_every=rng.uniform(150, 250), eval_seconds=rng.uniform(15, 35),
                ckpt_every=1e9, ckpt_first=LEAD + rng.uniform(100, 400),
                ckpt_bytes=rng.uniform(8, 20) * GB, log_every=50, log_seconds=0.05)
    return Case("healthy-llm-8gpu", "healthy", "LLM pre-training: evaluation phases, an async "
                "checkpoint's device-to-host copy, rank-0 logging", node, [job], (w0, w0 + span))


def healthy_short_steps(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.02, 0.06)
    job = train(rng, node, list(range(8)), step, workers=int(rng.integers(8, 13)),
                util=rng.uniform(0.7, 0.85), batch_bytes=rng.uniform(8, 30) * MB,
                cache_hit=0.98)
    return Case("healthy-short-steps-cpu-heavy", "healthy", "20-60 ms steps (shorter than a "
                "sample), image decoding keeps loaders 70-85% busy but fed", node, [job],
                (w0, w0 + span))


def healthy_nvme_busy(rng, i, w0, span):
    node = _node(rng, i, drives=1)
    step = rng.uniform(0.15, 0.5)
    d = node.drives[0]
    rho = rng.uniform(0.5, 0.7)
    per_rank = rho * d.read_ceiling(128 * 1024) * step / 8
    job = train(rng, node, list(range(8)), step, workers=int(rng.integers(10, 16)),
                util=rng.uniform(0.15, 0.3), batch_bytes=per_rank, cache_hit=0.0)
    read_rate = rng.uniform(80e6, 150e6)  # many small files: each worker reads slowly
    for ld in job.loaders.values():
        ld.request = 128 * 1024  # image files of ~100-150 KB, one request each
        ld.read_rate = read_rate
    return Case("healthy-nvme-at-60pct", "healthy", "the data set streams from NVMe at 50-70% "
                "of its ceiling; the drive reads ~100% busy, the loaders keep up", node, [job],
                (w0, w0 + span), ceilings=bool(rng.random() < 0.5))


def healthy_cpu_heavy(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.1, 0.3)
    workers = max(int(node.cores * rng.uniform(0.6, 0.8) / 8 / 0.85), 4)
    job = train(rng, node, list(range(8)), step, workers=workers, util=rng.uniform(0.75, 0.88))
    return Case("healthy-cpu-heavy-fed", "healthy", "augmentation-heavy loaders use most of "
                "the cores, each worker ~80% busy, batches always ready", node, [job],
                (w0, w0 + span), ceilings=bool(rng.random() < 0.5))


def healthy_pcie_bursts(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.2, 0.6)
    job = train(rng, node, [0, 2, 4, 6], step)
    job.h2d_bytes = step * 0.012 * node.board.pinned_h2d
    return Case("healthy-pcie-bursts", "healthy", "pinned copies at link rate, shorter than a "
                "sample, ~1% of each step", node, [job], (w0, w0 + span))


def healthy_power_at_limit(rng, i, w0, span):
    node = _node(rng, i, "h100")
    step = rng.uniform(0.5, 1.5)
    job = train(rng, node, list(range(8)), step)
    cf = rng.uniform(0.93, 0.97)
    job.clock_factor = {r: cf for r in range(8)}
    job.throttle_bits = {r: SW_POWER_CAP for r in range(8)}
    job.sm = 0.92
    job.compute *= cf
    node.extras["power_cap"] = {}
    job.power_cap = {r: node.board.power_limit_w for r in range(8)}
    node.board = replace(node.board, power_compute_w=node.board.power_limit_w * 1.05)
    return Case("healthy-at-board-power", "healthy", "dense GEMMs at the board's rated power: "
                "SW power cap active, clocks 3-7% under max (the hardware's normal operating "
                "point, nothing to fix)", node, [job], (w0, w0 + span))


def healthy_multinode(rng, i, w0, span):
    node = _node(rng, i, "h100")
    step = rng.uniform(0.5, 2.0)
    job = train(rng, node, list(range(8)), step, nodes=int(rng.integers(4, 33)),
                net_rate=node.nic_rate * 0.9, remote_jitter=step * rng.uniform(0.005, 0.02))
    return Case("healthy-multinode", "healthy", "one node of a multi-node job on a healthy "
                "fabric; peers elsewhere make it wait a little now and then", node, [job],
                (w0, w0 + span))


def healthy_single_jobs(rng, i, w0, span):
    node = _node(rng, i)
    jobs = [train(rng, node, [g], rng.uniform(0.03, 0.8), workers=int(rng.integers(3, 8)),
                  pid=10000 + 400 * g) for g in range(8)]
    return Case("healthy-8-single-gpu-jobs", "healthy", "a sweep: 8 independent single-GPU "
                "jobs, each with its own loader and step period", node, jobs, (w0, w0 + span))


def healthy_two_jobs(rng, i, w0, span):
    node = _node(rng, i)
    jobs = [train(rng, node, [0, 1, 2, 3], rng.uniform(0.1, 1.0), pid=20000),
            train(rng, node, [4, 5, 6, 7], rng.uniform(0.1, 1.0), pid=30000)]
    return Case("healthy-two-4gpu-jobs", "healthy", "two 4-GPU jobs with different step "
                "periods", node, jobs, (w0, w0 + span))


def healthy_eval_heavy(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.2, 1.0)
    job = train(rng, node, list(range(8)), step, eval_every=rng.uniform(60, 120),
                eval_seconds=rng.uniform(20, 40))
    return Case("healthy-frequent-evaluation", "healthy", "evaluation every 1-2 minutes for "
                "20-40 s: forward only, cached data, lower SM activity", node, [job],
                (w0, w0 + span))


def idle_between_jobs(rng, i, w0, span):
    node = _node(rng, i)
    return Case("idle-between-jobs", "healthy", "no job: no process, no GPU memory held "
                "(spare capacity, not a stall)", node, [], (w0, w0 + span))


def job_starts(rng, i, w0, span):
    node = _node(rng, i)
    t = w0 + span * rng.uniform(0.25, 0.45)
    job = train(rng, node, list(range(8)), rng.uniform(0.2, 1.5), start=t,
                init_seconds=rng.uniform(20, 60))
    return Case("job-starts-in-window", "healthy", "the node is idle, then a job starts "
                "(start-up, then training)", node, [job], (w0, w0 + span))


def job_ends(rng, i, w0, span):
    node = _node(rng, i)
    t = w0 + span * rng.uniform(0.5, 0.75)
    job = train(rng, node, list(range(8)), rng.uniform(0.2, 1.5), end=t)
    return Case("job-ends-in-window", "healthy", "a job trains, then exits; the node stays "
                "idle", node, [job], (w0, w0 + span))


def idle_allocated_notebook(rng, i, w0, span):
    node = _node(rng, i)
    k = int(rng.integers(1, 3))
    busy = [g for g in range(8) if g >= k]
    jobs = [train(rng, node, busy, rng.uniform(0.2, 1.0), pid=5000),
            Job(gpus=list(range(k)), loaders={}, compute=0, host_gap=0, optimizer=0,
                h2d_bytes=0, idle=True, comm="python3", pid=7000,
                mem_used=rng.uniform(0.2, 0.7) * node.board.memory_total,
                attribution={"systemd_unit": "jupyter.service"})]
    return Case("idle-allocated-notebook", "idle_allocated", "a notebook holds memory on "
                "GPUs it never uses while a job trains on the others", node, jobs,
                (w0, w0 + span), ("idle",), list(range(k)))


def idle_allocated_node(rng, i, w0, span):
    node = _node(rng, i)
    job = Job(gpus=list(range(8)), loaders={}, compute=0, host_gap=0, optimizer=0,
              h2d_bytes=0, idle=True, pid=6000, attribution=_attribution(rng),
              mem_used=rng.uniform(0.3, 0.9) * node.board.memory_total)
    return Case("idle-allocated-node", "idle_allocated", "a job holds all 8 GPUs' memory and "
                "has run no kernel for minutes (hung, or waiting on something)", node, [job],
                (w0, w0 + span), ("idle",), list(range(8)))


def input_storage(rng, i, w0, span):
    node = _node(rng, i, drives=1)
    step = rng.uniform(0.1, 0.6)
    d = node.drives[0]
    need = d.read_ceiling(1 << 20) * step / 8 * rng.uniform(1.3, 2.2)
    job = train(rng, node, list(range(8)), step, workers=int(rng.integers(8, 16)),
                util=0.1, batch_bytes=need, cache_hit=rng.uniform(0.0, 0.1))
    for ld in job.loaders.values():
        ld.request = 1 << 20
    return Case("input-storage-8gpu", "input_storage", "8 ranks stream an uncached data set "
                "from one NVMe drive at its ceiling", node, [job], (w0, w0 + span),
                ("input",), ceilings=bool(rng.random() < 0.5))


def input_storage_iops(rng, i, w0, span):
    node = _node(rng, i, drives=1)
    step = rng.uniform(0.1, 0.4)
    d = node.drives[0]
    req = 16 * 1024
    need = d.read_ceiling(req) * step / 4 * rng.uniform(1.3, 2.0)
    job = train(rng, node, [0, 1, 2, 3], step, workers=int(rng.integers(16, 24)), util=0.05,
                batch_bytes=need, cache_hit=0.0)
    for ld in job.loaders.values():
        ld.request = req
    return Case("input-storage-small-reads", "input_storage", "small random reads: the drive "
                "is at its IOPS ceiling well below its bandwidth", node, [job], (w0, w0 + span),
                ("input",), ceilings=bool(rng.random() < 0.5))


def input_storage_eval(rng, i, w0, span):
    case = input_storage(rng, i, w0, span)
    j = case.jobs[0]
    j.eval_every, j.eval_seconds = rng.uniform(120, 200), rng.uniform(15, 30)
    case.name = "input-storage-with-evaluation"
    case.description += "; evaluation phases from cache in between"
    return case


def input_cpu_1gpu(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.05, 0.4)
    job = train(rng, node, [int(rng.integers(8))], step, workers=int(rng.integers(2, 6)),
                util=rng.uniform(1.4, 2.5))
    return Case("input-cpu-1gpu", "input_cpu", "one GPU, too few loader workers for its "
                "decoding: every worker at 100%", node, [job], (w0, w0 + span), ("input",),
                list(job.gpus))


def input_cpu_dp(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.1, 0.8)
    job = train(rng, node, list(range(8)), step, workers=int(rng.integers(2, 6)),
                util=rng.uniform(1.3, 2.0))
    return Case("input-cpu-8gpu", "input_cpu", "data-parallel job whose loaders are CPU-bound "
                "on every rank; the stall surfaces as collective wait", node, [job],
                (w0, w0 + span), ("input",), ceilings=bool(rng.random() < 0.5))


def input_cpu_one_rank(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.1, 0.8)
    job = train(rng, node, list(range(8)), step, workers=8, util=rng.uniform(0.3, 0.5))
    k = int(rng.integers(8))
    ld = job.loaders[k]
    job.loaders[k] = replace(ld, workers=2, batch_cpu=ld.batch_cpu * rng.uniform(1.5, 2.5))
    return Case("input-cpu-one-rank", "input_cpu", "one rank's loader is slow (2 workers, "
                "heavier samples); its peers spin in the all-reduce", node, [job],
                (w0, w0 + span), ("input",), list(range(8)), [k])


def input_cpu_short_steps(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.02, 0.05)
    job = train(rng, node, list(range(8)), step, workers=int(rng.integers(3, 6)),
                util=rng.uniform(1.3, 1.8))
    return Case("input-cpu-short-steps", "input_cpu", "20-50 ms steps (shorter than a sample) "
                "with CPU-bound loaders", node, [job], (w0, w0 + span), ("input",))


def h2d_pageable(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.3, 1.0)
    job = train(rng, node, [0, 2, 4, 6], step, pinned=False)
    job.h2d_bytes = node.board.pageable_h2d * step * rng.uniform(0.15, 0.35)
    return Case("h2d-pageable", "h2d_pcie", "large batches copied from pageable memory: the "
                "CPU staging copy limits the rate", node, [job], (w0, w0 + span), ("h2d",),
                ceilings=bool(rng.random() < 0.5))


def h2d_bursts(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.1, 0.3)
    gpus = [int(rng.integers(8))]
    job = train(rng, node, gpus, step)
    job.h2d_bytes = node.board.pinned_h2d * step * rng.uniform(0.2, 0.35)
    return Case("h2d-pinned-bursts", "h2d_pcie", "pinned copies at link rate, each shorter "
                "than a 0.1 s sample, taking 20-35% of the step", node, [job], (w0, w0 + span),
                ("h2d",), list(gpus), ceilings=bool(rng.random() < 0.5))


def io_h2d_serialized(rng, i, w0, span):
    node = _node(rng, i, drives=1)
    step = rng.uniform(0.2, 0.8)
    job = train(rng, node, list(range(8)), step, workers=0, pinned=False)
    for r in job.gpus:
        job.loaders[r] = Loader(workers=0, batch_cpu=step * rng.uniform(0.03, 0.06),
                                batch_bytes=rng.uniform(80, 200) * MB, cache_hit=0.0,
                                drive=node.drives[0].name, request=128 * 1024)
    job.h2d_bytes = node.board.pageable_h2d * step * rng.uniform(0.08, 0.15)
    return Case("io-h2d-serialized", "io_h2d_serialized", "no prefetch: each rank reads its "
                "batch, decodes it, copies it, then computes; nothing overlaps and nothing is "
                "saturated", node, [job], (w0, w0 + span), ("input", "h2d"))


def shared_link(rng, i, w0, span):
    node = _node(rng, i, "h100")
    step = rng.uniform(0.15, 0.5)
    job = train(rng, node, list(range(8)), step)
    job.h2d_bytes = node.board.pinned_h2d * step * rng.uniform(0.12, 0.2)
    return Case("shared-uplink", "shared_link", "two GPUs behind each PCIe switch copy at "
                "once; their summed copies pin the switch's uplink", node, [job],
                (w0, w0 + span), ("h2d",), ceilings=bool(rng.random() < 0.5))


def comm_wait(rng, i, w0, span):
    node = _node(rng, i, "h100")
    step = rng.uniform(0.5, 2.0)
    job = train(rng, node, list(range(8)), step, nodes=int(rng.integers(4, 17)))
    job.grad_bytes = rng.uniform(8, 20) * GB
    job.net_rate = node.nic_rate * rng.uniform(0.03, 0.08)
    return Case("comm-wait-slow-fabric", "comm_wait", "a multi-node job on a degraded fabric: "
                "the inter-node all-reduce is exposed", node, [job], (w0, w0 + span),
                ("comm",))


def throttled_power(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.3, 1.5)
    job = train(rng, node, list(range(8)), step)
    b = node.board
    cap = b.power_limit_w * rng.uniform(0.45, 0.6)
    full = b.power_held_w + (b.power_compute_w - b.power_held_w) * (0.35 + 0.65 * job.sm)
    cf = min((cap / full) ** (1 / 2.2), 0.92)
    job.power_cap = {r: cap for r in range(8)}
    job.clock_factor = {r: cf for r in range(8)}
    job.throttle_bits = {r: SW_POWER_CAP for r in range(8)}
    node.extras["power_cap"] = {r: cap for r in range(8)}
    return Case("throttled-power-cap", "throttled", "an operator's power cap at 45-60% of "
                "the board limit: clocks drop, power sits at the cap", node, [job],
                (w0, w0 + span), ("throttle",))


def throttled_thermal(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.3, 1.5)
    job = train(rng, node, list(range(8)), step)
    k = int(rng.integers(8))
    job.clock_factor = {k: rng.uniform(0.55, 0.75)}
    job.throttle_bits = {k: SW_THERMAL | HW_THERMAL}
    node.extras["theta"] = {k: 0.16}
    return Case("throttled-thermal-one-gpu", "throttled", "one GPU's cooling failed: thermal "
                "slowdown cuts its clock; its peers spin waiting for it", node, [job],
                (w0, w0 + span), ("throttle",), list(range(8)), [k])


def straggler(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.2, 1.5)
    job = train(rng, node, list(range(8)), step)
    k = int(rng.integers(8))
    job.compute_scale = {k: rng.uniform(1.25, 1.5)}
    return Case("straggler-compute", "straggler", "one rank gets more work per step (uneven "
                "sequence lengths); it computes longest while its peers spin", node, [job],
                (w0, w0 + span), ("straggle",), list(range(8)), [k])


def straggler_sync_checkpoint(rng, i, w0, span):
    node = _node(rng, i, "h100")
    step = rng.uniform(0.8, 2.0)
    job = train(rng, node, list(range(8)), step, ckpt_every=1e9,
                ckpt_first=LEAD + rng.uniform(30, 150), ckpt_bytes=rng.uniform(2, 6) * GB)
    job.ckpt_sync0 = node.drives[-1].write * 0.8 * rng.uniform(90, 240)
    return Case("idle-rank0-sync-checkpoint", "straggler", "rank 0 writes a synchronous "
                "checkpoint for minutes: GPU 0 idles holding its memory while the other seven "
                "read 100% busy at ~155 W, spinning in the barrier", node, [job],
                (w0, w0 + span), ("ckpt",), list(range(8)), [0])


def memory_pressure(rng, i, w0, span):
    node = _node(rng, i, drives=1)
    step = rng.uniform(0.2, 0.6)
    workers = int(rng.integers(6, 10))
    # Direct reclaim frees ~1.5-3 GB/s for the whole node, shared by every worker.
    reclaim_node = rng.uniform(1.5e9, 3e9)
    hit = rng.uniform(0.2, 0.4)
    need = reclaim_node * step / 8 * rng.uniform(1.3, 2.0) / (1 - hit)
    job = train(rng, node, list(range(8)), step, workers=workers, util=0.1,
                batch_bytes=need, cache_hit=hit)
    for ld in job.loaders.values():
        ld.reclaim = reclaim_node / (8 * workers)
        ld.request = 1 << 20
    # Workers hold copies of the data set in anonymous memory: little is left for the cache.
    node.extras["anon_extra"] = node.memory_total * 0.97 - 8 * 24e9 - 8e9
    node.extras["dataset_cached"] = node.memory_total * 0.01
    return Case("memory-pressure", "memory_pressure", "the page cache cannot hold the working "
                "set: direct reclaim stalls the loaders and evicted pages are read again",
                node, [job], (w0, w0 + span), ("input",))


def gpu_lost(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.2, 1.5)
    k = int(rng.integers(8))
    t = w0 + span * rng.uniform(0.2, 0.5)
    job = train(rng, node, list(range(8)), step, lost=(k, t))
    return Case("gpu-lost", "gpu_lost", "a GPU falls off the bus mid-run; the other ranks hang "
                "in NCCL until the watchdog", node, [job], (w0, w0 + span), ("lost",),
                list(range(8)), [k])


# --- healthy variants added after the first 33 (appended, so that every earlier case keeps
# its index and a seed reproduces it) --------------------------------------------------------

def healthy_rank0_logging(rng, i, w0, span):
    node = _node(rng, i)
    step = rng.uniform(0.2, 1.0)
    job = train(rng, node, list(range(8)), step, log_every=int(rng.integers(10, 30)),
                log_seconds=step * rng.uniform(0.2, 0.5))
    return Case("healthy-rank0-logging", "healthy", "rank 0 pauses to log every 10-30 steps "
                "(1-3% of the job's time); its peers wait in the next all-reduce", node, [job],
                (w0, w0 + span))


def healthy_async_checkpoints(rng, i, w0, span):
    node = _node(rng, i, "h100")
    step = rng.uniform(0.3, 1.2)
    job = train(rng, node, list(range(8)), step, ckpt_every=rng.uniform(60, 120),
                ckpt_first=LEAD + rng.uniform(10, 50), ckpt_bytes=rng.uniform(2, 6) * GB)
    return Case("healthy-async-checkpoints", "healthy", "asynchronous checkpoints every 1-2 "
                "minutes: device-to-host copies, then drive writes, while training goes on",
                node, [job], (w0, w0 + span))


def healthy_streamed_shards(rng, i, w0, span):
    node = _node(rng, i, drives=1)
    step = rng.uniform(0.2, 0.6)
    rho = rng.uniform(0.2, 0.45)
    per_rank = rho * node.drives[0].read_ceiling(1 << 20) * step / 8
    job = train(rng, node, list(range(8)), step, workers=int(rng.integers(6, 10)),
                util=rng.uniform(0.2, 0.4), batch_bytes=per_rank, cache_hit=0.0)
    for ld in job.loaders.values():
        ld.request = 1 << 20
    return Case("healthy-streamed-shards", "healthy", "large shards streamed uncached in 1 MiB "
                "reads at 20-45% of the drive's ceiling, loaders fed", node, [job],
                (w0, w0 + span), ceilings=bool(rng.random() < 0.5))


def healthy_part_of_node(rng, i, w0, span):
    node = _node(rng, i)
    gpus = sorted(int(g) for g in rng.choice(8, size=int(rng.integers(2, 5)), replace=False))
    job = train(rng, node, gpus, rng.uniform(0.1, 1.0))
    return Case("healthy-part-of-node", "healthy", "a 2-4 GPU job; the node's other GPUs hold "
                "no memory (spare capacity)", node, [job], (w0, w0 + span))


def healthy_large_multinode(rng, i, w0, span):
    node = _node(rng, i, "h100")
    step = rng.uniform(0.3, 1.5)
    job = train(rng, node, list(range(8)), step, nodes=int(rng.integers(16, 65)),
                net_rate=node.nic_rate * rng.uniform(0.5, 0.9),
                remote_jitter=step * rng.uniform(0.01, 0.03))
    job.grad_bytes = rng.uniform(1, 4) * GB
    job.overlap = rng.uniform(0.85, 0.95)
    return Case("healthy-large-multinode", "healthy", "one node of a 16-64 node job, the "
                "all-reduce 85-95% hidden under backward, remote ranks 1-3% late", node, [job],
                (w0, w0 + span))


def healthy_partly_cached(rng, i, w0, span):
    node = _node(rng, i, drives=1)
    step = rng.uniform(0.1, 0.5)
    job = train(rng, node, list(range(8)), step, workers=int(rng.integers(4, 10)),
                batch_bytes=rng.uniform(20, 80) * MB, cache_hit=rng.uniform(0.6, 0.9))
    return Case("healthy-partly-cached", "healthy", "the page cache serves 60-90% of the reads, "
                "the drive the rest; loaders fed", node, [job], (w0, w0 + span))


BUILDERS: dict[str, Callable] = {f.__name__.replace("_", "-"): f for f in (
    healthy_llm, healthy_short_steps, healthy_nvme_busy, healthy_cpu_heavy, healthy_pcie_bursts,
    healthy_power_at_limit, healthy_multinode, healthy_single_jobs, healthy_two_jobs,
    healthy_eval_heavy, idle_between_jobs, job_starts, job_ends,
    idle_allocated_notebook, idle_allocated_node, input_storage, input_storage_iops,
    input_storage_eval, input_cpu_1gpu, input_cpu_dp, input_cpu_one_rank,
    input_cpu_short_steps, h2d_pageable, h2d_bursts, io_h2d_serialized, shared_link, comm_wait,
    throttled_power, throttled_thermal, straggler, straggler_sync_checkpoint, memory_pressure,
    gpu_lost, healthy_rank0_logging, healthy_async_checkpoints, healthy_streamed_shards,
    healthy_part_of_node, healthy_large_multinode, healthy_partly_cached)}


def build(name: str, seed: int, index: int, w0: float, span: float) -> tuple[Case, Timeline]:
    """One case from its seed: the node, its jobs, the generated timeline."""
    rng = np.random.default_rng([seed, index])
    case = BUILDERS[name](rng, index, w0, span)
    case.name, case.seed = name, seed
    if not case.ceilings and rng.random() < 0.3:
        case.ceilings = True
    tl = generate(case.node, case.jobs, w0 - LEAD, w0 + span, rng)
    return case, tl
