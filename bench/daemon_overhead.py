"""The daemon's cost on a node: CPU seconds per wall second of `agentd run` at 10 Hz with 8
fake GPUs, its resident memory, and /metrics latency over 1000 scrapes.

    python bench/daemon_overhead.py [--seconds 60] [--scrapes 1000]

Goals (issue #2): <= 2% of one core, <= 80 MiB RSS, scrape p99 <= 10 ms. For scale,
dcgm-exporter has been measured at 15-20% of a core and 71 MiB at its 30 s default interval.
The fake GPUs emulate the driver inside agentd's process, so their cost is counted too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
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


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fake_cpu_seconds(conn) -> float:
    conn.request("GET", "/metrics")
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith("agentd_fake_nvml_cpu_seconds_total "):
            return float(line.split()[1])
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="CPU measurement length")
    ap.add_argument("--scrapes", type=int, default=1000)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    # A stand-in training process with 8 data-loader workers, so the process sampler has a
    # real tree of 9 processes to read at 10 Hz.
    trainer = subprocess.Popen([sys.executable, "-c",
                                "import os, time\n"
                                "for _ in range(8):\n"
                                "    if os.fork() == 0:\n"
                                "        time.sleep(3600); os._exit(0)\n"
                                "time.sleep(3600)\n"], start_new_session=True)
    tmp = tempfile.mkdtemp()
    scenario = os.path.join(tmp, "gpus.toml")
    with open(scenario, "w") as f:
        f.write(SCENARIO.format(pid=trainer.pid))
    port = free_port()
    agent = subprocess.Popen([sys.executable, "-m", "agentd", "run", "--fake-nvml", scenario,
                              "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warning"])
    try:
        conn = None
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/metrics")
                conn.getresponse().read()
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(5)  # warm up: every sampler has run, the window holds data

        f0 = fake_cpu_seconds(conn)
        c0, t0 = cpu_seconds(agent.pid), time.monotonic()
        peak_rss = rss_bytes(agent.pid)
        next_scrape = t0 + 15
        while time.monotonic() - t0 < args.seconds:
            if time.monotonic() >= next_scrape:  # Prometheus-like: one scrape every 15 s
                conn.request("GET", "/metrics")
                conn.getresponse().read()
                next_scrape += 15
            time.sleep(0.5)
            peak_rss = max(peak_rss, rss_bytes(agent.pid))
        elapsed = time.monotonic() - t0
        cpu = (cpu_seconds(agent.pid) - c0) / elapsed
        fake = (fake_cpu_seconds(conn) - f0) / elapsed

        latencies = []
        body = b""
        for _ in range(args.scrapes):
            s = time.perf_counter()
            conn.request("GET", "/metrics")
            body = conn.getresponse().read()
            latencies.append(time.perf_counter() - s)
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        peak_rss = max(peak_rss, rss_bytes(agent.pid))
        series = sum(1 for line in body.decode().splitlines() if line and line[0] != "#")
    finally:
        agent.terminate()
        agent.wait(10)
        os.killpg(trainer.pid, 9)
        trainer.wait()

    figures = {
        "cpu_cores": cpu,
        "fake_driver_cpu_cores": fake,
        "agentd_cpu_cores": cpu - fake,
        "rss_mib": peak_rss / 2**20,
        "scrape_p50_ms": p50 * 1e3,
        "scrape_p99_ms": p99 * 1e3,
        "series": series,
        "seconds": args.seconds,
        "scrapes": args.scrapes,
    }
    print(f"agentd run, 10 Hz, 8 fake GPUs, 9-process trainer tree, all samplers, "
          f"{series} series on /metrics")
    print(f"  CPU      {cpu * 100:6.2f} % of one core over {args.seconds:.0f} s, of which the fake "
          f"driver's emulation {fake * 100:.2f} %")
    print(f"           {(cpu - fake) * 100:6.2f} % agentd's own   (goal <= 2 %)")
    print(f"  RSS      {peak_rss / 2**20:6.1f} MiB peak                 (goal <= 80 MiB)")
    print(f"  /metrics p50 {p50 * 1e3:5.2f} ms, p99 {p99 * 1e3:5.2f} ms over {args.scrapes} "
          f"scrapes (goal p99 <= 10 ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
