"""Input bound by storage: the data devices deliver reads at their ceiling (measured by
`agentd probe`, else a device-class default), or, where no ceiling is known, the readers are
seen stalled on I/O (pressure "full": no task could progress; the loader's processes in D
state) while the loader's CPU has headroom. Busy time is no evidence: NVMe reads ~100% busy
at half its throughput."""

from __future__ import annotations

from agentd.analysis.detectors.common import (MIN_STALL, SATURATED, confidence, fmt_rate,
                                              input_finding, margin)
from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding

PSI_FULL = 0.25  # all non-idle tasks stalled on I/O this share of the time
IOWAIT_SHARE = 0.25  # idle cores spend this share "in iowait" (tasks blocked on reads) ...
IOWAIT_PER_GPU = 0.5  # ... and at least this many cores' worth per starved GPU
PSI_SOME = 0.6
BLOCKED = 0.3  # share of the loader's workers in D state
LOADER_HEADROOM = 0.7  # the loader's workers use less than this share of their cores
RULED_OUT = 0.7  # a measured ceiling this far from reached rules storage out

CONFIDENCE = {"measured": 0.9, "nominal": 0.8, "default": 0.7}


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%" if x == x else "n/a"


def _num(x: float) -> str:
    return f"{x:.1f}" if x == x else "n/a"


def detect(ev: Evidence, starved: list[str]) -> list[Finding]:
    if not ev.disks or not starved:
        return []
    at_ceiling = [d for d in ev.disks.values()
                  if d.limit.known and d.utilization.n and d.utilization.lo >= SATURATED - 0.05
                  and d.utilization.mean >= SATURATED]
    loaders = [ev.loaders[g] for g in starved if g in ev.loaders]
    loader_sat = max((ld.saturation.mean for ld in loaders if ld.saturation.n), default=float(
        "nan"))
    blocked = max((ld.blocked.mean for ld in loaders if ld.blocked.n), default=float("nan"))
    if at_ceiling:
        d = max(at_ceiling, key=lambda x: x.utilization.mean)
        conf = CONFIDENCE.get(d.limit.source, 0.7) * margin(d.utilization.mean, SATURATED,
                                                             0.1)
        mechanism = (f"{d.name} reads at {d.utilization.mean * 100:.0f}% of its ceiling "
                     f"({d.limit.basis})")
        summary = (f"storage cannot keep up: {d.name} delivers {fmt_rate(d.read.mean)}, "
                   f"{d.utilization.mean * 100:.0f}% of the {fmt_rate(d.limit.value)} it can "
                   "read")
    else:
        # No ceiling: the readers themselves must be seen waiting on I/O.
        full = ev.psi_io_full.mean if ev.psi_io_full.n else float("nan")
        some = ev.psi_io.mean if ev.psi_io.n else float("nan")
        idle_cores = (ev.cpu_limit.value - ev.cpu_busy.mean) if ev.cpu_limit.known and \
            ev.cpu_busy.n else float("nan")
        iowait = ev.iowait / idle_cores if idle_cores == idle_cores and idle_cores > 0 and \
            ev.iowait == ev.iowait else float("nan")
        waiting = (blocked == blocked and blocked >= BLOCKED) or (
            iowait == iowait and iowait >= IOWAIT_SHARE and
            ev.iowait >= IOWAIT_PER_GPU * len(starved))
        stalled = (full == full and ev.psi_io_full.lo >= PSI_FULL) or (
            some == some and some >= PSI_SOME and waiting)
        cpu_free = loader_sat != loader_sat or loader_sat < LOADER_HEADROOM
        # Only a measured ceiling with clear headroom rules storage out; a nominal one (the
        # drive's link) is an upper bound the drive itself may never reach.
        headroom = [x for x in ev.disks.values() if x.limit.source == "measured" and
                    x.utilization.n and x.utilization.mean < RULED_OUT]
        if not (stalled and cpu_free) or headroom:
            return []
        # Waiting readers are what any loader reading without pause shows (pressure "some"
        # at 100% and workers in D state on a drive at 65% of its link, keeping up): without
        # a ceiling reached they name storage only where the GPUs' stall is clearly above the
        # moderate line: significantly, or by twice (a healthy node's 60 s windows idle 4-5%;
        # one of the robustness suite's warned at 5.0%; a storage-bound job's 19% read at
        # 30 s scrapes has a standard error of 9 points).
        starved = [g for g in starved if ev.gpus[g].idle.above(MIN_STALL) or
                   ev.gpus[g].idle.mean >= 2 * MIN_STALL]
        if not starved:
            return []
        d = max(ev.disks.values(), key=lambda x: x.read.mean)
        conf = 0.6 * (1.0 if blocked == blocked else 0.9)
        ceiling = (f"below its {d.limit.source} ceiling ({d.utilization.mean * 100:.0f}% of "
                   f"{fmt_rate(d.limit.value)}), which the drive itself may not reach"
                   if d.limit.known else "its ceiling is unknown")
        mechanism = (f"readers stalled on I/O (pressure some {some * 100:.0f}%, full "
                     f"{_pct(full)}; iowait {_num(ev.iowait)} cores; loader workers in D "
                     f"state {_pct(blocked)}) with CPU to spare; {d.name} reads {ceiling}")
        summary = (f"the data loader waits on storage: tasks wait for reads "
                   f"{some * 100:.0f}% of the time at {fmt_rate(d.read.mean)} from {d.name}"
                   + ("" if d.limit.source == "measured" else " (no measured ceiling)"))
    dev = d.name
    return [input_finding(
        ev, "input_storage", starved, confidence(conf, ev), mechanism, summary,
        {"device": dev, "read_bytes_per_second": d.read.mean,
         "read_ceiling_bytes_per_second": d.limit.value, "ceiling_source": d.limit.source,
         "read_utilization": d.utilization.mean if d.utilization.n else None,
         "request_bytes": d.request_bytes, "queue_depth": d.queue, "await_seconds": d.await_s,
         "psi_io": ev.psi_io.mean if ev.psi_io.n else None,
         "psi_io_full": ev.psi_io_full.mean if ev.psi_io_full.n else None,
         "loader_saturation": loader_sat, "loader_blocked_share": blocked,
         "iowait_cores": ev.iowait},
        [f"{dev} is the limit: stage the dataset on faster local NVMe or in memory, or spread "
         "it over more devices.",
         "Read fewer, larger objects (sharded WebDataset/TFRecord files) and keep more "
         "requests in flight (more DataLoader workers or prefetch); compress samples if "
         "the CPU has headroom."] + ([] if d.limit.source == "measured" else [
             "Measure the device's real ceiling with `agentd probe --storage PATH` so this "
             "judgement rests on a number, not a default."]))]
