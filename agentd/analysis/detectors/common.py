"""What the detectors share: thresholds (with their reasons), who is starved, and the shape
of an input-pipeline finding."""

from __future__ import annotations

import numpy as np

from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding, gain_from_stall, severity_for

# A GPU loses at least this share of its job time before an input cause is considered:
# 5% of step time waiting is TensorFlow's "moderately input-bound" line ...
MIN_STALL = 0.05
# ... and the stall must be significantly above the source's noise: the lower end of its
# one-sided 95% interval above this.
STALL_LO = 0.025
# Copies or reads "explain" a gap when, at the achievable rate, they need this share of it
# (and not several times more: then they overlap compute and are not the gap's cause).
EXPLAINS_LO, EXPLAINS_HI = 0.6, 1.6
SATURATED = 0.85  # a stage at 85% of its ceiling (lower 95% bound) is at capacity


# A job is judged from its first step: it needs this long from there (and three samples)
# to be judged at all. A job whose first step fell in the window's last second had its
# whole stall read off a handful of samples (the robustness suite's job start, seed
# 673081053: a rolling run warned input_cpu at "14%" from the step's first second).
MIN_JUDGED_SECONDS = 10.0


def starved(ev: Evidence, exclude: set[str] = frozenset()) -> list[str]:
    """Job GPUs whose idle share is at least MIN_STALL and significantly above noise, over
    at least MIN_JUDGED_SECONDS of job time from the first step."""
    out = []
    res = ev.sig.resolution
    for g in ev.job_gpus():
        s = ev.gpus[g]
        if g in exclude or s.idle.n == 0 or \
                s.idle.n * res < max(MIN_JUDGED_SECONDS, 3 * res):
            continue
        if s.idle.mean >= MIN_STALL and s.idle.lo >= STALL_LO:
            out.append(g)
    return out


NO_WORKERS = 1.2  # mean processes in a GPU process' tree: the trainer alone


def trainer_alone(ev: Evidence, g: str) -> bool:
    """The GPU's process tree shows no data-loader workers: the trainer loads its batches
    itself, between steps (PyTorch's DataLoader with num_workers=0)."""
    ld = ev.loaders.get(g)
    return ld is not None and ld.members == ld.members and ld.members <= NO_WORKERS


def stall_of(ev: Evidence, gpus: list[str]) -> float:
    return float(np.mean([ev.gpus[g].idle.mean for g in gpus])) if gpus else 0.0


def busy_of(ev: Evidence, gpus: list[str]) -> float:
    vals = [ev.gpus[g].busy_mean for g in gpus if ev.gpus[g].busy_mean == ev.gpus[g].busy_mean]
    return float(np.mean(vals)) if vals else float("nan")


def period_evidence(ev: Evidence, gpus: list[str]) -> dict:
    periods = [ev.gpus[g].period.seconds for g in gpus if ev.gpus[g].period is not None]
    return {"step_period_seconds": float(np.median(periods))} if periods else {}


def confidence(c: float, ev: Evidence, needs_fine: bool = False) -> float:
    if ev.coarse and needs_fine:
        c *= 0.7
    return round(min(max(c, 0.05), 0.99), 2)


def margin(value: float, threshold: float, span: float) -> float:
    """0.5 at the threshold, rising to 1 at threshold + span."""
    if value != value:
        return 0.5
    return 0.5 + 0.5 * min(max((value - threshold) / span, 0.0), 1.0)


def input_finding(ev: Evidence, kind: str, gpus: list[str], conf: float, mechanism: str,
                  summary: str, evidence: dict, advice: list[str]) -> Finding:
    stall = stall_of(ev, gpus)
    busy = busy_of(ev, gpus)
    peers = _peers_waiting(ev, gpus)
    ev_out = {"stall_fraction": stall, "gpu_busy": busy, **period_evidence(ev, gpus),
              **evidence}
    if peers:
        ev_out["peers_waiting"] = peers
    return Finding(kind=kind, subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1, confidence=conf,
                   severity=severity_for(stall, conf), summary=summary, mechanism=mechanism,
                   evidence=ev_out, gain=gain_from_stall(busy, stall), advice=advice,
                   stall_fraction=stall)


def _peers_waiting(ev: Evidence, gpus: list[str]) -> int:
    """Other GPUs of the node that spin while these idle (a data-parallel job waits for its
    slowest rank): counted where SM activity shows their collective time."""
    others = [g for g in ev.job_gpus() if g not in gpus]
    return sum(1 for g in others if ev.gpus[g].spin is not None and ev.gpus[g].spin.n and
               ev.gpus[g].spin.mean >= MIN_STALL)


def fmt_rate(x: float | None) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{x / 1e9:.2f} GB/s" if x >= 1e8 else f"{x / 1e6:.0f} MB/s"
