"""Multi-node job scenarios as data files (agentd/scenarios/cluster/*.toml), randomizable by
seed: one data-parallel job over several nodes, healthy with natural node-to-node variation,
or with one planted slow node of one cause.

    description = "16 nodes, one node's GPUs power-capped to 60-85% clocks from 2 min on"
    cause = "throttled"        # healthy | throttled | slow_gpu | input | network
    duration_s = 600           # for batch runs (tests, benchmarks)
    onset_s = 120              # when the planted problem starts
    nodes = 16                 # 1-64 nodes ...
    scheduler = "slurm"        # who the trainers belong to: "slurm" (job_id) or
    job_id = 4242              # "kubernetes" (namespace, job_name: one pod per node,
    namespace = "ml-train"     #  JOBNAME-worker-K)
    job_name = "llama-pretrain"
    host_prefix = "gpu-node-"  # host names: gpu-node-00, gpu-node-01, ...

    [job]                      # each node's JobParams (agentd/sim/model.py): 1-8 GPUs ...
    gpus = 8
    compute_s = 0.35

    [network]                  # the job's collective and fabric (agentd/sim/cluster.py)
    collective_bytes = 2.0e9   # gradient bytes each GPU all-reduces per step
    nvlink_bandwidth = 1.5e11
    latency_s = 0.002
    nics = 8                   # RDMA ports per node (GPU i on NIC i % nics)
    nic_rate = 5.0e10          # bytes/s: 400 Gb/s NDR
    nic_efficiency = 0.92

    [variation]                # natural spread, drawn per node and GPU (seed 0 without one)
    clock = 0.03               # each GPU's clock in [1 - 0.03, 1] of its maximum
    temperature_c = 6          # each GPU's temperature offset in [-6, +6] C
    storage_bandwidth = 0.15   # each node's storage bandwidth x [0.85, 1.15]
    nic_efficiency = 0.01      # each port's goodput share +-0.01
    compute_jitter = [0.01, 0.03]   # each node's step-time jitter, drawn in the range

    [fault]                    # the planted slow node (not for "healthy")
    node = -1                  # which node (-1: drawn from the seed; without one the middle)
    clock_factor = [0.6, 0.85] # [low, high]: drawn with the seed; without one, the midpoint

    [randomize]                # with a seed, like node scenarios: job fields, network
    nodes = [2, 64]            # fields, nodes, scheduler; field = [low, high]
    gpus = [1, 8]

The fault's keys by cause (each a number or [low, high]):
  throttled  clock_factor, reason ("sw_power_cap" or "hw_thermal"), gpus (list; default
             every GPU of the node)
  slow_gpu   compute_factor, gpu (-1: drawn), remapped_rows ([correctable, uncorrectable,
             pending, failure], set in the fake NVML), dram_factor (memory-bound: its DRAM
             activity relative to its peers')
  input      stage ("storage": its storage delivers storage_factor of its bandwidth, a
             degraded or shared volume; "cpu": its loaders keep cpu_factor of the cores, a
             CPU hog beside them), or slowdown instead of the factor: the factor that makes
             that node's input that many times slower than the job's steps
  network    nic (-1: drawn); rate_factor (trained down to a lower rate) or a lossy link:
             loss (share of packets received in error), efficiency_factor (goodput left),
             retransmit (bytes sent again, share of goodput), recoveries_per_hour

    load(name_or_path, seed=None, nodes=None, gpus=None) -> ClusterScenario
    library() -> names in agentd/scenarios/cluster

ClusterScenario.spec is the ClusterSpec to simulate (ClusterSimulator, or the fast step model
in agentd/sim/fleet.py); ClusterScenario.fault says what was planted where (the truth for
tests and benchmarks); .nodes lists each node's host name and job identity.
"""

from __future__ import annotations

import copy
import hashlib
import os
import uuid as uuidlib
from dataclasses import dataclass, field, fields, replace

import numpy as np

from agentd.sim import scenario as node_scenarios
from agentd.sim.cluster import ClusterSpec, LinkEpisode, Nic, NodeSpec
from agentd.sim.model import Episode
from agentd.tomlfile import read_toml

