"""The cluster view's pure parts: jobs from labels, robust peer statistics, causes on planted
faults, silence on natural variation, the report's shape; and the CLI's usage errors."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from agentd.cluster.causes import Options
from agentd.cluster.data import Fleet, Member
from agentd.cluster.groups import ALL_NODES, job_of, pod_owner
from agentd.cluster.peers import peers, windowed
from agentd.cluster.render import render_text
from agentd.cluster.report import analyze_fleet
from agentd.cluster.synth import CAUSES, gpu_detail, simulate_job, to_fleet
from conftest import agentd_cmd, free_port


@pytest.mark.parametrize("pod, owner", [
    ("train-3", "train"),                      # StatefulSet ordinal
    ("train-7d9f8c6b5-x2k4q", "train"),        # Deployment: template hash and random suffix
    ("train-worker-3", "train"),               # a training operator's role and index
    ("train-x2k4q", "train"),                  # a Job's pod
    ("llama-70b-master-0", "llama-70b"),
    ("mpi-launcher", "mpi"),
    ("lws-0-1", "lws"),                        # LeaderWorkerSet group and worker
    ("train-final", "train-final"),            # vowels: a name, not a random suffix
    ("trainer", "trainer"),
])
def test_pod_owner(pod, owner):
    assert pod_owner(pod) == owner


def test_job_of_precedence_and_group_by():
    assert job_of({"slurm_job_id": "48213", "pod": "x-0"})[0] == "slurm_job_id=48213"
    assert job_of({"namespace": "ml", "pod": "train-worker-3"}) == (
        "namespace=ml,workload=train", {"namespace": "ml", "workload": "train"})
    # `agentd rules`' per (node, job) series carry the pod's owner as workload: the same job
    assert job_of({"namespace": "ml", "workload": "train"}) == job_of(
        {"namespace": "ml", "pod": "train-worker-3"})
    assert job_of({"hpc_job": "77"})[0] == "hpc_job=77"
    assert job_of({"systemd_unit": "train.service"})[0] == "systemd_unit=train.service"
    # A process name, a container id or a pod UID name no job across nodes.
    for labels in ({"comm": "python"}, {"container_id": "0123456789ab"},
                   {"pod_uid": "5f1c-..."}, {}):
        assert job_of(labels) is None
    assert job_of({"team": "a", "slurm_job_id": "1"}, group_by="team") == ("team=a",
                                                                           {"team": "a"})
    assert job_of({"slurm_job_id": "1"}, group_by="team") is None


def test_windowed_means_and_robust_peers():
    x = np.array([[1.0, 2.0, np.nan, 4.0, 5.0]])
    np.testing.assert_allclose(windowed(x, 2)[0], [1.0, 1.5, 2.0, 4.0, 4.5])
    np.testing.assert_allclose(windowed(x, 4, min_share=0.9)[0, 3:], [np.nan, np.nan])
    # One outlier among nine alike peers: the median and the spread ignore it, and the
    # spread never falls under its floor however alike the others are.
    v = np.array([[1.0]] * 9 + [[1.5]])
    p = peers(v, floor_rel=0.03)
    assert p.median[0] == 1.0 and p.sigma[0] == pytest.approx(0.03)
    assert p.z[-1, 0] == pytest.approx(0.5 / 0.03)


def _run(cause, seed, nodes=16, activity="tensor", **kw):
    rng = np.random.default_rng(seed)
    sim = simulate_job(rng, nodes, cause, 1.75e9, seconds=2400, **kw)
    fleet = to_fleet([sim], activity=activity)
    return sim, analyze_fleet(fleet, Options(), gpu_detail([sim], activity))


@pytest.mark.parametrize("seed", range(12))
def test_natural_variation_gives_no_finding(seed):
    """Healthy jobs: clocks within +-3% per GPU, temperatures, power, different disks and
    loaders, measurement noise. Nothing may be named, whatever the job's size."""
    _, r = _run(None, seed, nodes=4 + seed * 5)
    assert r.findings == [], [f.summary for f in r.findings]


