"""`agentd diagnose --plot FILE.png`: the window as one picture an engineer can read (needs
matplotlib, the `plot` extra).

Four panels on one wall-clock axis: GPU busy as a band over the GPUs (min to max, median
line) rather than one line per GPU; host-to-device PCIe against the link's capacity; storage
reads per device against its measured ceiling; CPU against the cores there are. Stalls (the
median GPU under half busy) are shaded across all four. The title names the node, the range
and the top finding.
"""

from __future__ import annotations

import datetime
import math
import os

import numpy as np

from agentd.analysis.core import Report
from agentd.analysis.findings import KINDS
from agentd.analysis.signals import Signals
from agentd.diagnose import OutputError

STALL_BELOW = 0.5  # median GPU busy under this: a stall
MAX_DEVICES = 4  # storage devices drawn one by one; the rest are summed
_BAND = "#4C72B0"
_STALL = "#D62728"
_CEILING = "#555555"


class PlotUnavailable(Exception):
    """--plot cannot be honoured: matplotlib is not installed, or the file type is not one it
    writes (a usage problem, exit 2, not an unreachable source)."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: install it into agentd's "
                              "environment (pip install matplotlib)") from None
    return plt


def check_target(path: str) -> None:
    """Before any sampling: matplotlib is there, it writes this file type, and the file can be
    created. Raises PlotUnavailable (usage) or OutputError."""
    plt = _pyplot()
    if os.path.isdir(path):
        raise OutputError(f"--plot {path} is a directory")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    types = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if ext not in types:
        raise PlotUnavailable(f"--plot {path}: the name must end in one of "
                              f"{', '.join('.' + t for t in sorted(types))}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"--plot {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"--plot {path}: directory {parent} is not writable")


def _finite(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _band(sig: Signals, signal: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """min, median, max over the subjects that have data (NaN where none has)."""
    subs, m = sig.matrix(signal)
    keep = [i for i in range(len(subs)) if np.isfinite(m[:, i]).any()]
    if not keep:
        nan = np.full(len(sig.t), np.nan)
        return nan, nan, nan, []
    m = m[:, keep]
    with np.errstate(all="ignore"), _quiet():
        return (np.nanmin(m, axis=1), np.nanmedian(m, axis=1), np.nanmax(m, axis=1),
                [subs[i] for i in keep])


class _quiet:
    """Silence numpy's all-NaN-slice warnings (a missing sample is expected)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _spans(mask: np.ndarray, t: np.ndarray, step: float) -> list[tuple[float, float]]:
    """Runs of True in `mask` as (start, end) times; each sample covers the step before t."""
    out = []
    start = None
    for i, on in enumerate(mask):
        if on and start is None:
            start = t[i] - step
        if not on and start is not None:
            out.append((start, t[i - 1]))
            start = None
    if start is not None:
        out.append((start, t[-1]))
    return out


