"""A GPU that fell off the bus (NVML_ERROR_GPU_IS_LOST, XID 79) or stopped reporting while its
peers go on: the most important finding there is. Its job has crashed or hangs."""

from __future__ import annotations

from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding


def detect(ev: Evidence) -> list[Finding]:
    if not ev.lost_gpus:
        return []
    gpus = ev.lost_gpus
    where = "reported lost by the driver" if ev.sig.meta.get("gpus") else \
        "no longer reported while its peers are"
    return [Finding(
        kind="gpu_lost", subject=ev.subject(gpus), t0=ev.t0, t1=ev.t1, confidence=0.95,
        severity="critical",
        summary=f"GPU {', '.join(gpus)} {where}: every job using it has failed or hangs",
        mechanism="the device stopped answering (NVML GPU_IS_LOST / series gone)",
        evidence={"gpus_lost": len(gpus), "gpus_total": len(ev.gpus)},
        gain={"speedup": None, "busy_now": None, "busy_after": None},
        advice=["Drain the node: the GPU needs a reset (nvidia-smi -r) or a reboot, and the "
                "jobs on it a restart from their last checkpoint.",
                "Look for XID 79 / 48 / 94 / 95 in the kernel log (dmesg) and in "
                "agentd_gpu_xid_errors_total; repeated losses mean a hardware ticket "
                "(power, riser, the GPU itself)."],
        stall_fraction=1.0)]
