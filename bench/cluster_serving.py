"""The cost of serving a simulated multi-node job from one process (agentd run
--simulate-cluster): CPU seconds per wall second, per node and per GPU, resident memory,
and the samplers' overruns (ticks skipped because a run took longer than its interval, the
sign that one process serves more nodes than it keeps up with).

    python bench/cluster_serving.py [--nodes 4] [--gpus 8] [--seconds 60] [SCENARIO]

It is what sets agentd/sim/serve.py's MAX_SERVED_NODES; the simulation, the fake drivers,
every node's samplers, windows, rolling analyses and HTTP servers are all counted.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request

from daemon_overhead import cpu_seconds, rss_bytes  # bench/, beside this file


def free_port(span: int) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65535:
            return port


def overruns(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("agentd_sampler_overruns_total{"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("scenario", nargs="?", default="throttled")
    args = ap.parse_args()
    port = free_port(args.nodes)
    proc = subprocess.Popen([sys.executable, "-m", "agentd", "run", "--simulate-cluster",
                             args.scenario, "--simulate.nodes", str(args.nodes),
                             "--simulate.gpus", str(args.gpus), "--web.listen-address",
                             f"127.0.0.1:{port}", "--log.level", "error"])
    try:
        time.sleep(args.warmup)
        ports = [port + k for k in range(args.nodes)]
        over0 = sum(overruns(p) for p in ports)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        over = sum(overruns(p) for p in ports) - over0
        share = (c1 - c0) / (t1 - t0)
        print(f"{args.nodes} nodes x {args.gpus} GPUs ({args.scenario}), one process, "
              f"{t1 - t0:.0f} s:")
        print(f"  CPU: {share:.3f} s per second ({share / args.nodes:.3f} per node, "
              f"{share / (args.nodes * args.gpus):.4f} per GPU)")
        print(f"  resident memory: {rss_bytes(proc.pid) / 2**20:.0f} MiB")
        print(f"  sampler overruns: {over:.0f} in {t1 - t0:.0f} s over all nodes")
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
