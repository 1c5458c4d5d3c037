"""A data-parallel job over several nodes, joined at each step's collective, in 10 ms steps.

Each node is a Simulator (agentd/sim/model.py) with its own storage, CPU cores, PCIe links,
data loaders, clocks and RDMA ports. All nodes advance in lock-step on one clock; at every
time step the ranks of every node that reached the collective's barrier spin there (busy for
NVML, SMs nearly idle) until the last rank of the job arrives (settle_barrier); then all run
the collective together, for as long as its transfer over the slowest link takes:

    collective_s = 2(G-1)/G * S / nvlink_bandwidth                  (within each node)
                 + max over rails r of  bytes_r / min over nodes n of goodput(n, r)
                 + latency_s
    bytes_r      = 2(N-1)/N * S/G * (GPUs on NIC r)    (ring all-reduce, one ring per rail)

with S the gradient bytes each GPU all-reduces per step, N nodes of G GPUs, and GPU i on
NIC i % nics (rail-optimised). In a ring every rank moves the same bytes per step, so a slow
or lossy link shows in its port's rate, errors and link recoveries, in the transmit wait
(port_xmit_wait: data to send, no credits) of the port that sends into it (its predecessor
on the rail), and in a link near its rate while transferring: not in bytes per step.

Ground truth (ClusterTrace): every node's Trace (per rank: busy, SM activity, input stall,
wait in the collective, ...), every node's RDMA port counters, and for each collective which
rank arrived last, why (CAUSES: throttled clocks, a slower GPU at normal clocks, starved
input, or natural jitter), by how long it held the job (release minus the last arrival on
any other node), and how much longer the transfer took than over healthy links, and on whose
link (lost_time()).

    spec = ClusterSpec(nodes=[NodeSpec("node-0", JobParams(gpus=8)), ...],
                       collective_bytes=1e9)
    sim = ClusterSimulator(spec)
    ct = sim.run(60.0)                  # ClusterTrace; call again to continue
    lost_time(ct, 30.0, 60.0)           # seconds of job time each node cost, by cause
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from agentd.sim.model import (B_CPU, B_H2D, B_SERIALIZED, B_STORAGE, B_UPLINK, JobParams,
                              Simulator, Trace, settle_barrier)

# Why the last rank at a collective was late (ClusterTrace.releases["cause"]).
CAUSES = ("jitter", "throttled", "slow_gpu", "input")
C_JITTER, C_THROTTLED, C_SLOW_GPU, C_INPUT = range(len(CAUSES))
INPUT_BLAMES = (B_STORAGE, B_CPU, B_H2D, B_SERIALIZED, B_UPLINK)

MTU = 4096  # InfiniBand MTU: bytes per packet
# port_xmit_wait counts "ticks" whose length the InfiniBand spec leaves to the adapter; the
# simulator's tick (the counter's rate is what a comparison between peers reads).
XMIT_WAIT_TICK_S = 1e-6
# Natural congestion: a healthy port waits for credits this share of its transfer time.
BACKGROUND_XMIT_WAIT = 0.004
# What each NIC counts, cumulative per time step (ClusterTrace.net[node][field]: [steps, nics]).
NET_FIELDS = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "xmit_wait", "symbol_error",
              "rcv_errors", "link_error_recovery", "link_downed", "goodput_bytes", "rate")
# A node holds the job back "by its link" when the collective takes this much longer than
# over healthy links.
LINK_EXCESS = 0.02


@dataclass
class Nic:
    """One RDMA port of a node on the job's fabric (an HCA port, e.g. mlx5_0 port 1)."""

    device: str = "mlx5_0"
    rate: float = 50e9  # signalling rate, bytes/s (400 Gb/s NDR); the port's `rate` file
    efficiency: float = 0.92  # share of the rate a collective's transfer reaches


@dataclass
class LinkEpisode:
    """A node's link going bad: trained down to a lower rate, or lossy (same rate, packets
    lost and retransmitted, link recoveries), for a while."""

    start_s: float
    end_s: float
    node: int
    nic: int = -1  # -1: every NIC of the node
    rate_factor: float = 1.0  # the link retrained at this share of its rate (e.g. 0.5)
    efficiency_factor: float = 1.0  # goodput share left by retransmissions and timeouts
    loss: float = 0.0  # share of packets received in error (port_rcv_errors)
    retransmit: float = 0.0  # extra bytes sent again, as a share of the goodput
    recoveries_per_hour: float = 0.0  # link error recoveries while it is bad


