"""`agentd diagnose --prometheus URL --cluster`: read the per-node summaries, analyse every
job, report; exit codes as for diagnose (agentd/diagnose/__init__.py)."""

from __future__ import annotations

import json
import sys
import time

from agentd.analysis.findings import SEVERITIES
from agentd.cluster.causes import Options
from agentd.cluster.report import ClusterReport, analyze_fleet

EXPLAINED = ("throttled", "slow_gpu")  # findings whose evidence names power and temperature


def exit_status(r: ClusterReport, fail_on: str) -> int:
    from agentd.diagnose import EXIT_FINDINGS, EXIT_OK

    worst = r.worst_severity()
    if worst is None or SEVERITIES.index(worst) < SEVERITIES.index(fail_on):
        return EXIT_OK
    return EXIT_FINDINGS


def report_and_exit(source, args, window: float) -> int:
    from agentd.cluster.render import render_text

    fleet, detail = source.read()
    k = max(int(round(window / fleet.step)), 2)
    t = time.process_time()
    r = analyze_fleet(fleet, Options(window_steps=k), detail, args.price_per_gpu_hour)
    # The families that only explain a finding (power, temperature) come for the flagged
    # nodes alone; the detectors do not read them, so the second pass finds the same.
    flagged = {f.subject["node"] for f in r.findings if f.kind in EXPLAINED}
    if flagged and source.evidence(fleet, flagged):
        r = analyze_fleet(fleet, Options(window_steps=k), detail, args.price_per_gpu_hour)
    r.stats = dict(fleet.stats)
    r.stats.setdefault("phases", {})["analysis_cpu"] = round(time.process_time() - t, 3)
    if args.plot:
        from agentd.cluster.plot import plot

        plot(fleet, r, args.plot)
    if args.json:
        sys.stdout.write(json.dumps(r.to_json(), indent=1, allow_nan=False) + "\n")
    else:
        sys.stdout.write(render_text(r))
    return exit_status(r, args.fail_on)
