"""`agentd run` as a process: signals, reload, sd_notify, no driver, TLS and basic auth."""

from __future__ import annotations

import base64
import os
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import agentd_cmd, free_port, self_signed_cert, wait_http

SCENARIO = """
[[gpus]]
count = 2
utilization = 0.5
"""


def metrics(url: str, **kw) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5, **kw) as r:
        return r.read().decode()


def value(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(line_prefix)


@pytest.fixture
def scenario(tmp_path) -> str:
    p = tmp_path / "gpus.toml"
    p.write_text(SCENARIO)
    return str(p)


def start(spawn, *args, env=None, log=None):
    port = free_port()
    proc = spawn(agentd_cmd("run", "--web.listen-address", f"127.0.0.1:{port}", *args), env=env,
                 log=log)
    url = f"http://127.0.0.1:{port}"
    return proc, url, port


def test_sigterm_stops_within_two_seconds(spawn, scenario):
    proc, url, _ = start(spawn, "--fake-nvml", scenario)
    wait_http(url + "/metrics")
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.p.send_signal(signal.SIGTERM)
    rc = proc.p.wait(5)
    assert time.monotonic() - t0 < 2.0
    assert rc == 0
    assert "Traceback" not in proc.output()


def test_threads_carry_their_names_for_top(spawn, scenario):
    """`top -H` and /proc/PID/task/TID/comm tell the sampling loops, the analysis and the
    server's channel apart (bench/daemon_overhead.py reports CPU per thread by these
    names); the main thread keeps the process' name."""
    proc, url, _ = start(spawn, "--fake-nvml", scenario)
    wait_http(url + "/metrics")
    pid = proc.p.pid
    before = open(f"/proc/{pid}/comm").read().strip()
    deadline = time.monotonic() + 10
    names: set[str] = set()
    want = {"loop-gpu-0.1", "loop-host-0.1", "loop-host-1.0", "analysis", "web-channel"}
    while time.monotonic() < deadline and not want <= names:
        names = set()
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                names.add(open(f"/proc/{pid}/task/{tid}/comm").read().strip())
            except OSError:
                pass
        time.sleep(0.2)
    assert want <= names, names
    assert open(f"/proc/{pid}/comm").read().strip() == before not in want


def test_sigint_stops_cleanly(spawn, scenario):
    proc, url, _ = start(spawn, "--fake-nvml", scenario)
    wait_http(url + "/metrics")
    t0 = time.monotonic()
    proc.p.send_signal(signal.SIGINT)
    assert proc.p.wait(5) == 0
    assert time.monotonic() - t0 < 2.0


def test_sighup_reloads_and_keeps_running_config_on_error(spawn, scenario, tmp_path):
    cfg = tmp_path / "agentd.toml"
    cfg.write_text("[collectors.network]\nenabled = true\n")
    proc, url, _ = start(spawn, "--config.file", str(cfg), "--fake-nvml", scenario)
    wait_http(url + "/metrics")
    assert 'agentd_sampler_available{sampler="network"}' in metrics(url)
    cfg.write_text("[collectors.network]\nenabled = false\n")
    proc.p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while 'sampler="network"' in metrics(url) and time.monotonic() < deadline:
        time.sleep(0.1)
    text = metrics(url)
    assert 'sampler="network"' not in text
    assert value(text, "agentd_config_last_reload_successful") == 1
    # A broken file: logged, the running configuration stays.
    cfg.write_text("[collectors.network]\nenabled = maybe\n")
    proc.p.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    text = metrics(url)
    assert value(text, "agentd_config_last_reload_successful") == 0
    assert 'agentd_sampler_available{sampler="cpu"} 1.0' in text
    assert proc.p.poll() is None
    assert "reload failed" in proc.output()


def test_no_driver_says_so_once_and_samples_the_host(spawn):
    proc, url, _ = start(spawn, "--collector.gpu.interval", "0.2s")
    wait_http(url + "/metrics")
    time.sleep(1.0)
    text = metrics(url)
    assert 'agentd_sampler_available{sampler="gpu"} 0.0' in text
    assert 'agentd_sampler_success{sampler="cpu"} 1.0' in text
    assert "agentd_cpu_seconds_total" in text
    proc.stop()
    assert proc.output().count("no NVIDIA driver") == 1


def test_sd_notify_ready_watchdog_stopping(spawn, scenario, tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(10)
    # Stand-in for journald's stream: JOURNAL_STREAM names the very file stderr is.
    log = open(tmp_path / "journal.log", "w+")
    st = os.fstat(log.fileno())
    try:
        proc, url, _ = start(spawn, "--fake-nvml", scenario, log=log, env={
            "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000",
            "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        messages = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert messages[0].startswith("READY=1")
        assert any("WATCHDOG=1" in m for m in messages)
        proc.p.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        proc.p.wait(5)
        # Under journald: no timestamps, sd-daemon priority prefixes instead.
        lines = proc.output().splitlines()
        assert any(ln.startswith("<6>agentd: serving http://127.0.0.1:") for ln in lines)
        assert any(ln.startswith("<4>") and "FAKE GPUs" in ln for ln in lines)
        assert all(ln[:3] in ("<4>", "<6>") for ln in lines), lines
    finally:
        sock.close()


def test_window_endpoint(spawn, scenario):
    import json

    from agentd.daemon.window import load_npz

    proc, url, _ = start(spawn, "--fake-nvml", scenario)
    wait_http(url + "/metrics")
    time.sleep(1.5)
    with urllib.request.urlopen(url + "/api/v1/window?seconds=1", timeout=5) as r:
        doc = json.load(r)
    gpu = doc["groups"]["gpu"]
    assert gpu["interval_seconds"] == 0.1
    assert 8 <= len(gpu["t"]) <= 11
    assert set(gpu["columns"]["gpu.busy:0"]) == {0.5}
    with urllib.request.urlopen(url + "/api/v1/window?format=npz", timeout=5) as r:
        back = load_npz(r.read())
    assert "gpu.busy:1" in back["gpu"]["columns"]
    with urllib.request.urlopen(url + "/api/v1/status", timeout=5) as r:
        status = json.load(r)
    assert status["samplers"]["gpu"]["available"] is True
    # The rolling analysis' settings and counts (its schedule: docs/daemon.md).
    assert status["analysis"]["interval_seconds"] == 10.0
    assert status["analysis"]["max_interval_seconds"] == 30.0
    assert {"runs", "skipped", "errors", "last_run_timestamp_seconds"} <= set(status["analysis"])
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/api/v1/window?seconds=abc", timeout=5)
    assert e.value.code == 400


def test_tls_and_basic_auth(spawn, scenario, tmp_path):
    import bcrypt

    cert, key = self_signed_cert(tmp_path)
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(10)).decode().replace("$2b$", "$2y$")
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    proc, _, port = start(spawn, "--fake-nvml", scenario, "--web.config.file", str(web))
    url = f"https://127.0.0.1:{port}"
    tls = ssl.create_default_context(cafile=cert)

    def get(auth: str | None) -> int:
        req = urllib.request.Request(url + "/metrics")
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=5, context=tls) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            get(None)
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    assert get(None) == 401
    assert get("prometheus:wrong") == 401
    assert get("nobody:s3cret") == 401
    t0 = time.perf_counter()
    assert get("prometheus:s3cret") == 200
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        assert get("prometheus:s3cret") == 200
    # Verified credentials are cached: later scrapes skip the deliberate bcrypt cost.
    assert (time.perf_counter() - t0) / 5 < max(first, 0.05)
    # Plain HTTP on the TLS port is refused.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3)


def test_sampler_fault_does_not_stop_others(spawn, scenario, tmp_path):
    """A procfs whose stat file is garbage: the cpu sampler fails and is counted; the GPU
    and memory samplers carry on."""
    import shutil

    proc_dir = tmp_path / "proc"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "vm-debian12", "proc"),
                    proc_dir)
    proc, url, _ = start(spawn, "--fake-nvml", scenario, "--path.procfs", str(proc_dir))
    wait_http(url + "/metrics")
    (proc_dir / "stat").write_text("garbage\n")
    time.sleep(1.5)
    text = metrics(url)
    assert value(text, 'agentd_sampler_errors_total{sampler="cpu"}') > 0
    assert value(text, 'agentd_sampler_success{sampler="cpu"}') == 0
    assert value(text, 'agentd_sampler_success{sampler="gpu"}') == 1
    assert value(text, 'agentd_sampler_success{sampler="memory"}') == 1
    # One log line for the failure, not one per tick.
    assert proc.output().count("no aggregate 'cpu' line") == 1