@dataclass
class NodeSpec:
    """One node of the job: its hardware, its share of the job, and who it says it is."""

    name: str  # host name (dcgm-exporter's Hostname, Prometheus' instance host)
    params: JobParams  # its pipeline: storage, cores, loaders, PCIe, compute, episodes
    nics: list[Nic] = field(default_factory=lambda: [Nic()])
    clocks: list[float] | None = None  # per GPU share of the max clock in normal operation
    temperature_offset_c: list[float] | None = None  # per GPU, to the model's temperature
    throttle_reason: str = "sw_power_cap"  # what a clock episode reports: or "hw_thermal"
    remapped_rows: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    dram_factor: list[float] | None = None  # per GPU DRAM activity relative to peers
    cgroup: str = "/system.slice/train.service"  # the trainers' cgroup (job identity)
    pod: tuple[str, str, str] | None = None  # Kubernetes (namespace, pod, pod UID)
    container_id: str = ""  # the trainer container's id (64 hex), with a pod


@dataclass
class ClusterSpec:
    nodes: list[NodeSpec]
    collective_bytes: float = 1e9  # S: gradient bytes each GPU all-reduces per step
    nvlink_bandwidth: float = 1.5e11  # per GPU within a node, bytes/s
    latency_s: float = 0.002  # per collective (launch, synchronisation, small messages)
    link_episodes: list[LinkEpisode] = field(default_factory=list)
    seed: int = 0

    @property
    def gpus(self) -> int:
        return self.nodes[0].params.gpus

    def rail_gpus(self, nics: int) -> list[int]:
        """How many of a node's GPUs use each of its NICs (GPU i on NIC i % nics)."""
        return [len(range(r, self.gpus, nics)) for r in range(nics)]

    def network_bytes_per_gpu(self) -> float:
        """Bytes each GPU's share crosses the network per step, each way (ring all-reduce
        of S/G per rail over N nodes)."""
        n = len(self.nodes)
        return 2 * (n - 1) / n * self.collective_bytes / self.gpus if n > 1 else 0.0

    def nvlink_bytes_per_gpu(self) -> float:
        g = self.gpus
        return 2 * (g - 1) / g * self.collective_bytes if g > 1 else 0.0

    def check(self) -> None:
        if not self.nodes:
            raise ValueError("a job needs at least one node")
        g = self.gpus
        for k, node in enumerate(self.nodes):
            if node.params.gpus != g:
                raise ValueError(f"node {k} ({node.name}): {node.params.gpus} GPUs, the job's "
                                 f"nodes have {g} each")
            if len(node.nics) != len(self.nodes[0].nics):
                raise ValueError(f"node {k} ({node.name}): every node needs as many NICs")
        if self.collective_bytes <= 0:
            raise ValueError("collective_bytes: a data-parallel job all-reduces every step")
        for ep in self.link_episodes:
            if not 0 <= ep.node < len(self.nodes):
                raise ValueError(f"link episode: no node {ep.node}")
            if ep.nic >= len(self.nodes[ep.node].nics):
                raise ValueError(f"link episode: node {ep.node} has no NIC {ep.nic}")


@dataclass
class Links:
    """The job's links at one time, [nodes, nics] each."""

    rate: np.ndarray  # signalling rate, bytes/s
    goodput: np.ndarray  # what a transfer reaches, bytes/s
    retransmit: np.ndarray  # bytes sent again, share of goodput (a lossy link)
    loss: np.ndarray  # share of packets received in error
    recoveries_per_hour: np.ndarray
    episodes: list  # per node per NIC the LinkEpisode in force, or None


def link_state(spec: ClusterSpec, t: float) -> Links:
    """The links at time t: each node's NICs with the link episodes in force."""
    n, nics = len(spec.nodes), len(spec.nodes[0].nics)
    rate = np.array([[nic.rate for nic in node.nics] for node in spec.nodes], dtype=float)
    eff = np.array([[nic.efficiency for nic in node.nics] for node in spec.nodes])
    retransmit, loss, recoveries = np.zeros((n, nics)), np.zeros((n, nics)), np.zeros((n, nics))
    bad: list = [[None] * nics for _ in range(n)]
    for ep in spec.link_episodes:
        if ep.start_s <= t < ep.end_s:
            for r in (range(nics) if ep.nic < 0 else (ep.nic,)):
                rate[ep.node, r] *= ep.rate_factor
                eff[ep.node, r] *= ep.efficiency_factor
                retransmit[ep.node, r] = ep.retransmit
                loss[ep.node, r] = ep.loss
                recoveries[ep.node, r] = ep.recoveries_per_hour
                bad[ep.node][r] = ep
    return Links(rate, rate * eff, retransmit, loss, recoveries, bad)