CLUSTER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scenarios", "cluster")
CAUSES = ("healthy", "throttled", "slow_gpu", "input", "network")
SCHEDULERS = ("slurm", "kubernetes")
MAX_NODES = 4096  # a file's jobs draw 2-64 nodes; a fleet benchmark may ask for one of 512
MAX_GPUS = 8

ScenarioError = node_scenarios.ScenarioError
_table = node_scenarios._table  # a sub-table of a scenario document, or a one-line error

_TOP = {"description", "cause", "duration_s", "onset_s", "nodes", "scheduler", "job_id",
        "namespace", "job_name", "host_prefix", "job", "network", "variation", "fault",
        "randomize"}
_NETWORK = {"collective_bytes": 2.0e9, "nvlink_bandwidth": 1.5e11, "latency_s": 0.002,
            "nics": 8, "nic_rate": 5.0e10, "nic_efficiency": 0.92}
_VARIATION = {"clock": 0.03, "temperature_c": 6.0, "storage_bandwidth": 0.15,
              "nic_efficiency": 0.01, "compute_jitter": [0.01, 0.03]}
_FAULT_KEYS = {
    "throttled": {"node", "clock_factor", "reason", "gpus"},
    "slow_gpu": {"node", "compute_factor", "gpu", "remapped_rows", "dram_factor"},
    "input": {"node", "stage", "storage_factor", "cpu_factor", "slowdown"},
    "network": {"node", "nic", "rate_factor", "loss", "efficiency_factor", "retransmit",
                "recoveries_per_hour"},
    "healthy": set(),
}
# Port rates by InfiniBand generation, for the `rate` file (4X links).
IB_RATES = ((50e9, "400 Gb/sec (4X NDR)"), (25e9, "200 Gb/sec (4X HDR)"),
            (12.5e9, "100 Gb/sec (4X EDR)"), (7e9, "56 Gb/sec (4X FDR)"),
            (5e9, "40 Gb/sec (4X QDR)"))


@dataclass
class NodeIdentity:
    name: str  # host name
    cgroup: str  # the trainers' cgroup path
    slurm_job_id: str = ""
    namespace: str = ""
    pod: str = ""
    pod_uid: str = ""
    container_id: str = ""


@dataclass
class ClusterScenario:
    name: str
    description: str
    cause: str
    spec: ClusterSpec
    duration_s: float
    onset_s: float
    nodes: list[NodeIdentity]
    # What was planted: {"cause", "node", "host", and the cause's parameters (gpus, nic,
    # clock_factor, ...)}; {} for a healthy job.
    fault: dict = field(default_factory=dict)
    scheduler: str = "slurm"
    job_id: str = ""  # the Slurm job id, or the Kubernetes job's name
    randomized: dict = field(default_factory=dict)


def _number(v, where: str, low: float = 0.0, high: float = float("inf")) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ScenarioError(f"{where}: expected a number, got {v!r}")
    if not low <= v <= high:
        raise ScenarioError(f"{where}: {v!r} is outside [{low:g}, {high:g}]")
    return v


