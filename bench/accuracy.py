"""Diagnosis accuracy on randomized simulated runs whose bottleneck is known.

This replays agentd's own simulator, whose model the detectors know: it checks that they
separate the classes the model produces, not that the model matches real nodes. The
independent check is bench/robustness (a generator written apart from the detectors, and
dcgm-exporter/node_exporter data through a real Prometheus); see docs/robustness.md.

    python bench/accuracy.py [--seeds 14] [--seconds 120] [--json out.json]

Prints the confusion matrix (truth x top-1 finding), per-class precision and recall, false
alarms on healthy runs, the stall-fraction error against the simulator's ground truth,
detection of mild (5-8%) stalls, time to detect after onset with the daemon's rolling
analysis (every 10 s over the last 60 s), and the time to analyse one hour of 10 Hz data
from 8 GPUs (and to load it from a recording).

Goals: >= 95% top-1 accuracy (the top warning-or-worse finding), no warning on healthy runs,
stall fraction within +-3 points, stalls of 5% of step time and more detected (TensorFlow's
"moderately input-bound" line; below it a node is healthy by definition), a step period
never wrong (abstaining is allowed), detection within 30 s of onset, one hour of 8-GPU 10 Hz
data diagnosed in at most 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from agentd.analysis.core import analyze  # noqa: E402
from agentd.analysis.signals import from_groups  # noqa: E402
from agentd.sim import scenario as S  # noqa: E402
from agentd.sim.model import Episode  # noqa: E402
from agentd.sim.signals import simulate  # noqa: E402

WARMUP = 30.0  # queues fill; the analysed window starts after


def truth_stall(tr, t0: float) -> float:
    k0 = int(t0 / tr.dt)
    return float((tr.stall[-1] - tr.stall[k0]).mean() / (tr.t[-1] - tr.t[k0]))


def run_one(sc: S.Scenario, seconds: float) -> dict:
    sig, tr = simulate(sc, seconds=seconds)
    window = sig.slice(sig.t[0] + WARMUP, sig.t[-1])
    r = analyze(window)
    # The prediction: the first finding that names a class (unexplained idle time names none),
    # whatever its severity; false alarms are counted by severity below.
    named = [f for f in r.findings if f.kind != "unexplained_idle"]
    top = named[0] if named else None
    k0 = int(WARMUP / tr.dt)
    steps = tr.steps[-1] - tr.steps[k0]
    periods = []
    for g in r.gpus:
        i = int(g.gpu)
        truth = (tr.t[-1] - tr.t[k0]) / steps[i] if steps[i] > 0 else None
        periods.append((g.step_period_seconds, truth))
    return {"scenario": sc.name, "truth": sc.klass, "predicted": top.kind if top else "healthy",
            "stall_estimate": top.stall_fraction if top else 0.0,
            "stall_truth": truth_stall(tr, WARMUP),
            "all": [f"{f.kind}:{f.severity}" for f in r.findings], "periods": periods,
            "warnings": [f.kind for f in r.findings if f.severity != "info"],
            "seed": sc.job.seed}


def detection_delay(sc: S.Scenario, seconds: float, every: float = 10.0,
                    window: float = 60.0) -> float | None:
    """The daemon's rolling analysis over a run whose problem starts at sc.onset_s: its
    looks every `every` s, each running the analysis or keeping the last report as the
    daemon's schedule decides (bench/robustness/agentd_metrics.py rolling_looks)."""
    from bench.robustness.agentd_metrics import rolling_looks

    sig, _ = simulate(sc, seconds=seconds)
    t_start = sig.t[0] - 0.1
    for t, r, _ in rolling_looks(sig, t_start, t_start + seconds, every, window,
                                 first=every):
        at = t - t_start
        if r is not None and r.findings and r.findings[0].kind == sc.klass and \
                at >= sc.onset_s:
            return at - sc.onset_s
    return None


