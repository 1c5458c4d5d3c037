"""How fast the OpenMetrics writer turns a fleet into backfill data: N nodes x G GPUs x T
seconds of exporter and/or agentd series at a scrape interval (agentd/sim/openmetrics.py
write_fleet: the step model, then the text), and optionally promtool's backfill of it.

    python bench/cluster_writer.py [--nodes 512] [--gpus 8] [--seconds 3600]
        [--interval 15] [--flavour exporters|agentd|both] [--cpu-cores 8]
        [--out FILE] [--promtool]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import tempfile
import time

from agentd.sim.openmetrics import write_fleet


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=512)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3600.0)
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--flavour", default="exporters", choices=("exporters", "agentd", "both"))
    ap.add_argument("--cpu-cores", type=int, default=None,
                    help="node_cpu_seconds_total for this many cores per node (default all)")
    ap.add_argument("--out", help="keep the file here (default: a temporary one, removed)")
    ap.add_argument("--promtool", action="store_true",
                    help="also time `promtool tsdb create-blocks-from openmetrics`")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="agentd-writer-")
    out = args.out or os.path.join(tmp, "fleet.om")
    try:
        t0 = time.monotonic()
        st = write_fleet(out, args.nodes, args.gpus, args.seconds, args.interval,
                         flavour=args.flavour, cpu_cores=args.cpu_cores)
        wall = time.monotonic() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{args.nodes} nodes x {args.gpus} GPUs x {args.seconds:g} s at "
              f"{args.interval:g} s, {args.flavour}:")
        print(f"  {st['series']:,} series, {st['samples']:,} samples, "
              f"{st['bytes'] / 2**30:.2f} GiB, {len(st['truth'])} jobs")
        print(f"  {st['seconds']:.1f} s CPU ({st['model_seconds']:.1f} s the step model), "
              f"{wall:.1f} s wall, {st['samples'] / st['seconds'] / 1e6:.2f} M samples per "
              f"CPU second, peak RSS {rss:.0f} MiB")
        if args.promtool:
            db = os.path.join(tmp, "tsdb")
            t0 = time.monotonic()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", out, db],
                           check=True, capture_output=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            print(f"  promtool backfill: {cpu:.1f} s CPU, {time.monotonic() - t0:.1f} s wall")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
