"""The HTTP server's process and the analysis' process, as an operator meets them: hostile
clients (trickled bytes, idle connections, too many connections, floods of bad passwords)
cost neither sampling nor good clients their answers; a helper process that dies or hangs
is restarted and never stops sampling or serving; `diagnose --daemon` and `record --daemon`
read the window through it."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
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


@pytest.fixture
def scenario(tmp_path) -> str:
    p = tmp_path / "gpus.toml"
    p.write_text(SCENARIO)
    return str(p)


def start(spawn, *args):
    port = free_port()
    proc = spawn(agentd_cmd("run", "--web.listen-address", f"127.0.0.1:{port}", *args))
    return proc, f"http://127.0.0.1:{port}", port


def get(url: str, auth: str | None = None, context=None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def value(text: str, series: str) -> float:
    """The value of one series, named with its labels as /metrics writes them."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(series)


def reaches(url: str, series: str, at_least: float, timeout: float = 20, **kw) -> None:
    """Wait for a counter to reach a value: the server process reports its counters every
    2 s, and /metrics may be a second old."""
    def ok():
        try:
            return value(metrics(url, **kw), series) >= at_least
        except KeyError:
            return False

    wait_for(ok, timeout, f"{series} did not reach {at_least}")


def metrics(url: str, **kw) -> str:
    status, body = get(url + "/metrics", **kw)
    assert status == 200, body
    return body.decode()


def children(pid: int, module: str) -> list[int]:
    """Child processes of `pid` running `python -m MODULE`."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            for c in f.read().split():
                try:
                    with open(f"/proc/{c}/cmdline", "rb") as g:
                        if module.encode() in g.read():
                            out.append(int(c))
                except OSError:
                    pass
    return out


def wait_for(predicate, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(message)


def response(sock: socket.socket) -> bytes:
    """One whole HTTP response (headers and Content-Length body) from a keep-alive socket."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def closed_within(sock: socket.socket, seconds: float, trickle: bytes | None = None) -> bytes:
    """Read until the server closes the connection (sending `trickle` a byte at a time every
    0.3 s meanwhile); what it sent. Fails if it is still open after `seconds`."""
    sock.settimeout(0.3)
    got = b""
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        if trickle is not None:
            try:
                sock.send(trickle[i % len(trickle):i % len(trickle) + 1])
                i += 1
            except OSError:
                return got
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"the connection is still open after {seconds} s")


# --- hostile clients --------------------------------------------------------------------------


def test_trickling_clients_are_cut_off(spawn, scenario, tmp_path):
    """A client that sends its request line and headers a byte at a time, one that sends
    nothing, and one that never finishes its TLS handshake are all closed after the header
    deadline; meanwhile other clients get their answers."""
    proc, url, port = start(spawn, "--fake-nvml", scenario, "--web.header-timeout", "1s")
    wait_http(url + "/metrics")
    slow = socket.create_connection(("127.0.0.1", port))
    silent = socket.create_connection(("127.0.0.1", port))
    result = {}
    t = threading.Thread(target=lambda: result.update(
        silent=closed_within(silent, 20)))
    t.start()
    got = closed_within(slow, 20, trickle=b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 200)
    assert got.startswith(b"HTTP/1.1 408"), got
    assert get(url + "/metrics")[0] == 200
    t.join()
    assert result["silent"] == b""
    reaches(url, 'agentd_http_refused_total{reason="deadline"}', 2)
    proc.stop()

    cert, key = self_signed_cert(tmp_path)
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    proc, _, port = start(spawn, "--fake-nvml", scenario, "--web.header-timeout", "1s",
                          "--web.config.file", str(web))
    tls = ssl.create_default_context(cafile=cert)
    wait_http(f"https://127.0.0.1:{port}/metrics", context=tls)
    handshake = socket.create_connection(("127.0.0.1", port))
    handshake.send(b"\x16\x03\x01")  # the start of a ClientHello, and no more
    assert closed_within(handshake, 20) == b""
    assert get(f"https://127.0.0.1:{port}/metrics", context=tls)[0] == 200


def test_idle_keepalive_connections_are_closed(spawn, scenario):
    proc, url, port = start(spawn, "--fake-nvml", scenario, "--web.idle-timeout", "1s")
    wait_http(url + "/metrics")
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response(s).startswith(b"HTTP/1.1 200")
    assert closed_within(s, 20) == b""  # kept alive, then closed once idle for a second


