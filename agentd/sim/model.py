"""A training job per GPU as a pipeline with bounded queues, on one node, in time steps of
at most 10 ms, with the ground truth of what bounds each step.

    storage --read--> read queue --preprocess (CPU workers)--> ready queue (prefetch depth)
        --copy host-to-device (PCIe)--> [device slot] --> compute --> collective with peers

Each GPU's trainer pulls one batch per step. Shared resources are divided at every time step:
the node's storage bandwidth (and its request concurrency, by Little's law), its CPU cores,
and a PCIe switch uplink that NVMe drives and GPUs may share. Within a time step each GPU
advances through as many phase changes as fit, so steps much shorter than the time step stay
exact. Everything is numpy over the GPU axis; nothing here does I/O.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass, field, replace

import numpy as np

# GPU phases
WAIT, COPY, COMPUTE, BARRIER, COMM = 0, 1, 2, 3, 4

# What a waiting or copying GPU is held up by (ground truth, per time step).
BLAME = ("compute", "storage", "cpu", "h2d", "serialized", "comm", "straggler", "idle",
         "uplink")


@dataclass
class Episode:
    start_s: float
    end_s: float
    gpus: tuple[int, ...] = ()  # empty: every GPU
    clock_factor: float = 1.0  # compute slows by 1/clock_factor (throttling)
    cache_hit: float | None = None  # page-cache hit ratio during the episode
    idle: bool = False  # the job holds its GPU memory but runs no steps
    checkpoint_bytes: float = 0.0  # written once at the start; training pauses meanwhile
    storage_factor: float = 1.0  # storage delivers this share of its bandwidth (a neighbour)
    # Compute takes this many times longer at normal clocks (a degraded GPU: memory-bound
    # after row remapping, a bad HBM stack); unlike clock_factor the clocks read normal.
    compute_factor: float = 1.0
    cpu_factor: float = 1.0  # the job keeps this share of the node's cores (a CPU hog beside it)


@dataclass
class JobParams:
    """One training job per GPU, identical across GPUs unless a per-GPU factor says not."""

    gpus: int = 8
    batch_size: int = 256
    sample_bytes: float = 110e3  # bytes read from storage per sample (e.g. a JPEG)
    h2d_bytes_per_sample: float = 150e3  # decoded tensor bytes copied to the GPU
    cache_hit: float = 0.0  # page-cache hit ratio of reads
    storage_bandwidth: float = 6e9  # node total, bytes/s
    storage_latency_s: float = 100e-6  # per request
    storage_queue_depth: int = 64  # requests in flight, node total
    request_bytes: float = 256e3
    storage_devices: int = 1  # reads spread evenly over this many devices
    # What the devices are: "nvme" (local drives on PCIe, a link to match their bandwidth),
    # "sata" (SATA SSDs) or "network" (a network or virtual volume: no device class).
    storage_kind: str = "nvme"
    probed: bool = True  # `agentd probe` has measured the node's ceilings
    cpu_per_sample_s: float = 2e-3  # preprocessing CPU time per sample
    workers_per_gpu: int = 8
    cores: int = 96  # node cores available to the jobs
    trainer_cores: float = 0.2  # each trainer process's own CPU (launching kernels)
    pinned: bool = True  # pageable copies run at half speed and cost a core
    pcie_bandwidth: float = 25e9  # usable host-to-device bytes/s per GPU link
    # >0: the GPUs (and NVMe drives) of a switch share this uplink, per direction: the GPUs'
    # host-to-device copies flow down it, the drives' reads (and device-to-host copies) up.
    shared_uplink_bandwidth: float = 0.0
    gpus_per_switch: int = 2
    compute_s: float = 0.25  # per step at full clocks
    compute_jitter: float = 0.02  # relative standard deviation
    sm_active_when_computing: float = 0.8
    collective_bytes: float = 0.0  # all-reduce bytes per step (0: no collective)
    collective_bandwidth: float = 150e9  # bytes/s (NVLink) or the network's for multi-node
    straggler_gpu: int = -1  # this GPU computes straggler_factor times slower
    straggler_factor: float = 1.0
    peer_wait_s: float = 0.0  # per step, waiting at the collective for the slowest peer node
    checkpoint_every_s: float = 0.0  # periodic synchronous checkpoints (0: none)
    checkpoint_bytes: float = 0.0
    eval_every_s: float = 0.0  # periodic evaluation phases (0: none): cached data, no backward
    eval_duration_s: float = 0.0
    prefetch_depth: int = 2  # ready batches the loader keeps in host memory
    prefetch_to_device: bool = True  # copies overlap compute (pinned memory, non_blocking)
    episodes: list[Episode] = field(default_factory=list)
    seed: int = 0

    @property
    def storage_bytes_per_step(self) -> float:
        return self.batch_size * self.sample_bytes * (1.0 - self.cache_hit)

    @property
    def h2d_bytes_per_step(self) -> float:
        return self.batch_size * self.h2d_bytes_per_sample

    @property
    def cpu_seconds_per_step(self) -> float:
        return self.batch_size * self.cpu_per_sample_s


def uplink_link(p: JobParams) -> tuple[int, int]:
    """(generation, width) of a shared switch uplink: the real PCIe link whose capacity is
    nearest to shared_uplink_bandwidth (what the topology reports is what the copies get)."""
    from agentd.pcie import capacity

    options = [(gen, w) for gen in (1, 2, 3, 4, 5) for w in (1, 2, 4, 8, 16)]
    return min(options, key=lambda gw: abs(capacity(*gw) - p.shared_uplink_bandwidth))


def uplink_capacity(p: JobParams) -> float:
    from agentd.pcie import capacity

    return capacity(*uplink_link(p)) if p.shared_uplink_bandwidth > 0 else 0.0


def storage_throughput(p: JobParams) -> float:
    """Bytes/s the node's storage delivers with its request concurrency (Little's law)."""
    by_concurrency = p.storage_queue_depth * p.request_bytes / max(p.storage_latency_s, 1e-9)
    return min(p.storage_bandwidth, by_concurrency)


def stage_rates(p: JobParams) -> dict[str, float]:
    """Steps per second each stage could sustain per GPU if it alone set the pace."""
    g = p.gpus
    storage = storage_throughput(p)
    sb = p.storage_bytes_per_step
    h2d_bw = p.pcie_bandwidth * (1.0 if p.pinned else 0.5)
    rates = {
        "storage": storage / g / sb if sb > 0 else math.inf,
        "cpu": min(p.workers_per_gpu, max(p.cores - g * p.trainer_cores, 0.1) / g)
        / p.cpu_seconds_per_step,
        "h2d": h2d_bw / p.h2d_bytes_per_step,
    }
    if p.shared_uplink_bandwidth > 0:
        # Down each switch's uplink: its GPUs' copies; up it: its drive's share of the reads.
        down = p.gpus_per_switch * p.h2d_bytes_per_step
        up = g * sb / max(p.storage_devices, 1)
        rates["uplink"] = uplink_capacity(p) / max(down, up)
    slow = p.straggler_factor if 0 <= p.straggler_gpu < g else 1.0
    comm = p.collective_bytes / p.collective_bandwidth if p.collective_bytes else 0.0
    if comm or p.peer_wait_s:
        comm += p.peer_wait_s
    rates["compute"] = 1.0 / (p.compute_s * slow + comm)
    return rates


def analytic_throughput(p: JobParams) -> float:
    """Steady-state steps/s per GPU: the slowest stage when stages overlap; the sum of
    stage times where they are serialized (no prefetch)."""
    r = stage_rates(p)
    if p.prefetch_depth <= 0:
        # Read, preprocess, copy and compute one after another.
        return 1.0 / sum(1.0 / v for v in r.values() if v != math.inf)
    if not p.prefetch_to_device:
        copy = 1.0 / r["h2d"]
        compute_side = 1.0 / (copy + 1.0 / r["compute"])
        return min(compute_side, *(v for k, v in r.items() if k not in ("h2d", "compute")))
    return min(r.values())


def speedup_if_removed(p: JobParams) -> dict[str, float]:
    """How much faster steps would go were each input stage (and the serialization) free."""
    base = analytic_throughput(p)
    out = {}
    for stage, change in (
        ("storage", {"cache_hit": 1.0}),
        ("cpu", {"cpu_per_sample_s": 1e-12}),
        ("h2d", {"h2d_bytes_per_sample": 1e-6}),
        ("serialized", {"prefetch_depth": max(p.prefetch_depth, 2), "prefetch_to_device": True}),
        ("uplink", {"shared_uplink_bandwidth": 0.0}),
        ("comm", {"collective_bytes": 0.0, "peer_wait_s": 0.0}),
        ("straggler", {"straggler_factor": 1.0}),
    ):
        out[stage] = analytic_throughput(replace(p, **change)) / base
    return out


@dataclass
class Trace:
    """Cumulative quantities at the end of every time step (the counters hardware keeps),
    plus per-step ground truth. Arrays are [steps] or [steps, gpus]."""

    dt: float
    t: np.ndarray  # end of each time step, seconds since the start
    busy: np.ndarray  # GPU kernel time (computing or in a collective, spinning included)
    sm_active: np.ndarray  # SM-active time (SM fraction x time)
    pcie_rx: np.ndarray  # bytes copied host to device
    nvlink: np.ndarray  # collective bytes
    steps: np.ndarray  # training steps completed
    stall: np.ndarray  # time the GPU waited for input (WAIT or serialized COPY)
    blame: np.ndarray  # [steps, gpus] index into BLAME for that time step
    storage_read: np.ndarray  # [steps] bytes read from storage (node)
    storage_ops: np.ndarray  # [steps] read requests completed
    storage_busy: np.ndarray  # [steps] time with requests in flight
    storage_weighted: np.ndarray  # [steps] requests-in-flight x time
    cache_read: np.ndarray  # [steps, gpus] bytes served by the page cache
    worker_cpu: np.ndarray  # [steps, gpus] preprocessing CPU seconds
    trainer_cpu: np.ndarray  # [steps, gpus] trainer CPU seconds (incl. pageable copies)
    gpu_read: np.ndarray  # [steps, gpus] storage bytes read for that GPU's job
    io_wait: np.ndarray  # [steps] time some task waited for storage (PSI io some)
    io_full: np.ndarray  # [steps] time every runnable task waited for storage (PSI io full)
    mem_wait: np.ndarray  # [steps] time tasks waited on refaulting pages (PSI memory some)
    pcie_tx: np.ndarray  # [steps, gpus] bytes copied device to host (checkpoints)
    io_blocked: np.ndarray  # [steps, gpus] worker-seconds blocked on reads (D state)
    cpu_wait: np.ndarray  # [steps] time some task waited for a core (PSI cpu some)
    clock_factor: np.ndarray  # [steps, gpus] SM clock / max clock
    memory_held: np.ndarray  # [steps, gpus] 1 while a job holds GPU memory
    write: np.ndarray  # [steps] bytes written to storage (checkpoints)
    # [steps, gpus] time spent at the collective's barrier waiting for the last rank (spinning:
    # busy for NVML, SMs nearly idle); included in busy.
    collective_wait: np.ndarray | None = None
    cpu_other: np.ndarray | None = None  # [steps] CPU seconds other processes took (a hog)


class Simulator:
    """Advances a node in time steps of `dt` seconds; `run(seconds)` returns a Trace chunk
    and keeps the state, so a long run can be produced piece by piece.

    The per-step work is plain Python over the GPUs: for a handful of GPUs that is several
    times faster than numpy, whose per-call overhead dominates arrays of 8 elements."""

    CUM = ("storage_read", "storage_ops", "storage_busy", "storage_weighted", "io_wait",
           "cpu_wait", "write", "io_full", "mem_wait", "cpu_other")
    GCUM = ("busy", "sm_active", "pcie_rx", "nvlink", "steps", "stall", "cache_read",
            "worker_cpu", "trainer_cpu", "gpu_read", "pcie_tx", "io_blocked", "collective_wait")

    def __init__(self, p: JobParams, dt: float = 0.01, collective_s: float | None = None,
                 clocks: list[float] | None = None):
        """collective_s: this node is one of several of a job (agentd/sim/cluster.py), whose
        collective takes that long once every rank has arrived; the barrier is settled across
        the nodes by the caller (settle_barrier), and peer_wait_s does not apply.
        clocks: each GPU's SM clock as a share of its maximum in normal operation (GPUs of one
        model boost to slightly different clocks); episodes' clock factors apply on top."""
        if dt > 0.01:
            raise ValueError("the time step must be at most 10 ms")
        self.p = p
        self.dt = dt
        g = p.gpus
        self.rng = np.random.default_rng(p.seed)
        self._normals = iter(())
        self.now = 0.0
        self.phase = [WAIT] * g
        self.rem = [0.0] * g  # seconds of compute/comm, or bytes of copy, left
        self.read_q = [0.0] * g  # batches read, not yet preprocessed
        self.ready_q = [0.0] * g  # batches preprocessed (host)
        self.dev_slot = [0.0] * g  # batches already on the device
        self.dev_copy_left = [0.0] * g  # bytes of a prefetch copy in progress
        self.prepping = [False] * g  # serialized: a whole batch is being preprocessed
        self.checkpoint_left = 0.0
        self.d2h_left = [0.0] * g  # a checkpoint's device-to-host copy still to go, per GPU
        self._checkpoints_done: set[int] = set()
        self.cum = dict.fromkeys(self.CUM, 0.0)
        self.gcum = {k: [0.0] * g for k in self.GCUM}
        self.slow = [1.0] * g
        if 0 <= p.straggler_gpu < g:
            self.slow[p.straggler_gpu] = p.straggler_factor
        self.slow_now = self.slow  # with the episodes' compute factors in force
        self.cpu_factor = 1.0
        self.in_cluster = collective_s is not None
        if collective_s is not None:
            self.comm_s = collective_s
        else:
            self.comm_s = p.collective_bytes / p.collective_bandwidth if p.collective_bytes \
                else 0.0
            if self.comm_s or p.peer_wait_s:
                self.comm_s += p.peer_wait_s  # remote peers arrive later: the collective waits
        # Who a rank spinning at the barrier is held up by (ground truth).
        self.spin_blame = B_STRAGGLER if p.straggler_factor > 1 or self.in_cluster else B_COMM
        # Per rank: the compute time of its current (or last) step and its clock then, and its
        # input stall since its last collective, for the cluster's ground truth.
        self.compute_len = [0.0] * g
        self.compute_clock = [1.0] * g
        self.cycle_stall = [0.0] * g
        self.cycle_blame = [B_COMPUTE] * g  # what held its input up, if it stalled
        self.arrived_abs = [0.0] * g  # when it last arrived at the barrier (seconds)
        self.base_clock = list(clocks) if clocks is not None else [1.0] * g
        if len(self.base_clock) != g:
            raise ValueError("clocks: one per GPU")
        self.storage_avail = storage_throughput(p)
        self.uplink_bw = uplink_capacity(p)
        if self.uplink_bw > 0:
            # Each drive's reads go up its switch's uplink.
            self.storage_avail = min(self.storage_avail,
                                     self.uplink_bw * max(p.storage_devices, 1))
        self._arrivals: dict[int, float] = {}  # barrier arrivals within the current step
        self.evaluating = False
        self.storage_factor = 1.0
        # Batches through each stage, for conservation checks.
        self.count = {k: [0.0] * g for k in ("read", "prepped", "copy_started", "computed")}

    def _normal(self) -> float:
        try:
            return next(self._normals)
        except StopIteration:
            self._normals = iter(self.rng.standard_normal(4096).tolist())
            return next(self._normals)

    def _conditions(self, t: float) -> tuple[list[float], float, list[bool]]:
        """(clock factor per GPU, cache hit ratio, idle per GPU) in force at time t."""
        p = self.p
        g = p.gpus
        clock = list(self.base_clock)
        cache = p.cache_hit
        idle = [False] * g
        self.storage_factor = 1.0
        self.cpu_factor = 1.0
        slow = None
        self.evaluating = bool(p.eval_every_s) and (t % p.eval_every_s) >= \
            p.eval_every_s - p.eval_duration_s
        if self.evaluating:
            cache = 1.0  # the validation set is small and cached
        if p.checkpoint_every_s and p.checkpoint_bytes:
            k = int(t / p.checkpoint_every_s)
            if k >= 1 and -k not in self._checkpoints_done:
                self._checkpoints_done.add(-k)
                self._start_checkpoint(p.checkpoint_bytes)
        for n, ep in enumerate(self.p.episodes):
            if ep.start_s <= t < ep.end_s:
                for i in (ep.gpus or range(g)):
                    clock[i] *= ep.clock_factor
                    idle[i] = idle[i] or ep.idle
                if ep.cache_hit is not None:
                    cache = ep.cache_hit
                self.storage_factor *= ep.storage_factor
                self.cpu_factor *= ep.cpu_factor
                if ep.compute_factor != 1.0:
                    slow = slow or list(self.slow)
                    for i in (ep.gpus or range(g)):
                        slow[i] *= ep.compute_factor
                if ep.checkpoint_bytes and n not in self._checkpoints_done:
                    self._checkpoints_done.add(n)
                    self._start_checkpoint(ep.checkpoint_bytes)
        self.slow_now = slow or self.slow
        return clock, cache, idle

    def _start_checkpoint(self, nbytes: float) -> None:
        """Each GPU copies its share of the state to host memory, then the node writes it."""
        for i in range(self.p.gpus):
            self.d2h_left[i] += nbytes / self.p.gpus
        self.checkpoint_left += nbytes

    def _start_compute(self, i: int, clock: float) -> None:
        p = self.p
        jitter = 1.0 + p.compute_jitter * self._normal() if p.compute_jitter else 1.0
        forward_only = 1 / 3 if self.evaluating else 1.0  # evaluation has no backward pass
        self.count["computed"][i] += 1
        self.phase[i] = COMPUTE
        self.rem[i] = max(p.compute_s * forward_only * self.slow_now[i] * max(jitter, 0.2),
                          1e-6) / max(clock, 1e-3)
        self.compute_len[i] = self.rem[i]
        self.compute_clock[i] = clock

    def _step(self, rec: list) -> None:
        st = self._advance()
        if self.comm_s > 0:
            settle_barrier((self,), (st,), self.dt)
        self._commit(st, rec)

    def _advance(self) -> "_StepState":
        """One time step of the node up to its ranks' barrier: storage, CPU, PCIe, and each
        GPU through the phases that fit. What happens at the barrier is settled by
        settle_barrier (over this node, or every node of a job), then _commit records it."""
        p, dt, g = self.p, self.dt, self.p.gpus
        phase, rem = self.phase, self.rem
        read_q, ready_q, dev_slot, dcl = self.read_q, self.ready_q, self.dev_slot, \
            self.dev_copy_left
        if p.episodes or p.checkpoint_every_s or p.eval_every_s:
            clock, cache_hit, idle = self._conditions(self.now)
        else:
            clock, cache_hit, idle = self.base_clock, p.cache_hit, [False] * g
        batch_bytes = p.batch_size * p.sample_bytes
        sb = batch_bytes * (1 - cache_hit)  # storage bytes per batch
        h2d = p.h2d_bytes_per_step
        copy_bw = p.pcie_bandwidth * (1.0 if p.pinned else 0.5)
        serialized = p.prefetch_depth <= 0
        dev_prefetch = p.prefetch_to_device and not serialized
        depth = max(p.prefetch_depth, 1)

        # --- storage: readers fill their read-ahead (workers + prefetch batches) -----------------
        write_bytes = 0.0
        d2h = [0.0] * g
        if self.checkpoint_left > 0:
            # A synchronous checkpoint: training stops while the GPUs copy their state to the
            # host (PCIe, device to host) and the storage then writes it.
            if any(x > 0 for x in self.d2h_left):
                for i in range(g):
                    d2h[i] = min(self.d2h_left[i], p.pcie_bandwidth * dt)
                    self.d2h_left[i] -= d2h[i]
            else:
                write_bytes = min(self.checkpoint_left, p.storage_bandwidth * dt)
                self.checkpoint_left -= write_bytes
            idle = [True] * g
        if serialized:
            # No prefetch: the next batch is read only once the GPU asks for it.
            read_cap = 1.0
            wants = [phase[i] == WAIT and read_q[i] + ready_q[i] < 1 - 1e-9 and not idle[i]
                     for i in range(g)]
        else:
            read_cap = p.workers_per_gpu + p.prefetch_depth
            wants = [read_q[i] < read_cap and not idle[i] for i in range(g)]
        n = sum(wants)
        share = self.storage_avail * self.storage_factor / n if n else 0.0
        bw = [share if w else 0.0 for w in wants]
        if dev_prefetch:
            # The copy engine starts the next batch's copy as soon as the device slot frees.
            for i in range(g):
                if dev_slot[i] < 1 and dcl[i] == 0 and ready_q[i] >= 1 - 1e-9:
                    ready_q[i] -= 1
                    dcl[i] = h2d
                    self.count["copy_started"][i] += 1
        copy_rate = [copy_bw] * g
        uplink_limited = [False] * g
        if p.shared_uplink_bandwidth > 0:
            # Down a switch's uplink flow its GPUs' copies: when they ask more than it
            # carries, they slow down alike. (Up it flow its drive's reads: see storage_avail.)
            per = p.gpus_per_switch
            for first in range(0, g, per):
                members = range(first, min(first + per, g))
                copying = sum(1 for i in members if dcl[i] > 0 or phase[i] == COPY or (
                    not dev_prefetch and phase[i] == WAIT and ready_q[i] >= 1 - 1e-9))
                demand = copy_bw * copying
                if demand > self.uplink_bw:
                    f = self.uplink_bw / demand
                    for i in members:
                        copy_rate[i] *= f
                        uplink_limited[i] = True
        read_b = [0.0] * g
        read_time = [0.0] * g
        for i in range(g):
            if not wants[i]:
                continue
            cap = read_cap - read_q[i] - (ready_q[i] if serialized else 0.0)
            if sb > 0:
                b = min(bw[i] * dt / sb, cap) if bw[i] > 0 else 0.0
                read_time[i] = b * sb / bw[i] if bw[i] > 0 else 0.0
            else:
                b = max(cap, 0.0)  # all in the page cache
            read_b[i] = max(b, 0.0)
            read_q[i] += read_b[i]
            self.count["read"][i] += read_b[i]
        storage_bytes = [b * sb for b in read_b]
        total_read = sum(storage_bytes)
        # Requests in flight: by Little's law while the device keeps up; when readers are held
        # to its bandwidth, their requests queue (one per worker, up to the queue depth).
        saturated = n > 0 and sb > 0 and any(
            wants[i] and bw[i] * dt / sb < read_cap - read_q[i] + read_b[i] - 1e-9
            for i in range(g))
        if saturated:
            in_flight = float(min(p.storage_queue_depth, n * max(p.workers_per_gpu, 1)))
        else:
            in_flight = min(p.storage_queue_depth, total_read / max(p.request_bytes, 1.0) / dt *
                            p.storage_latency_s) if total_read else 0.0
        if write_bytes:
            in_flight = max(in_flight, 1.0)

        # --- preprocessing on the node's cores --------------------------------------------------
        spare = max(p.cores * self.cpu_factor - g * p.trainer_cores, 0.1)
        has_input = [False] * g
        room = [0.0] * g
        for i in range(g):
            room[i] = max(depth - ready_q[i], 0.0)
            if serialized:
                if phase[i] != WAIT:
                    room[i] = 0.0
                # Serialized loading works on whole batches: preprocessing starts once a
                # batch is fully read.
                has_input[i] = read_q[i] >= 1 - 1e-9 or (self.prepping[i] and read_q[i] > 1e-9)
            else:
                has_input[i] = read_q[i] > 1e-9
        demand = [float(p.workers_per_gpu) if has_input[i] and room[i] > 1e-9 and not idle[i]
                  else 0.0 for i in range(g)]
        total = sum(demand)
        scale = min(1.0, spare / total) if total > 0 else 1.0
        cps = p.cpu_seconds_per_step
        worker_cpu = [0.0] * g
        ready_at = [0.0] * g  # serialized: when, within this step, the batch became ready
        for i in range(g):
            cores = demand[i] * scale
            if not cores:
                if serialized:
                    self.prepping[i] = False
                continue
            avail_t = dt if (not serialized or self.prepping[i]) else dt - read_time[i]
            prep = min(cores * avail_t / cps, read_q[i], room[i])
            read_q[i] -= prep
            ready_q[i] += prep
            self.count["prepped"][i] += prep
            worker_cpu[i] = prep * cps
            if serialized:
                self.prepping[i] = read_q[i] > 1e-9
                ready_at[i] = dt - avail_t + prep * cps / cores

        # Workers that wait for reads sleep in D state: with prefetch, those of a reader held
        # back by the storage and not preprocessing; without, the one reader while it reads.
        blocked = [0.0] * g
        for i in range(g):
            if serialized:
                blocked[i] = read_time[i]
            elif wants[i] and saturated:
                blocked[i] = max(p.workers_per_gpu - worker_cpu[i] / dt, 0.0) * dt

        # --- copies to the device in flight (overlapping compute) ---------------------------------
        pcie = [0.0] * g
        trainer_cpu = [p.trainer_cores * dt] * g
        dev_ready_at = [0.0] * g  # when, within this step, the device batch landed
        if dev_prefetch:
            for i in range(g):
                if dcl[i] > 0:
                    moved = min(dcl[i], copy_rate[i] * dt)
                    dcl[i] -= moved
                    pcie[i] += moved
                    if not p.pinned:
                        trainer_cpu[i] += moved / copy_rate[i]
                    if dcl[i] <= 1e-6:
                        dcl[i] = 0.0
                        dev_slot[i] += 1
                        dev_ready_at[i] = moved / copy_rate[i]

        # --- the GPUs: each advances through as many phases as fit in dt ------------------------
        busy = [0.0] * g
        sm = [0.0] * g
        stall = [0.0] * g
        nvlink = [0.0] * g
        steps = [0.0] * g
        blame = [0] * g
        frac = [0.0] * g  # share of a collective each rank completed in this step
        sm_c = p.sm_active_when_computing
        for i in range(g):
            if idle[i]:
                blame[i] = B_IDLE
                continue
            left = dt
            while left > 1e-12:
                ph = phase[i]
                if ph == COMPUTE:
                    use = rem[i] if rem[i] < left else left
                    busy[i] += use
                    sm[i] += use * sm_c  # SMs stay busy at any clock: it takes longer
                    rem[i] -= use
                    left -= use
                    if rem[i] <= 1e-12:
                        if self.comm_s > 0:
                            phase[i] = BARRIER
                            self._arrive(i, dt - left)
                            left = 0.0  # the barrier's release is settled below
                        else:
                            phase[i] = WAIT
                            steps[i] += 1
                elif ph == WAIT:
                    if dev_prefetch:
                        if dev_slot[i] < 1 - 1e-9:
                            stall[i] += left
                            blame[i] = self._wait_blame(i, uplink_limited[i])
                            break
                        late = dev_ready_at[i] - (dt - left)
                        if late > 1e-12:
                            stall[i] += late  # the copy lands later in this step
                            blame[i] = B_H2D
                            left -= late
                        dev_slot[i] -= 1
                        if ready_q[i] >= 1 - 1e-9 and dcl[i] == 0:
                            # The freed slot takes the next batch at once.
                            ready_q[i] -= 1
                            self.count["copy_started"][i] += 1
                            moved = min(h2d, copy_rate[i] * left)
                            pcie[i] += moved
                            if moved >= h2d - 1e-6:
                                dev_slot[i] += 1
                                dev_ready_at[i] = dt - left + moved / copy_rate[i]
                            else:
                                dcl[i] = h2d - moved
                        self._start_compute(i, clock[i])
                    else:
                        if ready_q[i] < 1 - 1e-9:
                            stall[i] += left
                            blame[i] = self._wait_blame(i, uplink_limited[i])
                            break
                        late = ready_at[i] - (dt - left)
                        if late > 1e-12:
                            stall[i] += late
                            blame[i] = self._wait_blame(i, uplink_limited[i])
                            left -= late
                        ready_q[i] -= 1
                        self.count["copy_started"][i] += 1
                        phase[i] = COPY
                        rem[i] = h2d
                elif ph == COPY:
                    rate = copy_rate[i]
                    use = min(rem[i] / rate, left)
                    pcie[i] += use * rate
                    rem[i] -= use * rate
                    stall[i] += use
                    blame[i] = B_SERIALIZED if serialized else (B_UPLINK if uplink_limited[i]
                                                                 else B_H2D)
                    if not p.pinned:
                        trainer_cpu[i] += use
                    left -= use
                    if rem[i] <= 1e-6:
                        self._start_compute(i, clock[i])
                elif ph == COMM:
                    use = rem[i] if rem[i] < left else left
                    busy[i] += use
                    sm[i] += use * 0.1
                    nvlink[i] += use / self.comm_s * p.collective_bytes
                    frac[i] += use / self.comm_s
                    if blame[i] == 0:
                        blame[i] = B_COMM
                    rem[i] -= use
                    left -= use
                    if rem[i] <= 1e-12:
                        phase[i] = WAIT
                        steps[i] += 1
                else:  # BARRIER: settled by settle_barrier
                    break
        return _StepState(busy, sm, pcie, nvlink, steps, stall, blame, [0.0] * g, frac, clock,
                          read_b, storage_bytes, cache_hit, sb, batch_bytes, worker_cpu,
                          trainer_cpu, d2h, blocked, total_read, in_flight, write_bytes, n,
                          spare, total)

    def _commit(self, st: "_StepState", rec: list) -> None:
        """Add the step's quantities (barrier settled) to the counters and record a row."""
        p, dt, g = self.p, self.dt, self.p.gpus
        (busy, sm, pcie, nvlink, steps, stall, blame, wait, _, clock, read_b, storage_bytes,
         cache_hit, sb, batch_bytes, worker_cpu, trainer_cpu, d2h, blocked, total_read,
         in_flight, write_bytes, n, spare, total) = st
        if self.in_cluster:
            cs = self.cycle_stall
            for i in range(g):
                if stall[i]:
                    cs[i] += stall[i]
                    self.cycle_blame[i] = blame[i]
        self.now += dt
        gc = self.gcum
        for i in range(g):
            gc["busy"][i] += busy[i]
            gc["sm_active"][i] += sm[i]
            gc["pcie_rx"][i] += pcie[i]
            gc["nvlink"][i] += nvlink[i]
            gc["steps"][i] += steps[i]
            gc["stall"][i] += stall[i]
            gc["cache_read"][i] += read_b[i] * batch_bytes * cache_hit if sb > 0 else \
                read_b[i] * batch_bytes
            gc["worker_cpu"][i] += worker_cpu[i]
            gc["trainer_cpu"][i] += trainer_cpu[i]
            gc["gpu_read"][i] += storage_bytes[i]
            gc["pcie_tx"][i] += d2h[i]
            gc["io_blocked"][i] += blocked[i]
            gc["collective_wait"][i] += wait[i]
        c = self.cum
        # A neighbour taking part of the storage: its reads are the device's too.
        neighbour = self.storage_avail * (1 - self.storage_factor) * dt \
            if self.storage_factor < 1 else 0.0
        total_read += neighbour
        c["storage_read"] += total_read
        c["storage_ops"] += total_read / max(p.request_bytes, 1.0)
        busy_frac = min(in_flight, 1.0) if (total_read or write_bytes) else 0.0
        c["storage_busy"] += busy_frac * dt
        c["storage_weighted"] += in_flight * dt
        # Readers block on their requests while any are in flight: PSI's "some" I/O stall.
        c["io_wait"] += busy_frac * dt if n else 0.0
        # "full": no task runnable (every reader waits, no worker preprocesses): the less CPU
        # the workers get to use in the step, the closer to "some".
        prep_cores = sum(worker_cpu) / dt
        c["io_full"] += busy_frac * dt * max(0.0, 1.0 - prep_cores) if n else 0.0
        # Readers of thrashed pages stall in reclaim and refaults: PSI memory counts them.
        miss = (1 - cache_hit) if cache_hit < p.cache_hit else 0.0
        c["mem_wait"] += busy_frac * dt * miss if n else 0.0
        c["cpu_wait"] += dt * (1 - spare / total) if total > spare else 0.0
        c["write"] += write_bytes
        if self.cpu_factor < 1:
            c["cpu_other"] += p.cores * (1 - self.cpu_factor) * dt
        row = [self.now]
        for v in gc.values():
            row += v
        row += c.values()
        row += blame
        row += clock
        rec.append(row)

    def _wait_blame(self, i: int, uplink_limited: bool) -> int:
        """Who a GPU waiting for its next batch is held up by: the first stage upstream of it
        with nothing to hand over."""
        if self.p.prefetch_depth <= 0:
            return B_SERIALIZED
        if self.p.prefetch_to_device and self.dev_copy_left[i] > 0:
            return B_UPLINK if uplink_limited else B_H2D  # its batch is on its way
        if self.read_q[i] > 1e-6:
            return B_CPU  # raw data is there; preprocessing has not finished a batch
        return B_UPLINK if uplink_limited else B_STORAGE

    def _arrive(self, i: int, at: float) -> None:
        self._arrivals[i] = at
        self.arrived_abs[i] = self.now + at

    def run(self, seconds: float) -> Trace:
        n = int(round(seconds / self.dt))
        rec: list = []
        for _ in range(n):
            self._step(rec)
        return self.trace(rec)

    def trace(self, rec: list) -> Trace:
        """The Trace of the rows _commit recorded."""
        n = len(rec)
        g = self.p.gpus
        width = 1 + g * len(self.GCUM) + len(self.CUM) + 2 * g
        table = np.array(rec, dtype=float).reshape(n, width)
        gcols = {k: table[:, 1 + j * g: 1 + (j + 1) * g] for j, k in enumerate(self.GCUM)}
        base = 1 + g * len(self.GCUM)
        ccols = {k: table[:, base + j] for j, k in enumerate(self.CUM)}
        base += len(self.CUM)
        blame = table[:, base: base + g].astype(np.int8)
        clock = table[:, base + g: base + 2 * g]
        cols = [table[:, 0]]
        return Trace(
            dt=self.dt, t=cols[0], busy=gcols["busy"],
            sm_active=gcols["sm_active"], pcie_rx=gcols["pcie_rx"], nvlink=gcols["nvlink"],
            steps=gcols["steps"], stall=gcols["stall"], blame=blame,
            storage_read=ccols["storage_read"], storage_ops=ccols["storage_ops"],
            storage_busy=ccols["storage_busy"], storage_weighted=ccols["storage_weighted"],
            cache_read=gcols["cache_read"], worker_cpu=gcols["worker_cpu"],
            trainer_cpu=gcols["trainer_cpu"], gpu_read=gcols["gpu_read"],
            io_wait=ccols["io_wait"], cpu_wait=ccols["cpu_wait"], clock_factor=clock,
            io_full=ccols["io_full"], mem_wait=ccols["mem_wait"], pcie_tx=gcols["pcie_tx"],
            io_blocked=gcols["io_blocked"],
            memory_held=np.ones((n, g)), write=ccols["write"],
            collective_wait=gcols["collective_wait"], cpu_other=ccols["cpu_other"],
        )


