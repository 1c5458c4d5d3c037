"""`agentd diagnose --prometheus` against a real Prometheus: scraping `agentd run --simulate`,
and holding only dcgm-exporter and node_exporter series backfilled with promtool."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from agentd.sim import scenario as S
from agentd.sim.openmetrics import exporters_openmetrics
from agentd.sim.signals import simulate
from conftest import agentd_cmd, free_port, need, wait_http

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


def start_prometheus(spawn, tmp_path, tsdb: str, targets: dict[str, str] | None = None) -> str:
    binary = need("prometheus")
    port = free_port()
    jobs = "\n".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']"
        for job, target in (targets or {}).items())
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global:\n  scrape_interval: 1s\n" +
                   (f"scrape_configs:\n{jobs}\n" if targets else ""))
    spawn([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tsdb}",
           f"--web.listen-address=127.0.0.1:{port}",
           "--storage.tsdb.retention.time=100000d"])
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/-/ready", timeout=20)
    return base


def test_diagnose_from_prometheus_scraping_agentd(tmp_path, spawn):
    port = free_port()
    spawn(agentd_cmd("run", "--simulate", "input-cpu", "--simulate.seed", "1",
                     "--web.listen-address", f"127.0.0.1:{port}"))
    wait_http(f"http://127.0.0.1:{port}/metrics")
    prom = start_prometheus(spawn, tmp_path, str(tmp_path / "tsdb"),
                            {"agentd": f"127.0.0.1:{port}"})
    # 70 s of 1 s scrapes: the analysed 35 s, and before it the 30 s that rate() looks back.
    time.sleep(70)
    r = subprocess.run(agentd_cmd("diagnose", "--prometheus", prom, "--node", "127.0.0.1",
                                  "--last", "35s", "--step", "2s", "--json"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == "prometheus (agentd)"
    assert doc["findings"][0]["kind"] == "input_cpu"
    assert len(doc["gpus"]) == 8
    # /metrics has per-job series (no pids): the finding names the job that owns the GPUs.
    assert {"systemd_unit": "train.service"} in doc["findings"][0]["subject"]["processes"]


@pytest.mark.parametrize("scenario", ["input-storage", "idle-allocated"])
def test_diagnose_from_dcgm_and_node_exporter_only(tmp_path, spawn, scenario):
    """A cluster that runs only dcgm-exporter and node_exporter: 20 minutes at a 15 s scrape,
    backfilled into a real Prometheus."""
    promtool = need("promtool")
    sc = S.load(scenario, seed=0)
    sig, _ = simulate(sc, seconds=1200, start=1.75e9)
    om = tmp_path / "exporters.om"
    om.write_text(exporters_openmetrics(sig, "gpu-node-7", scrape=15.0))
    tsdb = tmp_path / "tsdb"
    r = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(om),
                        str(tsdb)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prom = start_prometheus(spawn, tmp_path, str(tsdb))
    start, end = sig.t[0] + 120, sig.t[-1]
    r = subprocess.run(agentd_cmd("diagnose", "--prometheus", prom, "--node", "gpu-node-7",
                                  "--start", f"{start:.0f}", "--end", f"{end:.0f}",
                                  "--step", "30s", "--json"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == "prometheus (dcgm-exporter + node_exporter)"
    assert doc["findings"][0]["kind"] == sc.klass
    notes = " ".join(doc["notes"])
    assert "cannot be resolved" in notes  # what a 30 s resolution cannot show
