"""The event-level timeline of a training node: what every GPU, loader worker, drive and link
does, step by step, with the cause of every second a GPU does not compute.

A data-parallel step on rank r: host-side work (Python, logging) -> wait for the next batch
from the rank's own loader -> host-to-device copy (pinned at the copy engine's rate, pageable
at the CPU staging copy's rate, shared switch uplinks split between the GPUs copying at once)
-> forward and backward kernels at an SM/tensor activity level, slower at a throttled clock
-> the gradient all-reduce: NCCL kernels spin until the slowest rank (here or on another
node) arrives, then move the bytes at NVLink or network rate -> optimizer kernels. Loader
workers (processes, children of the rank's process) each build a whole batch: read it (from
the page cache or from the drive, blocked in D state while the drive serves it), then decode
it on one core; batches are delivered in order with `prefetch` batches per worker in flight.
Storage, CPU and reclaim contention stretch the phases so that node-wide demand stays within
the drive's ceiling and the cores.

Also: evaluation phases (forward only, cached data), checkpoints (device-to-host copies over
PCIe TX, then storage writes; asynchronous, or synchronous on rank 0 while peers spin in the
barrier), host-side logging on rank 0, idle allocated GPUs, nodes idle between jobs, jobs
starting or ending inside the window, GPUs lost mid-run.

Ground truth: per GPU, every second is labelled with its cause: compute, gap (ordinary host
overhead), input, h2d, comm, throttle, straggle, ckpt, log, eval, idle, lost, nojob; time a
rank spends spinning for a late peer gets the late peer's cause.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.robustness.hardware import Node
from bench.robustness.pwc import Pwc, Segments, add, fluid_queue

KIB = 1024

# NVML clock-event reason bits (nvmlClocksEventReason*).
GPU_IDLE, SW_POWER_CAP, HW_SLOWDOWN, SW_THERMAL, HW_THERMAL = 0x1, 0x4, 0x8, 0x20, 0x40
IDLE_CLOCK_HZ = 345e6


@dataclass
class Loader:
    workers: int  # 0: the rank's own process loads each batch when it needs it
    batch_cpu: float  # CPU seconds to decode/augment one batch (on one core)
    batch_bytes: float  # bytes read per batch (read(), page cache hits included)
    cache_hit: float  # share of those bytes served by the page cache
    drive: str
    request: float = 256 * KIB  # bytes per read request
    prefetch: int = 2
    read_rate: float = 0.8e9  # bytes/s one worker's Python reads reach (open, read, close)
    reclaim: float = 0.0  # bytes/s one worker's direct reclaim frees (0: no memory pressure)


@dataclass
class Job:
    gpus: list[int]
    loaders: dict[int, Loader]  # per rank (GPU index)
    compute: float  # forward+backward seconds per step at the max clock
    host_gap: float  # host-side seconds per step (Python, logging, launch)
    optimizer: float
    h2d_bytes: float  # per step per rank
    pinned: bool = True
    sm: float = 0.8
    tensor: float = 0.45
    dram: float = 0.35
    jitter: float = 0.02  # coefficient of variation of phase times
    compute_scale: dict[int, float] = field(default_factory=dict)  # straggler ranks
    clock_factor: dict[int, float] = field(default_factory=dict)  # throttled ranks
    throttle_bits: dict[int, int] = field(default_factory=dict)
    power_cap: dict[int, float] = field(default_factory=dict)  # W, throttled by power
    grad_bytes: float = 0.0  # gradient bytes per GPU all-reduced each step
    overlap: float = 0.8  # share of the all-reduce hidden under backward
    nodes: int = 1  # >1: the job spans nodes; the others are modelled as remote ranks
    net_rate: float = 0.0  # bytes/s per GPU between nodes
    remote_jitter: float = 0.0  # extra arrival delay of remote ranks (mean seconds)
    start: float | None = None  # process start (None: before the timeline)
    end: float | None = None  # process exit (None: after)
    init_seconds: float = 30.0  # start-up before the first step
    mem_used: float = 60e9
    eval_every: float = 0.0  # seconds between evaluation phases (0: none)
    eval_seconds: float = 0.0
    ckpt_every: float = 0.0
    ckpt_first: float = 0.0  # seconds after the timeline's start of the first checkpoint
    ckpt_bytes: float = 0.0  # per GPU (sharded) device-to-host
    ckpt_sync0: float = 0.0  # >0: rank 0 writes synchronously this many bytes, peers wait
    log_every: int = 0  # steps between rank-0 host-side logging pauses
    log_seconds: float = 0.0
    idle: bool = False  # holds memory, runs no kernel (idle allocated)
    lost: tuple[int, float] | None = None  # (gpu, time) it falls off the bus
    pid: int = 4242
    comm: str = "pt_main_thread"
    attribution: dict = field(default_factory=dict)


@dataclass
class Timeline:
    start: float
    end: float
    node: Node
    jobs: list[Job]
    gpu: dict[int, dict[str, Pwc]]  # per GPU: kernel, sm, tensor, dram, pcie_rx, ... power
    causes: dict[int, list[tuple[float, float, str]]]
    host: dict[str, Pwc]  # cpu_user, cpu_system, iowait, psi_*, mem_*, refault
    disks: dict[str, dict]  # per drive: read, write, read_ops, write_ops (Pwc), request
    procs: dict[int, dict[str, Pwc]]  # per process tree root pid
    proc_life: dict[int, tuple[float, float]]
    net: dict[str, dict[str, Pwc]]  # per interface or RDMA port: rx, tx
    steps: dict[int, list[float]]  # per GPU: start time of each training step
    lost: dict[int, float]
    f_cpu: float = 1.0  # how much CPU contention stretched the loaders' decoding


class _Gpu:
    """Segments of one GPU being built."""

    names = ("kernel", "sm", "tensor", "dram", "pcie_rx", "pcie_tx", "nvlink_rx",
             "nvlink_tx", "power_extra", "held", "clock", "throttle", "mem")

    def __init__(self) -> None:
        self.s = {n: Segments() for n in self.names}
        self.causes: list[tuple[float, float, str]] = []
        self.steps: list[float] = []

    def cause(self, t0: float, t1: float, what: str) -> None:
        if t1 > t0:
            self.causes.append((t0, t1, what))


class _LoaderSim:
    """In-order batches from W worker processes with `prefetch` batches each in flight."""

    def __init__(self, spec: Loader, t0: float, f_cpu: float, f_io: float, worker_rate: float,
                 rng: np.random.Generator, jitter: float, host: dict, proc: dict):
        self.spec, self.rng, self.jitter = spec, rng, jitter
        self.f_cpu, self.f_io, self.rate = f_cpu, f_io, worker_rate
        self.free = np.full(max(spec.workers, 1), t0)
        self.ready: list[float] = []
        self.consumed: list[float] = []
        self.host, self.proc = host, proc

    def _j(self) -> float:
        return float(self.rng.lognormal(0, self.jitter)) if self.jitter else 1.0

    def _cpu(self, t0: float, t1: float, cores: float) -> None:
        """CPU of the loading process: a worker, or the trainer itself without workers."""
        self.proc["cpu"].put(t0, t1, cores)
        if self.spec.workers == 0:
            self.proc["root"].put(t0, t1, cores)

    def produce(self, start: float) -> float:
        """One batch built from `start` on one core; returns when it is ready. Records the
        worker's reads, D state and CPU."""
        s = self.spec
        miss = s.batch_bytes * (1 - s.cache_hit)
        hit = s.batch_bytes - miss
        t = start
        if miss > 0:
            if s.reclaim:
                # Room for the pages must first be reclaimed: the worker stalls in direct
                # reclaim (memory pressure), partly on CPU, partly waiting for writeback.
                d_rec = miss / s.reclaim * self._j()
                self.host["psi_mem"].put(t, t + d_rec, 1.0)
                self.host["cpu_system"].put(t, t + d_rec, 0.5)
                self._cpu(t, t + d_rec, 0.5)
                self.host["blocked"].put(t, t + d_rec, 0.5)
                self.proc["blocked"].put(t, t + d_rec, 0.5)
                t += d_rec
            d = miss / self.rate * self.f_io * self._j()
            self.host["disk_demand:" + s.drive].put(t, t + d, miss / d)
            self.host["read_reqs:" + s.drive].put(t, t + d, miss / s.request / d)
            self.host["blocked"].put(t, t + d, 1.0)
            self.host["refault"].put(t, t + d, (miss / 4096) / d * (0.85 if s.reclaim else 0.1))
            self.proc["blocked"].put(t, t + d, 1.0)
            self.proc["read"].put(t, t + d, miss / d)
            self.proc["rchar"].put(t, t + d, miss / d)
            t += d
        if hit > 0:
            d = hit / 6e9 * self._j()  # page-cache copies at memcpy speed
            self.proc["rchar"].put(t, t + d, hit / d)
            self._cpu(t, t + d, 1.0)
            self.host["cpu_system"].put(t, t + d, 1.0)
            t += d
        d = s.batch_cpu * self.f_cpu * self._j()
        self._cpu(t, t + d, 1.0)
        self.host["cpu_user"].put(t, t + d, 1.0)
        self.host["decoding"].put(t, t + d, 1.0)
        return t + d

    def batch_ready(self, k: int) -> float:
        s = self.spec
        while len(self.ready) <= k:
            j = len(self.ready)
            w = j % len(self.free)
            back = j - len(self.free) * s.prefetch
            slot = self.consumed[back] if back >= 0 else self.free[w]
            start = max(self.free[w], slot)
            done = self.produce(start)
            self.free[w] = done
            self.ready.append(done)
        return self.ready[k]