def test_a_job_alike_everywhere_gives_no_finding_even_when_all_nodes_idle():
    """A job whose every node waits for input alike: no node holds the others back (the
    per-node analysis names that input cause, not the cluster view)."""
    sim, _ = _run(None, 3, nodes=12)
    sim.gpu["gr_active"] *= 0.6  # every node's GPUs idle 40% of the time, alike
    sim.host["disk_busy"][:] = 0.97
    r = analyze_fleet(to_fleet([sim]), Options(), gpu_detail([sim]))
    assert r.findings == []


@pytest.mark.parametrize("cause", CAUSES)
@pytest.mark.parametrize("seed", [1, 2])
def test_each_planted_cause_is_named_on_its_node(cause, seed):
    sim, r = _run(cause, seed)
    named = [f for f in r.findings if f.subject["node"] == sim.truth.node]
    assert named, (sim.truth, [f.summary for f in r.findings])
    assert {f.subject["node"] for f in r.findings} == {sim.truth.node}
    f = named[0]
    assert f.kind == cause, f.summary
    assert f.severity in ("warning", "critical")
    if cause in ("throttled", "slow_gpu"):
        assert set(map(int, f.subject["gpus"])) >= set(sim.truth.gpus)
    # Seen within one analysis window (5 min) of the onset, give or take one step.
    assert f.evidence["first_seen"] - sim.truth.onset <= 300 + 60
    if cause != "slow_link" or "lossy" not in sim.truth.detail:
        # Healing the node recovers about the slowdown it causes.
        assert f.gain["speedup"] == pytest.approx(sim.truth.slowdown, rel=0.25)


def test_throttled_without_activity_series_uses_clocks():
    """dcgm-exporter without profiling fields: clocks robustly under the peers' still name
    the throttled node; the report says what cannot be seen."""
    sim, r = _run("throttled", 4, activity="none")
    assert [f.kind for f in r.findings] == ["throttled"]
    assert r.findings[0].subject["node"] == sim.truth.node
    assert any("cannot be seen" in n for n in r.notes)


def test_too_few_nodes_to_compare():
    sim, r = _run("throttled", 1, nodes=2)
    assert r.findings == [] and "too few" in r.jobs[0]["note"]


def test_report_json_and_text():
    sim, r = _run("throttled", 1)
    doc = json.loads(json.dumps(r.to_json(), allow_nan=False))
    f = doc["findings"][0]
    assert f["kind"] == "throttled" and f["subject"]["node"] == sim.truth.node
    assert f["subject"]["gpus"] and f["severity"] in ("warning", "critical")
    assert f["evidence"]["robust_z"] > 4 and f["gain"]["speedup"] > 1
    assert doc["fleet"]["by_cause"][0]["key"] == "throttled"
    text = render_text(r)
    assert sim.truth.node in text and "holds job" in text


def test_roll_ups_cost_at_the_configured_price():
    rng = np.random.default_rng(7)
    sims = [simulate_job(rng, 8, c, 1.75e9, seconds=2400, job=f"j{i}", namespace=ns)
            for i, (c, ns) in enumerate([("throttled", "a"), ("input_starved", "b"),
                                         (None, "a")])]
    fleet = to_fleet(sims)
    r = analyze_fleet(fleet, Options(), gpu_detail(sims), price_per_gpu_hour=2.0)
    roll = r.rollups
    lost = sum(f.gain["job_gpu_hours_lost"] for f in r.findings)
    assert roll["gpu_hours_lost"] == pytest.approx(lost) and lost > 0
    assert roll["cost"] == pytest.approx(2.0 * lost)
    assert {x["key"] for x in roll["by_owner"]} == {"namespace=a", "namespace=b"}
    assert {x["key"] for x in roll["by_cause"]} == {"throttled", "input_starved"}
    # The operator's price series, per GPU model, when no flag is given.
    fleet.price_per_gpu_hour = {"NVIDIA H100 80GB HBM3": 3.0, "": 1.0}
    r = analyze_fleet(fleet, Options(), gpu_detail(sims))
    assert r.rollups["cost"] == pytest.approx(3.0 * lost)


def test_nodes_without_job_labels_are_one_peer_group():
    """What a source builds when no series names a job: every node in one group."""
    sim = simulate_job(np.random.default_rng(5), 10, "slow_gpu", 1.75e9, seconds=2400)
    fleet = to_fleet([sim])
    fleet.members = [Member(ALL_NODES, m.node, m.gpus) for m in fleet.members]
    r = analyze_fleet(Fleet(**{**fleet.__dict__}), Options(), gpu_detail([sim]))
    assert [f.subject["node"] for f in r.findings] == [sim.truth.node]
    assert r.findings[0].subject["job"] == ALL_NODES


