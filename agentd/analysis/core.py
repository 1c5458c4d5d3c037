"""analyze(): signals in, a ranked diagnosis out. Pure: no I/O, no clock, no globals.

    measure the window once (evidence.py)
    -> device findings: lost GPUs, idle allocations, throttling, stragglers
    -> the GPUs starved of input significantly above the source's noise (detectors/common.py)
    -> for each, the best-evidenced input mechanism, root causes before their symptoms
    -> collective waits, only where no input cause and no straggler explains them
    -> from a coarse source that carries the daemon's own findings (daemon_view.py): what
       its 10 Hz analysis held for most of the range, where these series measured no cause
    -> what is left: `unexplained_idle` at info, with what would tell it apart
A healthy node (no GPU losing 5% of its job time significantly above noise, no device fault)
gets no finding at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agentd.analysis import daemon_view
from agentd.analysis import detectors as D
from agentd.analysis.detectors import common as C
from agentd.analysis.detectors import h2d_pcie, input_cpu
from agentd.analysis.evidence import Evidence, measure
from agentd.analysis.findings import SEVERITIES, WARN_CONFIDENCE, Finding, gain_from_stall, \
    json_safe, worst_severity
from agentd.analysis.signals import Signals

# Among input causes, a root cause outranks its symptom; then the clearer evidence wins.
ROOT_ORDER = {"memory_pressure": 0, "shared_link": 1, "input_storage": 2, "input_cpu": 2,
              "h2d_pcie": 2, "io_h2d_serialized": 3}
# The input causes' kinds (one detector each), and with the idle no cause explains.
CAUSE_KINDS = {d.__name__.rsplit(".", 1)[-1] for d in D.INPUT}
INPUT_KINDS = CAUSE_KINDS | {"unexplained_idle"}


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
    collective: float | None
    stall: float
    stall_standard_error: float | None
    job_seconds: float
    step_period_seconds: float | None
    step_period_interval: list | None
    step_period_note: str
    steps_per_second: float | None
    lost: bool = False


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
    missing: list[str] = field(default_factory=list)
    spare_gpus: list[dict] = field(default_factory=list)
    lost_gpu_hours: float = 0.0
    lost_cost: float | None = None
    throughput: dict = field(default_factory=dict)
    covered_seconds: float = 0.0

    def worst_severity(self) -> str | None:
        return worst_severity(self.findings)

    def to_json(self) -> dict:
        return json_safe({
            "node": self.node, "window": {"start": self.t0, "end": self.t1,
                                          "covered_seconds": self.covered_seconds},
            "resolution_seconds": self.resolution, "source": self.source,
            "findings": [f.to_json() for f in self.findings],
            "gpus": [dict(g.__dict__) for g in self.gpus],
            "spare_gpus": self.spare_gpus, "signals_missing": self.missing,
            "lost_gpu_hours": self.lost_gpu_hours, "lost_cost": self.lost_cost,
            "throughput": self.throughput, "notes": self.notes,
        })


def _root_rank(f: Finding) -> int:
    """ROOT_ORDER's rank; memory pressure judged from reclaim stalls alone (no refault
    counts, the storage not at its limit) explains nothing another detector measured."""
    if f.kind == "memory_pressure" and "refault_share" not in f.evidence and \
            not f.evidence.get("storage_at_limit"):
        return max(ROOT_ORDER.values()) + 1
    return ROOT_ORDER.get(f.kind, 9)


def _input_findings(ev: Evidence, starved: list[str]) -> list[Finding]:
    """For starved GPUs, the best-evidenced input cause each; GPUs with the same cause form
    one finding."""
    if not starved:
        return []
    by_gpu: dict[str, tuple] = {}
    for det in D.INPUT:
        for f in det.detect(ev, starved):
            key = (_root_rank(f), -f.confidence)
            for g in f.gpus:
                if g in starved and (g not in by_gpu or key < by_gpu[g][0]):
                    by_gpu[g] = (key, det, f.kind)
    groups: dict[tuple, list[str]] = {}
    for g, (_, det, kind) in by_gpu.items():
        groups.setdefault((det, kind), []).append(g)
    out = []
    for (det, kind), gpus in groups.items():
        gpus.sort(key=lambda s: (len(s), s))
        # Re-run the chosen detector on its own GPUs, so the finding's numbers are theirs.
        out += [f for f in det.detect(ev, gpus) if f.kind == kind]
    return out


def _unexplained(ev: Evidence, gpus: list[str]) -> Finding:
    stall = C.stall_of(ev, gpus)
    busy = C.busy_of(ev, gpus)
    tell = []
    if ev.coarse:
        tell.append(f"samples finer than {ev.sig.resolution:g} s (agentd's 10 Hz window)")
    tell += [f"{m}" for m in ev.missing]
    if not tell:
        tell.append("a profile of the step (PyTorch profiler, nsys): the gap is not in the "
                    "reads, the loader's CPU, the copies or the collectives that agentd sees")
    slow = _slow_copies(ev, gpus)
    if slow:
        tell.append(slow)
    loaders = [ev.loaders[g] for g in gpus if g in ev.loaders]
    node_sat, psi = input_cpu.node_saturated(ev)
    if loaders and node_sat >= input_cpu.NODE_SATURATED and psi >= input_cpu.PSI_CPU:
        tell.append(f"whether the other work that keeps the node's cores {node_sat * 100:.0f}% "
                    f"busy (tasks waiting for a CPU {psi * 100:.0f}% of the time) crowds out "
                    "the loader: its workers have headroom, so they are not what is "
                    "CPU-bound (their wait for a CPU: /proc/PID/schedstat)")
    if loaders and not ev.coarse and all(ld.saturation.mean < 0.7 for ld in loaders
                                         if ld.saturation.n):
        tell.append("whether batches are fetched on demand (no prefetch): the loader has "
                    "headroom, but steps this short hide whether its work alternates with "
                    "compute at 10 Hz (check DataLoader num_workers/prefetch_factor)")
    return Finding(
        kind="unexplained_idle", subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1,
        confidence=0.3, severity="info",
        summary=f"the GPUs run no kernel {stall * 100:.0f}% of their job time and no measured "
                "mechanism (storage, loader CPU, PCIe, collectives) explains it",
        mechanism="none seen",
        evidence={"stall_fraction": stall, "gpu_busy": busy,
                  "stall_standard_error": float(np.mean([ev.gpus[g].idle.se for g in gpus])),
                  **C.period_evidence(ev, gpus)},
        gain=gain_from_stall(busy, stall),
        advice=["What would tell it apart: " + "; ".join(tell) + ".",
                "Common causes of gaps no counter shows: host-side Python between steps "
                "(logging, metrics, .item() syncs), evaluation phases, the optimizer step on "
                "the CPU."],
        stall_fraction=stall)


SLOW_COPY = 0.5  # copies that never pass this share of the pinned ceiling in a sample ...
SLOW_COPY_MIN = 0.1  # ... but do reach this share (below it: copies shorter than a sample)


def _slow_copies(ev: Evidence, gpus: list[str]) -> str:
    """What would tell slow (pageable) copies apart, where the copy ceilings are not measured:
    copies that never run faster than a fraction of the link in a sample (95th percentile),
    and at that rate would take a material share of the time. Without `agentd probe`'s pageable
    ceiling this is no finding: a copy shorter than a sample reads slow in it too."""
    for g in gpus:
        link = ev.links.get(g)
        if link is None or link.pageable.source == "measured" or \
                not link.pinned.known or not link.rx.n:
            continue
        peak = h2d_pcie.peak_rate(link)
        if not peak > 0:
            continue
        share = link.rx.mean / peak
        if SLOW_COPY_MIN * link.pinned.value <= peak < SLOW_COPY * link.pinned.value and \
                share >= C.MIN_STALL:
            return (f"the host-to-device copy rates (`agentd probe` measures pinned and "
                    f"pageable ones): copies ran at up to {peak / 1e9:.1f} GB/s in a sample "
                    f"({peak / link.pinned.value * 100:.0f}% of the {link.pinned.value / 1e9:.0f}"
                    f" GB/s pinned ceiling, {link.pinned.source}); at that rate they would take "
                    f"{share * 100:.0f}% of the time, as copies from pageable memory (or through a "
                    "link shared with other devices) do")
    return ""


def _without_input_symptoms(ev: Evidence, device: list[Finding],
                            inputs: list[Finding]) -> list[Finding]:
    """In a data-parallel job starved of input, ranks wait for each other at the collective
    as their batches arrive at different times: one works harder per busy second than its
    spinning peers, or idles (waiting for its batch) while they spin. That straggling is the
    input's symptom, unless the GPU has a cause of its own (its clocks throttled)."""
    starved = {g for f in inputs for g in f.gpus}
    if not starved:
        return device
    throttled = {g for f in device if f.kind == "throttled" for g in f.gpus}
    groups = [set(grp) for grp in ev.jobs]
    out = []
    for f in device:
        if f.kind == "straggler" and not set(f.gpus) & throttled:
            if f.mechanism.startswith("one rank idles"):
                # The rank idled waiting for its own input, not on host-side work.
                if set(f.gpus) & starved:
                    continue
            else:
                job = next((grp for grp in groups if set(f.gpus) & grp), set(f.gpus))
                if job & starved:
                    continue
        out.append(f)
    return out


