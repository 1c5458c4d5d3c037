"""CPU time to simulate one hour of an 8-GPU node, per scenario (goal: under 30 s), and of a
multi-node job (goal: within 2x the single node's CPU per GPU).

    python bench/sim_speed.py [--hours 1] [scenario ...]
    python bench/sim_speed.py --cluster 16 [--gpus 8] [--hours 0.25] [cluster scenario ...]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from agentd.sim import cluster_scenario as CS
from agentd.sim import scenario as S
from agentd.sim.cluster import ClusterSimulator
from agentd.sim.model import Simulator

DEFAULT = ["input-storage", "input-cpu", "straggler", "healthy-8gpu-250ms", "shared-link"]
CLUSTER_DEFAULT = ["healthy", "throttled", "starved-storage", "lossy-link"]


def cluster(args) -> int:
    names = args.scenarios or CLUSTER_DEFAULT
    print(f"simulated {args.hours:g} h of {args.cluster} nodes x {args.gpus} GPUs, 10 ms steps, "
          "run in 60 s chunks")
    worst = 0.0
    for name in names:
        cs = CS.load(name, nodes=args.cluster, gpus=args.gpus)
        sim = ClusterSimulator(cs.spec)
        t0 = time.process_time()
        for _ in range(max(int(args.hours * 60), 1)):
            ct = sim.run(60.0)
        cpu = (time.process_time() - t0) / max(args.hours, 1 / 60)
        per_gpu = cpu / (args.cluster * args.gpus)
        worst = max(worst, per_gpu)
        steps = float(ct.nodes[0].steps[-1].mean())
        print(f"  {name:18s} {cpu:7.1f} s CPU per simulated hour, {per_gpu:5.2f} s per GPU "
              f"({steps:,.0f} steps per rank)")
    print(f"worst: {worst:.2f} s of CPU per GPU per simulated hour (a single 8-GPU node: "
          "its worst above / 8; goal: within 2x)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--cluster", type=int, default=0, metavar="NODES",
                    help="simulate a multi-node job of this many nodes instead")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node with --cluster")
    ap.add_argument("scenarios", nargs="*")
    args = ap.parse_args()
    if args.cluster:
        return cluster(args)
    args.scenarios = args.scenarios or DEFAULT
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
