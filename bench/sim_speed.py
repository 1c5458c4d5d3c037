"""CPU time to simulate one hour of an 8-GPU node, per scenario (goal: under 30 s).

    python bench/sim_speed.py [--hours 1] [scenario ...]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from agentd.sim import scenario as S
from agentd.sim.model import Simulator

DEFAULT = ["input-storage", "input-cpu", "straggler", "healthy-8gpu-250ms", "shared-link"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("scenarios", nargs="*", default=DEFAULT)
    args = ap.parse_args()
    print(f"simulated {args.hours:g} h, 10 ms steps, 8 GPUs, run in 60 s chunks")
    worst = 0.0
    for name in args.scenarios:
        sc = S.load(name)
        p = replace(sc.job, gpus=8)
        sim = Simulator(p)
        t0 = time.process_time()
        steps = 0.0
        for _ in range(int(args.hours * 60)):
            tr = sim.run(60.0)
            steps = float(tr.steps[-1].sum())
        cpu = time.process_time() - t0
        worst = max(worst, cpu / args.hours)
        print(f"  {name:22s} {cpu:6.1f} s CPU  ({steps:,.0f} training steps simulated)")
    print(f"worst: {worst:.1f} s of CPU per simulated hour (goal < 30 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
