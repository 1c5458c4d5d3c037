"""How a diagnosis reads to people: the text report (JSON is Report.to_json)."""

from __future__ import annotations

import math
import time

from agentd.analysis.core import Report
from agentd.analysis.findings import KINDS


def _pct(x: float | None, width: int = 4) -> str:
    if x is None or x != x:
        return "-".rjust(width)
    return f"{x * 100:.0f}%".rjust(width)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t)) if t else "?"


def _period(g) -> str:
    if g.lost:
        return "lost"
    if not g.step_period_seconds:
        return f"- ({g.step_period_note})" if g.step_period_note else "-"
    lo, hi = g.step_period_interval or (None, None)
    if lo and hi:
        return f"{g.step_period_seconds:.3f} s ({lo:.3f}-{hi:.3f})"
    return f"{g.step_period_seconds:.3f} s"


def render_text(r: Report) -> str:
    span = r.t1 - r.t0 + r.resolution
    covered = f", {r.covered_seconds:.0f} s of samples" if abs(r.covered_seconds - span) > \
        max(r.resolution * 2, 1.0) else ""
    lines = [f"agentd diagnose: node {r.node or '?'}, {span:.0f} s from {_when(r.t0)}"
             f"{covered}, {r.source}, one sample every {r.resolution:g} s", ""]
    if r.gpus:
        lines.append("GPU  busy  computing  collective  stall (+-se)  job time  step period")
        for g in r.gpus:
            se = f"+-{g.stall_standard_error * 100:.1f}" if g.stall_standard_error else ""
            lines.append(f"{g.gpu:>3}  {_pct(g.busy)}  {_pct(g.computing, 9)}  "
                         f"{_pct(g.collective, 10)}  {_pct(g.stall, 5)} {se:>6}  "
                         f"{g.job_seconds:7.0f} s  {_period(g)}")
        lines.append("")
    if r.throughput:
        parts = [f"{v:,.2f} {k.replace('_', ' ')}" for k, v in r.throughput.items()]
        lines.append("throughput: " + ", ".join(parts))
        lines.append("")
    if not r.findings:
        if r.gpus and all(g.lost for g in r.gpus):
            lines.append("No finding, and no GPU reporting.")
        else:
            lines.append("No finding: no GPU lost 5% of its job time significantly above the "
                         "source's noise, and no device fault.")
    for n, f in enumerate(r.findings, 1):
        gpus = f.subject.get("gpus")
        lines.append(f"{n}. [{f.severity.upper()}] {KINDS.get(f.kind, f.kind)} ({f.kind})"
                     f" on GPU {','.join(map(str, gpus)) if gpus else '-'}, confidence "
                     f"{f.confidence:.2f}")
        lines.append(f"   {f.summary}.")
        if f.mechanism:
            lines.append(f"   seen: {f.mechanism}")
        g = f.gain
        if g.get("speedup"):
            gain = f"   expected gain: {g['speedup']:.2f}x steps per second"
            now, after = g.get("busy_now"), g.get("busy_after")
            if now is not None and after is not None and now == now and after == after:
                gain += f" (busy {now * 100:.0f}% -> ~{after * 100:.0f}%"
                if g.get("step_time_change") is not None:
                    gain += f", step time {g['step_time_change'] * 100:+.0f}%"
                gain += ")"
            lines.append(gain)
        ev = ", ".join(f"{k}={_fmt(v)}" for k, v in f.evidence.items() if v is not None)
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
