"""End to end with real servers: a real Prometheus scraping `agentd run` with 8 fake GPUs, and
real disk reads by fio checked against /proc/diskstats and node_exporter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import agentd_cmd, free_port, need, wait_http

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

# Eight GPUs, each with its own utilization: steady, and bursty steps of several periods.
GPUS = [
    {"utilization": 0.15}, {"utilization": 0.42}, {"utilization": 0.73}, {"utilization": 0.98},
    {"step_period_s": 0.5, "step_busy_s": 0.35},  # 0.70
    {"step_period_s": 0.25, "step_busy_s": 0.05},  # 0.20
    # A period that divides the 1 s scrape interval: a window then holds whole periods.
    # (With a 2 s period, a 20 s window's two ends can differ by half a period's busy time,
    # which is what the work did, not a measurement error.)
    {"step_period_s": 1.0, "step_busy_s": 0.55},  # 0.55
    {"step_period_s": 0.25, "step_busy_s": 0.225},  # 0.90
]


def expected_utilization(g: dict) -> float:
    return g["utilization"] if "utilization" in g else g["step_busy_s"] / g["step_period_s"]


def write_scenario(path) -> None:
    lines = []
    for g in GPUS:
        lines.append("[[gpus]]\ncount = 1")
        lines += [f"{k} = {v}" for k, v in g.items()]
        lines.append("pcie_rx_bytes_per_second = 2.0e9\n")
    path.write_text("\n".join(lines))


def prom_query(base: str, query: str, at: float | None = None) -> list:
    params = {"query": query, **({"time": f"{at:.3f}"} if at is not None else {})}
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.fixture
def prometheus(tmp_path, spawn):
    binary = need("prometheus")

    def start(targets: dict[str, str]) -> str:
        port = free_port()
        jobs = "\n".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']"
            for job, target in targets.items())
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                       f"scrape_configs:\n{jobs}\n")
        spawn([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{port}"])
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/-/ready", timeout=20)
        return base

    return start


def test_prometheus_rate_of_busy_seconds_equals_utilization(tmp_path, spawn, prometheus):
    scenario = tmp_path / "gpus.toml"
    write_scenario(scenario)
    port = free_port()
    agent = spawn(agentd_cmd("run", "--fake-nvml", str(scenario),
                             "--web.listen-address", f"127.0.0.1:{port}"))
    wait_http(f"http://127.0.0.1:{port}/metrics")
    prom = prometheus({"agentd": f"127.0.0.1:{port}"})
    # Scrapes start ~5 s after Prometheus is ready; wait for a 20 s rate window to fill.
    # The window is evaluated at the newest scrape, so that rate() does not extrapolate over
    # a stretch the scraper has not reached yet (it lags "now" on a loaded 2-core machine).
    # And it waits for the window to be full (20 scrapes): in a window that starts before
    # the series does, rate() extrapolates only half an interval back and reads low.
    deadline = time.monotonic() + 90
    result, at = [], None
    while time.monotonic() < deadline:
        newest = prom_query(prom, "max(timestamp(agentd_gpu_busy_seconds_total))")
        if newest:
            at = float(newest[0]["value"][1])
            samples = prom_query(prom, "count_over_time(agentd_gpu_busy_seconds_total[20s])", at)
            if len(samples) == 8 and min(float(s["value"][1]) for s in samples) >= 20:
                result = prom_query(prom, "rate(agentd_gpu_busy_seconds_total[20s])", at)
                break
        time.sleep(1)
    assert len(result) == 8, (result, agent.output()[-2000:])
    rates = {int(s["metric"]["gpu"]): float(s["value"][1]) for s in result}
    for gpu, got in sorted(rates.items()):
        want = expected_utilization(GPUS[gpu])
        assert abs(got - want) <= 0.02, f"GPU {gpu}: rate {got:.4f}, utilization {want:.4f}; " \
            f"all: {rates}"
    # The PCIe counter integrates exactly as well.
    rx = prom_query(prom, "rate(agentd_gpu_pcie_rx_bytes_total[20s])", at)
    for series in rx:
        assert float(series["value"][1]) == pytest.approx(2.0e9, rel=0.03)
    # Prometheus saw every scrape succeed.
    up = prom_query(prom, 'up{job="agentd"}')
    assert up and up[0]["value"][1] == "1"


def _device_of(path: str) -> str:
    st = os.stat(path)
    link = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if os.path.exists(os.path.join(link, "partition")):
        link = os.path.dirname(link)
    return os.path.basename(link)


def _diskstats_read_bytes(dev: str) -> int:
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if p[2] == dev:
                return int(p[5]) * 512
    raise KeyError(dev)


def _metric(url: str, name: str, dev: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf'^{name}{{device="{re.escape(dev)}"}} (\S+)$', text, re.M)
    assert m, f"{name} for {dev} not in {url}"
    return float(m.group(1))


def test_fio_direct_reads_match_diskstats_and_node_exporter(tmp_path, spawn):
    fio = need("fio")
    node_exporter = need("prometheus-node-exporter")
    workdir = tmp_path / "fio"
    workdir.mkdir()
    dev = _device_of(str(workdir))
    if not os.path.exists(f"/sys/block/{dev}"):
        pytest.skip(f"{workdir} is not on a block device ({dev})")
    data = workdir / "data.bin"
    # Lay the file out first (writes), so the measured run only reads.
    subprocess.run([fio, "--name=layout", f"--filename={data}", "--size=256M", "--rw=write",
                    "--bs=1M", "--direct=1"], check=True, capture_output=True)
    ne_port, ag_port = free_port(), free_port()
    spawn([node_exporter, f"--web.listen-address=127.0.0.1:{ne_port}",
           "--collector.disable-defaults", "--collector.diskstats"])
    spawn(agentd_cmd("run", "--web.listen-address", f"127.0.0.1:{ag_port}",
                     "--no-collector.gpu", "--no-collector.process", "--no-collector.network",
                     "--no-collector.topology"))
    ne_url = f"http://127.0.0.1:{ne_port}/metrics"
    ag_url = f"http://127.0.0.1:{ag_port}/metrics"
    wait_http(ne_url)
    wait_http(ag_url)
    time.sleep(0.5)

    def snapshot():
        return (_metric(ag_url, "agentd_disk_read_bytes_total", dev),
                _metric(ne_url, "node_disk_read_bytes_total", dev),
                _diskstats_read_bytes(dev))

    before = snapshot()
    subprocess.run([fio, "--name=read", f"--filename={data}", "--size=256M", "--rw=read",
                    "--bs=1M", "--direct=1"], check=True, capture_output=True)
    time.sleep(0.5)  # a few agentd ticks
    after = snapshot()
    ours, node, kernel = (a - b for a, b in zip(after, before))
    assert kernel >= 256 * 2**20, "fio's direct reads must reach the device"
    assert ours == pytest.approx(kernel, rel=0.01)
    assert ours == pytest.approx(node, rel=0.01)
