"""`agentd diagnose --plot`: one picture an engineer can read (agentd/diagnose/plot.py)."""

from __future__ import annotations

import datetime
from dataclasses import replace
import sys

import numpy as np
import pytest

from agentd.analysis.core import analyze
from agentd.analysis.signals import Signals
from agentd.diagnose import plot as P
from agentd.sim import scenario as S
from agentd.sim.signals import simulate

pytest.importorskip("matplotlib")

START = 1.75e9


@pytest.fixture(scope="module")
def starved():
    sig, _ = simulate(S.load("input-storage", seed=0), seconds=40, start=START)
    sig.node = "gpu-node-17"
    # What the probe measured on this (slow) volume: the simulated device's own ceiling.
    read = sig.meta["ceilings"]["storage"]["nvme0n1"]["seq_read_bytes_per_second"]
    assert 0.3e9 < read < 0.71e9
    sig.meta["ceilings"] = {
        "storage": {"nvme0n1": {"source": "measured", "seq_read_bytes_per_second": read}},
        "h2d": {str(g): {"source": "measured", "pinned_bytes_per_second": 2.4e10}
                for g in range(8)},
        "cpu": {"source": "measured", "cores": 32}}
    return sig, analyze(sig, node=sig.node)


def labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_one_readable_picture(starved):
    sig, r = starved
    fig = P.figure(sig, r)
    gpu, pcie, disk, cpu = fig.axes
    # GPU busy is a band over the GPUs with its median, not one line per GPU.
    assert len(gpu.collections) >= 1 and "min–max of 8 GPUs" in labels(gpu)
    assert sum(1 for ln in gpu.get_lines() if ln.get_label().startswith("median GPU")) == 1
    assert len(gpu.get_lines()) < 8
    # Stalls are shaded, on every panel.
    stall = [lb for lb in labels(gpu) if lb.startswith("stall:")]
    assert stall and all(len(ax.patches) > 10 for ax in fig.axes)
    # Link capacity and the measured ceilings are drawn.
    assert any(lb.startswith("link capacity 31.5 GB/s") for lb in labels(pcie))
    assert "measured pinned copies 24.0 GB/s" in labels(pcie)
    read = sig.meta["ceilings"]["storage"]["nvme0n1"]["seq_read_bytes_per_second"]
    assert f"nvme0n1 ceiling {read / 1e6:.0f} MB/s" in labels(disk)
    assert "32 cores" in labels(cpu)
    # The time axis is the wall clock, not seconds from 0.
    left, right = cpu.get_xlim()
    import matplotlib.dates as mdates

    assert mdates.num2date(left).timestamp() == pytest.approx(sig.t[0], abs=1.0)
    assert right - left == pytest.approx(sig.duration / 86400, rel=0.05)
    # The title: node, range, the top finding.
    title = fig._suptitle.get_text()
    t0 = datetime.datetime.fromtimestamp(sig.t[0] - sig.resolution).astimezone()
    assert "gpu-node-17" in title and f"{t0:%Y-%m-%d %H:%M}" in title
    assert "input pipeline bound by storage on GPU 0-7" in title
    assert r.findings[0].kind == "input_storage"


def test_without_ceilings_or_findings_it_says_so():
    sc = S.load("healthy-8gpu-250ms", seed=0)
    sc = replace(sc, job=replace(sc.job, probed=False))  # agentd probe never ran here
    sig, _ = simulate(sc, seconds=20, start=START)
    r = analyze(sig, node="n")
    fig = P.figure(sig, r)
    assert "No finding" in fig._suptitle.get_text()
    assert not any("ceiling" in lb for ax in fig.axes for lb in labels(ax))


def test_coarse_source_shows_the_lost_time_and_a_lost_gpu(tmp_path):
    """At a Prometheus step, a sample is a mean: the time the median GPU waited is drawn as
    the area above it; a GPU without data is named lost, not drawn at 0%."""
    t = START + 15.0 * np.arange(1, 81)
    ch = {f"gpu.busy:{g}": np.full(80, 0.55) for g in range(7)}
    ch["gpu.busy:7"] = np.full(80, np.nan)
    sig = Signals(t, ch, 15.0, "prometheus (agentd)", "gpu-node-3", {"gpus_lost": ["7"]})
    r = analyze(sig, node="gpu-node-3")
    fig = P.figure(sig, r)
    P.plot(sig, r, str(tmp_path / "coarse.png"))
    assert "time the median GPU waited" in labels(fig.axes[0])
    assert "min–max of 7 GPUs" in labels(fig.axes[0])
    assert "GPU 7 lost" in fig._suptitle.get_text()


def test_missing_matplotlib_is_plot_unavailable(starved, monkeypatch, tmp_path):
    sig, r = starved
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(P.PlotUnavailable, match="needs matplotlib"):
        P.plot(sig, r, str(tmp_path / "x.png"))


def test_ranges():
    assert P._ranges([0, 1, 2, 3, 6]) == "0-3,6"
    assert P._ranges(["4"]) == "4"
    assert P._ranges([1, 2]) == "1,2"
