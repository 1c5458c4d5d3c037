"""How a diagnosis reads to people: the text report (JSON is Report.to_json)."""

from __future__ import annotations

import math
import time

from agentd.analysis.core import Report
from agentd.analysis.findings import KINDS


def render_text(r: Report) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.t0)) if r.t0 else "?"
    lines = [f"agentd diagnose: node {r.node or '?'}, {r.t1 - r.t0 + r.resolution:.0f} s from "
             f"{when}, {r.source}, one sample every {r.resolution:g} s", ""]
    if r.gpus:
        lines.append("GPU  busy  computing  stall  step period")
        for g in r.gpus:
            comp = f"{g.computing * 100:5.0f}%" if g.computing is not None else "    -  "
            per = f"{g.step_period_seconds:.3f} s" if g.step_period_seconds else "-"
            if g.step_period_seconds and g.step_jitter_seconds:
                per += f" (jitter {g.step_jitter_seconds * 1000:.0f} ms)"
            lines.append(f"{g.gpu:>3}  {g.busy * 100:3.0f}%    {comp}   {g.stall * 100:3.0f}%  {per}")
        lines.append("")
    if r.throughput:
        parts = [f"{v:,.2f} {k.replace('_', ' ')}" for k, v in r.throughput.items()]
        lines.append("throughput: " + ", ".join(parts))
        lines.append("")
    if not r.findings:
        lines.append("No finding: the GPUs are not starved in this window.")
    for n, f in enumerate(r.findings, 1):
        gpus = f.subject.get("gpus")
        lines.append(f"{n}. [{f.severity.upper()}] {KINDS.get(f.kind, f.kind)} ({f.kind})"
                     f" on GPU {','.join(map(str, gpus)) if gpus else '-'}, confidence "
                     f"{f.confidence:.2f}")
        lines.append(f"   {f.summary}.")
        g = f.gain
        gain = f"   expected gain: {g.get('speedup', 1):.2f}x steps per second"
        if g.get("busy_now") == g.get("busy_now") and g.get("busy_after") == g.get("busy_after"):
            gain += f" (busy {g['busy_now'] * 100:.0f}% -> ~{g['busy_after'] * 100:.0f}%"
            if g.get("step_time_change") is not None:
                gain += f", step time {g['step_time_change'] * 100:+.0f}%"
            gain += ")"
        lines.append(gain)
        ev = ", ".join(f"{k}={_fmt(v)}" for k, v in f.evidence.items())
        lines.append(f"   evidence: {ev}")
        procs = f.subject.get("processes")
        if procs:
            who = "; ".join(" ".join(f"{k}={v}" for k, v in p.items()) for p in procs[:4])
            lines.append(f"   processes: {who}")
        for a in f.advice:
            lines.append(f"   - {a}")
        lines.append("")
    if r.lost_gpu_hours:
        cost = f" (cost {r.lost_cost:,.2f})" if r.lost_cost is not None else ""
        lines.append(f"GPU time lost in this window: {r.lost_gpu_hours:.3f} GPU-hours{cost}")
    for note in r.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if abs(v) >= 1e6:
            return f"{v:.3g}"
        return f"{v:.3f}"
    return str(v)


