"""What the daemon benchmarks share: a node with 8 fake GPUs and a real trainer process tree,
`agentd run` on it, and readings of a process's CPU time and memory from /proc.

Not a benchmark itself: bench/daemon_overhead.py and bench/load.py import it.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time

SCENARIO = """
[[gpus]]
count = 8
step_period_s = 0.4
step_busy_s = 0.3
pcie_rx_bytes_per_second = 3.0e9
pcie_tx_bytes_per_second = 1.0e8
nvlink_rx_bytes_per_second = 2.0e10
nvlink_tx_bytes_per_second = 2.0e10
memory_used_bytes = 6.0e10
processes = [{{ pid = {pid}, memory_bytes = 6.0e10, sm_util = 0.7 }}]
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, float]:
    """(name, user + system CPU seconds) from a /proc/.../stat file."""
    with open(path) as f:
        text = f.read()
    fields = text.rsplit(")", 1)[1].split()
    return text[text.find("(") + 1:text.rfind(")")], (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    return _stat(f"/proc/{pid}/stat")[1]


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of each thread of a process, by thread name (comm; agentd
    names its threads at the OS level: loop-gpu-0.1, loop-host-0.1, analysis, ...), threads
    of one name summed."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            name, seconds = _stat(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue  # the thread ended meanwhile
        out[name] = out.get(name, 0.0) + seconds
    return out


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct child processes of `pid`."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return sorted(set(out))


def process_name(pid: int) -> str:
    """The agentd role of a process: its argv after `-m agentd...`, or its command."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    for i, a in enumerate(argv):
        if a == "-m" and i + 1 < len(argv):
            return argv[i + 1]
    return os.path.basename(argv[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 30.0) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise OSError(f"{path}: HTTP {r.status}")
        return body
    finally:
        conn.close()


def metric(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(prefix)


def trainer_tree(workers: int) -> subprocess.Popen:
    """A stand-in trainer forking `workers` children that sleep (a fed loader's workers wait
    on their queue most of the time), in a session of its own (os.killpg ends it whole)."""
    return subprocess.Popen([sys.executable, "-c",
                             "import os, time\n"
                             f"for _ in range({workers}):\n"
                             "    if os.fork() == 0:\n"
                             "        time.sleep(3600); os._exit(0)\n"
                             "time.sleep(3600)\n"], start_new_session=True)


class Node:
    """A stand-in trainer with 8 data-loader workers (so the process sampler reads a real tree
    of 9 processes at 10 Hz) and `agentd run` with 8 fake GPUs that the trainer "uses"."""

    def __init__(self, *agentd_args: str):
        self.trainer = trainer_tree(8)
        tmp = tempfile.mkdtemp()
        self.scenario = os.path.join(tmp, "gpus.toml")
        with open(self.scenario, "w") as f:
            f.write(SCENARIO.format(pid=self.trainer.pid))
        self.port = free_port()
        self.agent = subprocess.Popen([sys.executable, "-m", "agentd", "run", "--fake-nvml",
                                       self.scenario, "--web.listen-address",
                                       f"127.0.0.1:{self.port}", "--log.level", "warning",
                                       *agentd_args])
        self.pid = self.agent.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                get(self.port, "/metrics", timeout=5)
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("agentd did not answer")

    def metrics(self) -> str:
        return get(self.port, "/metrics").decode()

    def processes(self) -> dict[str, int]:
        """agentd's processes by role: the daemon and any children it started."""
        out = {"agentd": self.pid}
        for c in children(self.pid):
            out[process_name(c)] = c
        return out

    def stop(self) -> None:
        self.agent.terminate()
        try:
            self.agent.wait(10)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
        os.killpg(self.trainer.pid, 9)
        self.trainer.wait()


def write_json(path: str | None, obj) -> None:
    """--json FILE: the figures, for a machine to read."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
