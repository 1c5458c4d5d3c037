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
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids = f.read().split()
        except OSError:  # that thread ended meanwhile
            continue
        for c in kids:
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


def test_no_request_is_dropped_while_reloads_replace_the_server_process(spawn, scenario):
    """Clients opening connection after connection while SIGHUP replaces the server process
    three times: each request is answered, by the old process or the new one (a connection
    the old one accepted just before it was told to drain is served, not reset)."""
    proc, url, port = start(spawn, "--fake-nvml", scenario)
    wait_http(url + "/metrics")
    stop = threading.Event()
    results: list = []

    def client() -> None:
        while not stop.is_set():
            try:
                results.append(get(url + "/api/v1/status")[0])
            except OSError as e:  # reset, refused, or no answer within 10 s
                results.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            before = children(proc.p.pid, "agentd.daemon.httpd")
            proc.p.send_signal(signal.SIGHUP)
            wait_for(lambda: [c for c in children(proc.p.pid, "agentd.daemon.httpd")
                              if c not in before], 20, "no new server process after SIGHUP")
            wait_for(lambda: len(children(proc.p.pid, "agentd.daemon.httpd")) == 1, 20,
                     "the replaced server process did not exit")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and set(results) == {200}, [r for r in results if r != 200][:5]


GARBAGE_CHILD = """
import os, socket, struct, sys, time
from agentd.daemon.child import Channel, child_args

args = child_args(None, lambda p: [p.add_argument(a) for a in
                                   ("--listen-fd", "--web-config", "--routes")])
ch = Channel(socket.socket(fileno=args.channel_fd))
ch.send(0, {"op": "hello"})
if os.environ["GARBAGE"] == "huge":
    # A frame that claims almost a gigabyte, and never sends it.
    ch.sock.sendall(struct.pack("<IIQ", 1, 2, 2**30 - 1) + b"{}")
else:
    ch.sock.sendall(b"\\x01\\x00\\x00\\x00\\x05\\x00\\x00\\x00" + bytes(8) + b"{oops")
time.sleep(3600)
"""


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _web_server(window=None, **kw):
    from agentd.daemon.web import WebServer, json_response
    from agentd.daemon.window import groups_to_npz

    empty = groups_to_npz({}, {"node": "test"}, compress=False)
    routes = {"/api/v1/status": lambda q: json_response({"ok": True})}
    return WebServer("127.0.0.1", 0, "", routes, lambda: b"up 1\n",
                     window or (lambda s: (empty, {"window_seconds": 60})), False, "info",
                     **kw)


def _supervise_until(server, predicate, timeout: float, message: str):
    def step():
        server.supervise()
        return predicate()

    return wait_for(step, timeout, message)