def onset_variants() -> list[S.Scenario]:
    """Scenarios whose problem starts part-way, for the time to detect."""
    out = []
    base = S.load("throttled")
    out.append(replace(base, name="throttled@30s"))
    out.append(replace(S.load("memory-pressure"), name="memory_pressure@40s"))
    st = S.load("input-storage")
    # Storage falls behind at 60 s: a neighbour's job takes 70% of the volume's bandwidth.
    out.append(replace(st, name="input_storage@60s", onset_s=60.0,
                       job=replace(st.job, storage_bandwidth=st.job.storage_bandwidth * 3,
                                   episodes=[Episode(start_s=60.0, end_s=1e9,
                                                     storage_factor=0.3)])))
    cpu = S.load("input-cpu")
    out.append(replace(cpu, name="input_cpu@60s", onset_s=60.0,
                       job=replace(cpu.job, episodes=[Episode(start_s=0.0, end_s=60.0,
                                                              clock_factor=0.25)])))
    idle = S.load("idle-allocated")
    out.append(replace(idle, name="idle_allocated@0s"))
    return out


def mild_variants() -> list[S.Scenario]:
    """Input stalls of about 5-8% of step time."""
    out = []
    st = S.load("input-storage")
    for f in (0.93, 0.945, 0.96):
        bw = st.job.gpus * st.job.storage_bytes_per_step / st.job.compute_s * f
        out.append(replace(st, name=f"input_storage mild {1 - f:.1%}",
                           job=replace(st.job, storage_bandwidth=bw)))
    cpu = S.load("input-cpu")
    for f in (0.93, 0.95):
        cps = cpu.job.workers_per_gpu * cpu.job.compute_s / cpu.job.batch_size / f
        out.append(replace(cpu, name=f"input_cpu mild {1 - f:.1%}",
                           job=replace(cpu.job, cpu_per_sample_s=cps)))
    return out


