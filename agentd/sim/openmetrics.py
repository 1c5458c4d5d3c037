"""A simulated run written as the series dcgm-exporter and node_exporter would have exposed
(OpenMetrics with timestamps), for `promtool tsdb create-blocks-from openmetrics`: how the
tests and the demo put cluster-style data into a real Prometheus without those exporters."""

from __future__ import annotations

import numpy as np

from agentd.analysis.signals import Signals

MIB = 2**20


def exporters_openmetrics(sig: Signals, host: str, scrape: float = 15.0) -> str:
    """dcgm-exporter (gauges per GPU) and node_exporter (counters) samples every `scrape`
    seconds, from a 10 Hz simulated window. Counters are the running sums of the window's
    rates; gauges are the value at the scrape (as exporters sample them)."""
    k = max(int(round(scrape / sig.resolution)), 1)
    idx = np.arange(k - 1, len(sig.t), k)
    ts = sig.t[idx]
    lines: list[str] = []
    dcgm = f'Hostname="{host}",instance="{host}:9400",job="dcgm"'
    node = f'instance="{host}:9100",job="node"'

    def gauge(name: str, help_: str, rows: list[tuple[str, np.ndarray]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} gauge")
        for labels, values in rows:
            for t, v in zip(ts, values):
                if v == v:
                    lines.append(f"{name}{{{labels}}} {v:.6g} {t:.3f}")

    def counter(name: str, help_: str, rows: list[tuple[str, np.ndarray]]) -> None:
        base = name[:-6] if name.endswith("_total") else name
        lines.append(f"# HELP {base} {help_}")
        lines.append(f"# TYPE {base} counter")
        for labels, rates in rows:
            cum = np.cumsum(np.nan_to_num(rates)) * sig.resolution
            for t, v in zip(ts, cum[idx]):
                lines.append(f"{name}{{{labels}}} {v:.6f} {t:.3f}")

    def at_scrape(x: np.ndarray) -> np.ndarray:
        # The exporter's value at the scrape: the last sample before it.
        out = np.full(len(idx), np.nan)
        for j, i in enumerate(idx):
            window = x[max(i - k + 1, 0): i + 1]
            ok = window[~np.isnan(window)]
            out[j] = ok[-1] if len(ok) else np.nan
        return out

    def mean_over(x: np.ndarray) -> np.ndarray:
        out = np.full(len(idx), np.nan)
        for j, i in enumerate(idx):
            window = x[max(i - k + 1, 0): i + 1]
            ok = window[~np.isnan(window)]
            out[j] = ok.mean() if len(ok) else np.nan
        return out

    gpus = sig.gpus()
    # dcgm-exporter's GPU_UTIL is NVML utilization over the driver's last sample period.
    gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).",
          [(f'gpu="{g}",UUID="GPU-{g}",{dcgm}', at_scrape(sig.get("gpu.busy", g)) * 100)
           for g in gpus])
    gauge("DCGM_FI_PROF_PCIE_RX_BYTES", "The rate of data received over the PCIe bus.",
          [(f'gpu="{g}",UUID="GPU-{g}",{dcgm}', mean_over(sig.get("gpu.pcie_rx", g)))
           for g in gpus])
    gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).",
          [(f'gpu="{g}",UUID="GPU-{g}",{dcgm}', at_scrape(sig.get("gpu.mem_used", g)) / MIB)
           for g in gpus])
    gauge("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).",
          [(f'gpu="{g}",UUID="GPU-{g}",{dcgm}', at_scrape(sig.get("gpu.sm_clock", g)) / 1e6)
           for g in gpus])
    gauge("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).",
          [(f'gpu="{g}",UUID="GPU-{g}",{dcgm}', at_scrape(sig.get("gpu.power", g)))
           for g in gpus])
    disks = sig.subjects("disk.read")
    counter("node_disk_read_bytes_total", "The total number of bytes read successfully.",
            [(f'device="{d}",{node}', sig.get("disk.read", d)) for d in disks])
    counter("node_disk_written_bytes_total", "The total number of bytes written.",
            [(f'device="{d}",{node}', sig.get("disk.write", d)) for d in disks
             if sig.get("disk.write", d) is not None])
    counter("node_disk_io_time_seconds_total", "Total seconds spent doing I/Os.",
            [(f'device="{d}",{node}', sig.get("disk.busy", d)) for d in disks])
    counter("node_disk_io_time_weighted_seconds_total",
            "The weighted # of seconds spent doing I/Os.",
            [(f'device="{d}",{node}', sig.get("disk.queue", d)) for d in disks])
    cores = int(np.nanmax(sig.get("cpu.count"))) if sig.get("cpu.count") is not None else 1
    zero = np.zeros(len(sig.t))
    busy = np.nan_to_num(sig.get("cpu.busy")) if sig.get("cpu.busy") is not None else zero
    iowait = np.nan_to_num(sig.get("cpu.iowait")) if sig.get("cpu.iowait") is not None \
        else zero
    rows = []
    for c in range(cores):
        rows.append((f'cpu="{c}",mode="user",{node}', busy / cores))
        rows.append((f'cpu="{c}",mode="iowait",{node}', iowait / cores))
        rows.append((f'cpu="{c}",mode="idle",{node}',
                     np.maximum(1 - (busy + iowait) / cores, 0.0)))
    counter("node_cpu_seconds_total", "Seconds the CPUs spent in each mode.", rows)
    for res in ("io", "cpu", "memory"):
        x = sig.get(f"psi.{res}")
        if x is not None:
            counter(f"node_pressure_{res}_waiting_seconds_total",
                    f"Total time in seconds that processes have waited for {res}.",
                    [(node, _hold(x))])
    full = sig.get("psi.io_full")
    if full is not None:
        counter("node_pressure_io_stalled_seconds_total",
                "Total time in seconds no process could make progress due to IO congestion.",
                [(node, _hold(full))])
    blocked = sig.get("cpu.procs_blocked")
    if blocked is not None:
        gauge("node_procs_blocked", "Number of processes blocked waiting for I/O to complete.",
              [(node, at_scrape(_hold(blocked)))])
    for name, signal in (("node_memory_MemAvailable_bytes", "mem.available"),
                         ("node_memory_Cached_bytes", "mem.cached")):
        x = sig.get(signal)
        if x is not None:
            gauge(name, f"Memory information field {name[12:-6]}.",
                  [(node, at_scrape(_hold(x)))])
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _hold(x: np.ndarray) -> np.ndarray:
    """A slow signal (one sample a second) held between samples."""
    out = np.array(x, dtype=float)
    last = 0.0
    for i, v in enumerate(out):
        if v == v:
            last = v
        else:
            out[i] = last
    return out