def _order(findings: list[Finding]) -> list[Finding]:
    """Severest first; at equal severity the most GPU time lost; a throttled GPU before the
    straggling it causes."""
    findings.sort(key=lambda f: (-SEVERITIES.index(f.severity),
                                 -(f.stall_fraction * max(len(f.gpus), 1)), f.kind))
    thr = {g: f for f in findings if f.kind == "throttled" for g in f.gpus}
    for i, f in enumerate(list(findings)):
        if f.kind == "straggler" and f.gpus and f.gpus[0] in thr:
            t = thr[f.gpus[0]]
            # The straggling is the throttling's consequence: it costs the peers' wait too.
            if SEVERITIES.index(t.severity) < SEVERITIES.index(f.severity):
                t.severity = f.severity
            t.evidence = {**t.evidence, "peers_wait_fraction":
                          f.evidence.get("peers_wait_fraction")}
            findings.remove(t)
            findings.insert(findings.index(f), t)
    gone = [f for f in findings if f.kind == "gpu_lost"]
    return gone + [f for f in findings if f.kind != "gpu_lost"]


def analyze(sig: Signals, options: Options | None = None, node: str = "") -> Report:
    options = options or Options()
    ev = measure(sig, node)
    findings: list[Finding] = []
    for det in D.DEVICE:
        findings += det.detect(ev)
    idle = {g for f in findings if f.kind == "idle_allocated" for g in f.gpus}
    starved = C.starved(ev, exclude=idle)
    inputs = _input_findings(ev, starved)
    findings = _without_input_symptoms(ev, findings, inputs) + inputs
    blocked = {g for f in findings if f.kind == "straggler" and
               f.mechanism.startswith("one rank idles") for g in f.gpus}
    explained = {g for f in inputs for g in f.gpus} | blocked
    if not inputs and not any(f.kind == "straggler" for f in findings):
        for det in D.COLLECTIVE:
            findings += det.detect(ev, idle | set(ev.lost_gpus))
    rest = [g for g in starved if g not in explained]
    view = daemon_view.read(sig)
    if view is not None:
        findings, rest = _with_daemon_view(ev, view, findings, rest, starved)
    if rest:
        findings.append(_unexplained(ev, rest))
    findings = _order(findings)
    return _report(ev, sig, findings, options)


