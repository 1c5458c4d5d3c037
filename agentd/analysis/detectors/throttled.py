"""GPU clocks held down by power or heat. With clock-event reasons (agentd, or dcgm-exporter
configured to export them): a power or thermal reason active with the SM clock below its
maximum. Without them (dcgm-exporter's default set): the SM clock while busy well below the
model's maximum with power at its limit or the die hot, or well below its peers'; or held
down while the GPU draws well under its model's board power: a power limit set below the
board's (`nvidia-smi -pl`) or locked clocks, since GPU Boost otherwise runs an unconstrained,
cool GPU at its maximum clock."""

from __future__ import annotations

import numpy as np

from agentd.analysis.evidence import Evidence, gpu_model, held_forward
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
CAPPED_CLOCK = 0.94  # clock under this share of the maximum while busy ...
UNDER_BOARD = 0.8  # ... with power (or the enforced limit) under this share of the board's


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
    if not why and _capped_below_board(ev, g, ratio):
        why.append("power_limit_below_board")
    if not why:
        return None
    return 1.0, ratio, why, "SM clock against " + ("its maximum" if cmax else "its peers")


def board_power(ev: Evidence, g: str) -> float | None:
    """The model's rated board power (agentd.gpu.models), whatever limit is enforced."""
    model = gpu_model(ev.sig, g)
    return model.power_limit_watts if model else None


def _capped_below_board(ev: Evidence, g: str, ratio: float) -> bool:
    """The clock held down while the GPU computes, draws well under its board's rated power
    and runs cool: an enforced power limit under the board's (a lower limit reached, or,
    where the source exports no limit, power that never nears the board's) or locked clocks.
    Clock, power and temperature are read in the samples where the GPU computes (busy >=
    0.9): a GPU that idles part of the time reads lower clocks and power, and a cooler die,
    on average, whatever limits its compute. Without a temperature reading, heat cannot be
    ruled out: nothing is claimed."""
    s = ev.gpus[g]
    sig = ev.sig
    board = board_power(ev, g)
    cmax = s.clock_max
    if not (ratio == ratio and ratio < CAPPED_CLOCK) or not board or not cmax:
        return False
    series = [sig.get(k, g) for k in ("gpu.power", "gpu.sm_clock", "gpu.temperature")]
    if any(x is None for x in series):
        return False
    power, clock, temp = (np.asarray(x, dtype=float) for x in series)
    computing = s.present & (np.nan_to_num(s.busy) >= 0.9)
    ok = computing & np.isfinite(power) & np.isfinite(clock) & np.isfinite(temp)
    if ok.sum() < 5:
        return False
    if float(np.median(clock[ok])) >= CAPPED_CLOCK * cmax:
        return False  # at its maximum whenever it computes: low readings were gaps
    if float(np.quantile(temp[ok], 0.9)) >= HOT:
        return False  # hot while computing: the thermal path's to judge
    drawn = float(np.quantile(power[ok], 0.9))  # what it reaches while computing
    enforced = nanmean(sig.get("gpu.power_limit", g)) if _exported_limit(ev, g) else \
        float("nan")
    if enforced == enforced and enforced > 0:
        return enforced <= UNDER_BOARD * board and drawn >= POWER_AT_LIMIT * enforced
    return drawn <= UNDER_BOARD * board


def _exported_limit(ev: Evidence, g: str) -> bool:
    """The source reads the GPU's enforced power limit (not the model table's figure)."""
    return "gpu.power_limit" not in (ev.sig.meta.get("from_model_table") or ()) and \
        ev.sig.get("gpu.power_limit", g) is not None


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
    power = float(np.mean([ev.gpus[g].power or np.nan for g in gpus]))
    board = board_power(ev, gpus[0])
    advice = ["Power cap or heat slows these GPUs: check cooling and airflow, fan and inlet "
              "temperatures, and power limits (nvidia-smi -q -d PERFORMANCE,POWER).",
              "A throttled GPU also slows every peer that synchronises with it: compare "
              "with its peers and open a hardware ticket if one node runs hot."]
    if reasons == ["power_limit_below_board"]:
        # Judged against the model table's board power, not a reason the driver gave: a
        # card the table takes for a larger one would read as capped. Only an exported
        # limit under the board's makes it a warning.
        conf = 0.6 if all(_exported_limit(ev, g) for g in gpus) else 0.45
        basis += (f", drawing {power:.0f} W of the board's {board:.0f} W (model table): a "
                  "power limit set under the board's, or locked clocks")
        advice = ["Read the enforced and default power limits and any locked clocks: "
                  "nvidia-smi -q -d POWER,CLOCK (Enforced / Default Power Limit, Applications "
                  "and locked clocks). If the cap was not meant, restore the default limit "
                  "(nvidia-smi -pl) or unlock clocks (nvidia-smi -rgc).", advice[1]]
    return [Finding(
        kind="throttled", subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1, confidence=conf,
        severity=severity_for(recovered, conf),
        summary=f"SM clocks at {ratio * 100:.0f}% of maximum for {share * 100:.0f}% of the "
                f"busy time ({', '.join(reasons)})",
        mechanism=f"clocks held down ({basis})",
        evidence={"throttled_share": share, "clock_ratio": ratio, "reasons": ",".join(reasons),
                  "power_watts": power, **({"board_power_watts": board} if board else {}),
                  "temperature_celsius": float(np.mean(
                      [nanmean(ev.sig.get("gpu.temperature", g)) for g in gpus])),
                  "basis": basis},
        gain=gain_from_stall(busy, recovered),
        advice=advice,
        stall_fraction=recovered)]