def port_increments(links: Links, moved: np.ndarray, transfer: np.ndarray,
                    background: np.ndarray) -> dict[str, np.ndarray]:
    """What the ports count while each moves `moved` bytes [nodes, nics] of a collective
    each way, for `transfer` seconds (its rail's bytes at the rail's pace): bytes on the
    wire (a lossy link's retransmissions on it and on the ports around it), packets, receive
    and symbol errors and link recoveries on a lossy port, and transmit wait (data, no
    credits) on the port that sends into a slower one (its predecessor on the rail's ring),
    plus each port's share of natural congestion (`background`)."""
    n = moved.shape[0]
    succ = lambda a: np.roll(a, -1, axis=0)  # noqa: E731  (the next node on the ring)
    pred = lambda a: np.roll(a, 1, axis=0)  # noqa: E731
    wire_tx = moved * (1 + links.retransmit) * (1 + succ(links.retransmit))
    wire_rx = moved * (1 + links.retransmit) * (1 + pred(links.retransmit))
    errors = wire_rx / MTU * links.loss
    own, nxt = links.goodput, succ(links.goodput)
    wait = transfer * background
    if n > 1:
        wait = wait + transfer * np.clip(1 - nxt / own, 0.0, None)
    return {"goodput_bytes": moved, "tx_bytes": wire_tx, "rx_bytes": wire_rx,
            "tx_packets": wire_tx / MTU, "rx_packets": wire_rx / MTU,
            "xmit_wait": wait / XMIT_WAIT_TICK_S, "rcv_errors": errors,
            "symbol_error": errors * 4,  # several bad symbols per bad packet
            "link_error_recovery": transfer * links.recoveries_per_hour / 3600 * (moved > 0)}


def rail_transfer(spec: ClusterSpec, links: Links, moved: np.ndarray) -> np.ndarray:
    """Seconds each port spends moving `moved` bytes at its rail's pace."""
    pace = links.goodput.min(axis=0)
    return np.where(pace > 0, moved / pace, 0.0)


def collective_time(spec: ClusterSpec, goodput: np.ndarray) -> tuple[float, np.ndarray]:
    """(seconds the collective takes, the pace of each rail in bytes/s) for the links'
    goodput [nodes, nics]."""
    nics = goodput.shape[1]
    per_gpu = spec.network_bytes_per_gpu()
    pace = goodput.min(axis=0)  # each rail's ring runs at its slowest link
    inter = max((per_gpu * k / pace[r] for r, k in enumerate(spec.rail_gpus(nics)) if k),
                default=0.0)
    intra = spec.nvlink_bytes_per_gpu() / spec.nvlink_bandwidth
    return intra + inter + spec.latency_s, pace


@dataclass
class ClusterTrace:
    dt: float
    t: np.ndarray  # end of each time step, seconds since the start
    nodes: list[Trace]  # each node's counters and ground truth, as a single node's
    net: list[dict[str, np.ndarray]]  # per node: NET_FIELDS -> [steps, nics] cumulative
    # One entry per collective (arrays of equal length): its release time (s), the node and
    # GPU that arrived last, why (CAUSES index), how long that node held the job (release
    # minus the latest arrival on any other node), the collective's duration, its excess
    # over healthy links, and the node whose link set that pace (-1: none).
    releases: dict[str, np.ndarray]


