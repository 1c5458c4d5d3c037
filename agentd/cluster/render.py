"""How a cluster diagnosis reads to people (JSON is ClusterReport.to_json)."""

from __future__ import annotations

import time

from agentd.cluster.report import ClusterReport

KINDS = {
    "throttled": "throttled clocks",
    "slow_gpu": "a slower GPU at normal clocks",
    "slow_link": "a slow or lossy network link",
    "input_starved": "starved input on that node only",
    "straggler": "a straggler whose cause is not in the signals",
}


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t)) if t else "?"


def _hm(t: float) -> str:
    return time.strftime("%H:%M", time.localtime(t))


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{x * 100:.0f}%"


def _money(x) -> str:
    return "" if x is None else f", cost {x:,.2f}"


def render_text(r: ClusterReport) -> str:
    nodes = sum(j["nodes"] for j in r.jobs)
    gpus = sum(j["gpus"] for j in r.jobs)
    lines = [f"agentd diagnose --cluster: {len(r.jobs)} job(s) on {nodes} node(s), {gpus} "
             f"GPU(s), {(r.t1 - r.t0) / 60:.0f} min from {_when(r.t0)}; {r.source}; "
             f"{r.window / 60:g}-minute windows every {r.step:g} s", ""]
    if not r.findings:
        lines.append("No finding: in every job no node deviates from its peers beyond their "
                     "natural spread (compute activity, clocks, busy time, links).")
    for n, f in enumerate(r.findings, 1):
        s = f.subject
        where = f"{s['node']}" + (f" GPU {','.join(s['gpus'])}" if s.get("gpus") else "")
        ev = f.evidence
        lines.append(f"{n}. [{f.severity.upper()}] {KINDS.get(f.kind, f.kind)} ({f.kind}): "
                     f"{where} holds job {s['job']} back ({ev['peers'] + 1} nodes, "
                     f"{ev['job_gpus']} GPUs)")
        lines.append(f"   {f.summary}.")
        sp = f.gain.get("speedup")
        gain = (f"healed, the job's steps run {sp:.2f}x as fast "
                f"({f.gain['step_time_change'] * 100:+.0f}% step time); "
                f"{f.gain['job_gpu_hours_lost']:.1f} GPU-hours lost") if sp else \
            f.gain.get("note", "gain unknown")
        lines.append(f"   {gain}; seen {ev['windows']} window(s) from {_hm(ev['first_seen'])}, "
                     f"{ev['seconds'] / 60:.0f} min; confidence {f.confidence:.2f}")
        shown = {k: v for k, v in ev.items() if k not in (
            "windows", "first_seen", "seconds", "peers", "job_gpus") and v is not None}
        lines.append("   evidence: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
        for a in f.advice:
            lines.append(f"   - {a}")
        lines.append("")
    if r.jobs:
        lines.append("")
        lines.append(f"{'job':40s} {'nodes':>5s} {'GPUs':>5s} {'busy':>5s} {'activity':>8s}  "
                     "findings")
        for j in sorted(r.jobs, key=lambda j: -j["gpus"]):
            note = j.get("note", "")
            lines.append(f"{j['job'][:40]:40s} {j['nodes']:5d} {j['gpus']:5d} "
                         f"{_pct(j.get('busy')):>5s} {_pct(j.get('activity')):>8s}  "
                         f"{j.get('findings', 0)}{'  ' + note if note else ''}")
    roll = r.rollups
    if roll.get("by_cause"):
        lines += ["", f"Fleet: {roll['gpu_hours_lost']:.1f} GPU-hours lost to nodes holding "
                  f"their jobs back, of {roll['gpu_hours_in_jobs']:.0f} in jobs"
                  f"{_money(roll['cost'])}"]
        for title, key in (("by cause", "by_cause"), ("by job", "by_job"),
                           ("by namespace/user", "by_owner")):
            rows = ", ".join(f"{x['key']} {x['gpu_hours_lost']:.1f} GPU-h{_money(x['cost'])}"
                             for x in roll[key][:8])
            lines.append(f"  {title}: {rows}")
        if roll.get("unpriced_findings"):
            lines.append("  (no price: give --price-per-gpu-hour or an "
                         "agentd_gpu_price_per_hour series)")
    if r.missing:
        lines += ["", "signals missing from this source: " + "; ".join(r.missing)]
    for note in r.notes:
        lines.append(f"note: {note}")
    if r.stats:
        st = r.stats
        lines.append(f"query: {st.get('queries', 0)} queries, {st.get('series', 0)} series, "
                     f"{st.get('bytes', 0) / 1e6:.1f} MB in {st.get('seconds', 0):.1f} s")
    return "\n".join(lines).rstrip() + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1e6:
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)