def _with_daemon_view(ev: Evidence, view: "daemon_view.View", findings: list[Finding],
                      rest: list[str], starved: list[str]) -> tuple[list[Finding], list[str]]:
    """Findings the daemon's 10 Hz analysis held for most of the range, on the GPUs where
    this source's series measured no cause: an input cause on GPUs they show starved, a
    collective wait or straggler where no input cause or straggler is measured. What they
    measured stands (it covers the whole range with its evidence), with the daemon's
    agreement added where it is the same; another view of the daemon's is a note. Collective
    waits on the GPUs of an input cause the daemon saw are that cause's symptom."""
    measured = {g for f in findings if f.kind in CAUSE_KINDS | {"straggler"} for g in f.gpus}
    adopted = []
    for h in view.persistent:
        same = [f for f in findings if f.kind == h.kind and set(f.gpus) & set(h.gpus)]
        for f in same:
            f.evidence = {**f.evidence, "daemon_runs_share": h.share}
        agreed = {g for f in same for g in f.gpus}
        other = [g for g in h.gpus if g not in agreed and g in measured]
        fed = [g for g in h.gpus if g not in agreed and g not in measured and
               h.kind in CAUSE_KINDS and g not in starved]
        free = [g for g in h.gpus if g not in agreed and g not in other and g not in fed]
        if other:
            ev.notes.append(f"the daemon's analysis held {h.kind} on GPU {','.join(other)} "
                            f"({h.share * 100:.0f}% of its reports); these series measured "
                            "another cause there")
        if fed:
            ev.notes.append(f"the daemon's analysis held {h.kind} on GPU {','.join(fed)} "
                            f"({h.share * 100:.0f}% of its reports); these series show no "
                            "significant stall there over the range")
        if free:
            adopted.append(_daemon_finding(ev, h, free, view.covered))
    if view.covered < daemon_view.COVERED:
        if view.transient:
            ev.notes.append(f"the daemon's analysis reported in {view.covered * 100:.0f}% of "
                            "the scrapes (" + "; ".join(map(daemon_view.describe, view.transient))
                            + "): too few for its findings to stand for the range")
    else:
        for h in view.transient:
            ev.notes.append("the daemon's analysis named at times " + daemon_view.describe(h))
    if not adopted:
        return findings, rest
    inputs = [f for f in findings + adopted if f.kind in CAUSE_KINDS]
    starved_inputs = {g for f in inputs for g in f.gpus}
    device = [f for f in findings + adopted if f.kind not in CAUSE_KINDS and not (
        f.kind == "comm_wait" and set(f.gpus) & starved_inputs)]
    findings = _without_input_symptoms(ev, device, inputs) + inputs
    explained = {g for f in adopted for g in f.gpus}
    return findings, [g for g in rest if g not in explained]


