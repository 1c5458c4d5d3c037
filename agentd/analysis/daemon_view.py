"""What the daemon's own rolling analysis said over a range that a coarse source covers.

`agentd run` analyses the last minute of its 10 Hz window every 10 s and exports the findings
as agentd_finding_* (agentd/daemon/rolling.py). Read back from Prometheus, those series carry
what 1-30 s scrapes cannot show: reads alternating with compute inside a step, copies
slower than the link within a gap, the bytes of a collective flowing while the SMs wait.
The Prometheus source maps them into signals counted per scrape in each step:

    daemon.scrapes:            the node's scrapes
    daemon.reports:            those that served a current report
    daemon.finding             per "KIND@GPU" (GPU "" for the node): the severest served,
                               0 none, 1 info, 2 warning, 3 critical (NaN: no report)
    daemon.finding_warned      the reports that held it at warning or worse
    daemon.finding_named       the reports that named it at all
    daemon.finding_stall       the stall they claimed, summed (a share of the GPU's time each)
    daemon.finding_confidence  its confidence, while named

`read` sums them over the range: a finding the daemon held at warning or worse in most of
its reports is persistent, the range's diagnosis seen at a resolution the source lacks; one
named in fewer is transient, worth a note. Only the classes agentd knows, on GPUs the node
has. Pure: arrays in, summaries out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agentd.analysis.findings import KINDS
from agentd.analysis.signals import Signals

SEVERITY = {1: "info", 2: "warning", 3: "critical"}
# The daemon held the finding at warning or worse in at least this share of its reports over
# the range: the range's finding, not an episode of it.
PERSISTENT = 0.5
# Its analysis reported in at least this share of the node's scrapes over the range: less,
# and what it said describes too little of the range to stand for it.
COVERED = 0.5
# A finding held at warning or worse in at least this share of the reports is mentioned.
MENTIONED = 0.1
# Kinds the source's own series measure as well as the daemon (or better, over a longer
# range), or that name no cause.
OWN_KINDS = ("gpu_lost", "idle_allocated", "unexplained_idle")


@dataclass
class Held:
    kind: str
    gpus: list[str]
    share: float  # of the daemon's reports, at warning or worse (mean over its GPUs)
    severity: str  # the median severity of the steps it warned in
    stall: float  # the daemon's stall, averaged over its reports (0 in those without it)
    stall_named: float  # ... over the reports that named it
    confidence: float  # its mean confidence while named (NaN: not exported)
    persistent: bool = False  # held at warning or worse in PERSISTENT of the reports


@dataclass
class View:
    covered: float  # share of the node's scrapes with a current report
    persistent: list[Held]
    transient: list[Held]


def read(sig: Signals) -> View | None:
    """The daemon's findings over the range; None where the source carries none (not a
    Prometheus with agentd's analysis, or it never reported a finding)."""
    reports = sig.get("daemon.reports")
    subjects = sig.subjects("daemon.finding")
    if reports is None or not subjects:
        return None
    scrapes = sig.get("daemon.scrapes")
    with_data = np.zeros(len(sig.t), bool)
    for g in sig.gpus():
        with_data |= np.isfinite(sig.get("gpu.busy", g))
    if not with_data.any():
        with_data[:] = True
    reports = np.nan_to_num(reports)[with_data]
    total = float(reports.sum())
    if total <= 0:
        return None
    seen = float(np.nan_to_num(scrapes)[with_data].sum()) if scrapes is not None else total
    covered = min(total / seen, 1.0) if seen > 0 else 1.0
    gpus_here = set(sig.gpus())
    by_kind: dict[str, list[tuple]] = {}
    for sub in subjects:
        kind, _, g = sub.partition("@")
        if kind not in KINDS or kind in OWN_KINDS or g not in gpus_here:
            continue

        def series(signal: str) -> np.ndarray | None:  # over the steps with GPU data
            v = sig.get(signal, sub)
            return None if v is None else np.asarray(v, dtype=float)[with_data]

        w, named, st, conf = (series("daemon.finding_warned"), series("daemon.finding_named"),
                              series("daemon.finding_stall"),
                              series("daemon.finding_confidence"))
        warned, times, stall = (float(np.nan_to_num(x).sum()) if x is not None else 0.0
                                for x in (w, named, st))
        level = np.nan_to_num(series("daemon.finding"))
        steps = (np.nan_to_num(w) > 0) if w is not None else level >= 2
        c = float("nan")
        if conf is not None and named is not None:
            weights = np.nan_to_num(named) * np.isfinite(conf)
            if weights.sum() > 0:
                c = float(np.sum(np.nan_to_num(conf) * weights) / weights.sum())
        share = min(warned / total, 1.0)
        if share >= MENTIONED:
            by_kind.setdefault(kind, []).append(
                (g, share, level[steps & (level >= 2)], min(stall / total, 1.0),
                 min(stall / times, 1.0) if times > 0 else 0.0, c))
    held: list[Held] = []
    for kind, rows in by_kind.items():
        for persistent in (True, False):
            group = [r for r in rows if (r[1] >= PERSISTENT) == persistent]
            if not group:
                continue
            levels = np.concatenate([r[2] for r in group])
            confs = [r[5] for r in group if r[5] == r[5]]
            held.append(Held(
                kind=kind, gpus=sorted((r[0] for r in group), key=lambda g: (len(g), g)),
                share=float(np.mean([r[1] for r in group])),
                severity=SEVERITY[int(np.median(levels))] if len(levels) else "warning",
                stall=float(np.mean([r[3] for r in group])),
                stall_named=float(np.mean([r[4] for r in group])),
                confidence=float(np.mean(confs)) if confs else float("nan"),
                persistent=persistent))
    persistent = [h for h in held if h.persistent] if covered >= COVERED else []
    transient = [h for h in held if h not in persistent]
    return View(covered, persistent, transient)


def describe(h: Held) -> str:
    return f"{h.kind} on GPU {','.join(h.gpus)} ({h.share * 100:.0f}% of its reports)"