def speed(seconds: float = 3600.0) -> dict:
    sc = S.load("input-storage", seed=0)
    t0 = time.process_time()
    sig, _ = simulate(sc, seconds=seconds)
    sim_cpu = time.process_time() - t0
    t0 = time.perf_counter()
    r = analyze(sig)
    analyse = time.perf_counter() - t0
    # The same hour as a recording: write, then load and align.
    from agentd.daemon.window import groups_to_npz, load_npz_with_meta

    gpu_cols = [k for k in sig.channels if k.startswith("gpu.")]
    other = [k for k in sig.channels if not k.startswith("gpu.")]
    groups = {name: {"interval": 0.1, "t": sig.t, "columns": cols,
                     "values": np.stack([sig.channels[c] for c in cols], axis=1)
                     .astype(np.float32)}
              for name, cols in (("gpu", gpu_cols), ("host", other))}
    path = os.path.join(tempfile.mkdtemp(), "hour.npz")
    with open(path, "wb") as f:
        f.write(groups_to_npz(groups, sig.meta))
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        loaded, meta = load_npz_with_meta(f.read())
    from_groups(loaded, step=0.1, meta=meta)
    load = time.perf_counter() - t0
    return {"rows": len(sig.t), "channels": len(sig.channels), "analyse_seconds": analyse,
            "load_seconds": load, "recording_mib": os.path.getsize(path) / 2**20,
            "simulate_cpu_seconds": sim_cpu, "top": r.findings[0].kind if r.findings else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=14, help="randomized runs per scenario")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()

    results = []
    t0 = time.time()
    for name in S.library():
        for seed in range(args.seeds):
            results.append(run_one(S.load(name, seed=seed), args.seconds))
    classes = list(S.CLASSES)
    n = len(results)
    correct = sum(r["truth"] == r["predicted"] for r in results)
    print(f"{n} randomized runs ({len(S.library())} scenarios x {args.seeds} seeds, "
          f"{args.seconds:.0f} s each, first {WARMUP:.0f} s skipped) in {time.time() - t0:.0f} s")
    print(f"top-1 accuracy: {correct}/{n} = {correct / n:.1%}   (goal >= 95%)\n")
    conf = Counter((r["truth"], r["predicted"]) for r in results)
    for r in results:
        if r["truth"] != r["predicted"]:
            print(f"   missed: {r['scenario']} seed {r['seed']}: {r['all']}")
    predicted = sorted({r["predicted"] for r in results} | set(classes),
                       key=lambda c: classes.index(c) if c in classes else 99)
    short = {c: c[:9] for c in predicted}
    print("confusion (rows: truth, columns: top finding)")
    print(" " * 18 + " ".join(f"{short[c]:>9}" for c in predicted))
    for t in classes:
        row = [conf.get((t, p), 0) for p in predicted]
        if sum(row):
            print(f"{t:>18}" + " ".join(f"{v:>9}" for v in row))
    print("\nclass               precision  recall")
    per_class = {}
    for c in classes:
        tp = conf.get((c, c), 0)
        fp = sum(v for (t, p), v in conf.items() if p == c and t != c)
        fn = sum(v for (t, p), v in conf.items() if t == c and p != c)
        prec = tp / (tp + fp) if tp + fp else float("nan")
        rec = tp / (tp + fn) if tp + fn else float("nan")
        per_class[c] = {"precision": prec, "recall": rec}
        print(f"{c:>18}  {prec:9.2f}  {rec:6.2f}")
    healthy = [r for r in results if r["truth"] == "healthy"]
    alarms = [r for r in healthy if r["warnings"]]
    infos = [r for r in healthy if r["all"] and not r["warnings"]]
    print(f"\nhealthy runs with a warning or worse: {len(alarms)}/{len(healthy)}   (goal 0)")
    for r in alarms[:5]:
        print(f"   {r['scenario']}: {r['all']}")
    print(f"healthy runs with an info finding only: {len(infos)}/{len(healthy)}")
    right = wrong = abstained = 0
    for r in results:
        for got, truth in r["periods"]:
            if truth is None or truth > 60:
                continue
            if got is None:
                abstained += 1
            elif abs(got / truth - 1) <= 0.1:
                right += 1
            else:
                wrong += 1
    total = right + wrong + abstained
    print(f"step period (per GPU): within 10% {right}/{total}, wrong {wrong}, "
          f"abstained {abstained}   (goal: never wrong)")
    input_classes = ("input_storage", "input_cpu", "h2d_pcie", "io_h2d_serialized",
                     "shared_link", "memory_pressure")
    errs = [abs(r["stall_estimate"] - r["stall_truth"]) for r in results
            if r["truth"] in input_classes and r["predicted"] == r["truth"]]
    print(f"stall fraction error (input classes, {len(errs)} runs): mean "
          f"{np.mean(errs) * 100:.2f} pts, max {np.max(errs) * 100:.2f} pts   (goal <= 3)")

    print("\nmild stalls (5-8% of step time):")
    mild = []
    for sc in mild_variants():
        r = run_one(sc, args.seconds)
        mild.append(r)
        print(f"   {sc.name:28s} truth stall {r['stall_truth']:.1%}: "
              f"{'detected' if r['predicted'] == sc.klass else 'MISSED'} "
              f"({r['predicted']}, estimate {r['stall_estimate']:.1%})")

    print("\ntime to detect after onset (the daemon's looks every 10 s at the last 60 s, "
          "run as its schedule decides):")
    delays = {}
    for sc in onset_variants():
        d = detection_delay(sc, max(args.seconds, sc.onset_s + 90))
        delays[sc.name] = d
        print(f"   {sc.name:24s} {'%.0f s' % d if d is not None else 'NOT DETECTED'}")

    figures = {"runs": n, "accuracy": correct / n, "per_class": per_class,
               "false_alarms": len(alarms), "healthy_info_only": len(infos),
               "healthy_runs": len(healthy),
               "period": {"right": right, "wrong": wrong, "abstained": abstained},
               "stall_error_mean": float(np.mean(errs)), "stall_error_max": float(np.max(errs)),
               "mild": mild, "detection_delay_seconds": delays}
    if not args.skip_speed:
        s = speed()
        figures["speed"] = s
        print(f"\none hour, 8 GPUs, 10 Hz ({s['rows']:,} rows x {s['channels']} channels): "
              f"analysed in {s['analyse_seconds']:.2f} s (goal <= 1 s); recording "
              f"{s['recording_mib']:.0f} MiB loaded and aligned in {s['load_seconds']:.2f} s "
              f"(goal < 1 s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
