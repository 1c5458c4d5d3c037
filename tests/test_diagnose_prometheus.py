"""`agentd diagnose --prometheus` against a real Prometheus: scraping `agentd run --simulate`,
and holding only dcgm-exporter and node_exporter series backfilled with promtool."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
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
    # The daemon's own analysis (agentd_finding_*, from its 10 Hz window) said so too, in
    # most of its runs over the range: read back and weighed with the series.
    assert doc["findings"][0]["evidence"]["daemon_runs_share"] >= 0.5
    # /metrics has per-job series (no pids): the finding names the job that owns the GPUs,
    # once, though the job is read as one process tree per GPU (agentd_gpu_process_*).
    assert doc["findings"][0]["subject"]["processes"] == [{"systemd_unit": "train.service"}]
    # Too short a range for its step: one line, exit 3, saying what would do.
    r = subprocess.run(agentd_cmd("diagnose", "--prometheus", prom, "--node", "127.0.0.1",
                                  "--last", "30s", "--step", "10s"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "at least 10 are needed (one every 10 s: a longer --last or a shorter --step)" \
        in r.stderr, r.stderr
    # A node the server holds nothing for: one line, exit 3, naming both flavours it looked
    # for (it said "no dcgm-exporter GPU series" of a server full of agentd's).
    r = subprocess.run(agentd_cmd("diagnose", "--prometheus", prom, "--node", "gpu-node-9",
                                  "--last", "35s"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "neither agentd's nor dcgm-exporter's GPU series for node 'gpu-node-9'" in r.stderr


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


def _gpu_only_openmetrics(host: str, t0: float, phases: list, scrape: float = 5.0,
                          seed: int = 3) -> str:
    """dcgm-exporter series as a Kubernetes-deployed exporter writes them (instance is the
    exporter pod's address, the node is in Hostname), from nvidia-smi-like data: GPU
    utilisation, power, memory only. phases: (seconds, per-GPU (util, watts, MiB) for 8 GPUs)."""
    rng = np.random.default_rng(seed)
    lines = {name: [] for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_POWER_USAGE",
                                   "DCGM_FI_DEV_FB_USED")}
    t = t0
    for seconds, gpus in phases:
        for _ in range(int(seconds / scrape)):
            t += scrape
            for g, (util, watts, mib) in enumerate(gpus):
                u = util if util in (0, 100) else float(np.clip(rng.normal(util, 6), 0, 100))
                labels = (f'gpu="{g}",UUID="GPU-{g:04d}",modelName="NVIDIA H100 80GB HBM3",'
                          f'Hostname="{host}",instance="10.244.3.17:9400",job="dcgm"')
                lines["DCGM_FI_DEV_GPU_UTIL"].append((labels, round(u), t))
                lines["DCGM_FI_DEV_POWER_USAGE"].append((labels, watts + rng.normal(0, 5), t))
                lines["DCGM_FI_DEV_FB_USED"].append((labels, mib, t))
    out = []
    for name, rows in lines.items():
        out += [f"# HELP {name} {name}.", f"# TYPE {name} gauge"]
        rows.sort(key=lambda r: (r[0], r[2]))
        out += [f"{name}{{{lab}}} {v:.6g} {ts:.3f}" for lab, v, ts in rows]
    return "\n".join(out + ["# EOF"]) + "\n"


def test_gpu_only_telemetry_at_5s_through_a_real_prometheus(tmp_path, spawn):
    """The real-telemetry failures of issue #8: a healthy session (~90% utilisation, ~550 W)
    warned; a node idle between two jobs was called critical starvation; GPU 0 idle holding
    41 GB while its seven peers read 100% at ~155 W (spinning) was called 'no prefetch'.
    Also: the node is named by a host name with '-' and '.', found in Hostname (instance is
    the exporter pod's address), and the step is the scrape interval found in the data."""
    promtool = need("promtool")
    host = "gpu-a.rack-3"
    t0 = 1.76e9
    healthy = [(90, 550, 41000)] * 8
    idle = [(0, 70, 0)] * 8
    blocked = [(0, 72, 41000)] + [(100, 155, 41000)] * 7
    om = tmp_path / "dcgm.om"
    om.write_text(_gpu_only_openmetrics(host, t0, [(600, healthy), (300, idle),
                                                    (600, blocked)]))
    tsdb = tmp_path / "tsdb"
    r = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(om),
                        str(tsdb)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prom = start_prometheus(spawn, tmp_path, str(tsdb))

    def diagnose(node: str, start: float, end: float) -> tuple[int, dict]:
        r = subprocess.run(agentd_cmd("diagnose", "--prometheus", prom, "--node", node,
                                      "--start", f"{start:.0f}", "--end", f"{end:.0f}",
                                      "--json"), capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, 1), r.stderr
        return r.returncode, json.loads(r.stdout)

    code, doc = diagnose(host, t0 + 60, t0 + 590)
    assert doc["resolution_seconds"] == 5.0
    assert code == 0 and not [f for f in doc["findings"] if f["severity"] != "info"], doc
    missing = " ".join(doc["signals_missing"])
    assert "storage" in missing and "process trees" in missing
    code, doc = diagnose('Hostname="gpu-a.rack-3"', t0 + 610, t0 + 890)
    assert code == 0 and doc["findings"] == [] and len(doc["spare_gpus"]) == 8
    code, doc = diagnose(host, t0 + 910, t0 + 1490)
    top = doc["findings"][0]
    assert code == 1 and (top["kind"], top["subject"]["gpus"], top["severity"]) == \
        ("straggler", [0], "critical")
    assert top["stall_fraction"] > 0.8


def test_a_2_5_s_scrape_interval_loses_no_step(tmp_path, spawn):
    """Windows were whole seconds: at a 2.5 s scrape a gauge was read over 2 s, and every
    step missed its scrape whenever the range's end fell in the half second after one."""
    from agentd.diagnose.sources.prometheus_exporters import ExportersPrometheusSource

    promtool = need("promtool")
    host = "gpu-b.rack-3"
    t0 = 1.76e9
    om = tmp_path / "dcgm.om"
    om.write_text(_gpu_only_openmetrics(host, t0, [(300, [(90, 550, 41000)] * 8)], scrape=2.5))
    tsdb = tmp_path / "tsdb"
    r = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(om),
                        str(tsdb)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prom = start_prometheus(spawn, tmp_path, str(tsdb))
    for offset in (0.2, 0.7, 1.2, 1.7, 2.2):  # after a scrape at t0 + 2.5 k
        end = t0 + 250 + offset
        sig = ExportersPrometheusSource(prom, host, end - 100, end).read()
        assert sig.resolution == 2.5
        for key in ("gpu.mem_used:0", "gpu.busy:0", "gpu.power:0"):
            assert np.isfinite(sig.channels[key][1:]).all(), (offset, key)
