"""The dataset no longer fits in the page cache: file pages evicted are read again from
storage (refaults), a large share of all reads, while readers stall (memory pressure, or the
storage at its limit). Refaults explain a storage saturation: the cause outranks the symptom.
Ratios of near-zero rates never make a finding (REFAULT_FLOOR).

Where the source has no refault counter (node_exporter's default vmstat fields drop
`workingset_refault_*`), memory pressure is named only from what PSI measures directly: tasks
stalled on memory reclaim a large share of the time (PSI_STALLING, significantly) while the
GPUs starve; the share of reads that re-fetch evicted pages is then said to be unknown. It
is a warning only with the storage at its limit too (then it outranks that symptom, as
refaults would); alone it is info, and ranks after any cause another detector measured.
"""

from __future__ import annotations

from agentd.analysis.detectors import input_storage
from agentd.analysis.detectors.common import confidence, fmt_rate, input_finding
from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding

REFAULT_FLOOR = 2e6  # bytes/s of refaults (500 pages/s) below which nothing is judged
REFAULT_SHARE = 0.3  # refaults as a share of the data disks' reads
PSI_MEMORY = 0.05
PSI_STALLING = 0.10  # without refault counts: PSI memory "some" at least this share of the time


ADVICE = ["The dataset no longer fits in the page cache: free host memory (other jobs, "
          "oversized pinned buffers), add RAM, or stage the data on local NVMe.",
          "Read each sample once per epoch in a shuffled-shard layout (WebDataset, TFRecord) "
          "so the cache is not thrashed by random re-reads."]


def _stalling(ev: Evidence, starved: list[str]) -> list[Finding]:
    """No refault counter: PSI memory alone, when tasks stall on reclaim much of the time."""
    psi = ev.psi_memory
    if not psi.n or psi.mean < PSI_STALLING or psi.mean - 2 * psi.se < PSI_MEMORY:
        return []
    storage_bound = bool(ev.read_total.n and input_storage.detect(ev, starved))
    # Stalls on reclaim alone may be another tenant's cgroup at its own limit: info. With
    # the storage at its limit too, the likely story is a page cache too small for the data.
    conf = 0.6 + 0.15 * min(psi.mean / 0.5, 1.0) if storage_bound else 0.45
    return [input_finding(
        ev, "memory_pressure", starved, confidence(conf, ev),
        f"tasks stall on memory reclaim {psi.mean * 100:.0f}% of the time"
        + (" and the storage is at its limit" if storage_bound else "")
        + "; this source counts no refaults (re-reads of evicted pages)",
        f"memory is short: tasks stall on reclaim {psi.mean * 100:.0f}% of the time while the "
        "GPUs wait" + (" and the storage reads at its limit (likely re-reading evicted "
                       "pages)" if storage_bound else ""),
        {"psi_memory": psi.mean, "storage_at_limit": storage_bound,
         "read_bytes_per_second": ev.read_total.mean if ev.read_total.n else None},
        ADVICE + ["To see how much of the reading re-fetches evicted pages, export the "
                  "refault counters (node_exporter --collector.vmstat.fields adding "
                  "workingset_refault_file, or agentd's own metrics)."])]


def detect(ev: Evidence, starved: list[str]) -> list[Finding]:
    if not starved:
        return []
    if not ev.refault.n:
        return _stalling(ev, starved)
    if not ev.read_total.n:
        return []
    refault, read = ev.refault.mean, ev.read_total.mean
    if refault < REFAULT_FLOOR or read <= 0 or refault / read < REFAULT_SHARE:
        return []
    share = min(refault / read, 1.0)
    psi = ev.psi_memory.mean if ev.psi_memory.n else float("nan")
    storage_bound = bool(input_storage.detect(ev, starved))
    if not (storage_bound or (psi == psi and psi >= PSI_MEMORY)):
        return []
    conf = 0.55 + 0.3 * share + (0.1 if storage_bound else 0.0)
    return [input_finding(
        ev, "memory_pressure", starved, confidence(conf, ev),
        f"{share * 100:.0f}% of storage reads re-fetch evicted pages"
        + (" and the storage is at its limit" if storage_bound else
           f"; tasks stall on memory {psi * 100:.0f}% of the time"),
        f"{share * 100:.0f}% of storage reads re-fetch pages the cache evicted "
        f"({fmt_rate(refault)} of {fmt_rate(read)}); the GPUs wait for them",
        {"refault_bytes_per_second": refault, "read_bytes_per_second": read,
         "refault_share": share, "psi_memory": psi, "storage_at_limit": storage_bound},
        ADVICE)]
