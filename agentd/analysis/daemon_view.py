"""What the daemon's own rolling analysis said over a range that a coarse source covers.

`agentd run` analyses the last minute of its 10 Hz window every 10 s and exports the findings
as agentd_finding_* (agentd/daemon/rolling.py). Read back from Prometheus, those series carry
what 1-30 s scrapes cannot show: reads alternating with compute inside a step, copies
slower than the link within a gap, the bytes of a collective flowing while the SMs wait.
The Prometheus source maps them into three signals per "KIND@GPU" subject (GPU "" for a
finding about the node):

    daemon.finding             the severest served in each step: 0 none, 1 info, 2 warning,
                               3 critical; NaN where the daemon served no current report
    daemon.finding_share       the share of the step's reports that held it at warning or worse
    daemon.finding_stall       the share of the GPU's time it said the finding cost, averaged
                               over the step's reports (0 in those without the finding)
    daemon.finding_confidence  its confidence, while named

`persistent` names the findings the daemon held at warning or worse for most of the range
its analysis covered: the range's diagnosis, seen at a resolution the source lacks. A
finding it raised only at times is transient: said in a note, never a finding here. Pure:
arrays in, summaries out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agentd.analysis.signals import Signals

SEVERITY = {1: "info", 2: "warning", 3: "critical"}
# The daemon held the finding at warning or worse in at least this share of the steps its
# analysis reported in: the range's finding, not an episode of it.
PERSISTENT = 0.5
# Its analysis reported in at least this share of the range's steps (with GPU data): less,
# and what it said describes too little of the range to stand for it.
COVERED = 0.5
# A finding warned in at least this share of the reported steps is mentioned in a note.
MENTIONED = 0.1
# Kinds the source's own series measure as well as the daemon (or better, over a longer
# range), or that name no cause.
OWN_KINDS = ("gpu_lost", "idle_allocated", "unexplained_idle")


@dataclass
class Held:
    kind: str
    gpus: list[str]  # "" alone: the node as a whole
    share: float  # of the daemon's reports, at warning or worse (mean over its GPUs)
    severity: str  # the median severity of the steps it warned in
    stall: float  # the daemon's stall, averaged over its reports (0 in those without it)
    stall_named: float  # ... over the reports that named it
    confidence: float  # its mean confidence while named
    persistent: bool = False  # named at warning or worse in PERSISTENT of the steps


@dataclass
class View:
    covered: float  # share of the range's steps with a current report
    persistent: list[Held]
    transient: list[Held]


def _subjects(sig: Signals) -> dict[str, list[str]]:
    """kind -> GPUs the daemon named it on ("" for the node)."""
    out: dict[str, list[str]] = {}
    for sub in sig.subjects("daemon.finding"):
        kind, _, gpu = sub.partition("@")
        out.setdefault(kind, []).append(gpu)
    return out


def read(sig: Signals) -> View | None:
    """The daemon's findings over the range; None where the source carries none (not a
    Prometheus with agentd's analysis, or it never reported)."""
    subjects = _subjects(sig)
    if not subjects:
        return None
    sev = {f"{k}@{g}": sig.get("daemon.finding", f"{k}@{g}")
           for k, gpus in subjects.items() for g in gpus}
    reported = np.zeros(len(sig.t), bool)
    for v in sev.values():
        reported |= np.isfinite(v)
    if not reported.any():
        return None
    busy = [sig.get("gpu.busy", g) for g in sig.gpus()]
    with_data = np.zeros(len(sig.t), bool)
    for b in busy:
        with_data |= np.isfinite(b)
    n_range = int(with_data.sum()) or len(sig.t)
    covered = float((reported & with_data).sum() / n_range) if with_data.any() else \
        float(reported.mean())
    held: list[Held] = []
    for kind, gpus in subjects.items():
        if kind in OWN_KINDS:
            continue
        rows = []
        for g in gpus:
            sub = f"{kind}@{g}"
            level = sev[sub][reported]
            share = sig.get("daemon.finding_share", sub)
            warned = np.nan_to_num(share[reported]) if share is not None else \
                (np.nan_to_num(level) >= 2).astype(float)
            stall = sig.get("daemon.finding_stall", sub)
            stall = np.zeros(len(level)) if stall is None else np.nan_to_num(stall[reported])
            named = np.nan_to_num(level) >= 1
            conf = sig.get("daemon.finding_confidence", sub)
            conf = conf[reported][named] if conf is not None else np.array([])
            rows.append((g, float(warned.mean()), level[warned > 0], float(stall.mean()),
                         float(stall.mean() / named.mean()) if named.any() else 0.0,
                         float(np.nanmean(conf)) if np.isfinite(conf).any() else float("nan")))
        rows = [r for r in rows if r[1] >= MENTIONED]
        if not rows:
            continue
        steady = [r for r in rows if r[1] >= PERSISTENT]
        for group, persistent in ((steady, True),
                                  ([r for r in rows if r[1] < PERSISTENT], False)):
            if not group:
                continue
            levels = np.concatenate([r[2] for r in group])
            held.append(Held(
                kind=kind, gpus=sorted((r[0] for r in group), key=lambda g: (len(g), g)),
                share=float(np.mean([r[1] for r in group])),
                severity=SEVERITY[int(np.median(levels))] if len(levels) else "info",
                stall=float(np.mean([r[3] for r in group])),
                stall_named=float(np.mean([r[4] for r in group])),
                confidence=float(np.nanmean([r[5] for r in group]))
                if any(np.isfinite(r[5]) for r in group) else float("nan"),
                persistent=persistent))
    persistent = [h for h in held if h.persistent] if covered >= COVERED else []
    transient = [h for h in held if h not in persistent]
    return View(covered, persistent, transient)


def describe(h: Held) -> str:
    where = "the node" if h.gpus == [""] else "GPU " + ",".join(h.gpus)
    return f"{h.kind} on {where} ({h.share * 100:.0f}% of its runs)"