FAULTY_GPUS = """
[[gpus]]
count = 1
utilization = 0.5
pcie_rx_bytes_per_second = 1e9

[[gpus]]
count = 1
utilization = 0.5
pcie_rx_bytes_per_second = 1e9
[[gpus.errors]]
function = "nvmlDeviceGetFieldValues"
error = "unknown"

[[gpus]]
count = 1
lost_at_s = 0
"""


def test_gpu_faults_end_to_end(spawn, tmp_path):
    """agentd run --fake-nvml with GPU 1 answering NVML_ERROR_UNKNOWN to field values and
    GPU 2 lost before start: the GPU sampler never fails, GPU 0 and GPU 1's busy keep their
    10 Hz rows, the error is counted and logged once, the lost GPU is exported as lost."""
    import json

    path = tmp_path / "faulty.toml"
    path.write_text(FAULTY_GPUS)
    proc, url, _ = start(spawn, "--fake-nvml", str(path))
    wait_http(url + "/metrics")
    time.sleep(3.0)
    text = metrics(url)
    assert value(text, 'agentd_sampler_errors_total{sampler="gpu"}') == 0
    assert value(text, 'agentd_sampler_success{sampler="gpu"}') == 1
    assert value(text, 'agentd_gpu_errors_total{gpu="1"') > 0
    assert value(text, 'agentd_gpu_errors_total{gpu="0"') == 0
    assert value(text, 'agentd_gpu_lost{gpu="2",uuid=""}') == 1
    assert 'agentd_gpu_info{gpu="2",uuid="",name=""' in text
    with urllib.request.urlopen(url + "/api/v1/window?seconds=2", timeout=5) as r:
        doc = json.load(r)
    gpu = doc["groups"]["gpu"]["columns"]
    rows = len(doc["groups"]["gpu"]["t"])
    assert rows >= 10  # at 10 Hz: ~20; the whole sampler backed off used to give none
    assert None not in gpu["gpu.busy:0"] and None not in gpu["gpu.busy:1"]
    assert None not in gpu["gpu.pcie_rx:0"]
    assert set(gpu.get("gpu.pcie_rx:1", [None])) == {None}
    assert doc["meta"]["gpus"]["2"]["lost"] is True
    assert proc.stop() == 0
    out = proc.output()
    assert out.count("nvmlDeviceGetFieldValues failed") == 1, out
    assert "Traceback" not in out


