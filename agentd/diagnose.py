"""`agentd diagnose` and `agentd record`: sources in, a report out.

Sources: live sampling on this node for N seconds; a running daemon's window; a recording
written by `agentd record`; a Prometheus server (agentd's metrics, or dcgm-exporter and
node_exporter alone).

Exit status: 0 no finding at or above --fail-on; 1 findings at or above --fail-on;
2 usage error; 3 the source cannot be reached or read.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

from agentd.analysis.core import Options, Report, analyze
from agentd.analysis.findings import KINDS, SEVERITIES
from agentd.analysis.signals import Signals, from_groups
from agentd.prom import SourceError

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_SOURCE = 0, 1, 2, 3


# --- sources --------------------------------------------------------------------------------------


def _fetch_window(url: str, seconds: float, timeout: float = 30.0) -> bytes:
    """A running agentd's last `seconds` of window, as npz bytes."""
    try:
        with urllib.request.urlopen(f"{url}/api/v1/window?seconds={seconds:g}&format=npz",
                                    timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise SourceError(f"agentd at {url} answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SourceError(f"cannot reach agentd at {url}: {getattr(e, 'reason', e)}") from None


def from_daemon(url: str, seconds: float) -> Signals:
    url = url.rstrip("/")
    return _signals_from_npz(_fetch_window(url, seconds), f"daemon {url}")


def from_recording(path: str) -> Signals:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SourceError(f"cannot read recording {path}: {e.strerror}") from None
    return _signals_from_npz(data, f"recording {os.path.basename(path)}")


def _signals_from_npz(data: bytes, what: str) -> Signals:
    from agentd.window import load_npz_with_meta

    try:
        groups, meta = load_npz_with_meta(data)
    except Exception as e:
        raise SourceError(f"{what} is not an agentd window/recording: {e}") from None
    groups = {k: g for k, g in groups.items() if k != "topology"}
    if not any(len(g["t"]) for g in groups.values()):
        raise SourceError(f"{what} holds no samples")
    step = float(meta.get("fast_interval") or 0.1)
    return from_groups(groups, step=step, source=what, node=meta.get("node", ""), meta=meta)


def _sample_locally(seconds: float, config, stop: threading.Event, progress=None
                    ) -> tuple[dict, dict]:
    """Run the daemon's samplers (no HTTP server) for `seconds`, or until `stop`; return the
    window's groups since the start and the node's description."""
    from agentd.daemon import Daemon

    d = Daemon(replace(config, window_seconds=max(config.window_seconds, seconds + 5)))
    d.start(serve_http=False)
    t0 = time.time()
    bar = progress is not None and progress.isatty()
    try:
        while not stop.is_set() and time.time() - t0 < seconds:
            if bar:
                done = "#" * int(min((time.time() - t0) / seconds, 1.0) * 30)
                progress.write(f"\rsampling [{done:<30}] {time.time() - t0:5.1f}/{seconds:g} s")
                progress.flush()
            stop.wait(0.25)
        if bar:
            progress.write("\n")
        meta = d.window_meta()
        groups = {k: g for k, g in d.window.export(t0).items() if k != "topology"}
    finally:
        d.stop()
    return groups, meta


def live(seconds: float, config, progress=sys.stderr) -> tuple[Signals, dict]:
    """Sample this node for `seconds` (Ctrl-C analyses what was gathered so far)."""
    stop = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *a: stop.set())
    try:
        groups, meta = _sample_locally(seconds, config, stop, progress)
    finally:
        signal.signal(signal.SIGINT, old)
    return from_groups(groups, step=config.fast_interval, source="live sampling",
                       node=meta.get("node", ""), meta=meta), meta


# --- output ---------------------------------------------------------------------------------------


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


def plot(sig: Signals, r: Report, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SourceError("--plot needs matplotlib: pip install 'agentd[plot]'") from None
    import numpy as np

    t = sig.t - sig.t[0]
    fig, axes = plt.subplots(4, 1, figsize=(12, 9), sharex=True)
    for g in sig.gpus():
        axes[0].plot(t, sig.get("gpu.busy", g), lw=0.8, label=f"GPU {g}")
    axes[0].set_ylabel("GPU busy")
    axes[0].set_ylim(-0.05, 1.05)
    for g in sig.gpus():
        rx = sig.get("gpu.pcie_rx", g)
        if rx is not None:
            axes[1].plot(t, rx / 1e9, lw=0.8)
    axes[1].set_ylabel("PCIe RX GB/s")
    for d in sig.subjects("disk.read"):
        axes[2].plot(t, sig.get("disk.read", d) / 1e9, lw=0.8, label=d)
    axes[2].set_ylabel("storage GB/s")
    cpu = sig.get("cpu.busy")
    if cpu is not None:
        axes[3].plot(t, cpu, lw=0.8, color="k")
    axes[3].set_ylabel("CPU cores busy")
    axes[3].set_xlabel("seconds")
    # Shade the stalls: samples where the mean GPU utilization is under 0.5.
    subs, m = sig.matrix("gpu.busy")
    if len(subs):
        stalled = np.nanmean(m, axis=1) < 0.5
        for ax in axes:
            ax.fill_between(t, 0, 1, where=stalled, transform=ax.get_xaxis_transform(),
                            color="red", alpha=0.12, lw=0)
    title = f"{r.node}: " + (", ".join(f.kind for f in r.findings) or "no finding")
    fig.suptitle(title)
    axes[0].legend(fontsize=7, ncol=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def exit_status(r: Report, fail_on: str) -> int:
    worst = r.worst_severity()
    if worst is None or SEVERITIES.index(worst) < SEVERITIES.index(fail_on):
        return EXIT_OK
    return EXIT_FINDINGS


def report_and_exit(sig: Signals, args) -> int:
    if len(sig.t) < 10:
        raise SourceError(f"{sig.source} holds {len(sig.t)} samples: too few to analyse")
    opts = Options(samples_per_step=args.samples_per_step, tokens_per_step=args.tokens_per_step,
                   price_per_gpu_hour=args.price_per_gpu_hour)
    r = analyze(sig, opts, node=args.node or sig.node)
    if args.json:
        sys.stdout.write(json.dumps(r.to_json(), indent=1) + "\n")
    else:
        sys.stdout.write(render_text(r))
    if args.plot:
        plot(sig, r, args.plot)
    return exit_status(r, args.fail_on)


# --- recording ------------------------------------------------------------------------------------


def record(out: str, seconds: float, daemon_url: str | None, config, poll: float = 60.0) -> int:
    """Write a recording; a clean stop (SIGINT/SIGTERM) writes what was gathered so far."""
    from agentd.window import groups_to_npz

    stop = threading.Event()
    handlers = {s: signal.signal(s, lambda *a: stop.set()) for s in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    try:
        if daemon_url:
            groups, meta = _record_from_daemon(daemon_url, seconds, poll, stop)
        else:
            groups, meta = _sample_locally(seconds, config, stop)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(groups_to_npz(groups, meta))
    os.replace(tmp, out)
    rows = max((len(g["t"]) for g in groups.values()), default=0)
    print(f"agentd record: {rows} rows of {len(groups)} samplers written to {out}",
          file=sys.stderr)
    return EXIT_OK


def _record_from_daemon(url: str, seconds: float, poll: float, stop: threading.Event):
    """Poll the daemon's window and stitch the pieces (each overlaps the last)."""
    from agentd.window import load_npz_with_meta

    import numpy as np

    url = url.rstrip("/")
    merged: dict[str, dict] = {}
    meta: dict = {}
    t_end = time.time() + seconds
    t_start = time.time()
    while True:
        last = stop.is_set() or time.time() >= t_end
        try:
            groups, meta = load_npz_with_meta(_fetch_window(url, poll * 2 + 5))
        except SourceError as e:
            if not merged:
                raise
            print(f"agentd record: {e}; keeping what was recorded", file=sys.stderr)
            break
        for name, g in groups.items():
            keep = g["t"] >= t_start
            m = merged.get(name)
            if m is None or list(m["columns"]) != list(g["columns"]):
                if m is not None:  # new channels appeared: widen to the union
                    g = _union(m, g)
                    merged[name] = g
                    continue
                merged[name] = {**g, "t": g["t"][keep], "values": g["values"][keep]}
                continue
            new = keep & (g["t"] > (m["t"][-1] if len(m["t"]) else -np.inf))
            m["t"] = np.concatenate((m["t"], g["t"][new]))
            m["values"] = np.concatenate((m["values"], g["values"][new]))
        if last:
            break
        stop.wait(min(poll, max(t_end - time.time(), 0.0)))
    return merged, meta


def _union(a: dict, b: dict) -> dict:
    import numpy as np

    cols = list(dict.fromkeys(list(a["columns"]) + list(b["columns"])))

    def widen(g):
        out = np.full((len(g["t"]), len(cols)), np.nan, dtype=np.float32)
        for j, c in enumerate(g["columns"]):
            out[:, cols.index(c)] = g["values"][:, j]
        return out

    new = b["t"] > (a["t"][-1] if len(a["t"]) else -np.inf)
    return {"interval": a["interval"], "columns": cols,
            "t": np.concatenate((a["t"], b["t"][new])),
            "values": np.concatenate((widen(a), widen(b)[new]))}
