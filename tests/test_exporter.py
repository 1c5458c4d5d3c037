"""/metrics for a fixture node with 8 fake GPUs: a golden file (regenerate with
`pytest tests/test_exporter.py --update-golden`), the catalog, and promtool's lint."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentd.catalog import METRICS_BY_NAME
from agentd.daemon.config import Config, _default_collectors
from agentd.daemon.core import Daemon
from agentd.gpu.fake import install, library_from_dict
from agentd.paths import Paths
from agentd.daemon.runner import SamplerState
from agentd.samplers import registry
from agentd.samplers.base import Context, SeriesStore
from conftest import fixture_path, need

GOLDEN = fixture_path("e2e-output.txt")

SCENARIO = {
    "gpus": [
        {"count": 6, "step_period_s": 0.5, "step_busy_s": 0.35, "pcie_rx_bytes_per_second": 4e9,
         "pcie_tx_bytes_per_second": 1e8, "nvlink_rx_bytes_per_second": 2e10,
         "nvlink_tx_bytes_per_second": 2e10, "memory_used_bytes": 7e10,
         "processes": [], "ecc_corrected": 3},
        {"count": 1, "utilization": 0.95, "throttle": [
            {"start_s": 0, "end_s": 100, "reasons": ["hw_thermal_slowdown"],
             "sm_clock_hz": 1.2e9}], "temperature_celsius": 88},
        {"count": 1, "lost_at_s": 2.0, "xid": [{"at_s": 1.5, "code": 79}]},
    ]
}

# Series that differ from run to run or machine to machine, as node_exporter's e2e test does.
VOLATILE = re.compile(r"^(process_|agentd_build_info|agentd_sampler_duration_seconds|"
                      r"agentd_fake_nvml_cpu_seconds_total|"
                      r"agentd_sampler_last_success_timestamp_seconds|"
                      r"agentd_config_last_reload_success_timestamp_seconds)")


def fixture_node(procfs: str, sysfs: str, clock) -> Daemon:
    """A daemon on fixture trees, driven tick by tick on a pinned clock (no threads)."""
    install(library_from_dict(SCENARIO, clock=clock))
    cfg = Config(collectors=_default_collectors(), procfs=procfs, sysfs=sysfs, fake_nvml="x")
    d = Daemon(cfg)
    d.clock = clock
    ctx = Context(Paths(procfs, sysfs), 0.1, 1.0, d.shared, hostname="dgx-fixture")
    for name, cls in registry().items():
        s = cls(ctx, cfg.collector(name).options)
        s.open()
        if name == "gpu":
            s.backend.clock = clock
        ring = d.window.ring(name, 0.1) if cls.window_columns else None
        r = SamplerState(s, 0.1, 1.0, ring)
        r.available = True
        d._states[name] = r
    for tick in range(40):
        clock.advance(0.1)
        for r in d.runners():
            row = r.sampler.sample(clock.t, tick % 10 == 0)
            r.runs += 1
            r.success = True
            if row and r.ring is not None:
                r.ring.append(clock.t, row)
    return d


def render(procfs, sysfs, clock) -> str:
    text = fixture_node(procfs, sysfs, clock).exporter.render().decode()
    return "".join(line + "\n" for line in text.splitlines()
                   if not VOLATILE.match(line.split(" ", 3)[2] if line.startswith("#") else line))


@pytest.fixture
def output(dgx_procfs, dgx_sysfs, clock):
    from agentd.gpu.fake import uninstall

    try:
        yield render(dgx_procfs, dgx_sysfs, clock)
    finally:
        uninstall()


def test_golden(output, update_golden):
    if update_golden or not os.path.exists(GOLDEN):
        with open(GOLDEN, "w") as f:
            f.write(output)
    with open(GOLDEN) as f:
        expected = f.read()
    assert output == expected, "run pytest with --update-golden after checking the diff"


def test_every_name_is_in_the_catalog(output):
    for family in text_string_to_metric_families(output):
        name = family.name + ("_total" if family.type == "counter" else "")
        assert name in METRICS_BY_NAME, name
        spec = METRICS_BY_NAME[name]
        assert spec.type == family.type
        for sample in family.samples:
            assert set(sample.labels) == set(spec.labels), (name, sample.labels)


def test_content(output):
    assert 'agentd_gpu_lost{gpu="7"' in output
    assert re.search(r'agentd_gpu_clock_event_active\{gpu="6",uuid="[^"]+",'
                     r'reason="hw_thermal_slowdown"\} 1.0', output)
    assert re.search(r'agentd_gpu_xid_errors_total\{gpu="7",uuid="[^"]+",class="fatal"\} 1.0',
                     output)
    assert re.search(r'agentd_gpu_xid_errors_total\{gpu="0",uuid="[^"]+",class="fatal"\} 0.0',
                     output)
    assert re.search(r'agentd_gpu_xid_code_errors_total\{gpu="7",uuid="[^"]+",xid="79"\} 1.0',
                     output)
    assert re.search(r'agentd_pcie_shared_uplink\{gpu_address="0000:18:00.0",'
                     r'nvme_address="0000:19:00.0",switch="0000:16:00.0"', output)
    assert 'agentd_disk_read_bytes_total{device="nvme0n1"}' in output
    assert 'agentd_nfs_read_bytes_total{mountpoint="/mnt/datasets",export="10.0.0.5:/datasets"}' \
        in output
    assert 'agentd_rdma_receive_bytes_total{device="mlx5_0",port="1"}' in output
    assert 'agentd_gpu_window_idle_ratio{gpu="0"' in output


def test_promtool_check_metrics(dgx_procfs, dgx_sysfs, clock):
    promtool = need("promtool")
    from agentd.gpu.fake import uninstall

    try:
        text = fixture_node(dgx_procfs, dgx_sysfs, clock).exporter.render()
    finally:
        uninstall()
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_findings_export_one_series_per_kind_and_gpu():
    """No list in a label: a finding about GPUs 0 and 1 is one series per GPU, so a finding
    that spreads to GPU 2 keeps the series of 0 and 1 (an alert's `for:` runs on)."""
    from agentd.analysis.findings import Finding
    from agentd.daemon.rolling import finding_series

    def finding(kind, gpus, severity="warning", speedup=1.5):
        # As the analysis process sends it: Report.to_json()'s findings.
        return Finding(kind=kind, subject={"node": "n", "gpus": gpus}, t0=0, t1=60,
                       confidence=0.8, severity=severity, summary="", gain={"speedup": speedup},
                       stall_fraction=0.3).to_json()

    uuids = {"0": "GPU-a", "1": "GPU-b", "2": "GPU-c"}
    before = finding_series([finding("input_storage", [0, 1])], uuids)
    after = finding_series([finding("input_storage", [0, 1, 2], "critical", 1.8),
                            finding("input_storage", [1], speedup=1.2),
                            finding("memory_pressure", [])], uuids)
    active = {labels for n, labels, _ in before if n == "agentd_finding_active"}
    assert active == {("input_storage", "warning", "0", "GPU-a"),
                      ("input_storage", "warning", "1", "GPU-b")}
    speedup = {labels: v for n, labels, v in after
               if n == "agentd_finding_expected_speedup_ratio"}
    # The ranked first finding of a kind wins a GPU; a node-wide finding has gpu="".
    assert speedup == {("input_storage", "0", "GPU-a"): 1.8, ("input_storage", "1", "GPU-b"): 1.8,
                       ("input_storage", "2", "GPU-c"): 1.8, ("memory_pressure", "", ""): 1.5}
    for name, labels, _ in before + after:
        assert len(labels) == len(METRICS_BY_NAME[name].labels)
        assert not any("," in v for v in labels)


def test_series_store_checks_every_series_against_the_catalog():
    """Checked (name, label count) pairs are remembered; another count or an unknown name
    is still refused."""
    store = SeriesStore()
    for value in (2.0, 3.0):
        store.replace_gauges("cpu", [("agentd_cpu_online", (), value)])
    assert store.items() == [("agentd_cpu_online", (), 3.0)]
    with pytest.raises(ValueError):
        store.replace_gauges("cpu", [("agentd_cpu_online", ("0",), 1.0)])
    with pytest.raises(KeyError):
        store.add("agentd_no_such_metric_total", (), 1.0)
    assert store.items() == [("agentd_cpu_online", (), 3.0)]