class _Draw:
    """Draws for one scenario: a [low, high] range is drawn with the seed, or its midpoint
    without one; a plain number is itself."""

    def __init__(self, seed: int | None):
        self.seed = seed
        self.rng = np.random.default_rng(seed if seed is not None else 0)

    def value(self, v, where: str, low: float = 0.0, high: float = float("inf")) -> float:
        if isinstance(v, list):
            if len(v) != 2:
                raise ScenarioError(f"{where}: expected a number or [low, high]")
            lo, hi = (_number(x, where, low, high) for x in v)
            if lo > hi:
                raise ScenarioError(f"{where}: low above high")
            return float(self.rng.uniform(lo, hi)) if self.seed is not None else (lo + hi) / 2
        return float(_number(v, where, low, high))

    def index(self, v, n: int, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ScenarioError(f"{where}: expected an index, got {v!r}")
        if v == -1:
            return int(self.rng.integers(n)) if self.seed is not None else n // 2
        if not 0 <= v < n:
            raise ScenarioError(f"{where}: {v} is not in 0..{n - 1}")
        return v


def from_dict(doc: dict, name: str, seed: int | None = None, nodes: int | None = None,
              gpus: int | None = None) -> ClusterScenario:
    """A ClusterScenario from a parsed file; `nodes` and `gpus` override the file's and
    their randomization (e.g. to serve a small job)."""
    where = name
    if not isinstance(doc, dict):
        raise ScenarioError(f"{where}: expected a table")
    unknown = set(doc) - _TOP
    if unknown:
        raise ScenarioError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    cause = doc.get("cause", "healthy")
    if cause not in CAUSES:
        raise ScenarioError(f"{where}.cause: must be one of {', '.join(CAUSES)}")
    draw = _Draw(seed)
    randomize = _table(doc, "randomize", where)
    network = {**_NETWORK}
    for k, v in _table(doc, "network", where).items():
        if k not in _NETWORK:
            raise ScenarioError(f"{where}.network: unknown key {k!r}")
        network[k] = _number(v, f"{where}.network.{k}")
    top = {"nodes": doc.get("nodes", 4), "scheduler": doc.get("scheduler", "slurm")}
    job_random, drawn = {}, {}
    for k, bounds in randomize.items():
        w = f"{where}.randomize.{k}"
        if not (isinstance(bounds, list) and len(bounds) == 2):
            raise ScenarioError(f"{w}: expected [low, high]")
        if k in top or k in network:
            if seed is None:
                continue
            if k == "scheduler":
                if not all(b in SCHEDULERS for b in bounds):
                    raise ScenarioError(f"{w}: schedulers are {', '.join(SCHEDULERS)}")
                top[k] = bounds[int(draw.rng.integers(2))]
            elif k == "nodes":
                lo, hi = (int(_number(b, w, 1, MAX_NODES)) for b in bounds)
                top[k] = int(draw.rng.integers(lo, hi + 1))
            else:
                network[k] = draw.value(bounds, w)
                if k == "nics":
                    network[k] = round(network[k])
            drawn[k] = top.get(k, network.get(k))
        else:
            job_random[k] = bounds  # a job field: scenario.from_dict draws and checks it
    n_nodes = top["nodes"] if nodes is None else nodes
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or \
            not 1 <= n_nodes <= MAX_NODES:
        raise ScenarioError(f"{where}.nodes: expected 1 to {MAX_NODES} nodes, got {n_nodes!r}")
    scheduler = top["scheduler"]
    if scheduler not in SCHEDULERS:
        raise ScenarioError(f"{where}.scheduler: must be one of {', '.join(SCHEDULERS)}")
    for key in ("description", "namespace", "job_name", "host_prefix"):
        if key in doc and not isinstance(doc[key], str):
            raise ScenarioError(f"{where}.{key}: expected a string")
    job_doc = dict(_table(doc, "job", where))
    if gpus is not None:
        job_doc["gpus"] = gpus
        job_random.pop("gpus", None)
    base = node_scenarios.from_dict({"description": "", "job": job_doc, "randomize": job_random},
                                    name, seed)
    p = base.job
    drawn.update(base.randomized)
    if not 1 <= p.gpus <= MAX_GPUS:
        raise ScenarioError(f"{where}.job.gpus: expected 1 to {MAX_GPUS} GPUs per node")
    if not 1 <= network["nics"] <= 8:
        raise ScenarioError(f"{where}.network.nics: expected 1 to 8")
    nics = min(int(network["nics"]), p.gpus)  # a node has no more job NICs than GPUs
    onset = _number(doc.get("onset_s", 0.0), f"{where}.onset_s", 0, 1e9)
    duration = _number(doc.get("duration_s", 300.0), f"{where}.duration_s", 1, 1e9)

    # Who the job is.
    host_prefix = doc.get("host_prefix", "gpu-node-")
    raw_id = doc.get("job_id", 4242)
    if isinstance(raw_id, bool) or not isinstance(raw_id, int) or not 0 < raw_id < 2**31:
        raise ScenarioError(f"{where}.job_id: expected a Slurm job id (a positive integer)")
    job_id = str(raw_id) if scheduler == "slurm" else doc.get("job_name", "train")
    namespace = doc.get("namespace", "default")
    idents = [_identity(f"{host_prefix}{k:02d}", k, scheduler, job_id, namespace)
              for k in range(n_nodes)]

    # Natural variation.
    var = {**_VARIATION}
    for k, v in _table(doc, "variation", where).items():
        if k not in _VARIATION:
            raise ScenarioError(f"{where}.variation: unknown key {k!r}")
        var[k] = v
    vrng = np.random.default_rng([seed if seed is not None else 0, 1])
    vdraw = _Draw(seed)
    vdraw.rng = vrng
    vdraw.seed = 0  # ranges are always drawn: every node differs a little
    specs = []
    g = p.gpus
    for k in range(n_nodes):
        clock_var = _number(var["clock"], f"{where}.variation.clock", 0, 0.5)
        temp_var = _number(var["temperature_c"], f"{where}.variation.temperature_c", 0, 30)
        disk_var = _number(var["storage_bandwidth"], f"{where}.variation.storage_bandwidth",
                           0, 0.9)
        nic_var = _number(var["nic_efficiency"], f"{where}.variation.nic_efficiency", 0, 0.5)
        jitter = vdraw.value(var["compute_jitter"], f"{where}.variation.compute_jitter", 0, 1)
        node_p = replace(p, storage_bandwidth=p.storage_bandwidth * float(
            vrng.uniform(1 - disk_var, 1 + disk_var)), compute_jitter=jitter,
            seed=(seed or 0) * 1000 + k, episodes=list(p.episodes))
        nic_list = [Nic(f"mlx5_{r}", network["nic_rate"],
                        min(network["nic_efficiency"] + float(vrng.uniform(-nic_var, nic_var)),
                            1.0)) for r in range(nics)]
        specs.append(NodeSpec(
            name=idents[k].name, params=node_p, nics=nic_list,
            clocks=[float(c) for c in vrng.uniform(1 - clock_var, 1.0, g)],
            temperature_offset_c=[float(x) for x in vrng.uniform(-temp_var, temp_var, g)],
            cgroup=idents[k].cgroup,
            pod=(idents[k].namespace, idents[k].pod, idents[k].pod_uid)
            if scheduler == "kubernetes" else None,
            container_id=idents[k].container_id))
    spec = ClusterSpec(specs, collective_bytes=network["collective_bytes"],
                       nvlink_bandwidth=network["nvlink_bandwidth"],
                       latency_s=network["latency_s"], seed=seed or 0)

    # The planted fault.
    fault_doc = _table(doc, "fault", where)
    bad = set(fault_doc) - _FAULT_KEYS[cause]
    if bad:
        raise ScenarioError(f"{where}.fault: unknown key {sorted(bad)[0]!r} for cause {cause}")
    fault: dict = {}
    if cause != "healthy":
        fdraw = _Draw(seed)
        fdraw.rng = np.random.default_rng([seed if seed is not None else 0, 2])
        node = fdraw.index(fault_doc.get("node", -1), n_nodes, f"{where}.fault.node")
        fault = {"cause": cause, "node": node, "host": idents[node].name, "onset_s": onset}
        _plant(cause, fault_doc, fault, spec, specs[node], node, onset, fdraw, where)
    try:
        spec.check()
    except ValueError as e:
        raise ScenarioError(f"{where}: {e}") from None
    return ClusterScenario(
        name=name, description=str(doc.get("description", "")), cause=cause, spec=spec,
        duration_s=float(duration), onset_s=float(onset), nodes=idents, fault=fault,
        scheduler=scheduler, job_id=str(job_id), randomized=drawn)


def _plant(cause: str, doc: dict, fault: dict, spec: ClusterSpec, node: NodeSpec, k: int,
           onset: float, draw: _Draw, where: str) -> None:
    """Set up the planted fault on node k from onset on; record its parameters in fault."""
    g = node.params.gpus
    w = f"{where}.fault"
    end = 1e12
    if cause == "throttled":
        factor = draw.value(doc.get("clock_factor", [0.6, 0.85]), f"{w}.clock_factor", 0.05, 1)
        gpus = doc.get("gpus", [])
        if not isinstance(gpus, list) or any(isinstance(i, bool) or not isinstance(i, int)
                                             or not 0 <= i < g for i in gpus):
            raise ScenarioError(f"{w}.gpus: expected a list of GPU indexes below {g}")
        reason = doc.get("reason", "sw_power_cap")
        if reason not in ("sw_power_cap", "hw_thermal"):
            raise ScenarioError(f"{w}.reason: sw_power_cap or hw_thermal")
        node.throttle_reason = reason
        node.params.episodes.append(Episode(onset, end, gpus=tuple(gpus), clock_factor=factor))
        fault.update(gpus=list(gpus) or list(range(g)), clock_factor=factor, reason=reason)
    elif cause == "slow_gpu":
        factor = draw.value(doc.get("compute_factor", [1.15, 1.4]), f"{w}.compute_factor",
                            1.0, 5)
        gpu = draw.index(doc.get("gpu", -1), g, f"{w}.gpu")
        rows = doc.get("remapped_rows", [0, 8, 0, 0])
        if not (isinstance(rows, list) and len(rows) == 4 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in rows)):
            raise ScenarioError(f"{w}.remapped_rows: [correctable, uncorrectable, pending, "
                                "failure], counts")
        dram = draw.value(doc.get("dram_factor", 1.6), f"{w}.dram_factor", 0.1, 3)
        node.params.episodes.append(Episode(onset, end, gpus=(gpu,), compute_factor=factor))
        node.remapped_rows[gpu] = tuple(rows)
        node.dram_factor = [dram if i == gpu else 1.0 for i in range(g)]
        fault.update(gpus=[gpu], compute_factor=factor, remapped_rows=list(rows),
                     dram_factor=dram)
    elif cause == "input":
        stage = doc.get("stage", "cpu" if "cpu_factor" in doc else "storage")
        if stage not in ("storage", "cpu"):
            raise ScenarioError(f"{w}.stage: storage or cpu")
        key = f"{stage}_factor"
        if key in doc and "slowdown" in doc:
            raise ScenarioError(f"{w}: {key} or slowdown, not both")
        if ("cpu_factor" if stage == "storage" else "storage_factor") in doc:
            raise ScenarioError(f"{w}: stage {stage} takes {key}")
        if key in doc:
            factor = draw.value(doc[key], f"{w}.{key}", 0.001, 1)
        else:
            slowdown = draw.value(doc.get("slowdown", [1.2, 1.6]), f"{w}.slowdown", 1, 100)
            factor = _input_factor(spec, node.params, stage, slowdown)
            fault["slowdown"] = slowdown
        node.params.episodes.append(Episode(onset, end, **{key: factor}))
        fault.update(gpus=list(range(g)), stage=stage, **{key: float(factor)})
    elif cause == "network":
        nic = draw.index(doc.get("nic", -1), len(node.nics), f"{w}.nic")
        ep = LinkEpisode(onset, end, k, nic,
                         rate_factor=_link_rate(draw.value(doc.get("rate_factor", 1.0),
                                                           f"{w}.rate_factor", 0.01, 1),
                                                node.nics[nic].rate),
                         efficiency_factor=draw.value(doc.get("efficiency_factor", 1.0),
                                                      f"{w}.efficiency_factor", 0.01, 1),
                         loss=draw.value(doc.get("loss", 0.0), f"{w}.loss", 0, 0.5),
                         retransmit=draw.value(doc.get("retransmit", 0.0), f"{w}.retransmit",
                                               0, 1),
                         recoveries_per_hour=draw.value(doc.get("recoveries_per_hour", 0.0),
                                                        f"{w}.recoveries_per_hour", 0, 1e6))
        if ep.rate_factor == 1 and ep.efficiency_factor == 1:
            raise ScenarioError(f"{w}: a network fault needs rate_factor or efficiency_factor "
                                "below 1")
        spec.link_episodes.append(ep)
        fault.update(gpus=[i for i in range(g) if i % len(node.nics) == nic], nic=nic,
                     device=node.nics[nic].device, **{f.name: getattr(ep, f.name)
                                                      for f in fields(LinkEpisode)
                                                      if f.name not in ("start_s", "end_s",
                                                                        "node", "nic")})


