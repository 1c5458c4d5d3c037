"""NVIDIA XID codes, grouped by what the operator must do about them.

An XID is the driver's report of a GPU fault. Most codes say the application faulted (an
illegal address, a page fault): the job's owner has a bug to fix and the node is fine. Others
say the GPU, its memory, its links or its firmware failed: the node must be drained. The
exporter counts XIDs per class in agentd_gpu_xid_errors_total{class=...}, every class exported
at 0 from the GPU's first sample, so that increase() sees the first event of each class and
alerts can tell a crashed job from a failed GPU. The code itself is in
agentd_gpu_xid_code_errors_total{xid=...} and agentd_gpu_xid_last_code.

Source: NVIDIA's XID documentation (docs.nvidia.com/deploy/xid-errors/, "Xid Errors" and
"Analyzing Xid Errors with the Xid Catalog": mnemonic, description and the "Resolution Bucket
(Immediate Action)" RESTART_APP / RESET_GPU / RESTART_BM / CONTACT_SUPPORT), and
docs.nvidia.com/deploy/dynamic-page-retirement/ for 48/63/64. The grouping into classes is
agentd's: codes whose immediate action is to restart the application and whose usual cause is
the application are "application"; memory errors that the GPU corrected or contained, which
need a GPU reset at a convenient time, are "degraded"; the rest are "fatal". A code that is
not in this table is "unknown": new drivers add codes, and an unknown fault deserves a look.
docs/runbook.md (AgentdGpuXid) carries the same table; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

APPLICATION, DEGRADED, FATAL, UNKNOWN = "application", "degraded", "fatal", "unknown"
CLASSES = (APPLICATION, DEGRADED, FATAL, UNKNOWN)


@dataclass(frozen=True)
class Xid:
    code: int
    name: str
    klass: str
    action: str


XIDS: dict[int, Xid] = {x.code: x for x in [
    Xid(13, "graphics engine exception", APPLICATION,
        "usually an illegal access by the application (out-of-range index, bad kernel); tell "
        "the job's owner; repeated on one GPU across jobs: run diagnostics"),
    Xid(31, "GPU memory page fault (MMU fault)", APPLICATION,
        "usually the application read or wrote an invalid address; tell the job's owner"),
    Xid(43, "GPU stopped processing (channel reset by a user-level fault)", APPLICATION,
        "the application faulted and its channel was reset; other jobs are unaffected"),
    Xid(45, "preemptive cleanup after earlier errors", APPLICATION,
        "the driver ended a context after another fault (a killed job, an earlier XID): "
        "look at the XID before it"),
    Xid(63, "ECC page retirement or row remapping recorded", DEGRADED,
        "a memory row was marked for remapping; reset the GPU (or reboot) at the next "
        "convenient moment to apply it"),
    Xid(92, "high single-bit ECC error rate", DEGRADED,
        "corrected errors are frequent; watch agentd_gpu_ecc_errors_total and plan a check"),
    Xid(94, "contained ECC error", DEGRADED,
        "an uncorrectable memory error was contained: the affected application must "
        "restart, others run on; reset the GPU at the next convenient moment"),
    Xid(48, "double-bit ECC error", FATAL,
        "uncorrectable memory error: drain, reset the GPU; repeated: hardware ticket"),
    Xid(61, "internal micro-controller breakpoint or warning", FATAL,
        "firmware fault: drain and reset the GPU; report with nvidia-bug-report.sh"),
    Xid(62, "internal micro-controller halt", FATAL,
        "firmware halted: drain and reset the GPU; report with nvidia-bug-report.sh"),
    Xid(64, "ECC page retirement or row remapping failed", FATAL,
        "the memory could not be repaired: drain; hardware ticket (RMA)"),
    Xid(74, "NVLink error", FATAL,
        "an NVLink failed; collectives fail or slow down: drain, reset, check the links "
        "(nvidia-smi nvlink -e)"),
    Xid(79, "GPU has fallen off the bus", FATAL,
        "the GPU is gone (agentd_gpu_lost follows): drain, reboot or reseat; hardware ticket"),
    Xid(95, "uncontained ECC error", FATAL,
        "an uncorrectable memory error could not be contained: drain and reset the GPU"),
    Xid(119, "GSP RPC timeout", FATAL,
        "the GPU System Processor stopped answering: drain, reset the GPU or reboot"),
    Xid(120, "GSP error", FATAL,
        "the GPU System Processor failed: drain, reset the GPU or reboot"),
    Xid(140, "unrecovered ECC error", FATAL,
        "an ECC error could not be recovered: drain and reset the GPU"),
    Xid(154, "GPU recovery action changed", FATAL,
        "the driver requires a GPU reset, a node reboot or a drain (the kernel log says "
        "which): act on it"),
]}


def classify(code: int) -> str:
    x = XIDS.get(code)
    return x.klass if x is not None else UNKNOWN