def test_source_names_nodes_and_merges_their_targets():
    """The source aggregates per scrape target in PromQL and names the node here (a
    label_replace per step and node costs the server ~40% of a query): dcgm-exporter's
    hostname/Hostname, else the host of instance (IPv6 too), else --node-label; two targets
    of one node merge as the family aggregates."""
    from agentd.cluster.source import ClusterSource
    from agentd.diagnose.sources.promclient import Grid

    src = ClusterSource(None, 0.0, 600.0)
    assert src.node_of({"instance": "gpu-1:9400", "Hostname": "gpu-1.dc"}) == "gpu-1.dc"
    assert src.node_of({"instance": "gpu-1:9400", "hostname": "g1", "Hostname": "x"}) == "g1"
    assert src.node_of({"instance": "gpu-2:9100"}) == "gpu-2"
    assert src.node_of({"instance": "[fd00::7]:9100"}) == "[fd00::7]"
    assert src.node_of({"instance": "gpu-3"}) == "gpu-3"
    assert ClusterSource(None, 0, 600, node_label="k8s_node").node_of(
        {"instance": "10.0.0.1:9400", "k8s_node": "gpu-4"}) == "gpu-4"
    src.grid = Grid(60.0, 180.0, 60.0)

    def series(instance, values, **labels):
        return {"metric": {"instance": instance, **labels},
                "values": [[60.0 * (i + 1), str(v)] for i, v in enumerate(values)]}

    two = [series("gpu-1:9400", [0.5, 0.7, 0.9], pod="train-0"),
           series("gpu-1:9401", [0.6, 0.4, float("nan")], pod="train-0"),
           series("gpu-2:9400", [0.1, 0.2, 0.3], pod="train-1")]
    rows = src._rows(two, "clock_min")
    key = ("gpu-1", (("pod", "train-0"),))
    assert rows[key][0] == {"node": "gpu-1", "pod": "train-0"}
    np.testing.assert_allclose(rows[key][1], [0.5, 0.4, 0.9])
    np.testing.assert_allclose(src._rows(two, "act_max")[key][1], [0.6, 0.7, 0.9])
    np.testing.assert_allclose(src._rows(two, "net_errors")[key][1], [1.1, 1.1, 0.9])
    # evidence() and the per-GPU detail select these targets, escaped for RE2
    assert src._only(["gpu-1"]) == 'instance=~"gpu-1:9400|gpu-1:9401"'
    src._targets["gpu.5"] = {"gpu.5:9400"}
    assert src._only(["gpu.5"]) == 'instance=~"gpu\\\\.5:9400"'
    assert src._only(["gpu-9"]) == ""


@pytest.mark.parametrize("args, message", [
    (["--cluster"], "--prometheus"),
    (["--prometheus", "http://127.0.0.1:9", "--cluster", "--node", "n1"], "--selector"),
    (["--prometheus", "http://127.0.0.1:9", "--cluster", "--selector", "cluster=eu1"],
     "not a list of label matchers"),
    (["--prometheus", "http://127.0.0.1:9", "--cluster", "--group-by", "a-b"],
     "not a label name"),
    (["--prometheus", "http://127.0.0.1:9", "--cluster", "--window", "10s"], "at least"),
])
def test_cluster_usage_errors_are_one_line_and_exit_2(args, message):
    r = subprocess.run(agentd_cmd("diagnose", *args), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unreachable_prometheus_exits_3():
    r = subprocess.run(agentd_cmd("diagnose", "--prometheus",
                                  f"http://127.0.0.1:{free_port()}", "--cluster",
                                  "--timeout", "5s"), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3 and "cannot reach" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_plot_draws_the_job_of_the_top_finding(tmp_path):
    from agentd.cluster.plot import plot

    rng = np.random.default_rng(1)
    sim = simulate_job(rng, 8, "throttled", 1.75e9, seconds=2400)
    fleet = to_fleet([sim])
    r = analyze_fleet(fleet, Options(), gpu_detail([sim]))
    out = tmp_path / "cluster.png"
    plot(fleet, r, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