def _link_rate(factor: float, rate: float) -> float:
    """A link retrains to one of InfiniBand's rates: the factor to the nearest below it."""
    if factor >= 1:
        return 1.0
    below = [r / rate for r, _ in IB_RATES if r < rate * 0.999]
    return min(below, key=lambda f: abs(f - factor)) if below else factor


def _input_factor(spec: ClusterSpec, p, stage: str, slowdown: float) -> float:
    """The share of its storage bandwidth (or of its cores) that makes a node's input
    pipeline `slowdown` times slower than the job's steps (compute and collective)."""
    from agentd.sim.cluster import collective_time, link_state
    from agentd.sim.model import storage_throughput

    comm, _ = collective_time(spec, link_state(spec, 0.0).goodput)
    step_rate = 1.0 / (p.compute_s + comm)  # per GPU
    want = step_rate / slowdown
    if stage == "storage":
        need = want * p.gpus * p.storage_bytes_per_step  # bytes/s for `want`
        return min(need / storage_throughput(p), 1.0)
    cores = want * p.cpu_seconds_per_step * p.gpus + p.gpus * p.trainer_cores
    return min(cores / p.cores, 1.0)


def _identity(host: str, k: int, scheduler: str, job: str, namespace: str) -> NodeIdentity:
    if scheduler == "slurm":
        return NodeIdentity(host, f"/system.slice/slurmstepd.scope/job_{job}/step_0/user/"
                            f"task_0", slurm_job_id=job)
    pod = f"{job}-worker-{k}"
    uid = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"k8s://{namespace}/{pod}"))
    cid = hashlib.sha256(f"{namespace}/{pod}/trainer".encode()).hexdigest()
    cgroup = (f"/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/"
              f"cri-containerd-{cid}.scope")
    return NodeIdentity(host, cgroup, namespace=namespace, pod=pod, pod_uid=uid,
                        container_id=cid)


