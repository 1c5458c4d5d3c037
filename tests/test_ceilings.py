"""Ceilings in use: the daemon reads `agentd probe`'s state file at start and on SIGHUP,
exports it, and puts it in the window's meta (so recordings carry it); `diagnose --state-file`
overrides; agentd's metrics in Prometheus give it back."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request

import pytest

from agentd.probe import state
from conftest import agentd_cmd, free_port, need, wait_http
from test_probe import GOOD

SCENARIO = "[[gpus]]\ncount = 2\nutilization = 0.5\n"


def metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return r.read().decode()


def ceiling_lines(text: str) -> dict[str, float]:
    """{'name{labels}': value} of the ceiling series."""
    out = {}
    for line in text.splitlines():
        if "_ceiling_" in line and not line.startswith("#"):
            series, _, v = line.rpartition(" ")
            out[series] = float(v)
    return out


def until(fn, timeout: float = 8.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


@pytest.fixture
def node(tmp_path, spawn):
    """start(ceilings): a daemon whose state file holds `ceilings` (None: no file) before it
    starts, so its first read finds them."""
    def start(ceilings: dict | None = None):
        scen = tmp_path / "gpus.toml"
        scen.write_text(SCENARIO)
        ceil = tmp_path / "ceilings.json"
        if ceilings is not None:
            state.write(str(ceil), ceilings)
        port = free_port()
        proc = spawn(agentd_cmd("run", "--web.listen-address", f"127.0.0.1:{port}",
                                "--fake-nvml", str(scen), "--probe.state-file", str(ceil)))
        return proc, f"http://127.0.0.1:{port}", ceil
    return start


def test_daemon_exports_ceilings_and_rereads_them_on_sighup(node, tmp_path):
    proc, url, ceil = node(GOOD)
    # Written before the daemon started: it is there from the first scrape.
    wait_http(url + "/metrics")
    text = metrics(url)
    assert ceiling_lines(text) == {
        'agentd_cpu_ceiling_cores{source="measured"}': 12.5,
        'agentd_gpu_h2d_ceiling_bytes_per_second{gpu="0",uuid="GPU-abc",memory="pinned",'
        'source="measured"}': 5.3e10,
        'agentd_gpu_h2d_ceiling_bytes_per_second{gpu="0",uuid="GPU-abc",memory="pageable",'
        'source="measured"}': 2.1e10,
        'agentd_gpu_h2d_ceiling_bytes_per_second{gpu="1",uuid="GPU-def",memory="pinned",'
        'source="nominal"}': 6.3e10,
        'agentd_storage_read_ceiling_bytes_per_second{device="nvme0n1",pattern="sequential",'
        'source="measured"}': 6.8e9,
        'agentd_storage_read_ceiling_bytes_per_second{device="nvme0n1",pattern="random",'
        'source="measured"}': 3.9e9,
        'agentd_storage_read_ceiling_operations_per_second{device="nvme0n1",'
        'source="measured"}': 9.5e5,
    }
    assert "agentd_ceilings_measured_timestamp_seconds 1800000000.0" in text
    promtool = need("promtool")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    with urllib.request.urlopen(url + "/api/v1/window?seconds=5", timeout=5) as r:
        assert json.load(r)["meta"]["ceilings"] == GOOD

    # A new probe, then SIGHUP: the new figures.
    state.write(str(ceil), {**GOOD, "cpu": {**GOOD["cpu"], "cores": 6.0}})
    proc.p.send_signal(signal.SIGHUP)
    assert until(lambda: ceiling_lines(metrics(url)).get(
        'agentd_cpu_ceiling_cores{source="measured"}') == 6.0)
    # A broken file: one warning line, and no ceilings rather than stale ones.
    ceil.write_text('{"version": 1, "measured_at": "soon"}')
    proc.p.send_signal(signal.SIGHUP)
    assert until(lambda: not ceiling_lines(metrics(url)))
    # Removed: no ceilings, said at info.
    ceil.unlink()
    proc.p.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert not ceiling_lines(metrics(url)) and proc.p.poll() is None
    out = proc.output()
    warnings = [line for line in out.splitlines() if "WARNING" in line and "ceilings file" in line]
    assert len(warnings) == 1 and "measured_at" in warnings[0], out
    assert "Traceback" not in out
    assert out.count(f"no ceilings file {ceil}") == 1


def test_missing_file_is_said_once(node):
    proc, url, ceil = node()
    wait_http(url + "/metrics")
    for _ in range(2):
        proc.p.send_signal(signal.SIGHUP)
        time.sleep(0.8)
    assert not ceiling_lines(metrics(url))
    proc.stop()
    assert proc.output().count(f"no ceilings file {ceil}") == 1


def test_recordings_carry_ceilings_and_the_flag_overrides(tmp_path, monkeypatch):
    ceil = tmp_path / "ceilings.json"
    state.write(str(ceil), GOOD)
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(f'[probe]\nstate_file = "{ceil}"\n')
    scen = tmp_path / "gpus.toml"
    scen.write_text(SCENARIO)
    rec = tmp_path / "rec.agentd"
    # This node's samplers (a simulated node carries its simulator's ceilings instead).
    r = subprocess.run(agentd_cmd("record", "--fake-nvml", str(scen), "--duration", "3s",
                                  "--out", str(rec), "--config.file", str(cfg)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from agentd.diagnose.sources.recording import RecordingSource

    assert RecordingSource(str(rec)).read().meta["ceilings"] == GOOD

    other = {**GOOD, "cpu": {**GOOD["cpu"], "cores": 3.0}}
    override = tmp_path / "other.json"
    state.write(str(override), other)
    from agentd import cli
    from agentd import diagnose as D

    seen = {}

    def capture(sig, args):
        seen["ceilings"] = sig.meta.get("ceilings")
        return 0

    monkeypatch.setattr(D, "report_and_exit", capture)
    assert cli.main(["diagnose", "--recording", str(rec), "--state-file", str(override)]) == 0
    assert seen["ceilings"] == other


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("[]", "expected an object"), ('{"version": 9}', "version 9")])
def test_bad_state_file_for_diagnose_is_one_line(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    r = subprocess.run(agentd_cmd("diagnose", "--recording", str(tmp_path / "none"),
                                  "--state-file", str(path)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_config_key_and_flag(tmp_path):
    from agentd.daemon import config as C
    from agentd.cli import build_parser

    cfg = tmp_path / "a.toml"
    cfg.write_text('[probe]\nstate_file = "/srv/ceilings.json"\n')
    args = build_parser().parse_args(["run", "--config.file", str(cfg)])
    assert C.build(args).probe_state_file == "/srv/ceilings.json"
    args = build_parser().parse_args(["run", "--config.file", str(cfg),
                                      "--probe.state-file", ""])
    assert C.build(args).probe_state_file == ""
    assert C.build(build_parser().parse_args(["run"])).probe_state_file == \
        state.DEFAULT_STATE_FILE
    cfg.write_text("[probe]\nstate = 1\n")
    with pytest.raises(C.ConfigError, match="unknown key probe.state"):
        C.build(build_parser().parse_args(["run", "--config.file", str(cfg)]))


@pytest.mark.prometheus
@pytest.mark.slow
def test_prometheus_gives_the_ceilings_back(tmp_path, spawn, node):
    from agentd.diagnose.sources.prometheus_agentd import AgentdPrometheusSource
    from test_diagnose_prometheus import start_prometheus

    proc, url, ceil = node(GOOD)
    wait_http(url + "/metrics")
    prom = start_prometheus(spawn, tmp_path, str(tmp_path / "tsdb"),
                            {"agentd": url.removeprefix("http://")})
    time.sleep(14)
    end = time.time()
    sig = AgentdPrometheusSource(prom, "127.0.0.1", end - 6, end, 1.0).read()
    got = sig.meta["ceilings"]
    assert got["storage"]["nvme0n1"]["seq_read_bytes_per_second"] == 6.8e9
    assert got["storage"]["nvme0n1"]["rand_read_iops"] == 9.5e5
    assert got["h2d"]["0"]["pinned_bytes_per_second"] == 5.3e10
    assert got["h2d"]["1"]["source"] == "nominal"
    assert got["cpu"]["cores"] == 12.5 and got["measured_at"] == 1.8e9


def test_a_simulated_node_keeps_its_own_ceilings(tmp_path):
    """--simulate serves a made-up node: the real node's state file is not its ceilings."""
    from agentd.daemon.config import Config, _default_collectors
    from agentd.daemon.core import Daemon

    ceil = tmp_path / "ceilings.json"
    state.write(str(ceil), GOOD)
    d = Daemon(Config(collectors=_default_collectors(), simulate="input-storage",
                      probe_state_file=str(ceil)))
    d.start(serve_http=False)
    try:
        assert d.ceilings is None
        meta = d.window_meta()
        assert meta["ceilings"] != GOOD and meta["ceilings"]["storage"]
        assert not [n for n, _, _ in state.series(d.ceilings)]
    finally:
        d.stop()
