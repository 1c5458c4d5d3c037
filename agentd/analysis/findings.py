"""What a diagnosis says: a Finding, with its subject, the mechanism seen, the evidence in
numbers, the expected gain and advice."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SEVERITIES = ("info", "warning", "critical")

KINDS = {
    "gpu_lost": "a GPU fell off the bus",
    "idle_allocated": "GPUs allocated but idle",
    "input_storage": "input pipeline bound by storage",
    "input_cpu": "input pipeline bound by CPU preprocessing",
    "h2d_pcie": "host-to-device copies bound by PCIe",
    "io_h2d_serialized": "reads, preprocessing and copies serialized with compute (no prefetch)",
    "shared_link": "storage and GPU copies contend for a shared PCIe uplink",
    "comm_wait": "GPUs wait on collective communication",
    "throttled": "GPU clocks throttled",
    "straggler": "one GPU holds its peers back",
    "memory_pressure": "page cache evicted: data re-read from storage",
    "unexplained_idle": "GPUs idle for a reason the signals do not show",
}

# A finding needs this much confidence in its mechanism to warn; below, it is info.
WARN_CONFIDENCE = 0.5


def json_safe(v):
    """Plain JSON: NaN and infinities become null, numpy numbers Python ones."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def worst_severity(findings: list) -> str | None:
    """The severest severity among the findings, None without any."""
    if not findings:
        return None
    return max((f.severity for f in findings), key=SEVERITIES.index)


def severity_for(lost_fraction: float, confidence: float = 1.0) -> str:
    """How much GPU time the problem costs, as a severity; weak evidence never warns."""
    if not lost_fraction == lost_fraction or confidence < WARN_CONFIDENCE:
        return "info"
    if lost_fraction >= 0.2:
        return "critical"
    if lost_fraction >= 0.05:
        return "warning"
    return "info"


@dataclass
class Finding:
    kind: str
    subject: dict  # node, gpus, and where known processes / unit / container / pod / job
    t0: float
    t1: float
    confidence: float  # 0..1: how clearly the mechanism was seen
    severity: str
    summary: str
    mechanism: str = ""  # what was seen, in one phrase
    evidence: dict = field(default_factory=dict)
    gain: dict = field(default_factory=dict)  # busy_now, busy_after, step_time_change, speedup
    advice: list[str] = field(default_factory=list)
    stall_fraction: float = 0.0  # share of the affected GPUs' time lost to this cause

    @property
    def speedup(self) -> float:
        s = self.gain.get("speedup", 1.0)
        return float(s) if s is not None and s == s else 1.0

    @property
    def gpus(self) -> list[str]:
        return [str(g) for g in self.subject.get("gpus", [])]

    def to_json(self) -> dict:
        return json_safe(asdict(self))

    def headline(self) -> str:
        gpus = self.subject.get("gpus")
        where = f"GPU {','.join(map(str, gpus))}" if gpus else "node"
        return (f"[{self.severity}] {self.kind} on {self.subject.get('node', '?')} {where}: "
                f"{self.summary} (stall {self.stall_fraction * 100:.0f}%, expected speed-up "
                f"{self.speedup:.2f}x; confidence {self.confidence:.2f})")


def gain_from_stall(busy_now: float, recovered: float) -> dict:
    """Expected gain when `recovered` (share of wall time) becomes compute: the same work in
    (1 - recovered) of the time."""
    recovered = min(max(recovered, 0.0), 0.95) if recovered == recovered else 0.0
    speedup = 1.0 / (1.0 - recovered)
    return {
        "busy_now": busy_now,
        "busy_after": min(busy_now * speedup, 1.0) if busy_now == busy_now else None,
        "step_time_change": -recovered,
        "speedup": speedup,
    }