# --- a wall clock stepped backwards (in process, clocks injected) ----------------------------


class _Clocks:
    """A monotonic clock the test advances and a wall clock that follows it, until stepped."""

    def __init__(self):
        self.mono = 1000.0
        self.offset = 1_800_000_000.0 - self.mono

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.mono + self.offset


def test_wall_clock_stepped_back_an_hour(dgx_procfs, dgx_sysfs, monkeypatch):
    """NTP steps the wall clock back by an hour while the daemon runs: the GPU window
    statistics stay within [0, 1] and true, the rolling analysis keeps running on the last
    minute (not on an hour-wide mix), and findings never outlive the analysis."""
    import re

    from agentd.daemon import exporter as exporter_mod
    from agentd.daemon import rolling as rolling_mod
    from agentd.daemon.config import Config, _default_collectors
    from agentd.daemon.core import Daemon
    from agentd.daemon.runner import SamplerState
    from agentd.gpu.fake import install, library_from_dict, uninstall
    from agentd.paths import Paths
    from agentd.samplers import registry
    from agentd.samplers.base import Context

    clocks = _Clocks()
    for mod in (exporter_mod, rolling_mod):
        monkeypatch.setattr(mod.time, "monotonic", clocks.monotonic)
    install(library_from_dict({"gpus": [{"count": 2, "step_period_s": 2.0,
                                         "step_busy_s": 1.4}]}, clock=clocks.monotonic))
    try:
        cfg = Config(collectors=_default_collectors(), procfs=dgx_procfs, sysfs=dgx_sysfs,
                     fake_nvml="x")
        d = Daemon(cfg)
        d.clock = clocks.wall
        ctx = Context(Paths(dgx_procfs, dgx_sysfs), 0.1, 1.0, d.shared)
        for name in ("gpu", "cpu", "storage"):
            cls = registry()[name]
            s = cls(ctx, cfg.collector(name).options)
            s.open()
            if name == "gpu":
                s.backend.clock = clocks.monotonic
            st = SamplerState(s, 0.1, 1.0, d.window.ring(name, 0.1), wall_clock=d.clock,
                              monotonic=clocks.monotonic)
            st.available = True
            d._states[name] = st

        def run(seconds: float, tick0: int) -> None:
            for tick in range(tick0, tick0 + int(seconds * 10)):
                clocks.mono += 0.1
                for st in d.runners():
                    st.run(tick, 0.1)

        def idle_ratios() -> list[float]:
            clocks.mono += 1.5  # past the statistics cache
            text = d.exporter.render().decode()
            return [float(v) for v in re.findall(
                r'^agentd_gpu_window_idle_ratio\{[^}]*\} (\S+)$', text, re.M)]

        # Idle 0.6 s of every 2 s; a 1/6 s driver sample straddling an edge reads above the
        # idle threshold, so about one sample period less of it counts as idle.
        IDLE = (0.6 - 1 / 6) / 2
        run(70, 0)
        before = idle_ratios()
        assert len(before) == 2 and all(r == pytest.approx(IDLE, abs=0.04) for r in before)
        assert d.analysis.run_once() is not None
        clocks.offset -= 3600.0  # the wall clock steps back
        run(30, 700)
        after = idle_ratios()
        assert len(after) == 2 and all(r == pytest.approx(IDLE, abs=0.04) for r in after)
        report = d.analysis.run_once()
        assert report is not None and d.analysis.current() is report
        sig_t = d.window.export(d.clock() - cfg.analysis_window)["gpu"]["t"]
        assert np.all(np.diff(sig_t) > 0)
        # The last minute on the stepped wall clock: its first row a minute ago, its newest
        # one when the last tick ran (1.5 s before the statistics' scrape moved the clock).
        assert sig_t[0] == pytest.approx(d.clock() - cfg.analysis_window, abs=0.15)
        assert sig_t[-1] == pytest.approx(d.clock() - 1.5, abs=0.15)
        # The analysis stops (its thread stuck or failing): its findings are withdrawn.
        clocks.mono += (rolling_mod.STALE_RUNS + 1) * cfg.analysis_interval
        assert d.analysis.current() is None
        assert not [s for s in d.analysis.series() if s[0].startswith("agentd_finding")]
    finally:
        d.analysis.stop()  # its process
        uninstall()