def _contention(node: Node, jobs: list[Job], worker_rates: dict) -> tuple[float, float]:
    """Stretch factors of loader CPU and read phases so that the node's summed demand stays
    within its cores and its drives' ceilings (steady state, all ranks' loaders together)."""
    loaders = [(j, r, j.loaders[r]) for j in jobs if not j.idle for r in j.gpus
               if r in j.loaders and j.loaders[r].workers > 0]
    if not loaders:
        return 1.0, 1.0

    def x(j: Job, r: int, ld: Loader, f_cpu: float, f_io: float) -> float:
        consume = 1.0 / (j.compute + j.host_gap + j.optimizer + 1e-3)
        miss = ld.batch_bytes * (1 - ld.cache_hit)
        t_io = miss / worker_rates[(id(j), r)] * f_io + (ld.batch_bytes - miss) / 6e9 + \
            (miss / ld.reclaim if ld.reclaim else 0.0)
        t_cpu = ld.batch_cpu * f_cpu
        return min(consume, ld.workers / max(t_io + t_cpu, 1e-6))

    cores = node.cores - node.background_cores - sum(len(j.gpus) * 1.1 for j in jobs)
    f_cpu = f_io = 1.0
    for _ in range(30):
        cpu = sum(x(j, r, ld, f_cpu, f_io) * ld.batch_cpu for j, r, ld in loaders)
        if cpu > cores:
            f_cpu *= (cpu / cores) ** 0.7
        by_drive: dict[str, float] = {}
        for j, r, ld in loaders:
            by_drive[ld.drive] = by_drive.get(ld.drive, 0.0) + \
                x(j, r, ld, f_cpu, f_io) * ld.batch_bytes * (1 - ld.cache_hit)
        worst = max((v / (node.drive(d).read_ceiling(_request(loaders, d)) * 0.97)
                     for d, v in by_drive.items()), default=0.0)
        if worst > 1.0:
            f_io *= worst ** 0.7
    return f_cpu, f_io


