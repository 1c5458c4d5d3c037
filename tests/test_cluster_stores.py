"""`agentd diagnose --cluster` against real stores: Prometheus holding dcgm-exporter and
node_exporter series backfilled with promtool, and VictoriaMetrics fed the same series
through its import API; both must name the same nodes and causes."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from agentd.cluster.synth import simulate_job, write_exporters
from conftest import agentd_cmd, backfilled_prometheus, free_port, need, wait_http

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

START = 1_750_000_000.0
ONSET = 900.0  # seconds after START
CAUSES = [None, "throttled", "slow_link", "input_starved", "slow_gpu"]


@pytest.fixture(scope="module")
def jobs():
    rng = np.random.default_rng(11)
    return [simulate_job(rng, 6, cause, START, seconds=2100, job=f"train{i}",
                         onset=ONSET, namespace="ml" if i % 2 else "vision")
            for i, cause in enumerate(CAUSES)]


def _diagnose(url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(agentd_cmd("diagnose", "--prometheus", url, "--cluster", *extra),
                          capture_output=True, text=True, timeout=180)


def _check(doc: dict, jobs) -> None:
    named = {(f["subject"]["node"], f["kind"]) for f in doc["findings"]}
    truth = {(s.truth.node, s.truth.cause) for s in jobs if s.truth.cause}
    assert named == truth, (named, truth)
    for f in doc["findings"]:
        assert f["subject"]["job"].startswith("namespace=")
        assert f["severity"] in ("warning", "critical")
    assert {j["job"] for j in doc["jobs"]} == {
        f"namespace={'ml' if i % 2 else 'vision'},workload=train{i}" for i in range(len(CAUSES))}
    assert all(j["nodes"] == 6 and j["gpus"] == 48 for j in doc["jobs"])


@pytest.fixture(scope="module")
def prometheus(jobs, tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster-prom")
    om = d / "exporters.om"
    with open(om, "w") as f:
        write_exporters(jobs, f)
    with backfilled_prometheus(om, d) as url:
        yield url


@pytest.fixture(scope="module")
def victoriametrics(jobs, tmp_path_factory):
    binary = need("victoria-metrics")
    d = tmp_path_factory.mktemp("cluster-vm")
    port = free_port()
    p = subprocess.Popen([binary, f"-storageDataPath={d / 'data'}",
                          f"-httpListenAddr=127.0.0.1:{port}", "-retentionPeriod=100y",
                          "-search.disableCache"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health", timeout=30)
        text = d / "import.prom"
        with open(text, "w") as f:
            write_exporters(jobs, f, millis=True)
        with open(text, "rb") as f:
            req = urllib.request.Request(base + "/api/v1/import/prometheus", data=f.read(),
                                         method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 204
        urllib.request.urlopen(base + "/internal/force_flush", timeout=60).read()
        time.sleep(2)
        yield base
    finally:
        p.terminate()
        p.wait(10)


def test_prometheus_names_each_planted_node_and_cause(prometheus, jobs):
    r = _diagnose(prometheus, "--start", f"{START:.0f}", "--end", f"{START + 2100:.0f}",
                  "--json", "--price-per-gpu-hour", "3")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    _check(doc, jobs)
    # Cheap: per-node summaries, not per-GPU series (6 x 5 nodes, 240 GPUs here); power and
    # temperature come afterwards for the flagged nodes alone, and still explain them.
    assert doc["query"]["series"] < 40 * 30
    for f in doc["findings"]:
        if f["kind"] in ("throttled", "slow_gpu"):
            assert 0.3 < f["evidence"]["power_ratio"] < 1.2, f["evidence"]
            assert 30 < f["evidence"]["temperature_celsius"] < 100, f["evidence"]
    assert doc["fleet"]["cost"] == pytest.approx(3 * doc["fleet"]["gpu_hours_lost"])
    by_owner = {x["key"] for x in doc["fleet"]["by_owner"]}
    assert by_owner == {"namespace=ml", "namespace=vision"}


def test_prometheus_before_the_onset_is_silent_and_exits_0(prometheus):
    r = _diagnose(prometheus, "--start", f"{START:.0f}", "--end", f"{START + ONSET - 60:.0f}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No finding" in r.stdout


def test_prometheus_selector_and_group_by(prometheus, jobs):
    """--group-by a label only dcgm-exporter's series carry (namespace): two peer groups of
    mixed jobs; --selector narrows the nodes to one namespace's series."""
    r = _diagnose(prometheus, "--start", f"{START:.0f}", "--end", f"{START + 2100:.0f}",
                  "--json", "--selector", '{job=~"dcgm|node"}', "--group-by", "namespace")
    assert r.returncode in (0, 1), r.stderr
    doc = json.loads(r.stdout)
    assert {j["job"] for j in doc["jobs"]} == {"namespace=ml", "namespace=vision"}


def test_victoriametrics_answers_the_same_queries(victoriametrics, prometheus, jobs):
    r = _diagnose(victoriametrics, "--start", f"{START:.0f}", "--end", f"{START + 2100:.0f}",
                  "--json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    _check(doc, jobs)