def _daemon_finding(ev: Evidence, h: "daemon_view.Held", gpus: list[str],
                    covered: float) -> Finding:
    busy = C.busy_of(ev, gpus)
    measured = C.stall_of(ev, gpus)
    # An input cause costs no more than the idle time the series measured.
    stall = min(h.stall, measured) if h.kind in CAUSE_KINDS else h.stall
    conf = h.confidence if h.confidence == h.confidence else WARN_CONFIDENCE
    return Finding(
        kind=h.kind, subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1,
        confidence=round(conf, 2),
        severity=h.severity if conf >= WARN_CONFIDENCE else "info",
        summary=f"agentd's own analysis of its 10 Hz samples named it in {h.share * 100:.0f}% "
                f"of its reports over this range (samples every {ev.sig.resolution:g} s here "
                "cannot show the mechanism)",
        mechanism="named by the daemon's analysis of its 10 Hz window (agentd_finding_active)",
        evidence={"daemon_runs_share": h.share, "daemon_stall_fraction": h.stall_named,
                  "daemon_confidence": h.confidence,
                  "daemon_analysis_covered_share": covered, "stall_measured": measured},
        gain=gain_from_stall(busy, stall),
        advice=["The daemon's evidence in numbers: `agentd diagnose --daemon URL` (its "
                "/api/v1/findings) while the problem lasts, or `agentd record --daemon URL` "
                "for a recording to replay; docs/runbook.md has what to do for "
                f"{h.kind}."],
        stall_fraction=stall)