def _request(loaders, drive: str) -> float:
    return float(np.mean([ld.request for _, _, ld in loaders if ld.drive == drive]))


def generate(node: Node, jobs: list[Job], start: float, end: float,
             rng: np.random.Generator) -> Timeline:
    host_names = ["cpu_user", "cpu_system", "blocked", "decoding", "psi_mem", "refault",
                  "net_rx", "net_tx", "running_extra"]
    for d in node.drives:
        host_names += ["disk_demand:" + d.name, "read_reqs:" + d.name, "disk_write:" + d.name]
    host = {n: Segments() for n in host_names}
    gpus = {g: _Gpu() for g in range(node.gpus)}
    procs: dict[int, dict[str, Segments]] = {}
    life: dict[int, tuple[float, float]] = {}
    rdma = {n: {"rx": Segments(), "tx": Segments()} for n in node.nics}
    lost: dict[int, float] = {}
    # Per-worker read rate: synchronous buffered reads with readahead keep ~2 requests busy,
    # and Python's per-file overhead bounds what one worker reads.
    worker_rates = {}
    for j in jobs:
        for r, ld in j.loaders.items():
            d = node.drive(ld.drive)
            per = 2 * ld.request / (d.latency + ld.request / d.seq_read)
            worker_rates[(id(j), r)] = min(per, 0.45 * d.read_ceiling(ld.request),
                                           ld.read_rate)
    f_cpu, f_io = _contention(node, jobs, worker_rates)
    for j in jobs:
        _run_job(node, j, start, end, rng, host, gpus, procs, life, rdma, worker_rates,
                 f_cpu, f_io, lost)
    tl = _finish(node, jobs, start, end, rng, host, gpus, procs, life, rdma, lost)
    tl.f_cpu = f_cpu
    return tl


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def _proc_segments() -> dict[str, Segments]:
    # cpu: the whole tree; root: the trainer process alone (its workers are the rest).
    return {n: Segments() for n in ("cpu", "root", "blocked", "read", "rchar", "members")}