class ClusterSimulator:
    """The job's nodes in lock-step; `run(seconds)` returns a ClusterTrace chunk and keeps
    the state, like Simulator.run."""

    def __init__(self, spec: ClusterSpec, dt: float = 0.01):
        spec.check()
        self.spec = spec
        self.dt = dt
        self.now = 0.0
        comm, _ = collective_time(spec, link_state(spec, 0.0).goodput)
        self.sims = [Simulator(_node_params(spec, k), dt, collective_s=comm, clocks=node.clocks)
                     for k, node in enumerate(spec.nodes)]
        nics = len(spec.nodes[0].nics)
        self.nics = nics
        self.rail = [i % nics for i in range(spec.gpus)]
        # Per node one flat array of every NIC counter (a row per time step is one copy);
        # net[k][field] are views into it.
        self._flat = [np.zeros(len(NET_FIELDS) * nics) for _ in spec.nodes]
        self.net = [{f: flat[j * nics:(j + 1) * nics] for j, f in enumerate(NET_FIELDS)}
                    for flat in self._flat]
        for k, node in enumerate(spec.nodes):
            self.net[k]["rate"][:] = [nic.rate for nic in node.nics]
        self._links = None  # (time, rate, goodput, bad, comm, pace) at the last change
        self._healthy_comm = collective_time(
            spec, np.array([[nic.rate * nic.efficiency for nic in node.nics]
                            for node in spec.nodes]))[0]
        self._episode_edges = sorted({e for ep in spec.link_episodes
                                      for e in (ep.start_s, ep.end_s)})
        self._downed: set[tuple[int, int, int]] = set()  # (episode, node, nic) counted
        self._releases: list[tuple] = []
        rng = np.random.default_rng(spec.seed + 7919)
        # Per port, its share of natural congestion (ports differ a little).
        self._background = BACKGROUND_XMIT_WAIT * rng.uniform(0.5, 1.5, (len(spec.nodes), nics))

    # --- the links --------------------------------------------------------------------------

    def _link_now(self, t: float):
        """(links, collective seconds) at t, recomputed only when an episode starts or ends;
        a link retraining to a lower rate goes down and up once (link_downed)."""
        key = sum(1 for e in self._episode_edges if e <= t)
        if self._links is None or self._links[0] != key:
            links = link_state(self.spec, t)
            comm, _ = collective_time(self.spec, links.goodput)
            self._links = (key, links, comm)
            for k in range(len(self.spec.nodes)):
                self.net[k]["rate"][:] = links.rate[k]
            for e, ep in enumerate(self.spec.link_episodes):
                if ep.rate_factor < 1 and ep.start_s <= t < ep.end_s:
                    for r in (range(self.nics) if ep.nic < 0 else (ep.nic,)):
                        if (e, ep.node, r) not in self._downed:
                            self._downed.add((e, ep.node, r))
                            self.net[ep.node]["link_downed"][r] += 1
                            self.net[ep.node]["link_error_recovery"][r] += 1
        return self._links

    def _network(self, states) -> None:
        """Add the step's RDMA traffic: each rank in its collective moved its share of the
        network bytes (frac of a collective), through its rail's NIC, both ways."""
        if not any(any(st.frac) for st in states):
            return
        links = self._links[1]
        per_gpu = self.spec.network_bytes_per_gpu()
        moved = np.zeros((len(self.sims), self.nics))
        for k, st in enumerate(states):
            for i, f in enumerate(st.frac):
                if f:
                    moved[k, self.rail[i]] += f * per_gpu
        inc = port_increments(links, moved, rail_transfer(self.spec, links, moved),
                              self._background)
        for k, net in enumerate(self.net):
            for f, v in inc.items():
                net[f] += v[k]

    # --- stepping ---------------------------------------------------------------------------

    def _step(self, recs: list[list], net_rows: list[list]) -> None:
        dt = self.dt
        comm = self._link_now(self.now)[2]
        states = [sim._advance() for sim in self.sims]
        rel = settle_barrier(self.sims, states, dt, collective_s=comm)
        if rel is not None:
            self._released(rel, states, comm)
        self._network(states)
        for sim, st, rec in zip(self.sims, states, recs):
            sim._commit(st, rec)
        self.now += dt
        for flat, rows in zip(self._flat, net_rows):
            rows.append(flat.copy())

    def _released(self, rel: tuple[float, int, int], states, comm: float) -> None:
        """Ground truth of one collective: who arrived last, why, and what it cost."""
        at, k, i = rel
        sims = self.sims
        latest = [max(s.arrived_abs) for s in sims]
        others = max((v for j, v in enumerate(latest) if j != k), default=latest[k])
        release = self.now + at
        held = max(release - others, 0.0)
        holder = sims[k]
        stall = holder.cycle_stall[i] + states[k].stall[i]
        nominal = holder.p.compute_s * holder.base_clock[i] ** -1
        extra_compute = holder.compute_len[i] - nominal
        if stall > 1e-9 and stall >= extra_compute:
            cause = C_INPUT
        elif holder.compute_clock[i] < holder.base_clock[i] - 0.01:
            cause = C_THROTTLED
        elif holder.slow_now[i] > 1.01:
            cause = C_SLOW_GPU
        else:
            cause = C_JITTER
        excess = comm - self._healthy_comm
        pace_node = -1
        if excess > LINK_EXCESS * self._healthy_comm:
            goodput = self._links[1].goodput
            pace_node = int(np.unravel_index(np.argmin(goodput), goodput.shape)[0])
        self._releases.append((release, k, i, cause, held, comm, max(excess, 0.0), pace_node))
        for sim, st in zip(sims, states):
            for j in range(sim.p.gpus):
                sim.cycle_stall[j] = -st.stall[j]  # _commit adds this step's: 0 after it
                sim.cycle_blame[j] = 0

    def run(self, seconds: float) -> ClusterTrace:
        n = int(round(seconds / self.dt))
        recs: list[list] = [[] for _ in self.sims]
        net_rows: list[list] = [[] for _ in self.sims]
        self._releases = []
        for _ in range(n):
            self._step(recs, net_rows)
        nodes = [sim.trace(rec) for sim, rec in zip(self.sims, recs)]
        net = []
        for rows in net_rows:
            table = np.array(rows).reshape(n, len(NET_FIELDS), self.nics)
            net.append({f: table[:, j, :] for j, f in enumerate(NET_FIELDS)})
        cols = ("t", "node", "gpu", "cause", "held_s", "collective_s", "link_excess_s",
                "link_node")
        rel = np.array(self._releases, dtype=float).reshape(-1, len(cols))
        releases = {c: rel[:, j] if c in ("t", "held_s", "collective_s", "link_excess_s")
                    else rel[:, j].astype(int) for j, c in enumerate(cols)}
        return ClusterTrace(self.dt, nodes[0].t if nodes else np.zeros(0), nodes, net,
                            releases)


