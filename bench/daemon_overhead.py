"""The daemon's cost on a node, beside node_exporter's: CPU seconds per wall second of
`agentd run` at 10 Hz with 8 fake GPUs, all its processes counted (sampling, HTTP server,
rolling analysis), and of node_exporter (default collectors) scraped every second by this
benchmark; their resident memory; /metrics latency.

    python bench/daemon_overhead.py [--seconds 60] [--scrape-intervals 15,1]

One phase per agentd scrape interval (15 s, Prometheus' default, then 1 s as node_exporter);
node_exporter is scraped every second throughout. Goal (issue #10): agentd's own CPU <= 1.0%
of one core, the fake driver's emulation excluded (agentd_fake_nvml_cpu_seconds_total; on a
real GPU the driver's own time replaces it), and no more than node_exporter's; <= 80 MiB RSS
for the sampling process. The machine's other load inflates every CPU figure: run it on a
quiet machine, or compare the ratio, which both exporters share.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import subprocess
import time

from harness import (Node, cpu_seconds, free_port, metric, rss_bytes, thread_cpu_seconds,
                     write_json)


class Scraper:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.latencies: list[float] = []

    def __call__(self) -> str:
        t0 = time.perf_counter()
        self.conn.request("GET", "/metrics")
        body = self.conn.getresponse().read()
        self.latencies.append(time.perf_counter() - t0)
        return body.decode()


def measure(node: Node, ne_pid: int, agentd: Scraper, ne: Scraper, seconds: float,
            interval: float, peak: dict) -> dict:
    pids = {**node.processes(), "node_exporter": ne_pid}
    fake0 = metric(agentd(), "agentd_fake_nvml_cpu_seconds_total")
    c0 = {n: cpu_seconds(p) for n, p in pids.items()}
    th0 = thread_cpu_seconds(node.pid)
    t0 = time.monotonic()
    next_agentd = t0 + interval
    agentd.latencies.clear()
    while time.monotonic() - t0 < seconds:
        ne()
        if time.monotonic() >= next_agentd:
            agentd()
            next_agentd += interval
        for n, p in pids.items():
            peak[n] = max(peak.get(n, 0), rss_bytes(p))
        time.sleep(max(1.0 - (time.monotonic() - t0) % 1.0, 0.0))
    elapsed = time.monotonic() - t0
    cpu = {n: (cpu_seconds(p) - c0[n]) / elapsed for n, p in pids.items()}
    threads = {n: (v - th0.get(n, 0.0)) / elapsed
               for n, v in thread_cpu_seconds(node.pid).items()}
    fake = (metric(agentd(), "agentd_fake_nvml_cpu_seconds_total") - fake0) / elapsed
    own = sum(v for n, v in cpu.items() if n != "node_exporter") - fake
    lat = sorted(agentd.latencies[:-1] or agentd.latencies)
    return {"agentd_scrape_interval": interval, "seconds": elapsed, "cpu_cores": cpu,
            "sampling_threads_cpu_cores": threads,
            "fake_driver_cpu_cores": fake, "agentd_own_cpu_cores": own,
            "node_exporter_cpu_cores": cpu["node_exporter"],
            "ratio": own / cpu["node_exporter"] if cpu["node_exporter"] else None,
            "scrape_p50_ms": statistics.median(lat) * 1e3 if lat else None,
            "scrape_max_ms": lat[-1] * 1e3 if lat else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    ap.add_argument("--scrape-intervals", default="15,1",
                    help="agentd's scrape interval in each phase, seconds")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    exe = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exe is None:
        raise SystemExit("node_exporter is not installed (apt-get install "
                         "prometheus-node-exporter)")
    ne_port = free_port()
    ne_proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{ne_port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = Node()
    peak: dict[str, int] = {}
    phases = []
    try:
        node.wait_ready()
        time.sleep(args.warmup)  # every sampler has run, the analysis has run once
        agentd, ne = Scraper(node.port), Scraper(ne_port)
        series = sum(1 for line in agentd().splitlines() if line and line[0] != "#")
        for interval in (float(x) for x in args.scrape_intervals.split(",")):
            phases.append(measure(node, ne_proc.pid, agentd, ne, args.seconds, interval, peak))
    finally:
        node.stop()
        ne_proc.terminate()
        ne_proc.wait(10)

    print(f"agentd run, 10 Hz, 8 fake GPUs, 9-process trainer tree, all samplers, {series} "
          f"series; node_exporter (default collectors) scraped every 1 s; "
          f"{args.seconds:.0f} s per phase")
    print(f"{'agentd scraped every':>22} {'sampling':>9} {'server':>7} {'analysis':>9} "
          f"{'- fake':>7} {'= own':>7} {'node_exp':>9} {'ratio':>6}  /metrics p50")
    for p in phases:
        c = p["cpu_cores"]
        print(f"{p['agentd_scrape_interval']:>20g} s {c.get('agentd', 0) * 100:8.2f}% "
              f"{c.get('agentd.daemon.httpd', 0) * 100:6.2f}% "
              f"{c.get('agentd.daemon.analyst', 0) * 100:8.2f}% "
              f"{p['fake_driver_cpu_cores'] * 100:6.2f}% {p['agentd_own_cpu_cores'] * 100:6.2f}% "
              f"{p['node_exporter_cpu_cores'] * 100:8.2f}% {p['ratio']:6.2f}  "
              f"{p['scrape_p50_ms']:.1f} ms")
    print("  (% of one core; goal: own <= 1.0 % and ratio <= 1)")
    for p in phases:
        top = sorted(p["sampling_threads_cpu_cores"].items(), key=lambda kv: -kv[1])
        print(f"  sampling process by thread, scraped every {p['agentd_scrape_interval']:g} s: "
              + ", ".join(f"{n} {v * 100:.2f}%" for n, v in top if v >= 0.0005)
              + f" (the fake driver's {p['fake_driver_cpu_cores'] * 100:.2f}% is in the "
              "thread that calls it, loop-gpu-*)")
    print("  RSS peak MiB: " + ", ".join(f"{n} {v / 2**20:.1f}" for n, v in peak.items())
          + "  (goal: sampling process <= 80)")
    write_json(args.json, {"series": series, "phases": phases,
                           "rss_peak_mib": {n: v / 2**20 for n, v in peak.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
