from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
sys.path.insert(0, FIXTURES)
sys.path.insert(0, HERE)  # tests/hostile.py, shared with bench/reliability.py

import sysfs  # noqa: E402  (tests/fixtures/sysfs.py)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite golden files from the current output")


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


def fixture_path(*parts: str) -> str:
    return os.path.join(FIXTURES, *parts)


@pytest.fixture(scope="session")
def dgx_sysfs(tmp_path_factory) -> str:
    return sysfs.load("dgx-like", str(tmp_path_factory.mktemp("sys-dgx")))


@pytest.fixture(scope="session")
def vm_sysfs(tmp_path_factory) -> str:
    return sysfs.load("vm-debian12", str(tmp_path_factory.mktemp("sys-vm")))


@pytest.fixture(scope="session")
def dgx_procfs(tmp_path_factory) -> str:
    """The captured VM's /proc with the composed GPU node's disks, mounts and interfaces."""
    dest = str(tmp_path_factory.mktemp("proc-dgx"))
    shutil.copytree(fixture_path("vm-debian12", "proc"), dest, dirs_exist_ok=True)
    shutil.copytree(fixture_path("dgx-like", "proc"), dest, dirs_exist_ok=True)
    return dest


@pytest.fixture
def fake_gpus():
    """Install a fake NVML library built from a scenario dict; uninstalled afterwards."""
    from agentd.gpu.fake import install, library_from_dict, uninstall

    def make(doc: dict, **kwargs):
        return install(library_from_dict(doc, **kwargs))

    yield make
    uninstall()


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> int:
    """The first of n consecutive ports free now, for what serves on a span of ports (a
    simulated job: node K on port + K). Drawn below the kernel's ephemeral range, where
    free_port() and every client connection take theirs, so that another test's server or
    connection is unlikely to take one of them before the span is listened on."""
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(10000, max(low - n, 10001))
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def wait_http(url: str, timeout: float = 10.0, context=None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer: {last}")


class Proc:
    """A child process with its stderr captured to a file, stopped at teardown."""

    def __init__(self, args: list[str], env: dict | None = None, cwd: str | None = None,
                 log=None):
        # `log`: an open file to take stdout and stderr (default: a new temporary file).
        self.log = log or tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})}, cwd=cwd)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self, sig=signal.SIGTERM, timeout: float = 5.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


@pytest.fixture
def spawn():
    procs: list[Proc] = []

    def start(args, **kw) -> Proc:
        p = Proc(args, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop(signal.SIGKILL if p.p.poll() is None else signal.SIGTERM)


def agentd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agentd", *args]


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (bash .ci/run installs it)")
    return path


def self_signed_cert(tmp_path) -> tuple[str, str]:
    """(certificate, key) files of a throw-away certificate for 127.0.0.1."""
    cert, key = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@contextmanager
def backfilled_prometheus(openmetrics, workdir):
    """A real Prometheus serving the OpenMetrics file `openmetrics`, backfilled into
    workdir/tsdb with promtool (the file is removed once backfilled); yields its URL."""
    binary, promtool = need("prometheus"), need("promtool")
    workdir = str(workdir)
    tsdb = os.path.join(workdir, "tsdb")
    r = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(openmetrics),
                        tsdb], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    os.unlink(openmetrics)
    port = free_port()
    cfg = os.path.join(workdir, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write("global:\n  scrape_interval: 15s\n")
    p = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tsdb}",
                          f"--web.listen-address=127.0.0.1:{port}",
                          "--storage.tsdb.retention.time=100000d"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        p.wait(10)
