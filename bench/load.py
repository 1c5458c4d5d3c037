"""Sampling under HTTP load: does `agentd run` (10 Hz, 8 fake GPUs) keep its loops at rate and
its memory flat while clients hammer its endpoint?

    python bench/load.py [--seconds 30] [--scrapers 100] [--window-clients 20]

Phases, each `--seconds` long, one after the other on one daemon:
  idle       no client (the reference rates)
  scrapers   --scrapers connections each fetching /metrics back to back (keep-alive)
  window     --window-clients connections each fetching /api/v1/window?format=json
             (the whole window), back to back
  window-npz the same with format=npz
For each phase it prints the GPU and host loops' rates (from agentd_sampler_runs_total, read
before and after the phase), the requests answered (200), refused (503) and failed, their
latency, and the resident memory of every agentd process (peak during the phase, and after a
settling pause). Goal (issue #10): GPU loop >= 9.8 Hz and RSS <= 80 MiB under either load.
The load generator runs on the same cores as agentd (a worst case: real scrapers are remote).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from harness import Node, get, metric, rss_bytes, write_json


async def _client(port: int, path: str, stop_at: float, stats: dict) -> None:
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n").encode()
    reader = writer = None
    while time.monotonic() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, limit=2**20), 10)
            t0 = time.monotonic()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            length = int(headers.get("content-length", "0"))
            await asyncio.wait_for(reader.readexactly(length), 120)
            stats["latency"].append(time.monotonic() - t0)
            stats[status] = stats.get(status, 0) + 1
            stats["bytes"] += length
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
            if status != 200:
                await asyncio.sleep(0.1)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError,
                IndexError):
            stats["failed"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.1)
    if writer is not None:
        writer.close()


async def _watch_memory(pids: dict[str, int], stop_at: float, peak: dict) -> None:
    while time.monotonic() < stop_at:
        for name, pid in pids.items():
            peak[name] = max(peak.get(name, 0), rss_bytes(pid))
        await asyncio.sleep(0.25)


def _runs(node: Node) -> dict[str, float]:
    """Runs so far per loop, with the wall time of each loop's latest run: the rate is exact
    even though /metrics may be served from a cache up to a second old."""
    for _ in range(50):
        try:
            text = node.metrics()
            break
        except OSError:
            time.sleep(0.1)
    out = {}
    for s in ("gpu", "cpu"):
        out[s] = metric(text, f'agentd_sampler_runs_total{{sampler="{s}"}}')
        out[s + "_t"] = metric(text, f'agentd_sampler_last_success_timestamp_seconds'
                                     f'{{sampler="{s}"}}')
    out["overruns"] = metric(text, 'agentd_sampler_overruns_total{sampler="gpu"}')
    return out


def _tick_intervals(node: Node, seconds: float) -> np.ndarray:
    """Seconds between the GPU loop's rows over the last `seconds`, from the window."""
    from agentd.daemon.window import load_npz

    for _ in range(50):
        try:
            groups = load_npz(get(node.port, f"/api/v1/window?seconds={seconds:.1f}&format=npz"))
            return np.diff(np.asarray(groups["gpu"]["t"]))
        except OSError:
            time.sleep(0.1)
    return np.zeros(0)


def phase(node: Node, name: str, clients: int, path: str, seconds: float) -> dict:
    pids = node.processes()
    stats: dict = {"latency": [], "failed": 0, "bytes": 0}
    peak: dict[str, int] = {}
    r0 = _runs(node)

    async def main() -> None:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(_watch_memory(pids, stop_at, peak),
                             *(_client(node.port, path, stop_at, stats) for _ in range(clients)))

    asyncio.run(main())
    r1 = _runs(node)
    ticks = _tick_intervals(node, r1["gpu_t"] - r0["gpu_t"])
    time.sleep(3)
    after = {n: rss_bytes(p) for n, p in pids.items()}
    lat = sorted(stats["latency"])
    out = {
        "phase": name, "clients": clients, "path": path, "seconds": r1["gpu_t"] - r0["gpu_t"],
        "gpu_hz": (r1["gpu"] - r0["gpu"]) / (r1["gpu_t"] - r0["gpu_t"]),
        "cpu_hz": (r1["cpu"] - r0["cpu"]) / (r1["cpu_t"] - r0["cpu_t"]),
        "gpu_ticks_missed": r1["overruns"] - r0["overruns"],
        "gpu_tick_p99_ms": float(np.percentile(ticks, 99)) * 1e3 if len(ticks) else None,
        "gpu_tick_max_ms": float(ticks.max()) * 1e3 if len(ticks) else None,
        "ok": stats.get(200, 0), "refused": stats.get(503, 0) + stats.get(429, 0),
        "failed": stats["failed"] + sum(v for k, v in stats.items()
                                        if isinstance(k, int) and k not in (200, 503, 429)),
        "mb_served": stats["bytes"] / 1e6,
        "p50_ms": statistics.median(lat) * 1e3 if lat else None,
        "p99_ms": lat[max(int(len(lat) * 0.99) - 1, 0)] * 1e3 if lat else None,
        "rss_peak_mib": {n: v / 2**20 for n, v in peak.items()},
        "rss_after_mib": {n: v / 2**20 for n, v in after.items()},
    }
    return out


def show(r: dict) -> None:
    print(f"{r['phase']:<10} {r['clients']:>3} clients  GPU loop {r['gpu_hz']:5.2f} Hz  "
          f"host loop {r['cpu_hz']:5.2f} Hz  GPU ticks missed {r['gpu_ticks_missed']:.0f}, "
          f"between rows p99 {r['gpu_tick_p99_ms']:.0f} ms, max {r['gpu_tick_max_ms']:.0f} ms")
    if r["clients"]:
        lat = (f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms" if r["p50_ms"] is not None
               else "no answer")
        print(f"           answered {r['ok']}, refused {r['refused']}, failed {r['failed']} "
              f"({r['mb_served']:.0f} MB); {lat}")
    peak = ", ".join(f"{n} {v:.0f}" for n, v in r["rss_peak_mib"].items())
    after = ", ".join(f"{n} {v:.0f}" for n, v in r["rss_after_mib"].items())
    total_peak = sum(r["rss_peak_mib"].values())
    print(f"           RSS MiB peak: {peak} (sum {total_peak:.0f}); 3 s after: {after}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    ap.add_argument("--scrapers", type=int, default=100)
    ap.add_argument("--window-clients", type=int, default=20)
    ap.add_argument("--phases", default="idle,scrapers,window,window-npz")
    ap.add_argument("--warmup", type=float, default=20.0,
                    help="seconds of sampling before the first phase (fills the window)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    plans = {
        "idle": (0, "/metrics"),
        "scrapers": (args.scrapers, "/metrics"),
        "window": (args.window_clients, "/api/v1/window?format=json"),
        "window-npz": (args.window_clients, "/api/v1/window?format=npz"),
    }
    node = Node()
    results = []
    try:
        node.wait_ready()
        time.sleep(args.warmup)
        print(f"agentd run, 10 Hz, 8 fake GPUs; each phase {args.seconds:.0f} s")
        for name in args.phases.split(","):
            clients, path = plans[name]
            r = phase(node, name, clients, path, args.seconds)
            show(r)
            results.append(r)
    finally:
        node.stop()
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