def _node_params(spec: ClusterSpec, k: int) -> JobParams:
    """A node's JobParams as one of the job's nodes: its NVLink share of the collective,
    no stand-in for remote peers, its own random stream."""
    from dataclasses import replace

    p = spec.nodes[k].params
    return replace(p, collective_bytes=spec.nvlink_bytes_per_gpu(), peer_wait_s=0.0,
                   collective_bandwidth=spec.nvlink_bandwidth,
                   seed=p.seed * 1000 + k + 1 + spec.seed * 100_003)


def lost_time(ct: ClusterTrace, t0: float = 0.0, t1: float = math.inf) -> list[dict]:
    """Per node, the job time it cost between t0 and t1 (seconds), by cause: the time the
    job waited at collectives for it beyond the last rank of any other node ("throttled",
    "slow_gpu", "input", "jitter"), and the time collectives took beyond healthy links
    because of its link ("network")."""
    r = ct.releases
    sel = (r["t"] >= t0) & (r["t"] < t1)
    out = [dict.fromkeys((*CAUSES, "network"), 0.0) for _ in ct.nodes]
    for node, cause, held in zip(r["node"][sel], r["cause"][sel], r["held_s"][sel]):
        out[node][CAUSES[cause]] += float(held)
    for node, excess in zip(r["link_node"][sel], r["link_excess_s"][sel]):
        if node >= 0:
            out[node]["network"] += float(excess)
    return out


def culprit(ct: ClusterTrace, t0: float = 0.0, t1: float = math.inf
            ) -> tuple[int, str, float] | None:
    """(node, cause, share of the job's time it cost) of the node that cost the job the most
    time between t0 and t1, not counting natural jitter; None when none cost over 2%."""
    lost = lost_time(ct, t0, t1)
    r = ct.releases
    sel = (r["t"] >= t0) & (r["t"] < t1)
    if not sel.any():
        return None
    span = float(r["t"][sel][-1] - r["t"][sel][0]) or 1.0
    best = None
    for k, by in enumerate(lost):
        for cause, s in by.items():
            if cause != "jitter" and (best is None or s > best[2]):
                best = (k, cause, s)
    if best is None or best[2] / span < 0.02:
        return None
    return best[0], best[1], best[2] / span
