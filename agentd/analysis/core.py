"""analyze(): signals in, a ranked diagnosis out. Pure: no I/O, no clock, no globals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from agentd.analysis import detectors as D
from agentd.analysis.findings import SEVERITIES, Finding, json_safe
from agentd.analysis.signals import Signals


@dataclass
class Options:
    samples_per_step: float | None = None  # to turn steps/s into samples/s
    tokens_per_step: float | None = None
    price_per_gpu_hour: float | None = None  # to cost the GPU time lost


@dataclass
class GpuSummary:
    gpu: str
    busy: float
    computing: float | None
    stall: float
    step_period_seconds: float | None
    step_jitter_seconds: float | None
    steps_per_second: float | None


@dataclass
class Report:
    node: str
    t0: float
    t1: float
    resolution: float
    source: str
    findings: list[Finding]
    gpus: list[GpuSummary]
    notes: list[str] = field(default_factory=list)
    lost_gpu_hours: float = 0.0
    lost_cost: float | None = None
    throughput: dict = field(default_factory=dict)

    def worst_severity(self) -> str | None:
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITIES.index)

    def to_json(self) -> dict:
        return json_safe({
            "node": self.node, "window": {"start": self.t0, "end": self.t1},
            "resolution_seconds": self.resolution, "source": self.source,
            "findings": [f.to_json() for f in self.findings],
            "gpus": [dict(g.__dict__) for g in self.gpus],
            "lost_gpu_hours": self.lost_gpu_hours, "lost_cost": self.lost_cost,
            "throughput": self.throughput,
            "notes": self.notes,
        })


def analyze(sig: Signals, options: Options | None = None, node: str = "") -> Report:
    options = options or Options()
    ev = D.measure(sig, node)
    findings: list[Finding] = []
    for detector in D.NODE_DETECTORS:
        findings += detector(ev)
    # A throttled GPU that also straggles: the throttling is the cause, the straggling the
    # consequence; keep both, the cause first when the gains tie.
    findings.sort(key=lambda f: (-f.speedup, -SEVERITIES.index(f.severity), f.kind))
    gpus = []
    for g in ev.gpus:
        period, jitter = ev.period[g]
        gpus.append(GpuSummary(g, ev.busy[g], ev.compute[g], ev.stall[g], period, jitter,
                               1.0 / period if period else None))
    periods = [s.step_period_seconds for s in gpus if s.step_period_seconds]
    throughput: dict = {}
    if periods:
        steps = 1.0 / float(np.median(periods))
        throughput["steps_per_second"] = steps
        if options.samples_per_step:
            throughput["samples_per_second"] = steps * options.samples_per_step
        if options.tokens_per_step:
            throughput["tokens_per_second"] = steps * options.tokens_per_step
    hours = (ev.t1 - ev.t0 + sig.resolution) / 3600 if len(sig.t) else 0.0
    lost = sum(max(f.stall_fraction, 0.0) * len(f.subject.get("gpus", [])) * hours
               for f in findings)
    return Report(
        node=ev.node, t0=ev.t0, t1=ev.t1, resolution=sig.resolution, source=sig.source,
        findings=findings, gpus=gpus, notes=ev.notes, lost_gpu_hours=lost,
        lost_cost=lost * options.price_per_gpu_hour if options.price_per_gpu_hour else None,
        throughput=throughput)


RECENT_SECONDS = 20.0


def analyze_rolling(sig: Signals, options: Options | None = None, node: str = "",
                    recent: float = RECENT_SECONDS) -> Report:
    """The daemon's view: the whole window, plus what its last `recent` seconds show that the
    whole window does not yet (a problem that just began is diluted in a longer window)."""
    report = analyze(sig, options, node)
    if len(sig.t) == 0 or sig.duration <= recent * 1.5:
        return report
    short = analyze(sig.slice(sig.t[-1] - recent, sig.t[-1]), options, node)
    known = {(f.kind, tuple(f.subject.get("gpus", []))) for f in report.findings}
    fresh = [f for f in short.findings if (f.kind, tuple(f.subject.get("gpus", []))) not in known
             and f.kind != "idle_allocated"]
    for f in fresh:
        f.evidence = {**f.evidence, "onset": f"within the last {recent:.0f} s"}
        f.confidence = round(f.confidence * 0.9, 2)
    if fresh:
        # Recent problems first: the whole window still averages them with the time before.
        report.findings = sorted(fresh, key=lambda f: -f.speedup) + report.findings
    return report