(B_COMPUTE, B_STORAGE, B_CPU, B_H2D, B_SERIALIZED, B_COMM, B_STRAGGLER, B_IDLE,
 B_UPLINK) = range(len(BLAME))

# What one node's time step leaves for the barrier and the counters (lists over its GPUs).
_StepState = namedtuple("_StepState", (
    "busy", "sm", "pcie", "nvlink", "steps", "stall", "blame", "wait", "frac", "clock",
    "read_b", "storage_bytes", "cache_hit", "sb", "batch_bytes", "worker_cpu", "trainer_cpu",
    "d2h", "blocked", "total_read", "in_flight", "write_bytes", "readers", "spare",
    "cpu_demand"))


def settle_barrier(sims, states, dt: float, collective_s: float | None = None
                   ) -> tuple[float, int, int] | None:
    """The ranks at the collective's barrier, of one node or of every node of a job: while
    some have not arrived, those waiting spin (busy for NVML, SMs nearly idle) to the end of
    the time step; once the last arrives, all run the collective together, for each node's
    comm_s (collective_s, when given, becomes every node's comm_s for this collective).

    sims and states: the nodes' Simulators and the _StepStates their _advance returned.
    Returns (when in the step the barrier released, the node's position in sims, the GPU
    that arrived last), or None when it did not release in this step."""
    waiting = []
    ranks = 0
    for k, sim in enumerate(sims):
        phase = sim.phase
        g = sim.p.gpus
        ranks += g
        for i in range(g):
            if phase[i] == BARRIER:
                waiting.append((k, i))
    if not waiting:
        return None
    if len(waiting) < ranks:
        for k, i in waiting:
            sim, st = sims[k], states[k]
            spin = dt - sim._arrivals.pop(i, 0.0)
            st.busy[i] += spin
            st.sm[i] += spin * 0.05
            st.wait[i] += spin
            st.blame[i] = sim.spin_blame
        return None
    release, last = -1.0, (0, 0)
    for k, i in waiting:
        at = sims[k]._arrivals.get(i, 0.0)
        if at > release:
            release, last = at, (k, i)
    for k, sim in enumerate(sims):
        st = states[k]
        if collective_s is not None:
            sim.comm_s = collective_s
        p, phase, rem, arrivals = sim.p, sim.phase, sim.rem, sim._arrivals
        comm_s = sim.comm_s
        busy, sm, nvlink, steps, blame, wait, frac = st.busy, st.sm, st.nvlink, st.steps, \
            st.blame, st.wait, st.frac
        arrived_at = {i: arrivals.get(i, 0.0) for i in range(p.gpus)}
        arrivals.clear()
        for i in range(p.gpus):
            spin = release - arrived_at[i]
            busy[i] += spin
            sm[i] += spin * 0.05
            wait[i] += spin
            if spin > 1e-9:
                blame[i] = sim.spin_blame
            phase[i] = COMM
            rem[i] = comm_s
            use = min(comm_s, dt - release)
            busy[i] += use
            sm[i] += use * 0.1
            nvlink[i] += use / comm_s * p.collective_bytes
            frac[i] += use / comm_s
            rem[i] -= use
            if blame[i] == 0:
                blame[i] = B_COMM
            if rem[i] <= 1e-12:
                phase[i] = WAIT
                steps[i] += 1
                # (A GPU finishing its collective within this step starts the next one at the
                # next step: at most one step of 10 ms, rare, as collectives take longer.)
    return release, last[0], last[1]
