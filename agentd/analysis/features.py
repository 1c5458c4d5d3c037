"""Measurements the detectors share, as pure functions of arrays."""

from __future__ import annotations

import math

import numpy as np

from agentd.analysis.signals import Signals, coverage, nanmean

# numpy only: this module runs inside the daemon, and importing scipy.signal there would
# add ~75 MiB of resident memory (measured: 27 -> 102 MiB) for two small routines.


def find_peaks(x: np.ndarray, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Indexes and heights of the local maxima of x at or above `height` (plateaus count once,
    at their first sample)."""
    if len(x) < 3:
        return np.zeros(0, dtype=int), np.zeros(0)
    d = np.diff(x)
    rising = np.concatenate(([False], d > 0))
    # A maximum: rose into it, and the next change after it is a fall.
    nxt = np.full(len(x), 0.0)
    nonzero = np.flatnonzero(d != 0)
    if len(nonzero):
        after = np.searchsorted(nonzero, np.arange(len(x)), side="left")
        ok = after < len(nonzero)
        nxt[ok] = d[nonzero[after[ok]]]
    peaks = np.flatnonzero(rising & (nxt < 0) & (x >= height))
    return peaks, x[peaks]


def _smooth(x: np.ndarray, width: int = 5) -> np.ndarray:
    if len(x) <= width:
        return x
    return np.convolve(x, np.ones(width) / width, mode="same")


def _pick(x: np.ndarray | None, mask: np.ndarray | None) -> np.ndarray | None:
    return x if mask is None or x is None else x[mask]


def step_period(x: np.ndarray, resolution: float, min_s: float = 0.2,
                max_s: float = 30.0) -> tuple[float | None, float | None, float]:
    """(period, jitter, strength) of a periodic signal: the fundamental among the peaks of
    its autocorrelation (as Falcon finds iteration time), the spread of its cycle lengths,
    and the autocorrelation at that lag (0..1)."""
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) < 20 or np.std(x) < 1e-6:
        return None, None, 0.0
    x = x - x.mean()
    n = len(x)
    f = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(f * np.conj(f))[:n]
    acf /= acf[0]
    lo = max(int(math.ceil(min_s / resolution)), 1)
    hi = min(int(max_s / resolution), n // 2)
    if hi <= lo + 1:
        return None, None, 0.0
    peaks, heights = find_peaks(acf[lo:hi], 0.15)
    if not len(peaks):
        return None, None, 0.0
    lags = peaks + lo
    best = int(np.argmax(heights))
    lag, strength = lags[best], float(heights[best])
    # A sampled signal aliases: its strongest peak can be a multiple of the true period.
    # Take the shortest peak that divides it and is not much weaker.
    for p, h in sorted(zip(lags, heights)):
        if p >= lag:
            break
        ratio = lag / p
        if h >= 0.5 * strength and abs(ratio - round(ratio)) < 0.1:
            lag, strength = p, float(h)
            break
    period = lag * resolution
    smooth = _smooth(x)
    rising = np.flatnonzero((smooth[1:] > 0) & (smooth[:-1] <= 0)) * resolution
    gaps = np.diff(rising)
    gaps = gaps[(gaps > period * 0.5) & (gaps < period * 1.5)]
    jitter = float(np.std(gaps)) if len(gaps) >= 3 else None
    return float(period), jitter, strength


def period_from_bursts(rx: np.ndarray, resolution: float) -> float | None:
    """Step period from host-to-device copies when each step's copy is one short burst
    (isolated non-zero samples): the window's length over the number of copies, each copy
    being the typical burst's bytes. Exact where autocorrelation aliases (steps shorter than
    a few samples)."""
    x = np.nan_to_num(np.asarray(rx, dtype=float)) * resolution  # bytes per sample
    on = x > 0.02 * x.max() if x.max() > 0 else np.zeros(len(x), dtype=bool)
    if on.sum() < 10:
        return None
    idx = np.flatnonzero(on)
    isolated = np.mean([(i == 0 or not on[i - 1]) and (i == len(x) - 1 or not on[i + 1])
                        for i in idx])
    if isolated < 0.8:
        return None  # copies span samples: not countable this way
    per_copy = float(np.median(x[on]))
    copies = float(x.sum()) / per_copy
    return len(x) * resolution / copies if copies >= 5 else None


# SM activity of efficient compute (DCGM's guidance: >= 0.8 is needed for efficient use).
# Used as the computing level when samples are too coarse to see it directly.
EFFICIENT_SM = 0.8


def compute_fraction(busy: np.ndarray, sm: np.ndarray | None, coarse: bool = False
                     ) -> tuple[float, float | None]:
    """(NVML busy fraction, share of time actually computing).

    NVML counts a kernel running as busy, NCCL kernels spinning at a barrier included. SM
    activity separates the two: the SMs' level while computing is the high end of its
    distribution; time at that level is computing, the rest of the busy time is waiting.
    Coarse samples average the two together, so there the level is taken as EFFICIENT_SM."""
    b = nanmean(busy)
    if sm is None or coverage(sm) < 0.3:  # GPM reads every other fast tick
        return b, None
    s = np.asarray(sm, dtype=float)
    s = s[~np.isnan(s)]
    level = max(float(np.quantile(s, 0.9)), EFFICIENT_SM) if coarse else \
        float(np.quantile(s, 0.9))
    if level < 0.05:
        return b, 0.0
    return b, min(float(s.mean()) / level, 1.0)


def duty(x: np.ndarray | None, threshold: float) -> float:
    """Share of samples above a threshold."""
    if x is None:
        return float("nan")
    x = np.asarray(x, dtype=float)
    ok = ~np.isnan(x)
    return float((x[ok] > threshold).mean()) if ok.any() else float("nan")


def correlation(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return float("nan")
    ok = ~np.isnan(a) & ~np.isnan(b)
    if ok.sum() < 10 or np.std(a[ok]) < 1e-9 or np.std(b[ok]) < 1e-9:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def data_disks(sig: Signals) -> list[str]:
    """Devices that carry the reads (the boot disk and idle devices are left out)."""
    devs = sig.subjects("disk.read")
    rates = {d: nanmean(sig.get("disk.read", d)) for d in devs}
    total = sum(v for v in rates.values() if v == v)
    return [d for d, v in rates.items() if total > 0 and v == v and v >= 0.1 * total]


def storage_state(sig: Signals, mask: np.ndarray | None = None) -> dict:
    """Node storage: read rate, how busy and queued the data devices are, I/O pressure."""
    disks = data_disks(sig)

    def pick(x):
        return _pick(x, mask)

    read = sum(np.nan_to_num(pick(sig.get("disk.read", d))) for d in disks) if disks else None
    busy = [nanmean(pick(sig.get("disk.busy", d))) for d in disks]
    queue = [nanmean(pick(sig.get("disk.queue", d))) for d in disks]
    wait = [nanmean(pick(sig.get("disk.await", d))) for d in disks]
    nfs = sum(np.nan_to_num(pick(sig.get("nfs.read", m))) for m in sig.subjects("nfs.read")) \
        if sig.has("nfs.read") else None
    out = {
        "disks": disks,
        "read_bytes_per_second": nanmean(read) if read is not None else float("nan"),
        "busy": max(busy) if busy else float("nan"),
        "queue": max(queue) if queue else float("nan"),
        "await_seconds": max(wait) if wait else float("nan"),
        "psi_io": nanmean(pick(sig.get("psi.io"))),
        "nfs_read_bytes_per_second": nanmean(nfs) if nfs is not None else float("nan"),
    }
    busy_v, q, psi = out["busy"], out["queue"], out["psi_io"]
    # Saturated: the device is busy nearly all the time with requests queueing, or tasks
    # stall on I/O most of the time (PSI), which also covers network filesystems.
    out["saturated"] = bool((busy_v == busy_v and busy_v >= 0.8 and (q != q or q >= 2.0))
                            or (psi == psi and psi >= 0.5))
    out["score"] = max(busy_v if busy_v == busy_v else 0.0, psi if psi == psi else 0.0)
    return out


def cpu_state(sig: Signals, gpu: str, mask: np.ndarray | None = None) -> dict:
    """CPU available to the GPU's data loader: its process tree's use against its workers,
    and the node's cores."""

    def pick(x):
        return _pick(x, mask)

    procs = sig.meta.get("processes", {})
    tree = None
    for pid, info in procs.items():
        if gpu in [str(g) for g in info.get("gpus", [])]:
            tree = pid
            break
    out: dict = {"tree": tree}
    if tree is not None and sig.get("proc.cpu", str(tree)) is not None:
        used = nanmean(pick(sig.get("proc.cpu", str(tree))))
        members = nanmean(pick(sig.get("proc.members", str(tree))))
        workers = max(members - 1, 1) if members == members else float("nan")
        out.update(tree_cores=used, workers=workers,
                   worker_saturation=used / workers if workers == workers else float("nan"))
    cores = nanmean(pick(sig.get("cpu.busy")))
    count = nanmean(pick(sig.get("cpu.count")))
    out["node_cores_busy"] = cores
    out["node_cores"] = count
    out["node_saturation"] = cores / count if count == count and count else float("nan")
    out["psi_cpu"] = nanmean(pick(sig.get("psi.cpu")))
    ws, ns, psi = out.get("worker_saturation", float("nan")), out["node_saturation"], \
        out["psi_cpu"]
    out["saturated"] = bool((ws == ws and ws >= 0.8) or (ns == ns and ns >= 0.9)
                            or (psi == psi and psi >= 0.3))
    out["score"] = max(x for x in (ws, ns, psi, 0.0) if x == x)
    return out