def test_connection_limit(spawn, scenario):
    """At the limit a keep-alive connection idle between requests makes room for a new one;
    with none idle (all new or mid-request) the new connection is answered 503 and closed."""
    proc, url, port = start(spawn, "--fake-nvml", scenario, "--web.max-connections", "3")
    wait_http(url + "/metrics")
    idle = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response(s).startswith(b"HTTP/1.1 200")
        idle.append(s)
    assert get(url + "/-/healthy")[0] == 200  # took an idle one's place
    assert closed_within(idle[0], 10) == b""  # the longest idle
    busy = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.1\r\n")  # headers not finished: not idle
        busy.append(s)
    refused = socket.create_connection(("127.0.0.1", port))
    assert closed_within(refused, 10).startswith(b"HTTP/1.1 503")
    for s in busy:
        s.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        assert closed_within(s, 10).startswith(b"HTTP/1.1 200")
    reaches(url, 'agentd_http_refused_total{reason="connection_limit"}', 1)


def test_bad_password_flood_costs_neither_sampling_nor_good_clients(spawn, scenario, tmp_path):
    """32 clients on 8 addresses send wrong passwords as fast as they can. One bcrypt check
    runs at a time with a short queue, each address gets a few before it is refused, and
    beyond that the answer is 429 without one; the GPU loop keeps sampling and a client
    whose password was verified before keeps getting its scrapes."""
    import bcrypt

    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(10)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    proc, url, port = start(spawn, "--fake-nvml", scenario, "--web.config.file", str(web))
    def up() -> bool:
        try:
            return get(url + "/metrics", "prometheus:s3cret")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    wait_for(up, 20, "agentd did not answer")
    before = metrics(url, auth="prometheus:s3cret")
    stop = threading.Event()
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def attacker(n: int) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            auth = base64.b64encode(f"prometheus:guess-{n}-{k}-{threading.get_ident()}"
                                    .encode()).decode()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10,
                                              source_address=(f"127.0.0.{n + 2}", 0)) as s:
                    s.sendall(f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
                              f"{auth}\r\nConnection: close\r\n\r\n".encode())
                    code = int(s.recv(64).split()[1])
            except (OSError, ValueError, IndexError):
                code = 0
            with lock:
                codes[code] = codes.get(code, 0) + 1

    threads = [threading.Thread(target=attacker, args=(n % 8,)) for n in range(32)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    good = []
    try:
        while time.monotonic() - t0 < 8:
            good.append(get(url + "/metrics", "prometheus:s3cret")[0])
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    elapsed = time.monotonic() - t0
    after = metrics(url, auth="prometheus:s3cret")
    assert set(good) == {200}, good
    assert codes.get(429, 0) > 0, codes
    # bcrypt ran at most: each address's burst, its refill over the run, and the queue.
    assert codes.get(401, 0) <= 8 * (10 + elapsed / 6 + 1) + 8, codes
    runs = value(after, 'agentd_sampler_runs_total{sampler="gpu"}') - \
        value(before, 'agentd_sampler_runs_total{sampler="gpu"}')
    assert runs >= 3 * elapsed, f"the GPU loop ran {runs} times in {elapsed:.1f} s"
    reaches(url, 'agentd_http_refused_total{reason="auth_rate_limited"}', 1,
            auth="prometheus:s3cret")


# --- helper processes ---------------------------------------------------------------------------


def test_server_process_restarted_and_replaced_without_refusing(spawn, scenario):
    """The server process killed: the socket stays open (connections wait in its backlog)
    and a new process serves them. SIGHUP: a new process takes over, the old one exits."""
    proc, url, port = start(spawn, "--fake-nvml", scenario)
    wait_http(url + "/metrics")
    (web,) = children(proc.p.pid, "agentd.daemon.httpd")
    # It yields the CPU to sampling: ten nice steps below the daemon (or the lowest).
    assert os.getpriority(os.PRIO_PROCESS, web) >= min(
        os.getpriority(os.PRIO_PROCESS, proc.p.pid) + 10, 19)
    os.kill(web, signal.SIGKILL)
    assert get(url + "/metrics")[0] == 200  # waits in the backlog, answered by the new one
    text = metrics(url)
    assert value(text, 'agentd_child_restarts_total{process="web"}') == 1
    (second,) = children(proc.p.pid, "agentd.daemon.httpd")
    assert second != web
    proc.p.send_signal(signal.SIGHUP)
    wait_for(lambda: children(proc.p.pid, "agentd.daemon.httpd") not in ([second], []), 20,
             "no new server process after SIGHUP")
    assert get(url + "/metrics")[0] == 200
    wait_for(lambda: len(children(proc.p.pid, "agentd.daemon.httpd")) == 1, 20,
             "the replaced server process did not exit")
    assert "Traceback" not in proc.output()


@pytest.mark.slow
def test_analysis_process_killed_or_hung_is_restarted(spawn, scenario):
    proc, url, port = start(spawn, "--fake-nvml", scenario, "--analysis.interval", "1s",
                            "--analysis.window", "6s")
    wait_http(url + "/metrics")

    def runs() -> float:
        return value(metrics(url), "agentd_analysis_runs_total")

    wait_for(lambda: runs() >= 1, 60, "the analysis never ran")
    assert "agentd_gpu_stall_ratio{" in metrics(url)
    (child,) = children(proc.p.pid, "agentd.daemon.analyst")
    os.kill(child, signal.SIGKILL)
    n = runs()
    wait_for(lambda: runs() > n, 60, "the analysis did not run again after its process died")
    text = metrics(url)
    assert value(text, 'agentd_child_restarts_total{process="analysis"}') >= 1
    assert value(text, "agentd_analysis_errors_total") >= 1
    # Hung (stopped): the run misses its deadline, the process is killed and replaced.
    (child,) = children(proc.p.pid, "agentd.daemon.analyst")
    os.kill(child, signal.SIGSTOP)
    wait_for(lambda: children(proc.p.pid, "agentd.daemon.analyst") not in ([child], []), 60,
             "the hung analysis process was not replaced")
    n = runs()
    wait_for(lambda: runs() > n, 60, "the analysis did not run again after a hang")
    assert value(metrics(url), 'agentd_sampler_success{sampler="gpu"}') == 1
    assert "Traceback" not in proc.output()


def test_the_sampling_process_imports_no_analysis():
    """scipy (the analysis core's) costs ~75 MiB: it must stay out of the sampling process."""
    code = ("import sys; import agentd.cli; from agentd.daemon.core import Daemon; "
            "import agentd.daemon.web, agentd.daemon.rolling; "
            "print([m for m in sys.modules if m.startswith(('agentd.analysis', 'scipy'))])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_stale_findings_are_dropped(scenario):
    """In process, with a real analysis process: a report is exported while fresh, and no
    longer once the analysis has not succeeded for two intervals and a deadline; a dead
    process is an error and a restart after back-off; a hung one misses its deadline."""
    from dataclasses import replace

    from agentd.daemon.config import Config, _default_collectors
    from agentd.daemon.core import Daemon
    from agentd.daemon.rolling import AnalysisUnavailable, RollingAnalysis

    cfg = replace(Config(collectors=_default_collectors()), analysis_interval=1.0,
                  analysis_window=30.0)
    d = Daemon(cfg)
    ring = d.window.ring("gpu", 0.1)
    now = time.time()
    for i in range(300):
        t = now - 30 + i * 0.1
        ring.append(t, {f"gpu.busy:{g}": 0.9 if i % 10 < 6 else 0.0 for g in range(2)})
    ra = RollingAnalysis(d, deadline=2.0)
    ra._start_child()
    try:
        report = ra.run_once()
        assert report is not None and [g["gpu"] for g in report["gpus"]] == ["0", "1"]
        names = {name for name, _, _ in ra.series()}
        assert "agentd_gpu_stall_ratio" in names
        assert ra.findings_document()["status"] == "ok"
        ra._report_mono -= ra.stale_after() + 1  # no success since
        names = {name for name, _, _ in ra.series()}
        assert not {n for n in names if n.startswith(("agentd_gpu_", "agentd_finding_"))}
        doc = ra.findings_document()
        assert doc["status"] == "unavailable" and doc["findings"] == []

        ra._child.kill()
        with pytest.raises(AnalysisUnavailable):
            ra.run_once()
        assert ra.errors == 1
        with pytest.raises(AnalysisUnavailable, match="restarting"):
            ra.run_once()  # within the back-off
        ra._next_start = 0.0
        assert ra.run_once() is not None and ra.restarts == 1

        os.kill(ra._child.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(AnalysisUnavailable, match="no answer within"):
            ra.run_once()
        assert time.monotonic() - t0 < 30
        assert ra._child is None and ra.errors == 2
    finally:
        ra.stop()


# --- reading the window through the server --------------------------------------------------------


@pytest.mark.slow
def test_diagnose_and_record_through_the_server(spawn, tmp_path):
    proc, url, port = start(spawn, "--simulate", "input-storage", "--simulate.seed", "3")
    wait_http(url + "/metrics")
    time.sleep(25)
    r = subprocess.run(agentd_cmd("diagnose", "--daemon", url, "--seconds", "20", "--json"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr  # findings
    assert json.loads(r.stdout)["findings"][0]["kind"] == "input_storage"
    out = str(tmp_path / "rec.npz")
    r = subprocess.run(agentd_cmd("record", "--daemon", url, "--duration", "3s", "--out", out),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(agentd_cmd("diagnose", "--recording", out, "--json"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 1), r.stderr
    # The same window as JSON and as npz.
    status, body = get(url + "/api/v1/window?seconds=5&format=json")
    doc = json.loads(body)
    from agentd.daemon.window import load_npz_with_meta

    status, raw = get(url + "/api/v1/window?seconds=5&format=npz")
    groups, meta = load_npz_with_meta(raw)
    assert doc["meta"]["node"] == meta["node"]
    gpu = groups["gpu"]
    assert np.isclose(doc["groups"]["gpu"]["t"][0], gpu["t"][0], atol=1.0)
    assert set(doc["groups"]["gpu"]["columns"]) == set(gpu["columns"])