def _report(ev: Evidence, sig: Signals, findings: list[Finding], options: Options) -> Report:
    gpus = []
    spare = []
    for g, s in ev.gpus.items():
        if s.lost and not s.present.any():
            gpus.append(GpuSummary(g, float("nan"), None, None, float("nan"), None, 0.0, None,
                                   None, "lost", None, lost=True))
            continue
        no_job = len(sig.t) * sig.resolution - s.seconds
        if s.held_known and no_job >= max(30.0, 3 * sig.resolution):
            spare.append({"gpu": g, "seconds_without_job": no_job})
        p = s.period
        gpus.append(GpuSummary(
            g, s.busy_mean, s.compute.mean if s.compute is not None else None,
            s.spin.mean if s.spin is not None else None,
            s.idle.mean if s.idle.n else float("nan"), s.idle.se if s.idle.n else None,
            s.seconds, p.seconds if p else None, list(p.interval) if p else None,
            s.period_note, p.steps_per_second if p else None, lost=s.lost))
    rates = [x.steps_per_second for x in gpus if x.steps_per_second]
    throughput: dict = {}
    if rates:
        steps = float(np.median(rates))
        throughput["steps_per_second"] = steps
        if options.samples_per_step:
            throughput["samples_per_second"] = steps * options.samples_per_step
        if options.tokens_per_step:
            throughput["tokens_per_second"] = steps * options.tokens_per_step
    hours = sig.duration / 3600
    lost = 0.0
    for f in findings:
        if f.kind == "gpu_lost":
            continue
        n = len(f.gpus)
        if f.kind == "straggler":
            n += int(f.evidence.get("peers_spinning") or f.evidence.get("peers_waiting") or 0)
        lost += max(f.stall_fraction, 0.0) * n * hours
    notes = list(ev.notes)
    if ev.coarse:
        notes.append(f"samples every {sig.resolution:g} s: stalls shorter than that average "
                     "out; step period, idle gaps and the overlap of reads with copies cannot "
                     "be resolved")
    if ev.missing:
        notes.append("signals missing from this source: " + "; ".join(ev.missing) +
                     " (the classes that need them cannot be named)")
    if spare:
        notes.append("spare capacity: GPU " + ", ".join(
            f"{s['gpu']} ({s['seconds_without_job']:.0f} s)" for s in spare) +
            " held no job memory part of the window; that time is not counted as a stall")
    if ev.checkpoint_share >= 0.01:
        notes.append(f"{ev.checkpoint_share * 100:.0f}% of the job time went to checkpoints "
                     "(writes or device-to-host copies while the GPUs idled): not counted as "
                     "input stalls")
    limits = sig.meta.get("limits")
    if limits:
        notes.append(str(limits))
    if sig.meta.get("from_model_table"):
        notes.append("PCIe link, maximum SM clock or power limit taken from the GPU model "
                     "table (the source does not export them)")
    return Report(
        node=ev.node, t0=ev.t0, t1=ev.t1, resolution=sig.resolution, source=sig.source,
        findings=findings, gpus=gpus, notes=notes, missing=ev.missing, spare_gpus=spare,
        lost_gpu_hours=lost,
        lost_cost=lost * options.price_per_gpu_hour if options.price_per_gpu_hour else None,
        throughput=throughput, covered_seconds=sig.duration)


RECENT_SECONDS = 20.0
# An input finding of the last RECENT_SECONDS claims a problem that began there: its GPUs
# idle more in them than over the whole window, by this much and significantly. A healthy
# node idles 4-5% between steps, more in one 20 s than the next; judged alone, those 20 s
# crossed the 5% line and raised warnings the whole window never showed (the robustness
# suite's streamed-shards node: 18 of 54 rolling runs).
ONSET_RISE = 0.02


def _began_recently(f: Finding, whole: Report, recent: Report) -> bool:
    if f.kind not in INPUT_KINDS:
        return True  # its loss is no idle share (clocks, a straggler, a collective)
    before = {g.gpu: g for g in whole.gpus}
    now = {g.gpu: g for g in recent.gpus}
    gpus = [g for g in f.gpus if g in before and g in now]
    if not gpus:
        return False
    rise = float(np.mean([now[g].stall - before[g].stall for g in gpus]))
    se = float(np.sqrt(np.mean([(now[g].stall_standard_error or 0.0) ** 2 +
                                (before[g].stall_standard_error or 0.0) ** 2 for g in gpus])))
    return rise >= ONSET_RISE and rise >= 1.645 * se


def analyze_rolling(sig: Signals, options: Options | None = None, node: str = "",
                    recent: float = RECENT_SECONDS) -> Report:
    """The daemon's view: the whole window, plus what its last `recent` seconds show that the
    whole window does not yet (a problem that just began is diluted in a longer window)."""
    report = analyze(sig, options, node)
    if len(sig.t) == 0 or sig.duration <= recent * 1.5:
        return report
    short = analyze(sig.slice(sig.t[-1] - recent, sig.t[-1]), options, node)
    # The same GPUs in another order (a finding lists them by stall) are the same finding.
    known = {(f.kind, frozenset(f.gpus)) for f in report.findings}
    fresh = [f for f in short.findings if (f.kind, frozenset(f.gpus)) not in known
             and f.kind not in ("idle_allocated", "unexplained_idle")
             and f.severity != "info" and _began_recently(f, report, short)]
    for f in fresh:
        f.evidence = {**f.evidence, "onset": f"within the last {recent:.0f} s"}
        f.confidence = round(f.confidence * 0.9, 2)
    if fresh:
        # Recent problems first: the whole window still averages them with the time before.
        report.findings = sorted(fresh, key=lambda f: -f.speedup) + report.findings
    return report