def pcie_state(sig: Signals, gpu: str, mask: np.ndarray | None = None) -> dict:
    rx = _pick(sig.get("gpu.pcie_rx", gpu), mask)
    cap = nanmean(sig.get("gpu.pcie_capacity", gpu))
    out = {"rx_bytes_per_second": nanmean(rx), "capacity_bytes_per_second": cap}
    if rx is None or cap != cap or not cap:
        out.update(duty=float("nan"), utilization=float("nan"), saturated=False, score=0.0)
        return out
    d = duty(rx, 0.05 * cap)
    out["duty"] = d
    out["utilization"] = nanmean(rx) / cap
    # The copy engine never rests: copies take all the time there is between steps.
    out["saturated"] = bool(d == d and d >= 0.85 and out["rx_bytes_per_second"] > 0.1 * cap)
    out["score"] = d if d == d else 0.0
    return out


def uplink_state(sig: Signals, gpu: str) -> dict | None:
    """For a GPU behind a PCIe switch shared with NVMe drives: the uplink's utilization by
    those drives' reads and those GPUs' copies together."""
    for link in sig.meta.get("shared_uplinks", []):
        if gpu not in [str(g) for g in link.get("gpus", [])]:
            continue
        cap = float(link.get("uplink_bytes_per_second") or 0)
        if not cap:
            return None
        total = np.zeros(len(sig.t))
        for g in link["gpus"]:
            total += np.nan_to_num(sig.get("gpu.pcie_rx", str(g)))
        for d in link.get("disks", []):
            total += np.nan_to_num(sig.get("disk.read", d))
        util = float(np.mean(total)) / cap
        return {"switch": link.get("switch", ""), "capacity_bytes_per_second": cap,
                "utilization": util, "saturated": util >= 0.85, "gpus": link["gpus"],
                "disks": link.get("disks", [])}
    return None


def writes_dominate(sig: Signals) -> np.ndarray:
    """Samples where the node's disks mostly write (a checkpoint): GPU gaps there are not an
    input-pipeline problem."""
    if not sig.has("disk.write"):
        return np.zeros(len(sig.t), dtype=bool)
    w = sum(np.nan_to_num(sig.get("disk.write", d)) for d in sig.subjects("disk.write"))
    r = sum(np.nan_to_num(sig.get("disk.read", d)) for d in sig.subjects("disk.read")) \
        if sig.has("disk.read") else np.zeros(len(sig.t))
    return (w > 1e8) & (w > 2 * r)
