"""The daemon's rolling analysis: every `interval`, the last `window` of the high-rate window
goes through analyze(); the report is kept for /api/v1/findings and for /metrics.

Its schedule and ages run on the monotonic clock. A report is served only while it is
current: a run that finds too little data clears it, and one older than STALE_RUNS
intervals (the analysis failing, or its thread stuck) is withdrawn, so findings never stay
exported after the analysis stopped seeing them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from agentd.analysis.core import Report, analyze_rolling
from agentd.analysis.signals import from_groups

if TYPE_CHECKING:
    from agentd.daemon.core import Daemon

log = logging.getLogger("agentd.analysis")

STALE_RUNS = 3  # a report older than this many intervals is no longer served


def finding_log(previous: dict[tuple, str], findings: list) -> tuple[dict[tuple, str],
                                                                     list[tuple[int, str]]]:
    """What the log says after an analysis run. `previous` maps each finding logged so far,
    keyed (kind, GPUs), to its severity; returns that map for `findings` and the lines to
    log as (level, text): a new finding at warning with its headline; a change of severity
    and a finding that cleared at info."""
    now: dict[tuple, str] = {}
    lines = []
    for f in findings:
        key = (f.kind, tuple(f.subject.get("gpus", [])))
        now[key] = f.severity
        before = previous.get(key)
        if before is None:
            lines.append((logging.WARNING, f.headline()))
        elif before != f.severity:
            lines.append((logging.INFO, f"severity {before} -> {f.severity}: {f.headline()}"))
    for (kind, gpus), severity in previous.items():
        if (kind, gpus) not in now:
            where = f"GPU {','.join(map(str, gpus))}" if gpus else "node"
            lines.append((logging.INFO, f"cleared: {kind} on {where} (was {severity})"))
    return now, lines


class RollingAnalysis:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.report: Report | None = None
        self.runs = 0
        self.duration = 0.0
        self.last_run = 0.0
        self._report_mono: float | None = None  # monotonic time the report was made
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="analysis", daemon=True)
        self._reported: dict[tuple, str] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def run_once(self) -> Report | None:
        d = self.daemon
        cfg = d.config
        now = d.clock()
        t0 = time.perf_counter()
        groups = {k: v for k, v in d.window.export(now - cfg.analysis_window).items()
                  if k in ("gpu", "cpu", "storage", "process", "memory", "pressure", "network")}
        meta = d.window_meta()
        sig = from_groups(groups, step=cfg.fast_interval, source="window",
                          node=meta.get("node", ""), meta=meta)
        if len(sig.t) < 10:
            self.report = None  # nothing current to say; never the findings of old data
            return None
        report = analyze_rolling(sig, node=meta.get("node", ""))
        self.report = report
        self._report_mono = time.monotonic()
        self.runs += 1
        self.duration = time.perf_counter() - t0
        self.last_run = now
        self._reported, lines = finding_log(self._reported, report.findings)
        for level, line in lines:
            log.log(level, "%s", line)
        return report

    def _loop(self) -> None:
        interval = self.daemon.config.analysis_interval
        # The first run waits for half a window of data.
        if self._stop.wait(min(self.daemon.config.analysis_window / 2, 30.0)):
            return
        while True:
            try:
                self.run_once()
            except Exception as e:  # the analysis must never take the daemon down
                log.error("analysis failed: %s", e)
            if self._stop.wait(self.daemon.config.analysis_interval or interval):
                return

    def current(self) -> Report | None:
        """The report, while it is current (see the module's docstring)."""
        report, made = self.report, self._report_mono
        if report is None or made is None:
            return None
        age = time.monotonic() - made
        if age > STALE_RUNS * max(self.daemon.config.analysis_interval, 1.0):
            return None
        return report

    def series(self) -> list:
        out = [("agentd_analysis_runs_total", (), float(self.runs)),
               ("agentd_analysis_window_seconds", (), self.daemon.config.analysis_window)]
        if self.last_run:
            out += [("agentd_analysis_duration_seconds", (), self.duration),
                    ("agentd_analysis_last_run_timestamp_seconds", (), self.last_run)]
        r = self.current()
        if r is None:
            return out
        gpu = self.daemon.runner("gpu")
        uuids = {i: g["uuid"] for i, g in gpu.sampler.meta()["gpus"].items()} \
            if gpu is not None and gpu.available else {}
        out += finding_series(r.findings, uuids)
        for g in r.gpus:
            lab = (g.gpu, uuids.get(g.gpu, ""))
            if g.stall == g.stall:
                out.append(("agentd_gpu_stall_ratio", lab, g.stall))
            if g.computing is not None:
                out.append(("agentd_gpu_compute_ratio", lab, g.computing))
            if g.step_period_seconds:
                out.append(("agentd_gpu_step_period_seconds", lab, g.step_period_seconds))
        return out


def finding_series(findings: list, uuids: dict[str, str]) -> list:
    """One series per (kind, GPU): a finding about GPUs 0 and 1 is two series, so a label
    never holds a list and a finding that spreads to another GPU keeps its series (an
    alert's `for:` does not restart). Findings come ranked; where two of one kind concern
    the same GPU (the whole window's and a recent onset's), the first (larger gain) wins.
    A finding about the node as a whole has gpu="" and uuid=""."""
    out: list = []
    seen: set = set()
    for f in findings:
        for g in [str(g) for g in f.subject.get("gpus", [])] or [""]:
            if (f.kind, g) in seen:
                continue
            seen.add((f.kind, g))
            lab = (f.kind, g, uuids.get(g, ""))
            out += [
                ("agentd_finding_active", (f.kind, f.severity) + lab[1:], 1.0),
                ("agentd_finding_expected_speedup_ratio", lab, f.speedup),
                ("agentd_finding_stall_ratio", lab, f.stall_fraction),
                ("agentd_finding_confidence_ratio", lab, f.confidence),
            ]
    return out