def _smooth(x: np.ndarray, n: int) -> np.ndarray:
    """Moving mean over n samples, ignoring missing ones (NaN where all are missing)."""
    if n <= 1:
        return x
    ok = np.isfinite(x)
    k = np.ones(n)
    num = np.convolve(np.where(ok, x, 0.0), k, mode="same")
    den = np.convolve(ok.astype(float), k, mode="same")
    with np.errstate(all="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _ranges(gpus: list) -> str:
    """[0, 1, 2, 3, 6] -> "0-3,6"."""
    try:
        nums = sorted(int(g) for g in gpus)
    except (TypeError, ValueError):
        return ",".join(map(str, gpus))
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(f"{nums[i]}-{nums[j]}" if j > i + 1 else
                   ",".join(map(str, nums[i:j + 1])))
        i = j + 1
    return ",".join(out)


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB/s" if x >= 1e9 else f"{x / 1e6:.0f} MB/s"


def _title(sig: Signals, r: Report, lost: list[str]) -> str:
    t0 = datetime.datetime.fromtimestamp(sig.t[0] - sig.resolution).astimezone()
    t1 = datetime.datetime.fromtimestamp(sig.t[-1]).astimezone()
    same_day = t0.date() == t1.date()
    span = sig.duration
    length = f"{span / 3600:.1f} h" if span >= 7200 else (
        f"{span / 60:.0f} min" if span >= 120 else f"{span:.0f} s")
    first = (f"{r.node or sig.node or '?'}   {t0:%Y-%m-%d %H:%M:%S}–"
             f"{t1:%H:%M:%S}" if same_day else f"{t0:%Y-%m-%d %H:%M}–{t1:%Y-%m-%d %H:%M}")
    first += f" {t1:%Z} ({length}, {sig.source}, one sample every {sig.resolution:g} s)"
    if r.findings:
        f = r.findings[0]
        gpus = f.subject.get("gpus") or []
        where = f"GPU {_ranges(gpus)}" if gpus else "the node"
        g = f.gain
        gain = f", {f.speedup:.2f}x steps/s" if f.speedup > 1.005 else ""
        busy = ""
        if g.get("busy_now") == g.get("busy_now") and g.get("busy_after") == \
                g.get("busy_after") and g.get("busy_now") is not None:
            busy = f": busy {g['busy_now'] * 100:.0f}% → ~{g['busy_after'] * 100:.0f}%"
        second = (f"[{f.severity}] {KINDS.get(f.kind, f.kind)} on {where}{busy}{gain}"
                  + (f"  (+{len(r.findings) - 1} more)" if len(r.findings) > 1 else ""))
    else:
        second = "No finding: the GPUs are not starved in this window"
    if lost:
        second += f"   —   GPU {_ranges(lost)} lost"
    return first + "\n" + second


def plot(sig: Signals, r: Report, path: str) -> None:
    """Write the picture of the window and its report to `path` (PNG)."""
    fig = figure(sig, r)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def figure(sig: Signals, r: Report):
    """The matplotlib Figure (PlotUnavailable without matplotlib)."""
    plt = _pyplot()
    import matplotlib.dates as mdates

    tz = datetime.datetime.now().astimezone().tzinfo
    when = np.array([datetime.datetime.fromtimestamp(x, tz) for x in sig.t])
    fig, axes = plt.subplots(4, 1, figsize=(13, 10), sharex=True,
                             gridspec_kw={"height_ratios": [1.3, 1, 1, 1]})
    ax_gpu, ax_pcie, ax_disk, ax_cpu = axes
    ceilings = sig.meta.get("ceilings") or {}

    # GPU busy: a band over the GPUs, its median, and SM activity's median where known.
    lo, med, hi, gpus = _band(sig, "gpu.busy")
    lost = sorted({g for g in sig.gpus() if g not in gpus}
                  | {str(g) for g in sig.meta.get("gpus_lost", []) if str(g) not in gpus},
                  key=lambda g: (len(g), g))
    ax_gpu.fill_between(when, lo * 100, hi * 100, color=_BAND, alpha=0.25, lw=0,
                        label=f"min–max of {len(gpus)} GPUs")
    # At a fine resolution over a long window, a raw line is a comb: draw it thin and its
    # one-second mean on top (what a step-averaged view shows).
    n = int(round(1.0 / sig.resolution)) if sig.resolution < 0.5 and sig.duration > 20 else 1
    mean = ", 1 s mean" if n > 1 else ""

    def line(ax, y, color, label, scale=1.0, **kw):
        if n > 1:
            ax.plot(when, y * scale, color=color, lw=0.4, alpha=0.45)
        ax.plot(when, _smooth(y, n) * scale, color=color, lw=kw.pop("lw", 1.3),
                label=label + mean, **kw)

    line(ax_gpu, med, "#1B2A49", "median GPU", 100)
    _, sm, _, sm_gpus = _band(sig, "gpu.sm_active")
    if sm_gpus:
        line(ax_gpu, sm, "#8172B3", "median SM activity", 100, ls="--", lw=1.0)
    # The GPUs the top finding singles out (a straggler, a throttled GPU), on their own.
    top = r.findings[0] if r.findings else None
    picked = [str(g) for g in (top.subject.get("gpus") or [])] if top else []
    if top and 0 < len(picked) <= 3 and len(picked) < len(gpus):
        for g, color in zip(picked, ("#C44E52", "#DD8452", "#937860")):
            busy = sig.get("gpu.busy", g)
            if busy is not None:
                line(ax_gpu, busy, color, f"GPU {g} ({top.kind})", 100, lw=1.1)
            active = sig.get("gpu.sm_active", g)
            if active is not None:
                line(ax_gpu, active, color, f"GPU {g} SM activity", 100, ls="--", lw=0.9)
    ax_gpu.set_ylim(-3, 103)
    ax_gpu.set_ylabel("GPU busy %")

    # Stalls: the median GPU under half busy, shaded on every panel. A coarse source's
    # samples are means (a 15 s sample at 60% hides 6 s of stalls): there, the time the
    # median GPU waited is the area above its line.
    stalled = np.nan_to_num(med, nan=1.0) < STALL_BELOW
    spans = _spans(stalled, sig.t, sig.resolution)
    if sig.resolution > 1.0 and gpus:
        ax_gpu.fill_between(when, np.nan_to_num(med, nan=1.0) * 100, 100, color=_STALL,
                            alpha=0.10, lw=0, label="time the median GPU waited")
    for ax in axes:
        for a, b in spans:
            ax.axvspan(datetime.datetime.fromtimestamp(a, tz), datetime.datetime.fromtimestamp(
                b, tz), color=_STALL, alpha=0.12, lw=0)
    if spans:
        stall_share = float(stalled.mean())
        ax_gpu.fill_between([], [], [], color=_STALL, alpha=0.12, lw=0,
                            label=f"stall: median GPU < {STALL_BELOW:.0%} busy "
                                  f"({stall_share:.0%} of the time)")

    # PCIe host-to-device: the band over GPUs against the link's capacity (and a measured
    # pinned-copy ceiling when `agentd probe` gave one).
    lo, med, hi, rx_gpus = _band(sig, "gpu.pcie_rx")
    if rx_gpus:
        ax_pcie.fill_between(when, lo / 1e9, hi / 1e9, color="#55A868", alpha=0.25, lw=0,
                             label="min–max over GPUs")
        line(ax_pcie, med, "#2D7A3E", "median GPU", 1e-9)
    caps = [_finite(np.nanmax(c)) for c in (sig.get("gpu.pcie_capacity", g) for g in rx_gpus)
            if c is not None and np.isfinite(c).any()]
    cap = max((c for c in caps if c), default=None)
    if cap:
        ax_pcie.axhline(cap / 1e9, color=_CEILING, ls="--", lw=1.2,
                        label=f"link capacity {_gb(cap)}")
    pinned = [_finite(e.get("pinned_bytes_per_second")) for e in
              (ceilings.get("h2d") or {}).values() if isinstance(e, dict)]
    pinned = [p for p in pinned if p]
    if pinned:
        ax_pcie.axhline(float(np.median(pinned)) / 1e9, color=_CEILING, ls=":", lw=1.4,
                        label=f"measured pinned copies {_gb(float(np.median(pinned)))}")
    ax_pcie.set_ylabel("PCIe host→GPU\nGB/s per GPU")

    # Storage: the busiest devices one by one, each against its measured ceiling.
    devices = sorted(sig.subjects("disk.read"),
                     key=lambda d: -np.nan_to_num(np.nanmean(sig.get("disk.read", d)))
                     if np.isfinite(sig.get("disk.read", d)).any() else 0.0)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    storage = ceilings.get("storage") or {}
    for i, d in enumerate(devices[:MAX_DEVICES]):
        c = colors[i % len(colors)]
        line(ax_disk, sig.get("disk.read", d), c, d, 1e-9)
        e = storage.get(d)
        ceiling = _finite(e.get("seq_read_bytes_per_second")) if isinstance(e, dict) else None
        if ceiling:
            ax_disk.axhline(ceiling / 1e9, color=c, ls="--", lw=1.2,
                            label=f"{d} ceiling {_gb(ceiling)}")
    if len(devices) > MAX_DEVICES:
        rest = np.nansum([sig.get("disk.read", d) for d in devices[MAX_DEVICES:]], axis=0)
        line(ax_disk, rest, "#999999", f"{len(devices) - MAX_DEVICES} other devices", 1e-9)
    ax_disk.set_ylabel("storage reads\nGB/s")

    # CPU: busy cores and the data loaders' share, against the cores there are.
    trees = [sig.get("proc.cpu", s) for s in sig.subjects("proc.cpu")]
    if trees:
        line(ax_cpu, np.nansum(trees, axis=0), "#DD8452",
             f"GPU process trees ({len(trees)})", lw=2.0)
    cpu = sig.get("cpu.busy")
    if cpu is not None:
        line(ax_cpu, cpu, "#222222", "busy cores (node)", lw=1.0)
    count = sig.get("cpu.count")
    cores = _finite((ceilings.get("cpu") or {}).get("cores")) if isinstance(
        ceilings.get("cpu"), dict) else None
    if cores is None and count is not None and np.isfinite(count).any():
        cores = _finite(np.nanmax(count))
    if cores:
        ax_cpu.axhline(cores, color=_CEILING, ls="--", lw=1.2, label=f"{cores:g} cores")
    ax_cpu.set_ylabel("CPU cores")

    for ax, what in zip(axes[1:], ("PCIe", "storage", "CPU")):
        if not ax.get_lines():  # absent, not zero: say so
            ax.text(0.5, 0.5, f"no {what} data in this source", transform=ax.transAxes,
                    ha="center", va="center", color="#777777")
            ax.set_yticks([])
        ax.set_ylim(0, max(ax.get_ylim()[1], 1e-3) * 1.08)  # room above the top line
    for ax in axes:
        ax.grid(True, alpha=0.3, lw=0.5)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0),
                      frameon=False, borderaxespad=0)
        ax.margins(x=0)
    locator = mdates.AutoDateLocator(tz=tz)
    ax_cpu.xaxis.set_major_locator(locator)
    ax_cpu.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))
    zone, offset = f"{when[-1]:%Z}", f"UTC{when[-1]:%z}"
    ax_cpu.set_xlabel(f"time ({zone})" if zone in ("UTC", offset) else
                      f"time ({zone}, {offset})")
    fig.suptitle(_title(sig, r, lost), fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig
