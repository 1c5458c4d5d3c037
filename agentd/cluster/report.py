"""analyze_fleet(): per-node summaries in, a ranked cluster report out. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agentd.analysis.findings import SEVERITIES, Finding, json_safe, worst_severity
from agentd.cluster.causes import Options, analyze_job
from agentd.cluster.data import Fleet
from agentd.cluster.fleet import rollups


@dataclass
class ClusterReport:
    t0: float
    t1: float
    step: float
    window: float
    source: str
    findings: list[Finding]
    jobs: list[dict]
    rollups: dict
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def worst_severity(self) -> str | None:
        return worst_severity(self.findings)

    def to_json(self) -> dict:
        return json_safe({
            "window": {"start": self.t0, "end": self.t1},
            "resolution_seconds": self.step, "analysis_window_seconds": self.window,
            "source": self.source, "findings": [f.to_json() for f in self.findings],
            "jobs": self.jobs, "fleet": self.rollups, "signals_missing": self.missing,
            "notes": self.notes, "query": self.stats,
        })


def rank(findings: list[Finding]) -> list[Finding]:
    """By the job time each costs (GPU-hours lost), then severity: what to fix first."""
    return sorted(findings, key=lambda f: (-SEVERITIES.index(f.severity) if f.severity ==
                                           "info" else 0,
                                           -float(f.gain.get("job_gpu_hours_lost") or 0.0),
                                           -SEVERITIES.index(f.severity), f.kind,
                                           f.subject.get("node", "")))


def analyze_fleet(fleet: Fleet, opts: Options | None = None, detail=None,
                  price_per_gpu_hour: float | None = None) -> ClusterReport:
    opts = opts or Options()
    findings: list[Finding] = []
    jobs = []
    for job, members in sorted(fleet.jobs().items()):
        f, summary = analyze_job(fleet, job, members, opts, detail)
        seen = np.zeros(len(fleet.t), dtype=bool)
        for m in members:
            seen |= np.isfinite(fleet.gpu["busy_avg"][m]) if "busy_avg" in fleet.gpu else \
                np.zeros(len(fleet.t), dtype=bool)
        summary["gpu_hours"] = float(sum(fleet.members[m].gpus * np.isfinite(
            fleet.gpu["busy_avg"][m]).sum() for m in members) * fleet.step / 3600) \
            if "busy_avg" in fleet.gpu else 0.0
        summary["findings"] = len(f)
        summary["nodes_list"] = [fleet.members[m].node for m in members]
        jobs.append(summary)
        findings += f
    findings = rank(findings)
    roll = rollups(findings, jobs, fleet.price_per_gpu_hour, price_per_gpu_hour, fleet.models)
    notes = list(fleet.notes)
    if not fleet.activity:
        notes.append("no compute-activity series (DCGM_FI_PROF_PIPE_TENSOR_ACTIVE or "
                     "SM_ACTIVE, agentd's GPM counters): a throttled node is told by its "
                     "clocks alone, and a slower GPU at normal clocks cannot be seen")
    t0 = float(fleet.t[0] - fleet.step) if len(fleet.t) else 0.0
    t1 = float(fleet.t[-1]) if len(fleet.t) else 0.0
    return ClusterReport(t0, t1, fleet.step, opts.window_steps * fleet.step, fleet.source,
                         findings, jobs, roll, notes, list(fleet.missing), dict(fleet.stats))
