"""`agentd diagnose --cluster --plot FILE.png`: a job's nodes side by side (needs matplotlib).

One picture per report: the job of the top finding (else the largest job), its nodes as thin
lines and the node that holds it back in red, on one wall-clock axis: compute activity,
SM clocks, busy share, the slowest RDMA port's rate; the analysis windows where the finding
holds are shaded.
"""

from __future__ import annotations

import datetime

import numpy as np

from agentd.cluster.data import Fleet, _quiet
from agentd.cluster.peers import windowed
from agentd.cluster.report import ClusterReport
from agentd.diagnose.plot import PlotUnavailable

PANELS = (("act_max", "compute activity", 1.0, False), ("clock_min", "SM clock (GHz)", 1e-9,
                                                         False),
          ("busy_min", "busy share", 1.0, False), ("net_rate", "slowest port (Gb/s)", 8e-9,
                                                   True))


def plot(fleet: Fleet, r: ClusterReport, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install matplotlib") from None
    jobs = fleet.jobs()
    top = r.findings[0] if r.findings else None
    job = top.subject["job"] if top else max(jobs, key=lambda j: len(jobs[j]))
    members = jobs[job]
    ni = fleet.node_index()
    k = max(int(round(r.window / fleet.step)), 1)
    when = [datetime.datetime.fromtimestamp(t) for t in fleet.t]
    panels = [p for p in PANELS if (fleet.host if p[3] else fleet.gpu).get(p[0]) is not None]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.4 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (fam, label, scale, host) in zip(axes[:, 0], panels):
        rows = [ni[fleet.members[m].node] for m in members] if host else members
        x = windowed((fleet.host if host else fleet.gpu)[fam][rows], k) * scale
        with _quiet():
            ax.plot(when, np.nanmedian(x, axis=0), color="black", lw=1.5, label="job median")
        for i, m in enumerate(members):
            bad = top is not None and fleet.members[m].node == top.subject["node"]
            ax.plot(when, x[i], color="#D62728" if bad else "#4C72B0",
                    lw=1.8 if bad else 0.5, alpha=1.0 if bad else 0.4,
                    label=fleet.members[m].node if bad else None)
        ax.set_ylabel(label)
        if top is not None:
            ax.axvspan(datetime.datetime.fromtimestamp(top.t0),
                       datetime.datetime.fromtimestamp(top.t1), color="#D62728", alpha=0.08)
        ax.legend(loc="upper left", fontsize=8)
    title = f"job {job}: {len(members)} nodes"
    if top is not None:
        title += f" - {top.subject['node']} holds it back ({top.kind})"
    axes[0, 0].set_title(title)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