def _run_job(node, j: Job, start, end, rng, host, gpus, procs, life, rdma, worker_rates,
             f_cpu, f_io, lost) -> None:
    b = node.board
    t_proc = start - 3600.0 if j.start is None else j.start
    t_exit = end + 3600.0 if j.end is None else j.end
    # A job running before the timeline starts training at its start (the timeline's lead
    # lets its loaders reach their steady state before the analysed window).
    t_first = t_proc + j.init_seconds if j.start is not None else start
    ranks = list(j.gpus)
    # Process trees: one per rank, its loader workers as children.
    proc_of = {}
    for i, r in enumerate(ranks):
        pid = j.pid + 37 * i
        proc_of[r] = pid
        procs[pid] = _proc_segments()
        life[pid] = (t_proc, t_exit)
        ld = j.loaders.get(r)
        members = 1 + (ld.workers if ld and not j.idle else 0)
        procs[pid]["members"].put(t_proc, t_exit, float(members))
        g = gpus[r]
        g.s["held"].put(t_proc, t_exit, 1.0)
        g.s["mem"].put(t_proc + min(20.0, j.init_seconds * 0.5), t_exit, j.mem_used)
        g.s["mem"].put(t_proc, t_proc + min(20.0, j.init_seconds * 0.5), j.mem_used * 0.3)
        if j.idle:
            procs[pid]["cpu"].put(t_proc, t_exit, 0.01)
            procs[pid]["root"].put(t_proc, t_exit, 0.01)
            host["cpu_user"].put(t_proc, t_exit, 0.01)
            g.s["clock"].put(t_proc, t_exit, IDLE_CLOCK_HZ)
            g.cause(t_proc, t_exit, "idle")
            continue
        # Start-up: imports, model load (reads a checkpoint), CUDA context; the GPU idles.
        if j.start is not None:
            procs[pid]["cpu"].put(t_proc, t_first, 1.0)
            procs[pid]["root"].put(t_proc, t_first, 1.0)
            host["cpu_user"].put(t_proc, t_first, 1.0)
            g.s["clock"].put(t_proc, t_first, IDLE_CLOCK_HZ)
            g.cause(t_proc, t_first, "startup")
            if ld is not None:
                host["disk_demand:" + ld.drive].put(t_proc + 2, t_proc + 12,
                                                    j.mem_used * 0.2 / 10)
    if j.idle:
        return
    loaders = {}
    for r in ranks:
        ld = j.loaders.get(r)
        if ld is None:
            continue
        rate = worker_rates[(id(j), r)]
        loaders[r] = _LoaderSim(ld, t_first, f_cpu, f_io if ld.workers else 1.0, rate, rng,
                                j.jitter * 3, host, procs[proc_of[r]])
    n = len(ranks)
    multi = n > 1 or j.nodes > 1
    comm_nvlink = (2 * j.grad_bytes * (n - 1) / n / b.nvlink_busbw) if n > 1 else 0.0
    comm_net = (2 * j.grad_bytes / max(n, 1) * (j.nodes - 1) / j.nodes / j.net_rate
                if j.nodes > 1 and j.net_rate else 0.0)
    # What backward hides of the all-reduce; the rest is exposed after the last kernel.
    exposed_nv = comm_nvlink * (1 - j.overlap)
    # The network part: time a healthy fabric would need is the normal share; beyond the
    # backward pass it is exposed.
    exposed_net = max(comm_net - j.compute * 0.5 * j.overlap, 0.0)
    now = {r: t_first for r in ranks}
    step = 0
    next_eval = t_first + j.eval_every if j.eval_every else np.inf
    next_ckpt = start + j.ckpt_first if j.ckpt_every else np.inf
    lost_gpu, lost_t = j.lost if j.lost else (None, np.inf)
    clock_max = b.sm_clock_max_hz

    def jit() -> float:
        return float(rng.lognormal(0, j.jitter)) if j.jitter else 1.0

    def busy(r, t0, t1, sm, tensor, dram, power, clock, cause, bits=0):
        g = gpus[r]
        if t1 <= t0:
            return
        g.s["kernel"].put(t0, t1, 1.0)
        g.s["sm"].put(t0, t1, sm)
        g.s["tensor"].put(t0, t1, tensor)
        g.s["dram"].put(t0, t1, dram)
        g.s["power_extra"].put(t0, t1, power - b.power_held_w)
        g.s["clock"].put(t0, t1, clock)
        if bits:
            g.s["throttle"].put(t0, t1, bits)
        g.cause(t0, t1, cause)

    def idle(r, t0, t1, cause, clock=None):
        g = gpus[r]
        if t1 <= t0:
            return
        g.s["clock"].put(t0, t1, clock or clock_max)
        g.cause(t0, t1, cause)

    def compute_power(r: int, sm: float) -> float:
        p = b.power_held_w + (b.power_compute_w - b.power_held_w) * (0.35 + 0.65 * sm)
        return min(p, j.power_cap.get(r, b.power_limit_w))

    t_stop = min(t_exit, end)
    while True:
        t_min = min(now.values())
        if t_min >= t_stop or t_min >= lost_t:
            break
        # --- evaluation phase: forward only, cached data, no loader wait ---------------------
        if t_min >= next_eval:
            t_eval_end = t_min + j.eval_seconds
            for r in ranks:
                t = now[r]
                while t < t_eval_end:
                    gap = j.host_gap * jit()
                    idle(r, t, t + gap, "gap")
                    c = j.compute * 0.33 * jit()
                    busy(r, t + gap, t + gap + c, j.sm * 0.7, j.tensor * 0.6, j.dram,
                         compute_power(r, j.sm * 0.7), clock_max, "eval")
                    t += gap + c
                now[r] = t
            t_sync = max(now.values())
            for r in ranks:
                busy(r, now[r], t_sync, 0.03, 0.0, 0.02, b.power_spin_w, clock_max, "eval")
                now[r] = t_sync
            next_eval = t_sync + j.eval_every
            continue
        # --- checkpoint ------------------------------------------------------------------------
        if t_min >= next_ckpt:
            t0 = max(now.values())
            for r in ranks:
                busy(r, now[r], t0, 0.03, 0.0, 0.02, b.power_spin_w, clock_max, "gap")
            d2h = j.ckpt_bytes / b.pinned_h2d
            for r in ranks:
                gpus[r].s["pcie_tx"].put(t0, t0 + d2h, b.pinned_h2d)
                idle(r, t0, t0 + d2h, "ckpt")
            t1 = t0 + d2h
            drive = node.drives[-1].name
            if j.ckpt_sync0:
                # Rank 0 writes the whole state itself; the others wait in the barrier.
                w = j.ckpt_sync0 / (node.drive(drive).write * 0.8)
                host["disk_write:" + drive].put(t1, t1 + w, node.drive(drive).write * 0.8)
                host["cpu_system"].put(t1, t1 + w, 0.8)
                procs[proc_of[ranks[0]]]["cpu"].put(t1, t1 + w, 0.9)
                procs[proc_of[ranks[0]]]["root"].put(t1, t1 + w, 0.9)
                idle(ranks[0], t1, t1 + w, "ckpt")
                for r in ranks[1:]:
                    busy(r, t1, t1 + w, 0.02, 0.0, 0.01, b.power_spin_w, clock_max, "ckpt")
                t1 += w
            else:
                total = j.ckpt_bytes * n
                w = total / (node.drive(drive).write * 0.7)
                host["disk_write:" + drive].put(t1, t1 + w, node.drive(drive).write * 0.7)
                host["cpu_system"].put(t1, t1 + w, 0.5)
            for r in ranks:
                now[r] = t1
            next_ckpt = t1 + j.ckpt_every
            continue
        # --- one training step ---------------------------------------------------------------
        arrive = {}
        parts: dict[int, dict[str, float]] = {}
        for r in ranks:
            t = now[r]
            g = gpus[r]
            g.steps.append(t)
            p = {}
            gap = j.host_gap * jit()
            if j.log_every and r == ranks[0] and step % j.log_every == j.log_every - 1:
                extra = j.log_seconds * jit()
                idle(r, t, t + extra, "log")
                procs[proc_of[r]]["cpu"].put(t, t + extra, 0.3)
                procs[proc_of[r]]["root"].put(t, t + extra, 0.3)
                p["log"] = extra
                t += extra
            idle(r, t, t + gap, "gap")
            p["gap"] = gap
            t += gap
            ld = loaders.get(r)
            if ld is not None:
                if ld.spec.workers == 0:
                    # The rank's own process reads and decodes: nothing overlaps.
                    ready = ld.produce(t)
                else:
                    ready = ld.batch_ready(step)
                if ready > t:
                    idle(r, t, ready, "input")
                    p["input"] = ready - t
                    t = ready
                ld.consumed.append(t)
            if j.h2d_bytes:
                rate = b.pinned_h2d if j.pinned else b.pageable_h2d
                sw = node.switch_of(r)
                if sw is not None:
                    sharing = sum(1 for x in sw.gpus if x in ranks)
                    rate = min(rate, sw.uplink / max(sharing, 1))
                d = j.h2d_bytes / rate * jit()
                g.s["pcie_rx"].put(t, t + d, j.h2d_bytes / d)
                if not j.pinned:
                    host["cpu_system"].put(t, t + d, 0.3)
                else:
                    # The pin-memory thread copied the batch into pinned memory beforehand.
                    procs[proc_of[r]]["cpu"].put(t - d, t, 0.4)
                    procs[proc_of[r]]["root"].put(t - d, t, 0.4)
                    host["cpu_user"].put(t - d, t, 0.4)
                # At the link's rate the copy itself is the normal cost of a step; what a
                # copy beyond ~2% of the step costs is the h2d stall.
                normal = 0.015 * (j.compute + j.host_gap + j.optimizer)
                idle(r, t, t + min(d, normal), "gap")
                idle(r, t + min(d, normal), t + d, "h2d")
                p["h2d"] = max(d - normal, 0.0)
                t += d
            base = j.compute * jit()
            scale = j.compute_scale.get(r, 1.0)
            cf = j.clock_factor.get(r, 1.0)
            c = base * scale / cf
            sm = j.sm
            power = compute_power(r, sm)
            clock = clock_max * cf
            bits = j.throttle_bits.get(r, 0)
            busy(r, t, t + base, sm, j.tensor, j.dram, power, clock, "compute", bits)
            if scale > 1.0:
                busy(r, t + base, t + base * scale, sm, j.tensor, j.dram, power, clock,
                     "straggle", bits)
                p["straggle"] = base * (scale - 1)
            if cf < 1.0:
                busy(r, t + base * scale, t + c, sm, j.tensor, j.dram, power, clock,
                     "throttle", bits)
                p["throttle"] = c - base * scale
            if comm_nvlink:
                hidden = comm_nvlink * j.overlap
                rate_nv = 2 * j.grad_bytes * (n - 1) / n / comm_nvlink
                g.s["nvlink_tx"].put(t + c - hidden, t + c, rate_nv)
                g.s["nvlink_rx"].put(t + c - hidden, t + c, rate_nv)
            t += c
            arrive[r] = t
            parts[r] = p
        if multi:
            latest = max(arrive.values())
            origin_cause = "gap"
            if j.nodes > 1 and j.remote_jitter:
                remote = _median(list(arrive.values())) + \
                    float(rng.exponential(j.remote_jitter))
                if remote > latest:
                    latest = remote
            late = max(arrive, key=arrive.get)
            med = {k: _median([parts[x].get(k, 0.0) for x in ranks])
                   for k in ("input", "h2d", "straggle", "throttle", "log", "gap")}
            deltas = {k: parts[late].get(k, 0.0) - med[k] for k in med}
            if latest > arrive[late] + 1e-9:
                origin_cause = "gap"  # a remote rank came last
            elif max(deltas.values()) > 0:
                origin_cause = max(deltas, key=deltas.get)
            if lost_gpu in ranks and latest >= lost_t:
                # The lost GPU never arrives: its peers spin in NCCL until the watchdog.
                for r in ranks:
                    if r != lost_gpu:
                        busy(r, min(arrive[r], lost_t), t_stop, 0.02, 0.0, 0.01,
                             b.power_spin_w, clock_max, "lost")
                        now[r] = t_stop
                now[lost_gpu] = t_stop
                break
            for r in ranks:
                busy(r, arrive[r], latest, 0.03, 0.0, 0.02, b.power_spin_w, clock_max,
                     origin_cause)
            t_comm = exposed_nv + exposed_net
            for r in ranks:
                if exposed_nv:
                    rate_nv = 2 * j.grad_bytes * (n - 1) / n / comm_nvlink if comm_nvlink else 0
                    gpus[r].s["nvlink_tx"].put(latest, latest + exposed_nv, rate_nv)
                    gpus[r].s["nvlink_rx"].put(latest, latest + exposed_nv, rate_nv)
                busy(r, latest, latest + exposed_nv, 0.12, 0.0, 0.3, b.power_spin_w + 40,
                     clock_max, "gap")
                if comm_net:
                    net_bytes = 2 * j.grad_bytes / n * (j.nodes - 1) / j.nodes
                    hidden = comm_net - exposed_net
                    nic = node.nics[r % len(node.nics)]
                    t_net0 = latest + exposed_nv - hidden
                    rdma[nic]["tx"].put(t_net0, latest + t_comm, net_bytes / comm_net)
                    rdma[nic]["rx"].put(t_net0, latest + t_comm, net_bytes / comm_net)
                    # The part a healthy fabric needs anyway is ordinary; beyond, comm stall.
                    busy(r, latest + exposed_nv, latest + t_comm, 0.1, 0.0, 0.2,
                         b.power_spin_w + 30, clock_max, "comm")
            t_end = latest + t_comm
        else:
            t_end = arrive[ranks[0]]
        for r in ranks:
            o = j.optimizer * jit()
            cf = j.clock_factor.get(r, 1.0)
            busy(r, t_end, t_end + o / cf, 0.35, 0.05, 0.8, compute_power(r, 0.35),
                 clock_max * cf, "compute", j.throttle_bits.get(r, 0))
            now[r] = t_end + o / cf
        step += 1
    # After the loop: what the ranks do until the process exits. When a GPU was lost, its
    # peers enter the next collective and spin there until the watchdog ends the job.
    hung = lost_gpu in ranks and multi
    for r in ranks:
        t_last = now[r]
        if lost_gpu == r:
            lost[r] = lost_t
            continue
        if t_last < t_exit and t_last < end:
            if hung:
                busy(r, t_last, min(t_exit, end), 0.02, 0.0, 0.01, b.power_spin_w, clock_max,
                     "lost")
            else:
                idle(r, t_last, min(t_exit, end), "gap")
    if lost_gpu is not None:
        lost[lost_gpu] = lost_t
    for r in ranks:
        pid = proc_of[r]
        life_end = t_exit if lost_gpu != r else lost_t + 5.0
        life[pid] = (t_proc, life_end)
        # The trainer's main thread spins in cudaStreamSynchronize and runs Python: one core.
        procs[pid]["cpu"].put(t_first, min(life_end, end), 1.05)
        procs[pid]["root"].put(t_first, min(life_end, end), 1.05)
        host["cpu_user"].put(t_first, min(life_end, end), 1.05)


