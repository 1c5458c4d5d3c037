"""Diagnose every case from every source and score agentd against the ground truth.

    python -m bench.robustness [--seed N] [--cases NAME,...]
        [--sources recording,prometheus,agentd] [--resolutions 1,5,15,30] [--json FILE]
        [--workdir DIR [--reuse]] [--cli] [--rolling-every S] [--rolling-variants V,...]

Sources: agentd recordings at 10 Hz (full, and with SM activity, PCIe counters or process
trees removed); dcgm-exporter + node_exporter series backfilled into a real Prometheus at
each scrape interval (full at every interval; without SM activity, without PCIe bytes, and
GPU-only at 5 s; GPU-only also at 15 s); and agentd's own /metrics, as the daemon would have
served them, backfilled into the same Prometheus at each scrape interval (source "agentd"):
with the findings of its rolling analysis (full) and without them (no_analysis).
Fresh seeds each run unless --seed is given.

Scores per source and resolution: top-1 accuracy on starved cases (the report's first
finding is of an accepted kind), healthy false alarms (any finding at warning or above; info
separately), stall-fraction error (|first finding's stall_fraction - truth|, 0 claimed when
there is no finding), idle-share error (|gpus[].stall - the share of time no kernel ran|),
and step periods (per GPU: within 10% of the truth, abstained, or wrong; a period reported
for a GPU that ran no steps is wrong).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from bench.robustness import agentd_metrics as A
from bench.robustness import cases as C
from bench.robustness import exporters as E
from bench.robustness import sampling as S

RECORDING_VARIANTS = ("full", "no_sm", "no_pcie", "no_proc")
PROM_MATRIX = {1: ("full",), 5: ("full", "no_sm", "no_pcie", "gpu_only"),
               15: ("full", "gpu_only"), 30: ("full",)}
# agentd's /metrics with the rolling analysis' agentd_finding_* ("full"), and without them
# ("no_analysis": the counters and gauges alone, as from a daemon whose analysis failed).
AGENTD_VARIANTS = ("full", "no_analysis")
WARN = ("warning", "critical", "error")


@dataclass
class Result:
    case: str
    klass: str
    source: str  # "recording", "prometheus" (the exporters' series) or "agentd" (its /metrics)
    resolution: float
    variant: str
    findings: list = field(default_factory=list)
    gpus: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    error: str = ""


def variant_host(host: str, res: float, variant: str) -> str:
    head, dot, tail = host.partition(".")
    tag = f"-s{res:g}" + ("" if variant == "full" else "-" + variant.replace("_", ""))
    return head + tag + dot + tail


# --- diagnosis ---------------------------------------------------------------------------------

def diagnose_recording(path: str, cli: bool) -> dict:
    if cli:
        return _cli(["diagnose", "--recording", path, "--json"])
    from agentd.analysis.core import analyze
    from agentd.diagnose.sources.recording import RecordingSource

    sig = RecordingSource(path).read()
    return analyze(sig).to_json()


def diagnose_prometheus(url: str, host: str, start: float, end: float, cli: bool,
                        flavour: str = "exporters") -> dict:
    """`agentd diagnose --prometheus`: the exporters' series, or agentd's own ("agentd");
    the command tells them apart itself."""
    if cli:
        return _cli(["diagnose", "--prometheus", url, "--node", host, "--start", f"{start:.3f}",
                     "--end", f"{end:.3f}", "--json"])
    from agentd.analysis.core import analyze
    from agentd.diagnose.sources.prometheus_agentd import AgentdPrometheusSource
    from agentd.diagnose.sources.prometheus_exporters import ExportersPrometheusSource

    cls = AgentdPrometheusSource if flavour == "agentd" else ExportersPrometheusSource
    sig = cls(url, host, start, end).read()
    return analyze(sig).to_json()


def _cli(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "agentd", *args], capture_output=True, text=True,
                       timeout=600)
    if r.returncode not in (0, 1):
        raise RuntimeError(f"exit {r.returncode}: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


def _run(res: Result, fn, *args) -> Result:
    try:
        doc = fn(*args)
        res.findings = doc.get("findings", [])
        res.gpus = doc.get("gpus", [])
        res.notes = doc.get("notes", [])
    except Exception as e:  # a crash on one case is a result, not the end of the run
        res.error = f"{type(e).__name__}: {str(e)[:300]}"
    return res


def rolling(path: str, truth: "C.Truth", case: str, every: float,
            window: float = 60.0, variant: str = "full") -> dict:
    """The daemon's rolling analysis replayed over a recording: a look every `every` seconds
    from a full `window` on, each running analyze_rolling over the last `window` (and, within
    it, the last 20 s) or keeping the last report as the daemon's schedule decides
    (agentd_metrics.rolling_looks), as `agentd run` serves agentd_finding_* to the alerts.
    Counts the looks ("runs") whose report warns (warning or worse) and, on starved cases,
    those whose first named finding is of an accepted kind; "analysed": the looks that ran."""
    from agentd.diagnose.sources.recording import RecordingSource

    out = {"case": case, "class": truth.klass, "variant": variant, "runs": 0, "analysed": 0,
           "warned": 0, "right": 0, "warned_kinds": {}, "error": ""}
    try:
        sig = RecordingSource(path).read()
        t0 = float(sig.t[0])
        for _, r, ran in A.rolling_looks(sig, t0, float(sig.t[-1]), every, window,
                                       first=window):
            if r is None:
                continue
            out["runs"] += 1
            out["analysed"] += ran
            warned = [f.kind for f in r.findings if f.severity in WARN]
            if warned:
                out["warned"] += 1
                for k in warned:
                    out["warned_kinds"][k] = out["warned_kinds"].get(k, 0) + 1
            named = [f.kind for f in r.findings if f.kind != "unexplained_idle"]
            out["right"] += bool(named) and named[0] in truth.accept
    except Exception as e:  # a crash on one case is a result, not the end of the run
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def render_rolling(rows: list[dict], every: float) -> str:
    lines = []
    variants = list(dict.fromkeys(r.get("variant", "full") for r in rows))
    for v in variants:
        mine = [r for r in rows if r.get("variant", "full") == v]
        healthy = [r for r in mine if r["class"] == "healthy"]
        starved = [r for r in mine if r["class"] != "healthy"]
        warned = [r for r in healthy if r["warned"]]
        lines += [f"rolling analysis (the daemon's: a look every {every:g} s at the last 60 s, "
                  f"and its last 20 s; analysed at {sum(r.get('analysed', 0) for r in mine)} "
                  f"of {sum(r['runs'] for r in mine)} looks), {v} recordings:",
                  f"  healthy: {sum(r['warned'] for r in healthy)} of "
                  f"{sum(r['runs'] for r in healthy)} runs warned, on {len(warned)} of "
                  f"{len(healthy)} cases" + (": " + ", ".join(
                      f"{r['case']} {r['warned']} {r['warned_kinds']}" for r in warned)
                      if warned else ""),
                  f"  starved: {sum(r['right'] for r in starved)} of "
                  f"{sum(r['runs'] for r in starved)} runs named an accepted kind first"]
    errors = [r for r in rows if r["error"]]
    if errors:
        lines.append("  errors: " + "; ".join(f"{r['case']}: {r['error']}" for r in errors))
    return "\n".join(lines)


# --- scoring -----------------------------------------------------------------------------------

def score_one(res: Result, truth: C.Truth) -> dict:
    top = res.findings[0] if res.findings else None
    kinds = [f.get("kind") for f in res.findings]
    warn = any(f.get("severity") in WARN for f in res.findings)
    info = any(f.get("severity") == "info" for f in res.findings)
    healthy = truth.klass == "healthy"
    out = {"case": res.case, "class": truth.klass, "source": res.source,
           "resolution": res.resolution, "variant": res.variant, "error": res.error,
           "top": top.get("kind") if top else None,
           "top_severity": top.get("severity") if top else None, "kinds": kinds,
           "warning": warn, "info": info,
           "correct": (not healthy and not res.error and top is not None
                       and top.get("kind") in truth.accept),
           "truth_stall": truth.stall_fraction}
    claimed = float(top.get("stall_fraction") or 0.0) if top is not None else 0.0
    if not np.isfinite(claimed):
        claimed = 0.0
    out["stall_claimed"] = claimed
    out["stall_error"] = None if res.error else abs(claimed - (0.0 if healthy else
                                                               truth.stall_fraction))
    by_gpu = {str(g.get("gpu")): g for g in res.gpus}
    idle_err = [abs(float(by_gpu[str(g)]["stall"]) - truth.idle_fraction[g])
                for g in truth.idle_fraction
                if str(g) in by_gpu and by_gpu[str(g)].get("stall") is not None]
    out["idle_error"] = float(np.mean(idle_err)) if idle_err else None
    within = abstained = wrong = 0
    for g, p in truth.step_period.items():
        if g in truth.gpus or p is not None:
            rep = by_gpu.get(str(g), {}).get("step_period_seconds")
            if rep is None:
                abstained += p is not None
            elif p is None or abs(float(rep) - p) > 0.1 * p:
                wrong += 1
            else:
                within += 1
    out["period"] = {"within": within, "abstained": abstained, "wrong": wrong}
    return out


def summarize(scores: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for s in scores:
        groups.setdefault((s["source"], s["resolution"], s["variant"]), []).append(s)
    out = []
    order = {"recording": 0, "agentd": 1, "prometheus": 2}
    for (source, res, variant), ss in sorted(groups.items(), key=lambda kv: (
            order.get(kv[0][0], 3), kv[0][1], kv[0][2] != "full", kv[0][2])):
        starved = [s for s in ss if s["class"] != "healthy"]
        healthy = [s for s in ss if s["class"] == "healthy"]
        errs = [s["stall_error"] for s in starved if s["stall_error"] is not None]
        idle = [s["idle_error"] for s in ss if s["idle_error"] is not None]
        per = {k: sum(s["period"][k] for s in ss) for k in ("within", "abstained", "wrong")}
        out.append({
            "source": source, "resolution": res, "variant": variant,
            "starved": len(starved), "top1": sum(s["correct"] for s in starved),
            "healthy": len(healthy), "healthy_warning": sum(s["warning"] for s in healthy),
            "healthy_info": sum(s["info"] and not s["warning"] for s in healthy),
            "stall_error_mean": float(np.mean(errs)) if errs else None,
            "stall_error_max": float(np.max(errs)) if errs else None,
            "idle_error_mean": float(np.mean(idle)) if idle else None,
            "period": per, "errors": sum(bool(s["error"]) for s in ss)})
    return out


def render(summary: list[dict], scores: list[dict], truths: dict) -> str:
    lines = ["source      res  variant   top-1 starved   healthy warn  info  "
             "stall err mean/max  idle err  period within/abst/wrong  errors"]
    for s in summary:
        pct = f"{100 * s['top1'] / s['starved']:.0f}%" if s["starved"] else "-"
        se = (f"{s['stall_error_mean']:.3f}/{s['stall_error_max']:.3f}"
              if s["stall_error_mean"] is not None else "-")
        ie = f"{s['idle_error_mean']:.3f}" if s["idle_error_mean"] is not None else "-"
        p = s["period"]
        res = "10Hz" if s["source"] == "recording" else f"{s['resolution']:g}s"
        lines.append(
            f"{s['source'][:10]:10s} {res:>5s}  {s['variant']:8s} {s['top1']:3d}/{s['starved']:<3d}"
            f" {pct:>5s}   {s['healthy_warning']:3d}/{s['healthy']:<3d} {s['healthy_info']:4d}"
            f"   {se:>17s}  {ie:>8s}  {p['within']:6d}/{p['abstained']}/{p['wrong']:<10d}"
            f"  {s['errors']}")
    lines += ["", "per case (first finding, '*' when of an accepted kind; '!' marks a warning "
              "on a healthy case):"]
    order = {"recording": 0, "agentd": 1, "prometheus": 2}
    cols = sorted({(s["source"], s["resolution"], s["variant"]) for s in scores},
                  key=lambda c: (order.get(c[0], 3), c[1], c[2] != "full", c[2]))
    head = "case".ljust(34) + "class".ljust(18) + "stall  " + "  ".join(
        (("rec" if c[0] == "recording" else f"{c[1]:g}s") +
         ("/agentd" if c[0] == "agentd" else "") +
         ("" if c[2] == "full" else "/" + c[2]))[:17].ljust(17)
        for c in cols)
    lines.append(head)
    by = {(s["case"], s["source"], s["resolution"], s["variant"]): s for s in scores}
    for name, t in truths.items():
        row = name[:33].ljust(34) + t.klass[:17].ljust(18) + f"{t.stall_fraction:5.2f}  "
        cells = []
        for c in cols:
            s = by.get((name, *c))
            if s is None:
                cells.append("".ljust(17))
                continue
            mark = "*" if s["correct"] else ("!" if s["class"] == "healthy" and s["warning"]
                                             else "")
            txt = "ERROR" if s["error"] else (s["top"] or "-")
            cells.append((txt[:16] + mark).ljust(17))
        lines.append(row + "  ".join(cells))
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.robustness",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, help="reproduce a run (default: a fresh seed)")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--sources", default="recording,prometheus,agentd",
                    help="recording (10 Hz), prometheus (dcgm-exporter + node_exporter "
                         "series), agentd (agentd's /metrics in Prometheus)")
    ap.add_argument("--resolutions", default="1,5,15,30",
                    help="Prometheus scrape intervals in seconds")
    ap.add_argument("--duration", type=float, default=600.0, help="analysed window, seconds")
    ap.add_argument("--json", metavar="FILE", help="write every score and the truth as JSON")
    ap.add_argument("--workdir", help="keep recordings, OpenMetrics and the TSDB here")
    ap.add_argument("--cli", action="store_true",
                    help="diagnose through `agentd diagnose ... --json` subprocesses")
    ap.add_argument("--rolling-every", type=float, default=10.0, metavar="SECONDS",
                    help="replay the daemon's rolling analysis over each full recording "
                         "every SECONDS (0: not at all)")
    ap.add_argument("--rolling-variants", default="full", metavar="VARIANTS",
                    help="the recording variants the rolling analysis is replayed over "
                         f"(comma-separated, of {','.join(RECORDING_VARIANTS)})")
    ap.add_argument("--reuse", action="store_true",
                    help="diagnose the recordings and TSDB that an earlier run with the same "
                         "--seed and --cases kept in --workdir (the truth is rebuilt, nothing "
                         "is rewritten): the same data, scored with the code as it is now")
    args = ap.parse_args(argv)
    # The analysis' own numpy warnings (all-NaN slices) would bury the report.
    warnings.simplefilter("ignore", RuntimeWarning)
    # SIGTERM unwinds like Ctrl-C, so the Prometheus child is stopped and the work removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    names = args.cases.split(",") if args.cases else list(C.BUILDERS)
    unknown = [n for n in names if n not in C.BUILDERS]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(C.BUILDERS)}")
    bad = set(args.rolling_variants.split(",")) - set(RECORDING_VARIANTS)
    if bad:
        ap.error(f"unknown rolling variant(s) {', '.join(sorted(bad))}")
    if args.reuse and (args.seed is None or not args.workdir):
        ap.error("--reuse needs the --seed and --workdir of the run that kept the data")
    sources = set(args.sources.split(","))
    resolutions = [float(x) for x in args.resolutions.split(",") if x]
    work = args.workdir or tempfile.mkdtemp(prefix="agentd-robust-")
    os.makedirs(work, exist_ok=True)
    try:
        return _suite(args, seed, names, sources, resolutions, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _suite(args, seed: int, names: list[str], sources: set, resolutions: list[float],
           work: str) -> int:
    w0 = 1.75e9 + (seed % 1000) * 3600.0
    print(f"robustness suite: seed {seed}, {len(names)} cases, window {args.duration:g} s, "
          f"work in {work}", file=sys.stderr)
    t_start = time.process_time()
    rolling_variants = set(args.rolling_variants.split(","))
    truths: dict[str, C.Truth] = {}
    results: list[Result] = []
    rolls: list[dict] = []
    prom_jobs: list[tuple] = []
    tsdb = os.path.join(work, "tsdb")
    reuse = args.reuse
    if not reuse:
        shutil.rmtree(tsdb, ignore_errors=True)
    for i, name in enumerate(names):
        case, tl = C.build(name, seed, i, w0, args.duration)
        truth = C.measure(case, tl)
        truths[name] = truth
        rng = np.random.default_rng([seed, i, 7])
        a, b = case.window
        if "recording" in sources:
            groups = meta = None
            if not reuse:
                groups = S.sample_groups(tl, rng, a, b)
                meta = S.meta(tl, S.ceilings_for(tl) if case.ceilings else None)
            for v in RECORDING_VARIANTS:
                path = os.path.join(work, f"{i:02d}-{name}-{v}.rec")
                if not reuse:
                    g, m = S.drop(groups, meta, v)
                    S.write_recording(path, g, m)
                results.append(_run(Result(name, case.klass, "recording", 0.1, v),
                                    diagnose_recording, path, args.cli))
                if v in rolling_variants and args.rolling_every > 0:
                    rolls.append(rolling(path, truth, name, args.rolling_every, variant=v))
        om = E.OpenMetrics()
        if "prometheus" in sources:
            for res in resolutions:
                for v in PROM_MATRIX.get(int(res), ("full",)):
                    host = variant_host(case.node.host, res, v)
                    if not reuse:
                        # Generated from before the window so that rate() has its look-back.
                        E.exporters_series(tl, a - C.LEAD + 5, b, res, v, rng, om, host)
                    prom_jobs.append((name, case.klass, res, v, a, b, host, "prometheus"))
        if "agentd" in sources:
            # Its own random stream, so that the other sources of a seed stay as they were.
            arng = np.random.default_rng([seed, i, 11])
            groups = meta = None
            if not reuse:
                groups = S.sample_groups(tl, arng, a - C.LEAD + 5, b)
                meta = S.meta(tl, S.ceilings_for(tl) if case.ceilings else None)
            reports = None
            if not reuse:
                # The daemon's rolling analysis, once: what its agentd_finding_* say.
                reports = A.daemon_reports(groups, meta, a - C.LEAD + 5, b)
            for res in resolutions:
                # Each variant the same scrapes (the same draws): they differ in the findings.
                state = arng.bit_generator.state
                for v in AGENTD_VARIANTS:
                    host = variant_host(case.node.host, res,
                                        "agentd" if v == "full" else "agentd_" + v)
                    if not reuse:
                        arng.bit_generator.state = state
                        A.agentd_series(tl, groups, meta, a - C.LEAD + 5, b, res, arng, om,
                                        host, reports if v == "full" else None)
                    prom_jobs.append((name, case.klass, res, v, a, b, host, "agentd"))
        if om.families and not reuse:
            path = os.path.join(work, f"{i:02d}-{name}.om")
            with open(path, "w") as f:
                om.write(f)
                f.write("# EOF\n")
            E.backfill(path, tsdb)
            os.unlink(path)
        print(f"  [{i + 1}/{len(names)}] {name}: {case.klass}, stall {truth.stall_fraction:.2f}",
              file=sys.stderr)
    if prom_jobs:
        prom = E.Prometheus(tsdb, work)
        try:
            for name, klass, res, v, a, b, host, src in prom_jobs:
                results.append(_run(Result(name, klass, src, res, v), diagnose_prometheus,
                                    prom.url, host, a, b, args.cli,
                                    "agentd" if src == "agentd" else "exporters"))
        finally:
            prom.stop()
    scores = [score_one(r, truths[r.case]) for r in results]
    summary = summarize(scores)
    print(f"agentd robustness suite, seed {seed}, {datetime.date.today().isoformat()}, "
          f"{len(names)} cases ({sum(t.klass != 'healthy' for t in truths.values())} starved), "
          f"{args.duration:g} s windows; CPU {time.process_time() - t_start:.0f} s "
          "(this process; diagnoses in-process unless --cli)")
    print(render(summary, scores, truths))
    if rolls:
        print()
        print(render_rolling(rolls, args.rolling_every))
    if args.json:
        doc = {"seed": seed, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "duration": args.duration, "summary": summary, "scores": scores,
               "rolling": rolls,
               "truth": {n: {"class": t.klass, "accept": list(t.accept), "gpus": t.gpus,
                             "origin": t.origin, "stall_fraction": t.stall_fraction,
                             "idle_fraction": t.idle_fraction, "step_period": t.step_period}
                         for n, t in truths.items()}}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=float)
    return 0
