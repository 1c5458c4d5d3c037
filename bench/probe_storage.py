"""Storage ceilings: `agentd probe`'s two readers (fio, and its own O_DIRECT threads) against
a plain `fio --direct=1` on the same disk.

    python bench/probe_storage.py [--dir /var/tmp] [--rounds 7] [--seconds 1.5]

For sequential 1 MiB and random 4 KiB reads at queue depths 1, 8 and 32, prints the median
throughput and IOPS of each over the rounds (the three take turns at going first, since the
disk is shared) and the ratios. Goal (issue #9): each within 15% of fio --direct=1 and of
each other. tests/test_probe.py runs three of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from agentd.probe import storage  # noqa: E402
from agentd.probe.blockdev import block_device  # noqa: E402


def fio_direct(target: storage.Target, spec: storage.RunSpec) -> float:
    """IOPS of `fio --direct=1` as anyone would run it by hand: the reference."""
    r = subprocess.run(["fio", "--name=reference", f"--filename={target.path}", "--readonly",
                        "--direct=1", f"--size={target.size}",
                        "--rw=" + ("read" if spec.pattern == "seq" else "randread"),
                        f"--bs={spec.block}", "--ioengine=libaio",
                        f"--iodepth={spec.queue_depth}", "--time_based",
                        f"--runtime={spec.seconds}s", "--ramp_time=0.5s",
                        "--output-format=json"], capture_output=True, text=True, timeout=120)
    return float(json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read"]["iops"])


def compare(target: storage.Target, specs: list[storage.RunSpec], rounds: int) -> list[dict]:
    """Per spec: the median IOPS of fio --direct=1, our fio reader and our threads."""
    fio, threads = storage.FioReader(), storage.ThreadReader()
    methods = [lambda s: fio_direct(target, s), lambda s: fio.run(target, s).iops,
               lambda s: threads.run(target, s).iops]
    rows = []
    for spec in specs:
        runs: list[list[float]] = [[], [], []]
        for k in range(rounds):
            for m in [(k + i) % 3 for i in range(3)]:
                runs[m].append(methods[m](spec))
        ref, ours_fio, ours_threads = (statistics.median(r) for r in runs)
        rows.append({"pattern": spec.pattern, "queue_depth": spec.queue_depth,
                     "block": spec.block, "fio_direct": ref, "probe_fio": ours_fio,
                     "probe_threads": ours_threads, "fio_ratio": ours_fio / ref,
                     "threads_ratio": ours_threads / ref,
                     "threads_vs_fio": ours_threads / ours_fio,
                     # How much plain fio itself moved between rounds: the noise floor.
                     "fio_direct_spread": (max(runs[0]) - min(runs[0])) / ref})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=1.5, help="per run, after a 0.5 s ramp")
    args = p.parse_args()
    dev = block_device(args.dir)
    work = os.path.join(args.dir, f"agentd-bench-probe-{os.getpid()}")
    os.makedirs(work)
    try:
        target = storage.create_test_file(work, 512 << 20, time.monotonic() + 60)
        rows = compare(target, storage.plan(args.seconds), args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{dev.name} ({args.dir}), {args.rounds} rounds of {args.seconds:g} s, "
          f"{time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f}")
    print("| reads | queue depth | fio --direct=1 (spread) | probe (fio) | probe (threads) | "
          "fio / ref | threads / ref | threads / fio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        scale = r["block"] / 1e6 if r["pattern"] == "seq" else 1e-3
        unit = "MB/s" if r["pattern"] == "seq" else "k IOPS"
        what = "sequential 1 MiB" if r["pattern"] == "seq" else "random 4 KiB"
        print(f"| {what} | {r['queue_depth']} | {r['fio_direct'] * scale:.0f} {unit} "
              f"(±{r['fio_direct_spread'] * 50:.0f}%) | "
              f"{r['probe_fio'] * scale:.0f} {unit} | {r['probe_threads'] * scale:.0f} {unit} | "
              f"{r['fio_ratio']:.2f} | {r['threads_ratio']:.2f} | {r['threads_vs_fio']:.2f} |")
    ok = all(0.85 <= r[k] <= 1 / 0.85 for r in rows
             for k in ("fio_ratio", "threads_ratio", "threads_vs_fio"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