@pytest.mark.parametrize("garbage", ["huge", "bad-header"])
def test_server_process_writing_garbage_is_replaced(tmp_path, monkeypatch, garbage):
    """A server process that writes garbage on its channel (a frame claiming a gigabyte, or
    a header that is not JSON) and lives on is killed and replaced with back-off; the
    sampling process neither allocates what the frame claims nor stops reading."""
    (tmp_path / "garbage_httpd.py").write_text(GARBAGE_CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("GARBAGE", garbage)
    server = _web_server()
    server.module = "garbage_httpd"
    rss0 = _rss()
    server.start()
    try:
        first = server.pid()
        _supervise_until(server, lambda: server.restarts >= 1, 20,
                         "the server process was not replaced")
        assert not os.path.exists(f"/proc/{first}/cmdline") or \
            open(f"/proc/{first}/stat").read().split()[2] == "Z"
        # The replacement writes garbage too: replaced again, after a longer back-off.
        _supervise_until(server, lambda: server.restarts >= 2, 20,
                         "the second server process was not replaced")
        assert server._backoff.delay >= 2.0
        assert _rss() - rss0 < 100 * 2**20
    finally:
        server.stop()


def test_server_process_hung_is_replaced():
    """A server process that stops (SIGSTOP: its event loop sends nothing) is killed once
    silent for hang_seconds, and a new one serves the same socket."""
    server = _web_server()
    server.start()
    try:
        wait_for(lambda: server.stats, 10, "no counters from the server process")
        hung = server.pid()
        server.hang_seconds = 3.0
        os.kill(hung, signal.SIGSTOP)
        _supervise_until(server, lambda: server.pid() not in (hung, None), 30,
                         "the hung server process was not replaced")
        status, body = get(f"http://127.0.0.1:{server.port}/metrics")
        assert (status, body) == (200, b"up 1\n")
        assert server.restarts == 1
    finally:
        server.stop()


def test_window_exports_are_bounded_whatever_lengths_clients_ask():
    """Answers are cached per length for 0.25 s; clients asking for many different lengths
    would each cost the sampling process a copy of the window. It exports at most 4 a second
    (a burst of 4), and answers 503 with Retry-After beyond. Every request is answered at
    once, however many are in flight to the sampling process together (each answer reaches
    its own request)."""
    from agentd.daemon.window import groups_to_npz

    empty = groups_to_npz({}, {"node": "test"}, compress=False)
    calls = []

    def window(seconds):
        calls.append(seconds)
        return empty, {"window_seconds": 60}

    server = _web_server(window)
    server.start()
    codes: list[int] = []
    headers: list[str | None] = []

    def client(n: int) -> None:
        for k in range(10):
            url = (f"http://127.0.0.1:{server.port}/api/v1/window?format=npz"
                   f"&seconds={n * 10 + k + 1}")
            try:
                with urllib.request.urlopen(url, timeout=30) as r:
                    codes.append(r.status)
            except urllib.error.HTTPError as e:
                codes.append(e.code)
                headers.append(e.headers.get("Retry-After"))
            except OSError as e:  # no answer within 30 s
                codes.append(repr(e))

    try:
        wait_for(lambda: server.stats, 10, "the server process did not start")
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
    finally:
        server.stop()
    assert len(codes) == 200 and set(codes) <= {200, 503}, codes
    assert len(calls) <= 4 + 4 * elapsed + 1, f"{len(calls)} exports in {elapsed:.1f} s"
    assert codes.count(200) == len(calls) and headers and set(headers) == {"1"}


def test_http_counters_never_go_back_when_the_server_process_restarts(spawn, scenario):
    proc, url, port = start(spawn, "--fake-nvml", scenario)
    wait_http(url + "/metrics")
    for _ in range(20):
        assert get(url + "/-/healthy")[0] == 200
    reaches(url, 'agentd_http_requests_total{code="200"}', 20)
    before = value(metrics(url), 'agentd_http_requests_total{code="200"}')
    (web,) = children(proc.p.pid, "agentd.daemon.httpd")
    os.kill(web, signal.SIGKILL)
    wait_for(lambda: children(proc.p.pid, "agentd.daemon.httpd") not in ([web], []), 20,
             "the server process was not restarted")
    # The new process reports its own counters (from 0) within 2 s.
    time.sleep(3)
    after = value(metrics(url), 'agentd_http_requests_total{code="200"}')
    assert after >= before


@pytest.mark.parametrize("garbage", ["huge", "bad-header"])
def test_analysis_process_writing_garbage_is_replaced(tmp_path, monkeypatch, garbage):
    """An analysis process that answers garbage (a frame claiming a gigabyte, or a header
    that is not JSON) fails that run at once: it is killed and counted, the next is started
    after a back-off, and the sampling process never allocates what the frame claims."""
    import resource
    from dataclasses import replace

    from agentd.daemon.config import Config, _default_collectors
    from agentd.daemon.core import Daemon
    from agentd.daemon.rolling import AnalysisUnavailable, RollingAnalysis

    (tmp_path / "garbage_analyst.py").write_text(GARBAGE_CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("GARBAGE", garbage)
    d = Daemon(replace(Config(collectors=_default_collectors()), analysis_interval=1.0))
    ra = RollingAnalysis(d, deadline=20.0)
    ra.module = "garbage_analyst"
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ra._start_child()
    first = ra._child
    try:
        t0 = time.monotonic()
        with pytest.raises(AnalysisUnavailable, match="failed"):
            ra.run_once()
        assert time.monotonic() - t0 < 15  # at once, not at the deadline
        assert ra._child is None and ra.errors == 1 and first.proc.poll() is not None
        assert ra._next_start > time.monotonic() - 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert peak - peak0 < 100 * 2**20
    finally:
        ra.stop()


def test_analysis_process_that_stops_reading_misses_its_deadline():
    """A stopped analysis process takes no more of a window slice than the socket buffers:
    sending the rest is under the run's deadline too, so the run fails and the process is
    replaced instead of the analysis waiting for ever."""
    from dataclasses import replace

    from agentd.daemon.config import Config, _default_collectors
    from agentd.daemon.core import Daemon
    from agentd.daemon.rolling import AnalysisUnavailable, RollingAnalysis

    cfg = replace(Config(collectors=_default_collectors()), analysis_interval=1.0,
                  analysis_window=300.0)
    d = Daemon(cfg)
    ring = d.window.ring("gpu", 0.1)
    now = time.time()
    for i in range(3000):  # 8 GPUs x 8 signals x 300 s: ~800 kB, more than a socket buffers
        ring.append(now - 300 + i * 0.1, {f"gpu.s{k}:{g}": float(i % 10) for g in range(8)
                                          for k in range(8)})
    ra = RollingAnalysis(d, deadline=2.0)
    ra._start_child()
    ra._child.ready = True  # its first run gets no start-up allowance
    os.kill(ra._child.pid, signal.SIGSTOP)
    outcome = []

    def run():
        try:
            ra.run_once()
            outcome.append("answered")
        except AnalysisUnavailable as e:
            outcome.append(str(e))

    t = threading.Thread(target=run, daemon=True)
    try:
        t.start()
        t.join(30)
        assert not t.is_alive(), "the run still waits for the stopped process"
        assert "failed" in outcome[0] and ra._child is None and ra.errors == 1
    finally:
        ra.stop()


def test_analysis_process_whose_parent_closes_the_channel_exits_quietly():
    """The daemon closes the channel, then sends SIGTERM, when it stops or gives up on a
    run: a child then importing or answering hit the closed socket and printed a traceback
    the SIGTERM cut off (CI, tests/test_systemd_unit.py under load). Now it ends, exit 0,
    with nothing on stderr."""
    import subprocess
    import sys

    parent, child = socket.socketpair()
    p = subprocess.Popen([sys.executable, "-m", "agentd.daemon.analyst", "--channel-fd",
                          str(child.fileno()), "--parent-pid", str(os.getpid())],
                         pass_fds=(child.fileno(),), stderr=subprocess.PIPE, text=True)
    child.close()
    parent.close()  # before its hello: the send fails
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "Traceback" not in err, err


@pytest.mark.slow
def test_analysis_process_killed_or_hung_is_restarted(spawn, scenario):
    proc, url, port = start(spawn, "--fake-nvml", scenario, "--analysis.interval", "1s",
                            "--analysis.window", "10s")
    wait_http(url + "/metrics")

    def runs() -> float:
        return value(metrics(url), "agentd_analysis_runs_total")

    # A report is served while current (three 1 s intervals here): on a loaded machine the
    # niced analysis process may miss that between runs, so wait for one being served.
    wait_for(lambda: "agentd_gpu_stall_ratio{" in metrics(url), 60, "the analysis never ran")
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


def test_schedule_runs_when_a_level_moves_or_a_warning_is_held_and_else_waits():
    """The rolling analysis' schedule: the first look runs; while every GPU's levels stay
    where the last run saw them (busy share and SM activity within 2 points, SM clock within
    2%, power within 5%) and no finding is held at warning, the report stands as long as the
    next look stays within max_interval of the last run; a level that moves (a throttle:
    the clock down 5% at the same busy share), a GPU appearing or going silent (nan), or a
    warning runs it at once."""
    from agentd.daemon.rolling import Schedule, levels

    t = np.arange(100) * 0.1
    got = levels({("gpu.busy_time", "0"): (t, np.full(100, 0.9)),
                  ("gpu.busy_time", "1"): (t, np.where(t >= 9.0, 0.2, 0.9)),
                  ("gpu.busy_time", "2"): (t, np.full(100, np.nan)),
                  # read a row later than the others: each column with its own times
                  ("gpu.sm_clock", "0"): (np.append(t, 10.0), np.full(101, 1.98e9))},
                 since=9.0)
    assert got[("gpu.busy_time", "0")] == pytest.approx(0.9)
    assert got[("gpu.busy_time", "1")] == pytest.approx(0.2)
    assert np.isnan(got[("gpu.busy_time", "2")])
    assert got[("gpu.sm_clock", "0")] == pytest.approx(1.98e9)

    quiet = {"findings": [{"kind": "unexplained_idle", "severity": "info"}]}
    s = Schedule(interval=10.0, max_interval=30.0)
    steady = {("gpu.busy_time", "0"): 0.90, ("gpu.busy_time", "1"): 0.80,
              ("gpu.sm_clock", "0"): 1.98e9, ("gpu.power", "0"): 600.0}

    def at(**changes):
        return {**steady, **{(k.split("__")[0].replace("_", ".", 1), k.split("__")[1]): v
                             for k, v in changes.items()}}

    assert s.due(0.0, steady, None)
    s.ran(0.0, steady)
    assert not s.due(10.0, at(gpu_busy_time__0=0.91, gpu_busy_time__1=0.785,
                              gpu_sm_clock__0=1.96e9, gpu_power__0=580.0), quiet)
    assert not s.due(20.0, steady, quiet)
    assert s.due(30.0, steady, quiet)  # max_interval: every third look
    assert s.due(10.0, at(gpu_busy_time__1=0.78), quiet)  # 2 points
    assert s.due(10.0, at(gpu_sm_clock__0=1.88e9), quiet)  # a throttle: 5% slower
    assert s.due(10.0, at(gpu_power__0=520.0), quiet)
    assert s.due(10.0, at(gpu_busy_time__1=float("nan")), quiet)
    # A channel the GPU never fills (SM activity without GPM) stays nan: nothing moved.
    s.ran(0.0, {**steady, ("gpu.sm_active", "0"): float("nan")})
    assert not s.due(10.0, {**steady, ("gpu.sm_active", "0"): float("nan")}, quiet)
    assert s.due(10.0, {**steady, ("gpu.sm_active", "0"): 0.4}, quiet)
    s.ran(0.0, steady)
    fewer = dict(steady)
    del fewer[("gpu.busy_time", "1")]
    assert s.due(10.0, fewer, quiet) and s.due(10.0, {**steady, ("gpu.busy_time", "2"): 0.0},
                                                quiet)
    assert s.due(10.0, steady, {"findings": [{"kind": "input_cpu", "severity": "warning"}]})
    assert s.due(10.0, steady, None)  # no report: always
    assert Schedule(interval=60.0, max_interval=30.0).max_interval == 60.0
    # Runs never further apart than max_interval: 15 s with looks every 10 s is every look.
    s = Schedule(interval=10.0, max_interval=15.0)
    s.ran(0.0, steady)
    assert s.due(10.0, steady, quiet)


def test_a_steady_node_keeps_its_report_and_a_change_is_analysed_at_once():
    """In process, with a real analysis process: a look that finds every GPU's busy share
    where the last run left it skips the run (counted in agentd_analysis_skipped_total) and
    keeps the report current; a GPU whose busy share drops runs it at once; after a failed
    run the next look runs again, and no look keeps a report alive without a run."""
    from dataclasses import replace

    from agentd.daemon.config import Config, _default_collectors
    from agentd.daemon.core import Daemon
    from agentd.daemon.rolling import AnalysisUnavailable, RollingAnalysis

    cfg = replace(Config(collectors=_default_collectors()), analysis_interval=1.0,
                  analysis_max_interval=30.0, analysis_window=30.0)
    d = Daemon(cfg)
    ring = d.window.ring("gpu", 0.1)
    clock = [time.time() - 30.0]
    d.clock = lambda: clock[0]  # the window's time moves as its rows come, not faster

    def rows(seconds: float, busy1: float) -> None:
        for i in range(int(round(seconds * 10))):
            clock[0] += 0.1
            row = {}
            for g in range(2):
                b = busy1 if g == 1 else 0.9
                row[f"gpu.busy:{g}"] = b
                row[f"gpu.busy_time:{g}"] = b
            ring.append(clock[0], row)

    rows(30.0, 0.9)
    ra = RollingAnalysis(d, deadline=20.0)
    ra._start_child()
    try:
        ra.look()
        assert ra.runs == 1 and ra.skipped == 0
        made = ra._report_mono
        rows(1.0, 0.9)  # the last second as steady as before
        ra.look()
        assert ra.runs == 1 and ra.skipped == 1
        assert ra.current() is not None and ra._report_mono >= made
        assert ("agentd_analysis_skipped_total", (), 1.0) in ra.series()
        rows(2.0, 0.5)  # GPU 1 now waits half of its time
        ra.look()
        assert ra.runs == 2 and ra.skipped == 1

        # The analysis process dies just after a run, the node as steady as then: the next
        # look must not keep the report current (it finds the process gone).
        rows(1.0, 0.5)
        ra.look()
        assert ra.runs == 2 and ra.skipped == 2
        ra._child.kill()
        ra._child.proc.wait(10)
        made = ra._report_mono
        rows(1.0, 0.5)
        with pytest.raises(AnalysisUnavailable):
            ra.look()
        assert ra._report_mono == made and ra.skipped == 2
        with pytest.raises(AnalysisUnavailable, match="restarting"):
            ra.look()  # runs again (within the back-off), never skips
        assert ra.skipped == 2
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
