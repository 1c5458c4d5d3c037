"""The multi-node simulation: the physics of a data-parallel job's slow node (one per cause),
conservation and ground truth, the step model against the 10 ms one, the scenario library,
the served nodes scraped by a real Prometheus and read by a real node_exporter, and the
OpenMetrics writer backfilled with promtool and queried."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from agentd.exitcodes import USAGE
from agentd.jobs import parse_cgroup
from agentd.sim import cluster_scenario as C
from agentd.sim.cluster import (CAUSES, ClusterSimulator, collective_time, culprit,
                                link_state, lost_time)
from agentd.sim.scrapes import scrapes_from_steps, scrapes_from_trace
from conftest import (agentd_cmd, backfilled_prometheus, free_port, free_ports, need,
                      wait_http)

DT = 0.01


def job(cause: str = "healthy", nodes: int = 4, gpus: int = 2, onset: float = 5.0,
        compute_s: float = 0.3, collective_bytes: float = 2e9, seed: int | None = None,
        **fault) -> C.ClusterScenario:
    doc = {"cause": cause, "nodes": nodes, "onset_s": onset,
           "job": {"gpus": gpus, "compute_s": compute_s},
           "network": {"collective_bytes": collective_bytes}}
    if cause != "healthy":
        doc["fault"] = {"node": 2, **fault}
    return C.from_dict(doc, "test", seed=seed)


def at(t: float) -> int:
    return int(round(t / DT)) - 1


def window(a: np.ndarray, t0: float, t1: float) -> np.ndarray:
    return a[at(t1)] - a[at(t0)]


# --- physics, per cause ---------------------------------------------------------------------


def test_throttled_node_computes_while_its_peers_spin_for_the_difference():
    cs = job("throttled", clock_factor=0.7)
    ct = ClusterSimulator(cs.spec).run(40.0)
    t0, t1 = 12.0, 40.0
    steps = np.array([window(n.steps, t0, t1) for n in ct.nodes])
    assert np.ptp(steps) <= 1  # every rank steps together
    per_step = lambda a: np.array([window(getattr(n, a), t0, t1) for n in ct.nodes]) / \
        steps  # noqa: E731
    wait, sm = per_step("collective_wait"), per_step("sm_active")
    # The peers wait for the throttled node's extra compute time.
    clocks = np.array([n.clocks for n in cs.spec.nodes])
    c = cs.spec.nodes[0].params.compute_s / clocks
    extra = c[2].max() / 0.7 - c[[0, 1, 3]]
    assert wait[[0, 1, 3]] == pytest.approx(extra, rel=0.15)
    assert wait[2].max() < 0.2 * wait[[0, 1, 3]].min()
    # It computes while they spin: its SMs busier, its clocks lower; NVML busy everywhere.
    assert sm[2].min() > sm[[0, 1, 3]].max() + 0.05
    assert ct.nodes[2].clock_factor[at(t1)] == pytest.approx(clocks[2] * 0.7)
    busy = np.array([window(n.busy, t0, t1) for n in ct.nodes]) / (t1 - t0)
    assert busy.min() > 0.97
    # Ground truth: node 2, throttled, holds nearly every step.
    node, cause, share = culprit(ct, t0, t1)
    assert (node, cause) == (2, "throttled") and share > 0.15
    r = ct.releases
    late = r["t"] > t0
    assert (r["node"][late] == 2).mean() > 0.9
    assert (r["cause"][late] == CAUSES.index("throttled")).mean() > 0.9


@pytest.mark.parametrize("kind", ["slow", "lossy"])
def test_bad_link_shows_in_rates_and_errors_not_in_bytes_per_step(kind):
    fault = {"nic": 0, "rate_factor": 0.25} if kind == "slow" else \
        {"nic": 0, "efficiency_factor": 0.5, "loss": 1e-3, "retransmit": 0.04,
         "recoveries_per_hour": 3600}
    cs = job("network", **fault)
    ct = ClusterSimulator(cs.spec).run(30.0)
    t0, t1 = 10.0, 30.0
    net = lambda k, f: window(ct.net[k][f], t0, t1)  # noqa: E731  [nics]
    collectives = window(ct.nodes[0].steps, t0, t1)[0]
    goodput = np.array([net(k, "goodput_bytes") for k in range(4)]) / collectives
    # In a ring every rank moves the same bytes per step, the bad link's node too.
    assert goodput == pytest.approx(np.full_like(goodput, goodput[0, 0]), rel=0.02)
    wire = np.array([net(k, "tx_bytes") for k in range(4)]) / collectives
    assert wire.max() / wire.min() < 1.1
    # The collective takes as long as the slowest link's pace says.
    links = link_state(cs.spec, 20.0)
    expected, _ = collective_time(cs.spec, links.goodput)
    r = ct.releases
    assert r["collective_s"][r["t"] > t0] == pytest.approx(expected)
    assert expected > 1.5 * collective_time(cs.spec, link_state(cs.spec, 0.0).goodput)[0]
    # The port sending into the bad link (node 1, its predecessor on the ring) waits for
    # credits; the others hardly.
    wait = np.array([net(k, "xmit_wait")[0] for k in range(4)])
    assert wait[1] > 20 * np.median(wait[[0, 2, 3]])
    rate = ct.net[2]["rate"][at(t1)]
    errors = np.array([net(k, "rcv_errors")[0] + net(k, "symbol_error")[0] for k in range(4)])
    recover = np.array([net(k, "link_error_recovery")[0] for k in range(4)])
    if kind == "slow":
        # Trained down: a lower rate (and once down and up), no errors.
        assert rate[0] == pytest.approx(0.25 * 50e9) and rate[1] == pytest.approx(50e9)
        assert ct.net[2]["link_downed"][-1][0] == 1 and ct.net[0]["link_downed"][-1][0] == 0
        assert errors.max() == 0
        # While transferring, its link runs near its rate; its peers' at a quarter of theirs.
        transfer = np.array([net(k, "goodput_bytes")[0] for k in range(4)]) / \
            np.array([ct.net[k]["rate"][at(t1)][0] for k in range(4)])
        assert transfer[2] > 3 * transfer[[0, 1, 3]].max()
    else:
        # Lossy: same rate, errors and link recoveries on its port only, resent bytes.
        assert rate[0] == pytest.approx(50e9)
        assert errors[2] > 100 and errors[[0, 1, 3]].max() == 0
        assert recover[2] > 1 and recover[[0, 1, 3]].max() == 0
        sent = net(2, "tx_bytes")[0] / net(2, "goodput_bytes")[0]
        assert sent == pytest.approx(1.04, rel=0.01)
    node, cause, _ = culprit(ct, t0, t1)
    assert (node, cause) == (2, "network")


@pytest.mark.parametrize("stage", ["storage", "cpu"])
def test_starved_node_idles_before_the_collective_while_its_peers_wait(stage):
    cs = job("input", stage=stage, slowdown=1.5)
    ct = ClusterSimulator(cs.spec).run(50.0)
    t0, t1 = 30.0, 50.0  # its prefetch buffer has run dry by then
    share = lambda n, a: window(getattr(n, a), t0, t1).mean() / (t1 - t0)  # noqa: E731
    stall = np.array([share(n, "stall") for n in ct.nodes])
    wait = np.array([share(n, "collective_wait") for n in ct.nodes])
    assert stall[2] > 0.2 and stall[[0, 1, 3]].max() < 0.01
    assert wait[[0, 1, 3]].min() > 0.2 and wait[2] < 0.05
    # Its own input stage is saturated, not its peers'.
    tr = ct.nodes[2]
    if stage == "storage":
        busy = np.array([window(n.storage_busy, t0, t1) / (t1 - t0) for n in ct.nodes])
        assert busy[2] > 0.95 and busy[[0, 1, 3]].max() < 0.5
    else:
        other = window(tr.cpu_other, t0, t1) / (t1 - t0)
        used = window(tr.worker_cpu, t0, t1).sum() / (t1 - t0)
        cores = cs.spec.nodes[2].params.cores
        assert (other + used) / cores > 0.9
        assert window(tr.cpu_wait, t0, t1) / (t1 - t0) > 0.5
    node, cause, _ = culprit(ct, t0, t1)
    assert (node, cause) == (2, "input")


def test_slower_gpu_at_normal_clocks_holds_the_job_and_shows_remapped_rows():
    from agentd.sim.node import ClusterHistory, SimulatedNode
    from agentd.sim.serve import node_scenario

    cs = job("slow_gpu", gpu=1, compute_factor=1.3, remapped_rows=[0, 12, 0, 0])
    sim = ClusterSimulator(cs.spec)
    ct = sim.run(30.0)
    t0, t1 = 10.0, 30.0
    tr = ct.nodes[2]
    clocks = np.array(cs.spec.nodes[2].clocks)
    assert tr.clock_factor[at(t1)] == pytest.approx(clocks)  # its clocks read normal
    sm = window(tr.sm_active, t0, t1)
    assert sm[1] > sm[0] + 0.05
    node, cause, _ = culprit(ct, t0, t1)
    assert (node, cause) == (2, "slow_gpu")
    r = ct.releases
    late = r["t"] > t0
    assert ((r["node"][late] == 2) & (r["gpu"][late] == 1)).mean() > 0.9
    # Through the fake NVML of the served node: rows remapped from the onset, no clock event.
    hist = ClusterHistory(ClusterSimulator(cs.spec))
    clock = [1_800_000_000.0]
    node = SimulatedNode(node_scenario(cs, 2), clock=lambda: clock[0], cluster=hist, index=2)
    try:
        lib = node.install_nvml()
        N = node.pynvml
        N.nvmlInit()
        handle = N.nvmlDeviceGetHandleByIndex(1)
        assert N.nvmlDeviceGetRemappedRows(handle)[:2] == (0, 0)
        clock[0] += 8.0
        assert N.nvmlDeviceGetRemappedRows(handle)[:2] == (0, 12)
        assert N.nvmlDeviceGetCurrentClocksEventReasons(handle) & \
            N.nvmlClocksEventReasonSwPowerCap == 0
        assert lib is N.nvmlLib
        N.nvmlShutdown()
    finally:
        node.stop()


def test_conservation_and_lock_step():
    cs = job("input", nodes=3, gpus=4, stage="storage", slowdown=1.3)
    sim = ClusterSimulator(cs.spec)
    ct = sim.run(25.0)
    t = ct.t[-1]
    steps = np.concatenate([n.steps[-1] for n in ct.nodes])
    assert np.ptp(steps) <= 1
    per_gpu_net = cs.spec.network_bytes_per_gpu()
    for k, (s, tr) in enumerate(zip(sim.sims, ct.nodes)):
        # Each GPU's time is busy (computing, spinning, in the collective) or stalled.
        assert tr.busy[-1] + tr.stall[-1] == pytest.approx(np.full(4, t), abs=0.02)
        assert (tr.collective_wait[-1] <= tr.busy[-1] + 1e-9).all()
        # NVLink and the network carry their bytes per collective, no more, no less.
        done = tr.steps[-1]
        assert tr.nvlink[-1] == pytest.approx(done * cs.spec.nvlink_bytes_per_gpu(),
                                              abs=cs.spec.nvlink_bytes_per_gpu())
        rails = np.array(cs.spec.rail_gpus(len(cs.spec.nodes[k].nics)))
        assert ct.net[k]["goodput_bytes"][-1] == pytest.approx(
            done.mean() * per_gpu_net * rails, abs=per_gpu_net * rails.max())
        # Batches: read = preprocessed + queued, preprocessed = copies started + ready.
        c = s.count
        for i in range(4):
            assert c["read"][i] == pytest.approx(c["prepped"][i] + s.read_q[i], abs=1e-6)
            assert c["prepped"][i] == pytest.approx(c["copy_started"][i] + s.ready_q[i],
                                                    abs=1e-6)
        # Storage read what the batches needed (plus what the neighbour took).
        assert tr.gpu_read[-1].sum() == pytest.approx(
            sum(c["read"]) * cs.spec.nodes[k].params.storage_bytes_per_step, rel=1e-9)
    # One release per step; the time the job waited for stragglers fits in the run.
    r = ct.releases
    assert len(r["t"]) == pytest.approx(steps.mean(), abs=1)
    assert r["held_s"].sum() < t


def test_healthy_job_with_natural_variation_has_no_culprit():
    cs = job(nodes=6, gpus=2, seed=4)
    ct = ClusterSimulator(cs.spec).run(30.0)
    assert culprit(ct, 5.0, 30.0) is None
    lost = lost_time(ct, 5.0, 30.0)
    assert all(v["network"] == 0 and v["throttled"] == 0 for v in lost)
    # Natural variation: nodes differ in clocks, disks and step jitter, yet none dominates.
    clocks = np.array([n.clocks for n in cs.spec.nodes])
    assert clocks.min() >= 0.97 and np.ptp(clocks) > 0.005
    held = np.bincount(ct.releases["node"], minlength=6) / len(ct.releases["node"])
    assert held.max() < 0.9


# --- the step model against the 10 ms simulation ---------------------------------------------


@pytest.mark.parametrize("name", ["healthy", "throttled", "slow-gpu", "starved-storage",
                                  "starved-cpu", "slow-link", "lossy-link"])
def test_step_model_agrees_with_the_10ms_simulation(name):
    cs = C.with_onset(C.load(name, seed=3, nodes=4, gpus=2), 10.0)
    exact = scrapes_from_trace(cs, ClusterSimulator(cs.spec).run(90.0), 15.0)
    fast = scrapes_from_steps(cs, 90.0, 15.0)

    def rate(sc, part, key):  # per node (mean over its GPUs or ports), last 45 s
        x = getattr(sc, part)[key]
        r = (x[-1] - x[-4]) / (sc.t[-1] - sc.t[-4])
        return r.mean(axis=tuple(range(1, r.ndim))) if r.ndim > 1 else r

    for key in ("busy_s", "sm_active_s", "tensor_active_s"):
        assert rate(fast, "gpu", key) == pytest.approx(rate(exact, "gpu", key), abs=0.02), key
    for key in ("disk_read_bytes", "cpu_user_s", "job_cpu_s"):
        assert rate(fast, "host", key) == pytest.approx(rate(exact, "host", key), rel=0.03), key
    for key in ("disk_io_s", "psi_io_s", "psi_cpu_s"):
        assert rate(fast, "host", key) == pytest.approx(rate(exact, "host", key), abs=0.03), key
    for key in ("tx_bytes", "rx_bytes", "xmit_wait", "rcv_errors"):
        assert rate(fast, "port", key) == pytest.approx(rate(exact, "port", key), rel=0.03,
                                                        abs=1.0), key
    assert fast.gpu["clock"][-1] == pytest.approx(exact.gpu["clock"][-1])
    assert fast.port["rate"][-1] == pytest.approx(exact.port["rate"][-1])
    # Power follows the last second's compute: a gauge, so compare it over several scrapes
    # (a second catches different parts of a step).
    assert fast.gpu["power_w"][-4:].mean(axis=(0, 2)) == pytest.approx(
        exact.gpu["power_w"][-4:].mean(axis=(0, 2)), rel=0.08)


# --- the scenario library ---------------------------------------------------------------------


def test_library_has_every_cause_and_randomizes_reproducibly():
    names = C.library()
    assert {C.load(n).cause for n in names} == set(C.CAUSES)
    sizes = set()
    for n in names:
        for seed in (None, 0, 1, 2):
            a = C.load(n, seed)
            assert a.spec.nodes and 1 <= a.spec.gpus <= 8
            if seed is not None:
                b = C.load(n, seed)
                assert [x.params for x in a.spec.nodes] == [x.params for x in b.spec.nodes]
                assert a.fault == b.fault
                assert 2 <= len(a.spec.nodes) <= 64
            if a.cause != "healthy":
                assert 0 <= a.fault["node"] < len(a.spec.nodes)
                assert a.fault["host"] == a.spec.nodes[a.fault["node"]].name
    for seed in range(12):
        a = C.load("throttled", seed)
        sizes.add((len(a.spec.nodes), a.spec.gpus))
    assert len(sizes) > 8
    # Overrides win over the draws (serving a small job).
    s = C.load("throttled", 7, nodes=3, gpus=2)
    assert len(s.spec.nodes) == 3 and s.spec.gpus == 2


def test_nodes_say_who_they_are_slurm_and_kubernetes():
    from agentd.jobs import parse_pod_dirs

    slurm = C.load("throttled", nodes=3)
    for node in slurm.spec.nodes:
        assert parse_cgroup(f"0::{node.cgroup}\n").slurm_job_id == "4242"
    assert len({n.name for n in slurm.spec.nodes}) == 3
    k8s = C.load("thermal", nodes=3)
    assert k8s.scheduler == "kubernetes"
    pods = set()
    for node in k8s.spec.nodes:
        a = parse_cgroup(f"0::{node.cgroup}\n")
        ns, pod, uid = node.pod
        assert a.pod_uid == uid and a.container_id == node.container_id
        assert parse_pod_dirs([f"{ns}_{pod}_{uid}"])[uid] == (ns, pod)
        pods.add(pod)
    assert pods == {f"llama-pretrain-worker-{k}" for k in range(3)}


@pytest.mark.parametrize("doc, message", [
    ({"cause": "gremlins"}, "cause: must be one of"),
    ({"nodes": 0}, "expected 1 to 4096 nodes"),
    ({"warp": 1}, "unknown key 'warp'"),
    ({"cause": "throttled", "fault": {"gpu": 1}}, "unknown key 'gpu' for cause throttled"),
    ({"cause": "throttled", "nodes": 4, "fault": {"node": 9}}, "9 is not in 0..3"),
    ({"cause": "throttled", "fault": {"clock_factor": [0.9, 0.5]}}, "low above high"),
    ({"cause": "network", "fault": {"nic": 0}}, "needs rate_factor or efficiency_factor"),
    ({"cause": "input", "fault": {"stage": "gpu"}}, "storage or cpu"),
    ({"scheduler": "pbs"}, "scheduler: must be one of"),
    ({"job": {"gpus": 12}}, "1 to 8 GPUs"),
    ({"network": {"nics": 0}}, "1 to 8"),
    ({"variation": {"clock": 2}}, "outside"),
    ({"job_id": "x"}, "positive integer"),
])
def test_bad_cluster_scenarios_say_what_is_wrong(doc, message):
    with pytest.raises(C.ScenarioError, match=message):
        C.from_dict(doc, "bad", seed=1)


# --- serving: one process, a daemon per node ---------------------------------------------------


def prom_query(base: str, q: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def start_prometheus(spawn, tmp_path, targets: list[str] | None = None,
                     tsdb: str | None = None) -> str:
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    scrape = ""
    if targets:
        scrape = ("scrape_configs:\n  - job_name: agentd\n    scrape_interval: 1s\n"
                  f"    static_configs:\n      - targets: {json.dumps(targets)}\n")
    cfg.write_text("global:\n  scrape_interval: 1s\n" + scrape)
    spawn([need("prometheus"), f"--config.file={cfg}",
           f"--storage.tsdb.path={tsdb or tmp_path / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=100000d"])
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/-/ready", timeout=20)
    return base


def poll(fn, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(1.0)


@pytest.mark.slow
def test_served_nodes_scraped_by_prometheus_with_distinct_instances_and_jobs(spawn, tmp_path):
    """Two simulated jobs (Slurm and Kubernetes), two nodes each, each node on its own port:
    Prometheus tells every node apart by instance, and agentd's per-job series carry the
    job (Slurm job id; namespace and pod, one per node)."""
    base_a = free_ports(4)  # two jobs of two nodes, side by side
    base_b = base_a + 2
    procs = [spawn(agentd_cmd("run", "--simulate-cluster", name, "--simulate.nodes", "2",
                              "--simulate.gpus", "1", "--web.listen-address",
                              f"127.0.0.1:{port}"))
             for name, port in (("throttled", base_a), ("thermal", base_b))]
    targets = [f"127.0.0.1:{p + k}" for p in (base_a, base_b) for k in range(2)]
    for t in targets:
        wait_http(f"http://{t}/metrics", timeout=30)
    prom = start_prometheus(spawn, tmp_path, targets)
    cpu = poll(lambda: len(prom_query(prom, "agentd_process_cpu_seconds_total")) == 4 and
               prom_query(prom, "agentd_process_cpu_seconds_total"), 40)
    assert cpu, "Prometheus did not scrape the four nodes"
    by_instance = {r["metric"]["instance"]: r["metric"] for r in cpu}
    assert set(by_instance) == set(targets)
    slurm = [by_instance[f"127.0.0.1:{base_a + k}"] for k in range(2)]
    pods = [by_instance[f"127.0.0.1:{base_b + k}"] for k in range(2)]
    assert {m.get("slurm_job_id") for m in slurm} == {"4242"}
    assert {m.get("namespace") for m in pods} == {"ml-research"}
    assert {m.get("pod") for m in pods} == {"llama-pretrain-worker-0",
                                            "llama-pretrain-worker-1"}
    info = prom_query(prom, "agentd_gpu_info")
    assert {r["metric"]["instance"]: r["metric"]["hostname"] for r in info} == {
        f"127.0.0.1:{base_a}": "gpu-node-00", f"127.0.0.1:{base_a + 1}": "gpu-node-01",
        f"127.0.0.1:{base_b}": "gpu-node-00", f"127.0.0.1:{base_b + 1}": "gpu-node-01"}
    # Each node's own GPUs (its own NVML): UUIDs differ between the nodes of a job (two jobs
    # whose scenarios name their hosts alike have alike UUIDs: a UUID follows its host).
    for base in (base_a, base_b):
        uuids = {r["metric"]["uuid"] for r in info
                 if r["metric"]["instance"].endswith((f":{base}", f":{base + 1}"))}
        assert len(uuids) == 2
    ports = prom_query(prom, "agentd_rdma_port_speed_bytes")
    assert len(ports) == 4 and {float(r["value"][1]) for r in ports} == {50e9}
    # Every agentd family the OpenMetrics writer writes is one a daemon serves, with its
    # labels (Prometheus adds instance and job).
    import io

    from agentd.sim.openmetrics import OpenMetricsWriter, write_agentd

    with urllib.request.urlopen(f"http://{targets[2]}/metrics", timeout=10) as r:
        theirs = label_names(r.read().decode())
    sc = scrapes_from_steps(C.load("thermal", nodes=2, gpus=1), 30.0, 15.0)
    buf = io.StringIO()
    write_agentd(OpenMetricsWriter(buf, sc.t), sc)
    for name, labels in label_names(buf.getvalue()).items():
        assert name in theirs, name
        assert labels - {"instance", "job"} <= theirs[name], name
    for p in procs:
        assert "Traceback" not in p.output()
        assert p.stop() == 0


def test_run_simulate_cluster_flag_errors(spawn):
    def run(*args):
        return subprocess.run(agentd_cmd("run", *args), capture_output=True, text=True,
                              timeout=60)

    for args, message in [
        (("--simulate-cluster", "no-such-job"), "no cluster scenario 'no-such-job'"),
        (("--simulate.nodes", "3"), "go with --simulate-cluster"),
        (("--simulate-cluster", "throttled", "--simulate", "input-storage"), "excludes"),
        (("--simulate-cluster", "throttled", "--simulate.nodes", "40"), "one process keeps up"),
        (("--simulate-cluster", "throttled", "--web.listen-address", "127.0.0.1:65535"),
         "ports 65535 to"),
    ]:
        r = run(*args)
        assert r.returncode == USAGE, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    # A port already taken: one line, exit 2, no node left serving.
    taken = free_ports(3)
    blocker = spawn(agentd_cmd("run", "--simulate-cluster", "healthy", "--simulate.nodes", "1",
                               "--simulate.gpus", "1", "--web.listen-address",
                               f"127.0.0.1:{taken + 1}"))
    wait_http(f"http://127.0.0.1:{taken + 1}/metrics", timeout=30)
    r = run("--simulate-cluster", "healthy", "--simulate.nodes", "3", "--simulate.gpus", "1",
            "--web.listen-address", f"127.0.0.1:{taken}")
    assert r.returncode == USAGE and "cannot listen" in r.stderr, r.stderr
    blocker.stop()


def test_node_exporter_reads_a_simulated_nodes_trees(spawn, tmp_path):
    """A real node_exporter on one simulated node's /proc and /sys: its infiniband collector
    sees the RDMA ports (errors of a lossy link included), and every node_* family the
    OpenMetrics writer writes is one node_exporter has, with the same labels."""
    from agentd.sim.node import ClusterHistory, SimulatedNode
    from agentd.sim.openmetrics import OpenMetricsWriter, write_node_exporter
    from agentd.sim.scrapes import scrapes_from_steps
    from agentd.sim.serve import node_scenario

    binary = need("prometheus-node-exporter")
    cs = C.with_onset(C.load("lossy-link", nodes=4, gpus=2), 2.0)
    hist = ClusterHistory(ClusterSimulator(cs.spec))
    t0 = time.time()
    node = SimulatedNode(node_scenario(cs, 2), cluster=hist, index=2, t0=t0 - 20.0)
    try:
        node.write()
        port = free_port()
        spawn([binary, f"--path.procfs={node.procfs}", f"--path.sysfs={node.sysfs}",
               f"--web.listen-address=127.0.0.1:{port}"])
        wait_http(f"http://127.0.0.1:{port}/metrics", timeout=20)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        node.stop()
    assert 'node_scrape_collector_success{collector="infiniband"} 1' in text
    nic = cs.fault["device"]
    errs = re.search(rf'node_infiniband_port_errors_received_total{{device="{nic}",port="1"}}'
                     r" (\S+)", text)
    assert errs and float(errs.group(1)) > 0
    data = re.search(rf'node_infiniband_port_data_received_bytes_total{{device="{nic}",'
                     r'port="1"} (\S+)', text)
    snap = node.history.snapshot(20.0, ("net.rx_bytes",))
    assert float(data.group(1)) == pytest.approx(float(snap["net.rx_bytes"][
        cs.fault["nic"]]), rel=0.05)
    for collector in ("cpu", "diskstats", "netdev", "pressure", "meminfo"):
        assert f'node_scrape_collector_success{{collector="{collector}"}} 1' in text
    # What node_exporter exposes here, the writer writes with the same label names.
    import io

    sc = scrapes_from_steps(cs, 30.0, 15.0)
    buf = io.StringIO()
    write_node_exporter(OpenMetricsWriter(buf, sc.t), sc)
    theirs, ours = label_names(text), label_names(buf.getvalue())
    for name, labels in ours.items():
        assert name in theirs, name
        assert labels - {"instance", "job"} == theirs[name], name


def label_names(text: str) -> dict[str, set]:
    """Metric name -> the label names its samples carry, from exposition text."""
    out: dict[str, set] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{([^}]*)\})?\s", line)
        if m:
            out.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(2) or ""))
    return out


# --- the OpenMetrics writer through promtool into Prometheus --------------------------------


@pytest.mark.slow
def test_writer_backfilled_with_promtool_and_queried(spawn, tmp_path):
    from agentd.sim.openmetrics import write_cluster

    promtool = need("promtool")
    cs = C.with_onset(C.load("throttled", seed=5, nodes=3, gpus=2), 60.0)
    om = tmp_path / "job.om"
    start = 1.7e9
    stats = write_cluster(str(om), cs, 240.0, 15.0, start=start, exact=True,
                          dcgm_fields="all", cpu_cores=4)
    assert stats["samples"] > 10_000 and stats["nodes"] == 3
    r = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(om),
                        str(tmp_path / "tsdb")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prom = start_prometheus(spawn, tmp_path, tsdb=str(tmp_path / "tsdb"))
    at_ = start + 240.0

    def q(expr: str) -> dict:
        url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": at_})
        with urllib.request.urlopen(url, timeout=10) as resp:
            result = json.loads(resp.read())["data"]["result"]
        return {tuple(sorted(x["metric"].items())): float(x["value"][1]) for x in result}

    planted = cs.fault["host"]
    clock = {dict(k)["Hostname"]: v for k, v in q("avg by (Hostname) "
                                                  "(DCGM_FI_DEV_SM_CLOCK)").items()}
    assert len(clock) == 3 and min(clock, key=clock.get) == planted
    assert clock[planted] < 0.9 * max(clock.values())
    # agentd's series: the throttled node computes more, at lower clocks, NVML busy alike.
    act = {dict(k)["instance"]: v for k, v in q(
        "sum by (instance) (rate(agentd_gpu_tensor_active_seconds_total[1m]))").items()}
    assert max(act, key=act.get) == f"{planted}:9445"
    busy = q("avg by (instance) (rate(agentd_gpu_busy_seconds_total[1m]))")
    assert min(busy.values()) > 0.97
    # Bytes per second alike on every node's RDMA ports (a ring), none in node_network_*.
    tx = q("sum by (instance) (rate(node_infiniband_port_data_transmitted_bytes_total[1m]))")
    assert len(tx) == 3 and max(tx.values()) / min(tx.values()) < 1.05
    eth = q('sum by (instance) (rate(node_network_transmit_bytes_total{device="eth0"}[1m]))')
    assert max(eth.values()) < 0.01 * min(tx.values())
    # The job's identity on agentd's per-job series; a value checked against the truth.
    jobs = q("agentd_process_cpu_seconds_total")
    assert len(jobs) == 3
    if cs.scheduler == "slurm":
        assert {dict(k).get("slurm_job_id") for k in jobs} == {"4242"}
        assert q("count by (hpc_job) (DCGM_FI_DEV_GPU_UTIL)") == {(("hpc_job", "4242"),): 6.0}
    else:
        pods = {n.pod for n in cs.nodes}
        assert {dict(k).get("pod") for k in jobs} == pods
        dcgm = q("count by (namespace, pod) (DCGM_FI_DEV_GPU_UTIL)")
        assert {dict(k)["pod"] for k in dcgm} == pods and set(dcgm.values()) == {2.0}
    truth = scrapes_from_trace(cs, ClusterSimulator(cs.spec).run(240.0), 15.0, start)
    host0 = cs.nodes[0].name
    rate = q(f'rate(agentd_gpu_busy_seconds_total{{instance="{host0}:9445",gpu="0"}}[1m])')
    # rate() over the last minute's samples (195..240 s): their increase over their span.
    expected = (truth.gpu["busy_s"][-1, 0, 0] - truth.gpu["busy_s"][-4, 0, 0]) / 45.0
    assert list(rate.values())[0] == pytest.approx(expected, rel=1e-3)
    reasons = q("max by (Hostname) (DCGM_FI_DEV_CLOCK_THROTTLE_REASONS)")
    assert {dict(k)["Hostname"]: v for k, v in reasons.items()}[planted] == 4.0


# --- every cluster scenario through the cluster analysis, by a real Prometheus ----------------

# The simulation's causes and the cluster analysis' finding kinds (agentd/cluster/causes.py).
KIND = {"throttled": "throttled", "slow_gpu": "slow_gpu", "network": "slow_link",
        "input": "input_starved"}
FLEET_START, FLEET_ONSET, FLEET_SECONDS = 1.75e9, 600.0, 1800.0


@pytest.fixture(scope="module")
def scenario_fleet(tmp_path_factory):
    """One job of 6 nodes x 2 GPUs per cluster scenario (healthy included), simulated by the
    step model, written as dcgm-exporter, node_exporter and agentd series, backfilled with
    promtool into a real Prometheus; yields (its URL, each job's truth)."""
    from agentd.sim.openmetrics import write_fleet

    d = tmp_path_factory.mktemp("scenario-fleet")
    names = C.library()
    stats = write_fleet(str(d / "fleet.om"), 6 * len(names), 2, FLEET_SECONDS, 15.0,
                        nodes_per_job=6, scenarios=names, seed=1, start=FLEET_START,
                        onset_s=FLEET_ONSET, cpu_cores=4)
    assert [t["scenario"] for t in stats["truth"]] == names
    with backfilled_prometheus(d / "fleet.om", d) as url:
        yield url, stats["truth"]


@pytest.mark.slow
@pytest.mark.prometheus
@pytest.mark.parametrize("flavour", ["agentd", "exporters"])
def test_cluster_analysis_names_each_scenarios_planted_node_and_cause(scenario_fleet, flavour):
    """`agentd diagnose --prometheus URL --cluster` on the simulated jobs, from agentd's own
    series or from dcgm-exporter + node_exporter's: each planted node and cause named in its
    own job (jobs told apart by their labels), within one analysis window of the onset, and
    nothing on the healthy job."""
    url, truth = scenario_fleet
    r = subprocess.run(agentd_cmd("diagnose", "--prometheus", url, "--cluster", "--flavour",
                                  flavour, "--start", f"{FLEET_START:.0f}", "--end",
                                  f"{FLEET_START + FLEET_SECONDS:.0f}", "--json"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["query"]["flavour"] == flavour
    assert len(doc["jobs"]) == len(truth) and all(j["nodes"] == 6 for j in doc["jobs"])
    named = {(f["subject"]["node"], f["kind"]) for f in doc["findings"]}
    planted = {(t["host"], KIND[t["cause"]]) for t in truth if t["cause"] != "healthy"}
    assert named == planted, (named, planted)
    healthy = next(t for t in truth if t["cause"] == "healthy")
    by_job = {j["job"]: j for j in doc["jobs"]}
    assert sum(j["findings"] for j in by_job.values() if
               set(j["nodes_list"]) == set(healthy["hosts"])) == 0
    for f in doc["findings"]:
        t = next(t for t in truth if t.get("host") == f["subject"]["node"])
        assert f["severity"] in ("warning", "critical"), f
        assert set(by_job[f["subject"]["job"]]["nodes_list"]) == set(t["hosts"])
        assert 0 < f["evidence"]["first_seen"] - t["onset"] <= doc["analysis_window_seconds"]


# --- agentd demo --cluster ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scenario, kind", [("throttled", "throttled"),
                                            ("lossy-link", "slow_link")])
def test_cluster_demo_names_the_node_holding_the_job_back(scenario, kind):
    """The demo end to end: the nodes' daemons' windows (throttled) and RDMA counters (a lossy
    link) through the cluster analysis. Causes that show at once: a starved node first drains
    its prefetch buffer, which a loaded machine can stretch past a short run."""
    r = subprocess.run(agentd_cmd("demo", "--cluster", "--scenario", scenario,
                                  "--nodes", "3", "--gpus", "1", "--onset", "8",
                                  "--seconds", "30", "--web.listen-address",
                                  f"127.0.0.1:{free_ports(3)}"),
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr
    frames = [f for f in r.stdout.split("\n\n\n") if f.strip()]
    first, last = frames[0], frames[-1]
    for host in ("gpu-node-00", "gpu-node-01", "gpu-node-02"):
        assert host in first and host in last
    assert "no node stands out" in first
    planted = C.load(scenario, nodes=3, gpus=1).fault["host"]
    assert re.search(rf"Holding the job back: {planted}( GPU 0)? \({kind}, "
                     r"(warning|critical)\)", last), last
    assert "Traceback" not in r.stderr


def test_demo_verdict_is_the_cluster_analysis_on_the_nodes_rows():
    """cluster_verdict: the rows of each refresh through agentd/cluster's analyze_fleet. Peers
    alike within their natural spread: nothing; one node computing longer at lower clocks:
    throttled, on that node and the GPU its per-GPU values single out."""
    from agentd.sim.cluster_demo import cluster_verdict

    rng = np.random.default_rng(1)
    hosts = [f"n{k}" for k in range(6)]

    def rows(bad: str | None = None) -> dict:
        out = {}
        for h in hosts:
            r = {"clock_min": 1980e6 * rng.uniform(0.98, 1.0), "act_max": 0.40 +
                 rng.uniform(-0.005, 0.005), "busy_min": 0.99, "busy_avg": 0.995,
                 "throttle_max": 0.0, "power_max": 0.7, "temp_max": 60.0, "net_rate": 50e9,
                 "net_errors": 0.0, "net_recover": 0.0, "disk_busy": 0.05, "cpu_busy": 0.1}
            if h == bad:
                r.update(clock_min=1980e6 * 0.7, act_max=0.55, throttle_max=1.0,
                         power_max=0.99)
            out[h] = r
        return out

    ident = {h: {"model": "NVIDIA H100 80GB HBM3", "clock_max": 1980e6,
                 "gpus": {"act_max": {"0": 0.55 if h == "n4" else 0.4, "1": 0.4}}}
             for h in hosts}
    history = [(5.0 * i, rows()) for i in range(8)]
    assert cluster_verdict(history, {"slurm_job_id": "7"}, 2, ident) == []
    history += [(5.0 * i, rows("n4")) for i in range(8, 12)]
    found = cluster_verdict(history, {"slurm_job_id": "7"}, 2, ident)
    assert [(f["host"], f["cause"], f["gpus"]) for f in found] == [("n4", "throttled", ["0"])]
    assert found[0]["severity"] in ("warning", "critical")
    # A lossy link: errors and recoveries on one node's port, counted per demo window.
    lossy = [(t, {h: {**r, "net_errors": 500.0, "net_recover": 0.2} if h == "n1" else r
                  for h, r in rows().items()}) for t in 5.0 * np.arange(12, 16)]
    found = cluster_verdict(history[:12] + lossy, {"slurm_job_id": "7"}, 2, ident)
    assert [(f["host"], f["cause"]) for f in found] == [("n1", "slow_link")]
    assert re.search(r"\d+\.\d link errors/s and [1-9]\d* link recoveries per 15 s$",
                     found[0]["summary"]), found[0]["summary"]


def test_demo_flag_errors():
    for args, message in [(("--nodes", "3"), "go with --cluster"),
                          (("--cluster", "--scenario", "nope"), "no cluster scenario"),
                          (("--cluster", "--nodes", "99"), "one process keeps up"),
                          (("--cluster", "--nodes", "2"), "takes at least 3 nodes, got 2"),
                          (("--cluster", "--onset", "-1"), "--onset: must be a positive "
                           "duration")]:
        r = subprocess.run(agentd_cmd("demo", *args, "--seconds", "1"), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == USAGE, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
