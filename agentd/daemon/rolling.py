"""The daemon's rolling analysis: every `interval`, the last `window` of the high-rate window is
analysed, and the report kept for /api/v1/findings and for /metrics.

The analysis runs in a long-lived child process (analyst.py): the analysis core imports
scipy, which would add ~75 MiB to the sampling process, and a run holds the GIL for tens of
milliseconds that the 10 Hz loops should not wait behind. Each run sends the window slice
as npz bytes (window.groups_to_npz) with the node's description, and gets back the report as
JSON (Report.to_json()), which this process reads only for the fields it exports.

Every `interval` the daemon looks at the window and runs the analysis when something may
have changed: there is no report yet, a finding is held at warning or worse, the analysis
process is not running, some GPU's level over the last interval moved from where it was
before the last run (LEVELS: its busy share or SM activity by 2 points, its SM clock by 2%,
its power by 5%; a GPU appearing or going silent), or the next look would come more than
`max_interval` after the last run. Otherwise the report stands (the look is counted as
skipped): on a node whose job is steady, which is most of the time, the analysis costs a
third of what it would, while a stall, a throttle, a rank that falls behind or a job that
starts or ends moves one of those levels and is analysed within one interval (Schedule).

The child is restarted with back-off when it dies, answers garbage or misses its deadline;
sampling and serving never wait for it. Its schedule and ages run on the monotonic clock. A
report is served only while it is current: a run that finds too little data clears it, and
one older than STALE_RUNS intervals (the analysis failing, its process restarting, or its
thread stuck) is withdrawn, so findings never stay exported after the analysis stopped seeing
them.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from agentd.daemon.child import Backoff, Child, ChildGone, child_series, name_os_thread
from agentd.daemon.window import groups_to_npz

if TYPE_CHECKING:
    from agentd.daemon.core import Daemon

log = logging.getLogger("agentd.analysis")

STALE_RUNS = 3  # a report older than this many intervals is no longer served
# What a look compares with the last run, per GPU: the mean of each window channel over the
# last interval, and how far it may move (absolute, or relative to where it was) before the
# analysis runs again. Busy time and SM activity move with a stall, a collective wait or a
# rank falling behind; the SM clock with a throttle; power with compute turning into a spin.
LEVELS = {"gpu.busy_time": (0.02, False), "gpu.sm_active": (0.02, False),
          "gpu.sm_clock": (0.02, True), "gpu.power": (0.05, True)}
GROUPS = ("gpu", "cpu", "storage", "process", "memory", "pressure", "network")
DEADLINE = 10.0  # seconds a run may take (runs take ~0.05 s for 8 GPUs and 60 s)
STARTUP = 30.0  # more for the first run of a new process: its imports (scipy) take seconds
MIN_ROWS = 10  # fewer aligned rows than this: nothing to analyse yet
MAX_ANSWER = 16 * 2**20  # bytes of one answer (a report for 8 GPUs is ~20-100 kB)


class AnalysisUnavailable(Exception):
    pass


def levels(columns: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], since: float
           ) -> dict[tuple[str, str], float]:
    """Per (channel, GPU): the mean of its finite values at or after `since`, each column
    with its own times (columns read one by one may differ by a row); nan where it has none
    (a lost GPU, a failing read). Pure."""
    out = {}
    for key, (t, v) in columns.items():
        x = np.asarray(v, dtype=float)[np.asarray(t) >= since]
        x = x[np.isfinite(x)]
        out[key] = float(x.mean()) if len(x) else float("nan")
    return out


def moved(before: dict[tuple[str, str], float], now: dict[tuple[str, str], float]) -> bool:
    """Whether any level moved past its tolerance (LEVELS), appeared, went, or became nan
    (a GPU going silent) or a number again; one that stays nan (a channel this GPU never
    fills, such as SM activity without GPM) has not moved."""
    if set(before) != set(now):
        return True
    for key, x in now.items():
        tolerance, relative = LEVELS.get(key[0], (0.02, False))
        ref = before[key]
        if x != x and ref != ref:
            continue
        limit = tolerance * abs(ref) if relative else tolerance
        if not abs(x - ref) <= limit:  # nan on one side: moved
            return True
    return False


class Schedule:
    """When the rolling analysis runs (the module's docstring): asked at every look with the
    GPUs' levels over the last interval. Pure state on the monotonic clock; the daemon and
    the benchmarks that replay it share it."""

    def __init__(self, interval: float, max_interval: float):
        self.interval = interval
        self.max_interval = max(max_interval, interval)
        self.last_run: float | None = None
        self.reference: dict[tuple[str, str], float] = {}  # the levels before the last run

    def due(self, now: float, levels: dict[tuple[str, str], float], report: dict | None
            ) -> bool:
        if report is None or self.last_run is None:
            return True
        # Run now if the next look would come more than max_interval after the last run
        # (a tenth of an interval of slack: looks land on a grid, so that 30 s is every
        # third look of 10 s).
        if now - self.last_run + self.interval > self.max_interval + 0.1 * self.interval:
            return True
        if any(f.get("severity") in ("warning", "critical") for f in report.get("findings", [])
               if isinstance(f, dict)):
            return True
        return moved(self.reference, levels)

    def begin(self) -> None:
        """A run starts: until it succeeds (ran), every look is due."""
        self.last_run = None

    def ran(self, now: float, levels: dict[tuple[str, str], float]) -> None:
        self.last_run = now
        self.reference = dict(levels)


def finding_log(previous: dict[tuple, str], findings: list[dict],
                headlines: list[str] | None = None
                ) -> tuple[dict[tuple, str], list[tuple[int, str]]]:
    """What the log says after an analysis run. `previous` maps each finding logged so far,
    keyed (kind, GPUs), to its severity; `findings` are Report.to_json()'s, with their
    headlines (Finding.headline(), made by the analysis process) in the same order. Returns
    that map for `findings` and the lines to log as (level, text): a new finding at warning
    with its headline; a change of severity and a finding that cleared at info."""
    now: dict[tuple, str] = {}
    lines = []
    for i, f in enumerate(findings):
        kind, severity = str(f.get("kind", "")), str(f.get("severity", ""))
        # The analysis lists a finding's GPUs in no fixed order (by their stall, say): the
        # same finding must keep its key from one run to the next.
        gpus = sorted((f.get("subject") or {}).get("gpus", []),
                      key=lambda g: (len(str(g)), str(g)))
        key = (kind, tuple(gpus))
        if key in now:
            continue  # the same kind on the same GPUs twice (the window's, a recent onset's)
        headline = headlines[i] if headlines and i < len(headlines) else \
            f"[{severity}] {kind} on GPU {','.join(map(str, key[1])) or '(node)'}"
        now[key] = severity
        before = previous.get(key)
        if before is None:
            lines.append((logging.WARNING, headline))
        elif before != severity:
            lines.append((logging.INFO, f"severity {before} -> {severity}: {headline}"))
    for (kind, gpus), severity in previous.items():
        if (kind, gpus) not in now:
            where = f"GPU {','.join(map(str, gpus))}" if gpus else "node"
            lines.append((logging.INFO, f"cleared: {kind} on {where} (was {severity})"))
    return now, lines


class RollingAnalysis:
    module = "agentd.daemon.analyst"  # what the analysis process runs (tests put a faulty one)

    def __init__(self, daemon: "Daemon", deadline: float = DEADLINE):
        self.daemon = daemon
        self.deadline = deadline
        self.report: dict | None = None  # the latest Report.to_json(), while fresh
        self.runs = 0
        self.skipped = 0  # looks that found nothing moved: the report stands
        self.errors = 0
        self.restarts = 0
        self.duration = 0.0
        self.last_run = 0.0  # wall-clock time of the last successful run
        self._report_mono: float | None = None  # monotonic time the report was made
        self.reason = "warming up"  # why there is no report, when there is none
        self._child: Child | None = None
        self._started = False  # a child was started once: the next start is a restart
        self._backoff = Backoff()
        self._next_start = 0.0  # monotonic: no child is started before
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="analysis", daemon=True)
        self._reported: dict[tuple, str] = {}  # (kind, GPUs) -> severity, as logged
        self._rid = 0
        cfg = daemon.config
        self.schedule = Schedule(cfg.analysis_interval, cfg.analysis_max_interval)

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._start_child()  # its imports take seconds: start it before the first run
        self._thread.start()

    def stop(self, timeout: float = 0.5) -> None:
        """Stop the loop and the child (SIGTERM; SIGKILL after `timeout`). A run in flight
        ends with the child: it is not waited for."""
        self._stop.set()
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.terminate()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        if child is not None:
            child.reap(timeout)

    def _start_child(self) -> Child:
        level = self.daemon.config.log_level
        child = Child("analysis", self.module, ["--log-level", level],
                      max_payload=MAX_ANSWER)
        child.start()
        self._started = True
        with self._lock:
            self._child = child
        return child

    def _discard_child(self, reason: str) -> None:
        """Kill the child after a failure; the next one starts after a back-off."""
        with self._lock:
            child, self._child = self._child, None
        ran = 0.0
        if child is not None:
            ran = child.ran_for()
            child.kill()
        if self._stop.is_set():
            return  # stopping: the child was ended on purpose
        delay = self._backoff.next_delay(ran)
        self._next_start = time.monotonic() + delay
        self.errors += 1
        log.error("analysis process failed (%s); restarting it in %.1f s", reason, delay)

    def child_pid(self) -> int | None:
        with self._lock:
            return self._child.pid if self._child is not None and self._child.alive() else None

    # --- one run --------------------------------------------------------------------------------

    def _request(self, child: Child, header: dict, payload: bytes) -> tuple[dict, bytes]:
        assert child.channel is not None
        self._rid = self._rid % 0xFFFFFFFF + 1
        rid = self._rid
        budget = self.deadline + (0.0 if child.ready else STARTUP)
        end = time.monotonic() + budget
        # Under the same deadline: a stopped child takes no more than the socket's buffer of
        # a window slice (a few MB), and the rest would wait for it for ever.
        child.channel.send(rid, header, payload, timeout=budget)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {budget:g} s")
            try:
                got, head, body = child.channel.recv(timeout=left)
            except socket.timeout:
                raise TimeoutError(f"no answer within {budget:g} s") from None
            if got == rid:
                return head, body
            if got == 0 and head.get("op") == "hello":
                child.ready = True

    def slice(self) -> tuple[bytes, dict]:
        """The window's last `analysis_window`, as npz bytes, with the node's description."""
        d = self.daemon
        now = d.clock()
        groups = {k: v for k, v in d.window.export(now - d.config.analysis_window).items()
                  if k in GROUPS}
        meta = d.window_meta()
        return groups_to_npz(groups, meta, compress=False), meta

    def run_once(self) -> dict | None:
        """One analysis of the current window. Returns the report (Report.to_json()), or None
        when there is too little data; raises AnalysisUnavailable when the child failed."""
        if self._stop.is_set():
            return None
        t0 = time.perf_counter()
        with self._lock:
            child = self._child
        if child is None or not child.alive():
            if child is not None:
                self._discard_child(f"exited with status {child.proc.poll()}")
                raise AnalysisUnavailable("the analysis process exited")
            if time.monotonic() < self._next_start:
                raise AnalysisUnavailable("the analysis process is restarting")
            self.restarts += self._started
            child = self._start_child()
        payload, meta = self.slice()
        header = {"op": "analyze", "step": self.daemon.config.fast_interval,
                  "node": meta.get("node", ""), "min_rows": MIN_ROWS}
        try:
            head, body = self._request(child, header, payload)
            if head.get("error"):
                # The analysis raised on this data: a bug to log, not a dead process.
                raise ValueError(head["error"])
            answer = json.loads(body) if body else {}
            report = answer.get("report")
            if report is not None and not (isinstance(report.get("findings"), list)
                                           and isinstance(report.get("gpus"), list)):
                raise ValueError("the report lacks findings or gpus")
        except (ChildGone, TimeoutError, OSError) as e:
            self._discard_child(str(e) or type(e).__name__)
            raise AnalysisUnavailable(f"the analysis process failed: {e}") from None
        except ValueError as e:
            self.errors += 1
            raise AnalysisUnavailable(f"the analysis failed: {e}") from None
        if report is None:
            self.report = None  # nothing current to say; never the findings of old data
            self.reason = "too little data in the window"
            return None
        self.runs += 1
        self.duration = time.perf_counter() - t0
        self.last_run = self.daemon.clock()
        self._report_mono = time.monotonic()
        self.report = report
        self.reason = ""
        self._log_new(report, answer.get("headlines") or [])
        return report

    def _log_new(self, report: dict, headlines: list) -> None:
        self._reported, lines = finding_log(self._reported, report["findings"], headlines)
        for level, line in lines:
            log.log(level, "%s", line)

    def stale_after(self) -> float:
        """Seconds after which the last report no longer describes the node."""
        return STALE_RUNS * max(self.daemon.config.analysis_interval, 1.0)

    def current(self) -> dict | None:
        """The latest report while current (see the module's docstring); None otherwise."""
        report, made = self.report, self._report_mono
        if report is None or made is None:
            return None
        if time.monotonic() - made > self.stale_after():
            self.report = None
            self._reported = {}
            self.reason = self.reason or "the analysis has not run recently"
            return None
        return report

    def window_levels(self, seconds: float) -> dict[tuple[str, str], float]:
        """Each GPU's levels (LEVELS) over the window's last `seconds`."""
        ring = self.daemon.window.rings().get("gpu")
        if ring is None:
            return {}
        since = self.daemon.clock() - seconds
        columns = {}
        for key in ring.channels():
            signal, _, gpu = key.partition(":")
            if signal in LEVELS:
                columns[(signal, gpu)] = ring.column(key, since)
        return levels(columns, since)

    def look(self) -> None:
        """One look at the window: a run when the schedule says so, else the report stands.
        Never a skip while the analysis process is not running: a report is kept current
        only by a process that could make it again (a dead one is found and restarted at
        this look, and its report withdrawn three intervals after the last run)."""
        cfg = self.daemon.config
        sched = self.schedule
        sched.interval = cfg.analysis_interval  # a reload may have changed them
        sched.max_interval = max(cfg.analysis_max_interval, cfg.analysis_interval)
        now = time.monotonic()
        seen = self.window_levels(cfg.analysis_interval)
        if self.child_pid() is not None and not sched.due(now, seen, self.current()):
            self.skipped += 1
            self._report_mono = time.monotonic()  # looked at now: it still describes the node
            return
        sched.begin()
        if self.run_once() is not None:
            sched.ran(now, seen)

    def _loop(self) -> None:
        name_os_thread()
        cfg = self.daemon.config
        # The first run waits for half a window of data.
        if self._stop.wait(min(cfg.analysis_window / 2, 30.0)):
            return
        while True:
            try:
                self.look()
            except AnalysisUnavailable as e:
                if self._stop.is_set():
                    return
                if "failed" in str(e) and str(e) != self.reason:
                    log.error("%s", e)
                self.reason = str(e)
            except Exception as e:  # the analysis must never take the daemon down
                self.errors += 1
                self.reason = f"the analysis failed: {e}"
                log.error("analysis failed: %s", e)
            self.current()  # drop a stale report even when nobody reads it
            if self._stop.wait(self.daemon.config.analysis_interval):
                return

    # --- what it exports ------------------------------------------------------------------------

    def findings_document(self) -> dict:
        report = self.current()
        if report is None:
            return {"status": "unavailable" if self.runs or self.errors else "warming up",
                    "reason": self.reason, "findings": [],
                    "window_seconds": self.daemon.config.analysis_window}
        return {"status": "ok", **report}

    def series(self) -> list:
        out = [("agentd_analysis_runs_total", (), float(self.runs)),
               ("agentd_analysis_skipped_total", (), float(self.skipped)),
               ("agentd_analysis_errors_total", (), float(self.errors)),
               ("agentd_analysis_window_seconds", (), self.daemon.config.analysis_window)]
        if self.last_run:
            out += [("agentd_analysis_duration_seconds", (), self.duration),
                    ("agentd_analysis_last_run_timestamp_seconds", (), self.last_run)]
        out.append(("agentd_child_restarts_total", ("analysis",), float(self.restarts)))
        pid = self.child_pid()
        if pid is not None:
            out += child_series("analysis", pid)
        r = self.current()
        if r is None:
            return out
        gpu = self.daemon.runner("gpu")
        uuids = {str(i): g["uuid"] for i, g in gpu.sampler.meta()["gpus"].items()} \
            if gpu is not None and gpu.available else {}
        out += finding_series(r["findings"], uuids)
        for g in r["gpus"]:
            lab = (str(g.get("gpu")), uuids.get(str(g.get("gpu")), ""))
            for name, key in (("agentd_gpu_stall_ratio", "stall"),
                              ("agentd_gpu_compute_ratio", "computing"),
                              ("agentd_gpu_step_period_seconds", "step_period_seconds")):
                value = g.get(key)
                if isinstance(value, (int, float)) and (key != "step_period_seconds" or value):
                    out.append((name, lab, float(value)))
        return out


def finding_series(findings: list[dict], uuids: dict[str, str]) -> list:
    """One series per (kind, GPU) of the report's findings (Report.to_json()'s): a finding
    about GPUs 0 and 1 is two series, so a label never holds a list and a finding that
    spreads to another GPU keeps its series (an alert's `for:` does not restart). Findings
    come ranked; where two of one kind concern the same GPU (the whole window's and a recent
    onset's), the first (larger gain) wins. A finding about the node as a whole has gpu=""
    and uuid=""."""
    out: list = []
    seen: set = set()
    for f in findings:
        kind = str(f.get("kind", ""))
        values = (("agentd_finding_expected_speedup_ratio", (f.get("gain") or {}).get("speedup")),
                  ("agentd_finding_stall_ratio", f.get("stall_fraction")),
                  ("agentd_finding_confidence_ratio", f.get("confidence")))
        for g in [str(g) for g in (f.get("subject") or {}).get("gpus", [])] or [""]:
            if (kind, g) in seen:
                continue
            seen.add((kind, g))
            lab = (kind, g, uuids.get(g, ""))
            out.append(("agentd_finding_active", (kind, str(f.get("severity", ""))) + lab[1:],
                        1.0))
            out += [(name, lab, float(v)) for name, v in values if isinstance(v, (int, float))]
    return out
