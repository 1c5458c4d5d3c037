"""GPU clocks held down by power or heat. With clock-event reasons (agentd, or dcgm-exporter
configured to export them): a power or thermal reason active with the SM clock below its
maximum. Without them (dcgm-exporter's default set): the SM clock while busy well below the
model's maximum with power at its limit or the die hot, or well below its peers'."""

from __future__ import annotations

import numpy as np

from agentd.analysis.evidence import Evidence, held_forward
from agentd.analysis.findings import Finding, gain_from_stall, severity_for
from agentd.analysis.signals import nanmean
from agentd.analysis.stats import robust

THROTTLE_SHARE = 0.2  # reasons active this share of the busy time
THROTTLE_CLOCK = 0.92  # and the SM clock below this share of its maximum meanwhile
# Power and thermal clock-event reasons (bits of gpu.throttle, NVML's order).
THROTTLE_BITS = {2: "sw_power_cap", 3: "hw_slowdown", 5: "sw_thermal_slowdown",
                 6: "hw_thermal_slowdown", 7: "hw_power_brake_slowdown"}
NO_REASONS_CLOCK = 0.88  # without reasons: clock this far under the maximum ...
POWER_AT_LIMIT = 0.95  # ... with power at its limit
HOT = 85.0  # ... or the die this hot (celsius)
PEER_GAP = 0.08  # or this far under the peers' median clock (and robustly so)


def _with_reasons(ev: Evidence, g: str):
    sig = ev.sig
    s = ev.gpus[g]
    bits = sig.get("gpu.throttle", g)
    if bits is None:
        return None
    have = np.isfinite(bits) & s.present & (np.nan_to_num(s.busy) >= 0.3)
    if have.sum() < 5:
        return None
    b = bits[have].astype(np.int64)
    mask = sum(1 << k for k in THROTTLE_BITS)
    active = (b & mask) != 0
    share = float(active.mean())
    clock = held_forward(sig.get("gpu.sm_clock", g), 30)
    if clock is None or not s.clock_max or not active.any():
        return None
    ratio = nanmean(clock[have][active]) / s.clock_max
    if share >= THROTTLE_SHARE and ratio == ratio and ratio < THROTTLE_CLOCK:
        reasons = sorted({THROTTLE_BITS[k] for k in THROTTLE_BITS
                          if ((b >> k) & 1)[active].mean() > 0.2})
        return share, ratio, reasons, "clock-event reasons"
    return None


def _without_reasons(ev: Evidence, g: str, peers):
    s = ev.gpus[g]
    if s.clock is None or s.busy_mean != s.busy_mean or s.busy_mean < 0.3:
        return None
    cmax = s.clock_max
    why = []
    ratio = s.clock / cmax if cmax else float("nan")
    if ratio == ratio and ratio < NO_REASONS_CLOCK:
        if s.power is not None and s.power_limit and s.power >= POWER_AT_LIMIT * s.power_limit:
            why.append("sw_power_cap")
        temp = nanmean(ev.sig.get("gpu.temperature", g))
        if temp == temp and temp >= HOT:
            why.append("thermal")
    if peers.median == peers.median and s.clock <= peers.median * (1 - PEER_GAP) and \
            peers.z(s.clock) <= -4:
        why.append("below_peers")
        if ratio != ratio:
            ratio = s.clock / peers.median
    if not why:
        return None
    return 1.0, ratio, why, "SM clock against " + ("its maximum" if cmax else "its peers")


def detect(ev: Evidence) -> list[Finding]:
    clocks = [ev.gpus[g].clock for g in ev.job_gpus() if ev.gpus[g].clock]
    peers = robust(clocks, floor=0.02 * (float(np.median(clocks)) if clocks else 1.0))
    hits = []
    for g in ev.job_gpus():
        got = _with_reasons(ev, g)
        if got is None and ev.sig.get("gpu.throttle", g) is None:
            got = _without_reasons(ev, g, peers)
        if got is not None:
            hits.append((g, *got))
    if not hits:
        return []
    gpus = [h[0] for h in hits]
    share = float(np.mean([h[1] for h in hits]))
    ratio = float(np.mean([h[2] for h in hits]))
    reasons = sorted({r for h in hits for r in h[3]})
    basis = hits[0][4]
    busy = float(np.mean([ev.gpus[g].busy_mean for g in gpus]))
    comp = [ev.gpus[g].compute.mean for g in gpus if ev.gpus[g].compute is not None]
    computing = float(np.mean(comp)) if comp else busy
    # Compute at full clocks would take `ratio` of the time it takes now.
    recovered = computing * share * (1 - ratio)
    conf = 0.9 if basis == "clock-event reasons" else 0.7
    return [Finding(
        kind="throttled", subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1, confidence=conf,
        severity=severity_for(recovered, conf),
        summary=f"SM clocks at {ratio * 100:.0f}% of maximum for {share * 100:.0f}% of the "
                f"busy time ({', '.join(reasons)})",
        mechanism=f"clocks held down ({basis})",
        evidence={"throttled_share": share, "clock_ratio": ratio, "reasons": ",".join(reasons),
                  "power_watts": float(np.mean([ev.gpus[g].power or np.nan for g in gpus])),
                  "temperature_celsius": float(np.mean(
                      [nanmean(ev.sig.get("gpu.temperature", g)) for g in gpus])),
                  "basis": basis},
        gain=gain_from_stall(busy, recovered),
        advice=["Power cap or heat slows these GPUs: check cooling and airflow, fan and inlet "
                "temperatures, and power limits (nvidia-smi -q -d PERFORMANCE,POWER).",
                "A throttled GPU also slows every peer that synchronises with it: compare "
                "with its peers and open a hardware ticket if one node runs hot."],
        stall_fraction=recovered)]