def relabel(cs: ClusterScenario, hosts: list[str], job_id: str | int) -> ClusterScenario:
    """The same job under other host names and another job id (Slurm job id, or the
    Kubernetes job's name): to put several jobs side by side in one fleet."""
    if len(hosts) != len(cs.nodes):
        raise ValueError("one host name per node")
    ns = cs.nodes[0].namespace or "default"
    idents = [_identity(h, k, cs.scheduler, str(job_id), ns) for k, h in enumerate(hosts)]
    nodes = []
    for node, ident in zip(cs.spec.nodes, idents):
        nodes.append(replace(node, name=ident.name, cgroup=ident.cgroup,
                             pod=(ident.namespace, ident.pod, ident.pod_uid)
                             if cs.scheduler == "kubernetes" else None,
                             container_id=ident.container_id))
    fault = dict(cs.fault)
    if fault:
        fault["host"] = hosts[fault["node"]]
    return replace(cs, spec=replace(cs.spec, nodes=nodes), nodes=idents, fault=fault,
                   job_id=str(job_id))


def with_onset(cs: ClusterScenario, onset_s: float) -> ClusterScenario:
    """The same job with its planted problem starting at onset_s instead."""
    cs = copy.deepcopy(cs)
    shift = onset_s - cs.onset_s
    if cs.fault:
        for node in cs.spec.nodes:
            for ep in node.params.episodes:
                ep.start_s += shift
        for ep in cs.spec.link_episodes:
            ep.start_s += shift
        cs.fault["onset_s"] = onset_s
    cs.onset_s = onset_s
    return cs


def ib_rate_text(rate: float) -> str:
    """The sysfs `rate` text for a port's bytes/s: the generation's name when it is one."""
    for value, text in IB_RATES:
        if abs(rate - value) < 0.01 * value:
            return text
    return f"{rate * 8 / 1e9:g} Gb/sec (4X)"


def load(path_or_name: str, seed: int | None = None, nodes: int | None = None,
         gpus: int | None = None) -> ClusterScenario:
    """A cluster scenario by file path, or by name from agentd/scenarios/cluster."""
    path = node_scenarios.find(path_or_name, CLUSTER_DIR, "cluster scenario")
    doc = read_toml(path, "cluster scenario", ScenarioError)
    return from_dict(doc, os.path.splitext(os.path.basename(path))[0], seed, nodes, gpus)


def library() -> list[str]:
    return node_scenarios.library(CLUSTER_DIR)
