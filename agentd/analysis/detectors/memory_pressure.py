"""The dataset no longer fits in the page cache: file pages evicted are read again from
storage (refaults), a large share of all reads, while readers stall (memory pressure, or the
storage at its limit). Refaults explain a storage saturation: the cause outranks the symptom.
Ratios of near-zero rates never make a finding (REFAULT_FLOOR)."""

from __future__ import annotations

from agentd.analysis.detectors import input_storage
from agentd.analysis.detectors.common import confidence, fmt_rate, input_finding
from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding

REFAULT_FLOOR = 2e6  # bytes/s of refaults (500 pages/s) below which nothing is judged
REFAULT_SHARE = 0.3  # refaults as a share of the data disks' reads
PSI_MEMORY = 0.05


def detect(ev: Evidence, starved: list[str]) -> list[Finding]:
    if not starved or not ev.refault.n or not ev.read_total.n:
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
        ["The dataset no longer fits in the page cache: free host memory (other jobs, "
         "oversized pinned buffers), add RAM, or stage the data on local NVMe.",
         "Read each sample once per epoch in a shuffled-shard layout (WebDataset, TFRecord) "
         "so the cache is not thrashed by random re-reads."])]