def _finish(node, jobs, start, end, rng, host, gpus, procs, life, rdma, lost) -> Timeline:
    b = node.board
    out_gpu: dict[int, dict[str, Pwc]] = {}
    causes: dict[int, list] = {}
    steps: dict[int, list[float]] = {}
    for i, g in gpus.items():
        built = {n: seg.build(start, end) for n, seg in g.s.items()}
        held = built.pop("held")
        extra = built.pop("power_extra")
        # Power: idle with no process, held-idle with memory, plus each state's extra.
        base = held.map(lambda v: np.where(v > 0, b.power_held_w, b.power_idle_w))
        built["power"] = add(base, extra)
        # Memory: ~0.5 GiB the driver reserves even with no process.
        built["mem"] = built["mem"].map(lambda v: v + 0.5 * 2**30)
        clock = built["clock"]
        built["clock"] = clock.map(lambda v: np.where(v > 0, v, IDLE_CLOCK_HZ))
        thr = built["throttle"]
        kernel = built["kernel"]
        # GpuIdle is reported whenever no kernel runs.
        built["throttle"] = add(thr, kernel.map(lambda v: np.where(v > 0, 0.0, GPU_IDLE)))
        built["held"] = held
        out_gpu[i] = built
        causes[i] = sorted(g.causes) or [(start, end, "nojob")]
        steps[i] = g.steps
    h = {n: s.build(start, end) for n, s in host.items() if not n.startswith(("disk_", "read_"))}
    disks = {}
    for d in node.drives:
        demand = host["disk_demand:" + d.name].build(start, end)
        reqs = host["read_reqs:" + d.name].build(start, end)
        req_size = np.mean([ld.request for j in jobs for ld in j.loaders.values()
                            if ld.drive == d.name] or [256 * KIB])
        # Background reads (logs, libraries) keep a trickle.
        served = fluid_queue(demand, d.read_ceiling(req_size))
        ops = served.scale(1.0 / req_size)
        write = fluid_queue(host["disk_write:" + d.name].build(start, end), d.write)
        disks[d.name] = {"read": served, "write": write, "read_ops": ops,
                         "write_ops": write.scale(1.0 / (1 * 2**20)), "request": req_size,
                         "reqs_demand": reqs}
    built_procs = {pid: {n: s.build(start, end) for n, s in p.items()} for pid, p in
                   procs.items()}
    net = {nic: {"rx": v["rx"].build(start, end), "tx": v["tx"].build(start, end)}
           for nic, v in rdma.items()}
    return Timeline(start, end, node, jobs, out_gpu, causes, h, disks, built_procs, life, net,
                    steps, lost)


def truth_fractions(tl: Timeline, a: float, b: float) -> dict[int, dict[str, float]]:
    """Per GPU, the share of [a, b] spent in each cause."""
    out = {}
    for g, segs in tl.causes.items():
        acc: dict[str, float] = {}
        covered = 0.0
        for t0, t1, what in segs:
            d = min(t1, b) - max(t0, a)
            if d > 0:
                acc[what] = acc.get(what, 0.0) + d
                covered += d
        if covered < (b - a):
            acc["nojob"] = acc.get("nojob", 0.0) + (b - a) - covered
        out[g] = {k: v / (b - a) for k, v in acc.items()}
    return out
