"""What the 10 Hz host samplers cost as a node grows: CPU time per tick of the cpu sampler's
/proc/stat parse for 2 to 224 CPUs, and of the process sampler for 8 real process trees
(8 ranks, each with its data-loader workers) of 1 to 13 members.

    python bench/sampler_cost.py [--seconds 10] [--cpus 2,64,224] [--workers 0,4,12]

bench/daemon_overhead.py measures the whole daemon on this machine (2 cores, one 9-process
tree); a GPU node has 100-200 CPUs and 8 ranks with 4-16 workers each, and both samplers'
work grows with those counts. The figures are thread CPU time (clock_gettime
THREAD_CPUTIME: the kernel's time in the reads included) per tick, sampled at 10 Hz with a
sleep between ticks as in the daemon (a sampler's first run after a wake-up costs more
than a second one in the same tick), and the share of one core that makes at 10 Hz.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from harness import trainer_tree, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agentd.paths import Paths  # noqa: E402
from agentd.samplers.base import Context, SharedState  # noqa: E402
from agentd.samplers.cpu import CpuSampler  # noqa: E402
from agentd.samplers.process import ProcessSampler  # noqa: E402


def proc_stat_text(cpus: int, tick: int) -> str:
    """A /proc/stat of `cpus` CPUs, as a 6.1 kernel writes it, `tick` jiffies on."""
    lines = [f"cpu  {1000 * cpus + tick} 20 {300 * cpus} {90000 * cpus + tick} 100 0 50 0 0 0"]
    lines += [f"cpu{i} {1000 + tick * (i % 3)} 2 300 {90000 + tick} 1 0 5 0 0 0"
              for i in range(cpus)]
    lines += ["intr 123456 " + " ".join(["0"] * 600), "ctxt 987654", "btime 1764633600",
              "processes 123456", "procs_running 3", "procs_blocked 0",
              "softirq 1 2 3 4 5 6 7 8 9 10 11"]
    return "\n".join(lines) + "\n"


def cpu_cost(cpus: int, ticks: int) -> float:
    """Seconds of CPU per tick of the cpu sampler on a /proc/stat of `cpus` CPUs (a file in
    a scratch procfs, rewritten between ticks: read with open/read/close, where /proc/stat
    itself is read with one pread)."""
    with tempfile.TemporaryDirectory() as tmp:
        stat = os.path.join(tmp, "stat")
        with open(stat, "w") as f:
            f.write(proc_stat_text(cpus, 0))
        ctx = Context(paths=Paths(tmp, tmp, tmp), fast_interval=0.1, slow_interval=1.0)
        s = CpuSampler(ctx, {})
        s.open()
        spent = 0
        for i in range(1, ticks + 1):
            with open(stat, "w") as f:
                f.write(proc_stat_text(cpus, i))
            time.sleep(0.1)
            t0 = time.thread_time_ns()
            s.sample(time.monotonic(), i % 10 == 0)
            spent += time.thread_time_ns() - t0
        s.close()
    return spent / ticks / 1e9


def start_trees(trees: int, workers: int) -> list[subprocess.Popen]:
    """`trees` trainer processes, each with `workers` children."""
    procs = [trainer_tree(workers) for _ in range(trees)]
    time.sleep(0.5 + 0.05 * trees * workers)  # the children are forked
    return procs


def process_cost(trees: int, workers: int, ticks: int) -> tuple[float, int]:
    """(seconds of CPU per tick, members read per tick) of the process sampler on real trees."""
    procs = start_trees(trees, workers)
    try:
        shared = SharedState(gpu_processes={p.pid: (i,) for i, p in enumerate(procs)})
        ctx = Context(paths=Paths("/proc", "/sys", "/var/log"), fast_interval=0.1,
                      slow_interval=1.0, shared=shared)
        s = ProcessSampler(ctx, {})
        s.open()
        s.sample(time.monotonic(), True)
        spent = 0
        for i in range(ticks):
            time.sleep(0.1)
            t0 = time.thread_time_ns()
            s.sample(time.monotonic(), i % 10 == 0)
            spent += time.thread_time_ns() - t0
        members = sum(len(t.pids) for t in s._trees.values())
        s.close()
        return spent / ticks / 1e9, members
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="sampling time per case")
    ap.add_argument("--cpus", default="2,64,224", help="CPU counts of the /proc/stat cases")
    ap.add_argument("--workers", default="0,4,12", help="workers per rank (8 ranks)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    ticks = max(int(args.seconds * 10), 10)
    out: dict = {"cpu": {}, "process": {}}
    print("cpu sampler, per tick (per-CPU lines parsed every 10th tick):")
    for n in (int(x) for x in args.cpus.split(",")):
        c = cpu_cost(n, ticks)
        out["cpu"][n] = c
        print(f"  {n:4d} CPUs        {c * 1e6:7.0f} us/tick   {c * 10 * 100:5.2f} % of a core at 10 Hz")
    print("process sampler, 8 process trees (one per rank) at 10 Hz, reads included:")
    for w in (int(x) for x in args.workers.split(",")):
        c, members = process_cost(8, w, ticks)
        out["process"][w] = {"seconds_per_tick": c, "members": members}
        print(f"  {w:2d} workers/rank, {members:3d} processes  {c * 1e6:7.0f} us/tick   "
              f"{c * 10 * 100:5.2f} % of a core at 10 Hz   ({c / max(members, 1) * 1e6:.0f} us "
              "per process)")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
