"""Serving a simulated multi-node job: every node on its own port, from one process.

    agentd run --simulate-cluster throttled --simulate.seed 3 --simulate.nodes 4 \\
        --web.listen-address 127.0.0.1:9445        # gpu-node-00 on :9445, -01 on :9446, ...

One ClusterSimulator runs the job; each node is a SimulatedNode (its own /proc, /sys and
/var/log trees, host name, GPUs, RDMA ports) served by its own Daemon: the real samplers,
window, exporter, rolling analysis and HTTP endpoint, as on a real node.

Why one process and not one per node: the nodes meet at every step's collective, so their
simulations are coupled every 10 ms; processes would have to exchange the barrier 100 times a
second (or each simulate the whole job). One process runs the job once, on one clock, and
hands each node its counters. What is process-global had to become per node: NVML (pynvml's
`nvmlLib` is one module global) is answered by a separate instance of the pynvml module per
node (agentd/gpu/fake/library.py private_pynvml), handed to that node's GPU sampler; paths,
the host name (dcgm-exporter's Hostname label, the window's node) and the trainers' cgroups
(their Slurm job or Kubernetes pod) are each node's own. The cost is the GIL: every node's
samplers share one core's worth of Python, so a served job is held to what one core keeps up
with (serving_cores(), measured by bench/cluster_serving.py); larger jobs are for the
OpenMetrics writer (agentd/sim/openmetrics.py), which needs no daemon at all.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from dataclasses import replace

from agentd.daemon.config import Config, ConfigError, parse_listen
from agentd.sim.cluster import ClusterSimulator
from agentd.sim.cluster_scenario import ClusterScenario, ScenarioError, load
from agentd.sim.node import ClusterHistory, SimulatedNode
from agentd.sim.scenario import Scenario

log = logging.getLogger("agentd")

MAX_SERVED_NODES = 32
# CPU seconds per second one served node costs: a base (its samplers, window, analysis and
# HTTP server, its share of the simulation) and a part per GPU (fake NVML, GPU sampler),
# measured with bench/cluster_serving.py on a loaded 2-core VM (4 x 8 GPUs: 0.124 per node;
# 8 x 1 GPU: 0.035 per node).
NODE_CORES, GPU_CORES = 0.022, 0.0127


def serving_cores(nodes: int, gpus: int) -> float:
    """About how many cores serving nodes x gpus takes (at most one: the GIL)."""
    return nodes * (NODE_CORES + GPU_CORES * gpus)


def node_scenario(cs: ClusterScenario, k: int) -> Scenario:
    """Node k of the job as a node scenario (what a SimulatedNode serves)."""
    node = cs.spec.nodes[k]
    klass = "healthy"
    if cs.fault.get("node") == k:
        klass = {"throttled": "throttled", "slow_gpu": "straggler",
                 "input": "input_" + cs.fault.get("stage", "storage"),
                 "network": "comm_wait"}.get(cs.cause, "healthy")
    return Scenario(name=cs.name, description=cs.description, klass=klass, job=node.params,
                    duration_s=cs.duration_s, onset_s=cs.onset_s, node_name=node.name)


class SimulatedJob:
    """A simulated multi-node job served by one Daemon per node, on consecutive ports from
    `listen` (HOST:PORT) on. `config` is every node's configuration but for the address and
    the simulated trees; `reload_config` (optional) builds it again on SIGHUP."""

    def __init__(self, scenario: ClusterScenario, config: Config, clock=time.time,
                 reload_config=None):
        from agentd.daemon.core import Daemon

        n = len(scenario.spec.nodes)
        host, port = parse_listen(config.listen_address, "--web.listen-address")
        if port == 0:
            raise ConfigError("--web.listen-address: a simulated job needs a port to count "
                              "its nodes' ports from (not 0)")
        if port + n - 1 > 65535:
            raise ConfigError(f"--web.listen-address: {n} nodes need ports {port} to "
                              f"{port + n - 1}")
        self.scenario = scenario
        self.sim = ClusterSimulator(scenario.spec)
        self.history = ClusterHistory(self.sim)
        t0 = clock()
        self.nodes = [SimulatedNode(node_scenario(scenario, k), clock=clock,
                                    cluster=self.history, index=k, t0=t0) for k in range(n)]
        bracket = f"[{host}]" if ":" in host else host
        self.addresses = [f"{bracket}:{port + k}" for k in range(n)]
        self.daemons = []
        for k, node in enumerate(self.nodes):
            cfg = replace(config, listen_address=self.addresses[k], simulate="")
            reload = None
            if reload_config is not None:
                reload = (lambda a: lambda: replace(reload_config(), listen_address=a,
                                                    simulate=""))(self.addresses[k])
            self.daemons.append(Daemon(cfg, reload_config=reload, sim_node=node))

    def start(self) -> None:
        """Start every node's daemon; if one cannot (its port is taken), stop the others and
        raise its ConfigError."""
        k = 0
        try:
            for k, d in enumerate(self.daemons):
                d.start()
        except BaseException:
            for d in self.daemons[:k + 1]:  # the one that failed may have started loops
                d.stop()
            for node in self.nodes[k + 1:]:
                node.stop()
            raise

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()

    def reload(self) -> None:
        for d in self.daemons:
            d.reload()

    def describe(self) -> list[str]:
        cs = self.scenario
        who = f"Slurm job {cs.job_id}" if cs.scheduler == "slurm" else \
            f"Kubernetes job {cs.job_id} in {cs.nodes[0].namespace}"
        lines = [f"simulated job '{cs.name}' ({who}): {len(self.nodes)} nodes x "
                 f"{cs.spec.gpus} GPUs: {cs.description}"]
        for node, addr in zip(self.nodes, self.addresses):
            lines.append(f"  {node.hostname}: http://{addr}/metrics")
        return lines


def load_for_serving(args: argparse.Namespace, seed: int | None) -> ClusterScenario:
    """The scenario the flags name, at a size one process can serve (ScenarioError or
    ConfigError with one line otherwise)."""
    sc = load(args.simulate_cluster, seed, getattr(args, "simulate_nodes", None),
              getattr(args, "simulate_gpus", None))
    check_servable(len(sc.spec.nodes), sc.spec.gpus, "--simulate.nodes/--simulate.gpus")
    return sc


def check_servable(nodes: int, gpus: int, flags: str) -> None:
    """ConfigError when one process cannot keep up with serving that many nodes."""
    cores = serving_cores(nodes, gpus)
    if nodes > MAX_SERVED_NODES or cores > 1.0:
        raise ConfigError(f"{nodes} nodes x {gpus} GPUs would take ~{cores:.1f} cores to "
                          "serve; one process keeps up with one (at most "
                          f"{MAX_SERVED_NODES} nodes): fewer with {flags}, or write larger "
                          "jobs with agentd/sim/openmetrics.py for promtool backfill")


def run_cluster(args: argparse.Namespace) -> int:
    """`agentd run --simulate-cluster SCENARIO`: serve until SIGTERM/SIGINT; SIGHUP reloads
    every node's configuration. Exit 0, or USAGE (2) with one line for a bad flag, scenario
    or address (agentd/exitcodes.py)."""
    import sys

    from agentd import logs
    from agentd.daemon import config as configmod
    from agentd.daemon.webconfig import WebConfigError
    from agentd.exitcodes import USAGE

    def fail(message: str) -> int:
        print(f"agentd: error: {message}", file=sys.stderr)
        return USAGE

    try:
        cfg = configmod.build(args)
        if cfg.simulate or cfg.fake_nvml:
            raise ConfigError("--simulate-cluster excludes --simulate and --fake-nvml")
        sc = load_for_serving(args, cfg.simulate_seed)
        job = SimulatedJob(sc, cfg, reload_config=lambda: configmod.build(args))
    except (ConfigError, ScenarioError) as e:
        return fail(str(e))
    logs.setup(cfg.log_level)
    stop = threading.Event()
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        job.start()
    except (ConfigError, WebConfigError) as e:
        return fail(str(e))
    for line in job.describe():
        log.warning("%s", line)
    try:
        while not stop.wait(0.5):
            if reload.is_set():
                reload.clear()
                job.reload()  # a node's bad reload is logged and keeps it serving
    except (ConfigError, WebConfigError) as e:
        job.stop()
        return fail(str(e))
    job.stop()
    return 0