def reload_and_wait(proc, url: str) -> str:
    """SIGHUP, then the metrics once the reload has been attempted (its outcome logged)."""
    count = proc.output().count("reload")
    proc.p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while proc.output().count("reload") == count and time.monotonic() < deadline:
        time.sleep(0.1)
    return metrics(url)


def test_failed_reloads_keep_serving(spawn, scenario, tmp_path):
    """A new address in use, a broken fake-NVML scenario: the reload fails, is logged and
    reported, and the daemon goes on serving where it was."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = free_port()
    cfg = tmp_path / "agentd.toml"
    good = f'[web]\nlisten_address = "127.0.0.1:{port}"\n[gpu]\nfake_nvml = "{scenario}"\n'
    cfg.write_text(good)
    proc = spawn(agentd_cmd("run", "--config.file", str(cfg)))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/metrics")
    try:
        cfg.write_text(good.replace(str(port), str(busy.getsockname()[1])))
        text = reload_and_wait(proc, url)
        assert value(text, "agentd_config_last_reload_successful") == 0
        assert "cannot listen on" in proc.output().splitlines()[-1]
        bad = tmp_path / "bad.toml"
        bad.write_text("[[gpus]]\ncount = 'many'\n")
        cfg.write_text(good.replace(scenario, str(bad)))
        text = reload_and_wait(proc, url)
        assert value(text, "agentd_config_last_reload_successful") == 0
        assert "reload failed" in proc.output().splitlines()[-1]
        assert value(text, 'agentd_sampler_success{sampler="gpu"}') == 1
        cfg.write_text(good)
        text = reload_and_wait(proc, url)
        assert value(text, "agentd_config_last_reload_successful") == 1
        assert proc.p.poll() is None
    finally:
        busy.close()


def test_reload_with_a_broken_simulation_scenario(spawn, tmp_path):
    import shutil

    from agentd.sim.scenario import SCENARIO_DIR

    sc = tmp_path / "sim.toml"
    shutil.copy(os.path.join(SCENARIO_DIR, "input-cpu.toml"), sc)
    (tmp_path / "a.toml").write_text("")
    proc, url, _ = start(spawn, "--simulate", str(sc), "--config.file", str(tmp_path / "a.toml"))
    wait_http(url + "/metrics")
    sc.write_text("[[events]]\ngpu = 'x'\n")
    text = reload_and_wait(proc, url)
    assert value(text, "agentd_config_last_reload_successful") == 0
    assert "events[0].gpu" in proc.output()
    assert proc.p.poll() is None


def test_reload_to_another_host_on_the_same_port(spawn, scenario, tmp_path):
    """127.0.0.1:P -> 0.0.0.0:P cannot bind beside the old socket: the old one is closed
    first, and reopened when the new address cannot be had."""
    port = free_port()
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(f'[web]\nlisten_address = "127.0.0.1:{port}"\n')
    proc = spawn(agentd_cmd("run", "--config.file", str(cfg), "--fake-nvml", scenario))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/metrics")
    other = socket.socket()
    other.bind(("127.0.0.2", port))  # someone else on the same port, another address
    other.listen()
    try:
        cfg.write_text(f'[web]\nlisten_address = "0.0.0.0:{port}"\n')
        text = reload_and_wait(proc, url)
        assert value(text, "agentd_config_last_reload_successful") == 0
    finally:
        other.close()
    text = reload_and_wait(proc, url)
    assert value(text, "agentd_config_last_reload_successful") == 1
    assert "serving http://0.0.0.0:" in proc.output()
    assert proc.p.poll() is None
