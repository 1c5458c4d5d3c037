"""`agentd diagnose --plot FILE.png`: the window as one picture (needs matplotlib, the `plot`
extra)."""

from __future__ import annotations

from agentd.analysis.core import Report
from agentd.analysis.signals import Signals


class PlotUnavailable(Exception):
    """matplotlib is not installed (a usage problem, not an unreachable source)."""


def plot(sig: Signals, r: Report, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: install it into agentd's "
                              "environment (pip install matplotlib)") from None
    import numpy as np

    t = sig.t - sig.t[0]
    fig, axes = plt.subplots(4, 1, figsize=(12, 9), sharex=True)
    for g in sig.gpus():
        axes[0].plot(t, sig.get("gpu.busy", g), lw=0.8, label=f"GPU {g}")
    axes[0].set_ylabel("GPU busy")
    axes[0].set_ylim(-0.05, 1.05)
    for g in sig.gpus():
        rx = sig.get("gpu.pcie_rx", g)
        if rx is not None:
            axes[1].plot(t, rx / 1e9, lw=0.8)
    axes[1].set_ylabel("PCIe RX GB/s")
    for d in sig.subjects("disk.read"):
        axes[2].plot(t, sig.get("disk.read", d) / 1e9, lw=0.8, label=d)
    axes[2].set_ylabel("storage GB/s")
    cpu = sig.get("cpu.busy")
    if cpu is not None:
        axes[3].plot(t, cpu, lw=0.8, color="k")
    axes[3].set_ylabel("CPU cores busy")
    axes[3].set_xlabel("seconds")
    # Shade the stalls: samples where the mean GPU utilization is under 0.5.
    subs, m = sig.matrix("gpu.busy")
    if len(subs):
        stalled = np.nanmean(m, axis=1) < 0.5
        for ax in axes:
            ax.fill_between(t, 0, 1, where=stalled, transform=ax.get_xaxis_transform(),
                            color="red", alpha=0.12, lw=0)
    title = f"{r.node}: " + (", ".join(f.kind for f in r.findings) or "no finding")
    fig.suptitle(title)
    axes[0].legend(fontsize=7, ncol=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


