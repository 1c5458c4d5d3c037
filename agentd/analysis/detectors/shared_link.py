"""GPUs and NVMe drives behind one PCIe switch share its uplink, per direction: NVMe reads
(and device-to-host copies) flow upstream, host-to-device copies (and writes) downstream.
A direction whose summed bytes need nearly all the uplink's time holds the GPUs behind it
back; so do host-to-device copies that need about the time the GPUs idle (when their own
links alone would not): a data-parallel job's ranks copy their batches at once, through the
one uplink. Reads need the time the drive takes, not the uplink's: an uplink below its
ceiling upstream is never why a drive is slow (input_storage judges the drive)."""

from __future__ import annotations

from agentd.analysis.detectors.common import (EXPLAINS_HI, EXPLAINS_LO, SATURATED, confidence,
                                              fmt_rate, input_finding, margin)
from agentd.analysis.detectors.h2d_pcie import judge as own_link
from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding


def detect(ev: Evidence, starved: list[str]) -> list[Finding]:
    out = []
    for u in ev.uplinks:
        gpus = [g for g in u.gpus if g in starved]
        if not gpus:
            continue
        idle = sum(ev.gpus[g].idle.mean for g in gpus) / len(gpus)
        best = None
        for direction, est in (("downstream", u.down), ("upstream", u.up)):
            if not est.n:
                continue
            share = est.mean / u.capacity
            lo = (est.mean - 1.645 * est.se) / u.capacity
            explained = share / idle if idle > 0 else 0.0
            if share >= SATURATED and lo >= SATURATED - 0.05:
                cand = (direction, share, 0.85 * margin(share, SATURATED, 0.1))
            elif direction == "downstream" and EXPLAINS_LO <= explained <= EXPLAINS_HI and \
                    not any(own_link(ev, g) for g in gpus):
                cand = (direction, share, 0.7)
            else:
                continue
            if best is None or cand[1] > best[1]:
                best = cand
        if best is None:
            continue
        direction, share, conf = best
        what = "host-to-device copies" if direction == "downstream" else "NVMe reads"
        out.append(input_finding(
            ev, "shared_link", gpus, confidence(conf, ev),
            f"the {direction} of switch {u.switch}'s uplink carries {share * 100:.0f}% of "
            "what it can",
            f"{what} of GPUs {', '.join(gpus)}"
            + (f" and drives {', '.join(u.disks)}" if u.disks else "")
            + f" share switch {u.switch}'s {fmt_rate(u.capacity)} uplink, "
            f"{share * 100:.0f}% used {direction}",
            {"switch": u.switch, "direction": direction, "uplink_utilization": share,
             "uplink_capacity_bytes_per_second": u.capacity,
             "downstream_bytes_per_second": u.down.mean,
             "upstream_bytes_per_second": u.up.mean, "disks": ",".join(u.disks)},
            ["Spread the traffic: read the data from a drive behind another switch or a CPU "
             "root port, place jobs so GPUs on one switch do not all copy at once, or stage "
             "data in host memory first.",
             "Check the uplink trains at its maximum generation and width (lspci -vv: LnkSta "
             "against LnkCap)."]))
    return out
