"""A timeline as dcgm-exporter and node_exporter would have exposed it, scraped by Prometheus
at 1-30 s, written as OpenMetrics and backfilled into a real Prometheus with promtool.

What each series is (dcgm-exporter's default counters, docs/REFERENCE.md):
- dcgm-exporter collects every `interval` on its own phase; a scrape returns the last
  collection. DCGM_FI_DEV_GPU_UTIL is NVML's last driver sample (one 1/6 s period, integer
  percent) at the collection: an instantaneous read. DCGM_FI_PROF_* (graphics engine, SM,
  tensor, DRAM activity, PCIe bytes/s) are averaged over the collection interval. Power is
  the driver's 1 s average; clocks, temperature and framebuffer use are instants. A lost GPU's
  fields cannot be read any more: its series stop, and DCGM_FI_DEV_XID_ERRORS reads 79.
- node_exporter reads /proc at the scrape: counters cumulative at that instant
  (node_disk_*, node_cpu_seconds_total per CPU and mode, node_pressure_*,
  node_network_*, node_infiniband_*), gauges as they are (MemAvailable, Cached, procs_blocked).

Variants remove what some clusters lack: SM/tensor/DRAM activity (no profiling module),
PCIe bytes, or everything but utilization, power and memory (nvidia-smi readings exported
under dcgm names).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import zlib

import numpy as np

from bench.robustness.hardware import MIB
from bench.robustness.sampling import disk_model, host_signals, node_memory
from bench.robustness.timeline import Timeline

VARIANTS = {
    "full": "dcgm-exporter defaults plus SM activity, node_exporter defaults",
    "no_sm": "no SM, tensor or DRAM activity (DCGM profiling unavailable for those)",
    "no_pcie": "no PCIe byte rates",
    "gpu_only": "utilization, power and memory only (nvidia-smi readings under dcgm names), "
                "no node_exporter",
}
GPU_ONLY = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED",
            "DCGM_FI_DEV_FB_FREE")
NO_SM = ("DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_SM_OCCUPANCY", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
         "DCGM_FI_PROF_DRAM_ACTIVE")
NO_PCIE = ("DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES")


class OpenMetrics:
    """Families of timestamped samples; written with each series' samples together."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_: str, labels: str, ts: np.ndarray,
            values: np.ndarray) -> None:
        base = name[:-6] if kind == "counter" and name.endswith("_total") else name
        fam = self.families.setdefault(base, (kind, help_, []))
        ok = np.isfinite(values)
        fmt = "{:.10g}" if kind == "counter" else "{:.6g}"
        prefix = f"{name}{{{labels}}} "
        fam[2].append("\n".join(prefix + fmt.format(v) + f" {t:.3f}"
                                for t, v in zip(ts[ok], values[ok])))

    def write(self, f) -> None:
        for base, (kind, help_, chunks) in self.families.items():
            chunks = [c for c in chunks if c]
            if not chunks:
                continue
            f.write(f"# HELP {base} {help_}\n# TYPE {base} {kind}\n")
            for c in chunks:
                f.write(c)
                f.write("\n")


def scrape_times(a: float, b: float, every: float, rng: np.random.Generator) -> np.ndarray:
    phase = rng.uniform(0, every)
    t = np.arange(a + phase, b, every)
    return t + rng.normal(0, 0.002, len(t))


def labels_for(tl: Timeline, host: str, style: int) -> tuple[str, str, dict]:
    """(dcgm-exporter base labels, node_exporter labels, per-GPU extra labels). Kubernetes
    nodes are scraped by pod address, so only Hostname / kubernetes_node name the host."""
    k8s = any(j.attribution.get("pod_uid") for j in tl.jobs)
    host_label = "Hostname" if style % 2 == 0 else "hostname"
    if k8s:
        h = zlib.crc32(host.encode())
        ip = f"10.233.{(h >> 8) % 250}.{h % 250}"
        dcgm = f'{host_label}="{host}",instance="{ip}:9400",job="dcgm-exporter"'
        node = f'instance="{ip}:9100",job="node-exporter",kubernetes_node="{host}"'
    else:
        dcgm = f'{host_label}="{host}",instance="{host}:9400",job="dcgm-exporter"'
        node = f'instance="{host}:9100",job="node"'
    extra = {}
    for j in tl.jobs:
        if j.attribution.get("pod_uid"):
            for r in j.gpus:
                extra[r] = ',namespace="training",pod="trainer-0",container="pytorch"'
    return dcgm, node, extra


def exporters_series(tl: Timeline, a: float, b: float, every: float, variant: str,
                     rng: np.random.Generator, om: OpenMetrics, host: str | None = None) -> None:
    """Append one node's dcgm-exporter and node_exporter samples over [a, b] to `om`."""
    node = tl.node
    board = node.board
    dcgm_l, node_l, extra = labels_for(tl, host or node.host, int(rng.integers(2)))
    drop = set(GPU_ONLY) if variant == "gpu_only" else set()
    skip = set(NO_SM) if variant == "no_sm" else set(NO_PCIE) if variant == "no_pcie" else set()

    def want(name: str) -> bool:
        return (not drop or name in drop) and name not in skip

    # --- dcgm-exporter ---
    ts = scrape_times(a, b, every, rng)
    phase = rng.uniform(0, every)
    collect = np.arange(a - 2 * every + phase, b + every, every)
    idx = np.searchsorted(collect, ts, side="right") - 1
    c1 = collect[idx]
    c0 = c1 - every
    period = board.util_period
    u_phase = rng.uniform(0, period)
    driver = "550.54.15"
    for g in range(node.gpus):
        p = tl.gpu[g]
        lost = tl.lost.get(g, np.inf)
        alive = c1 < lost
        lab = (f'gpu="{g}",UUID="{node.uuids[g]}",pci_bus_id="{node.gpu_bus_ids[g]}",'
               f'device="nvidia{g}",modelName="{board.name}",DCGM_FI_DRIVER_VERSION="{driver}",'
               f'{dcgm_l}{extra.get(g, "")}')
        # The driver's last complete sample period before the collection.
        last_end = np.floor((c1 - u_phase - 0.004) / period) * period + u_phase
        util = np.round(100 * p["kernel"].mean(last_end - period, last_end))
        series = {
            "DCGM_FI_DEV_GPU_UTIL": (util, "gauge", "GPU utilization (in %)."),
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE": (p["kernel"].mean(c0, c1), "gauge",
                                              "Ratio of time the graphics engine is active."),
            "DCGM_FI_PROF_SM_ACTIVE": (p["sm"].mean(c0, c1), "gauge",
                                       "The ratio of cycles an SM has at least 1 warp assigned."),
            "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": (p["tensor"].mean(c0, c1), "gauge",
                                                "Ratio of cycles the tensor pipe is active."),
            "DCGM_FI_PROF_DRAM_ACTIVE": (p["dram"].mean(c0, c1), "gauge",
                                         "Ratio of cycles the device memory interface is "
                                         "active sending or receiving data."),
            "DCGM_FI_PROF_PCIE_TX_BYTES": (p["pcie_tx"].mean(c0, c1), "gauge",
                                           "The rate of data transmitted over the PCIe bus."),
            "DCGM_FI_PROF_PCIE_RX_BYTES": (p["pcie_rx"].mean(c0, c1), "gauge",
                                           "The rate of data received over the PCIe bus."),
            "DCGM_FI_DEV_SM_CLOCK": (np.round(p["clock"].at(c1) / 1e6 / 15) * 15, "gauge",
                                     "SM clock frequency (in MHz)."),
            "DCGM_FI_DEV_POWER_USAGE": (p["power"].mean(c1 - 1, c1) *
                                        rng.normal(1, 0.008, len(c1)), "gauge",
                                        "Power draw (in W)."),
            "DCGM_FI_DEV_GPU_TEMP": (np.round(_temperature(tl, g, c1)), "gauge",
                                     "GPU temperature (in C)."),
            "DCGM_FI_DEV_FB_USED": (np.round(p["mem"].at(c1) / MIB), "gauge",
                                    "Framebuffer memory used (in MiB)."),
            "DCGM_FI_DEV_FB_FREE": (np.round((board.memory_total - p["mem"].at(c1)) / MIB),
                                    "gauge", "Framebuffer memory free (in MiB)."),
        }
        for name, (v, kind, help_) in series.items():
            if want(name):
                om.add(name, kind, help_, lab, ts[alive], np.asarray(v, dtype=float)[alive])
        if want("DCGM_FI_DEV_XID_ERRORS"):
            xid = np.where(c1 >= lost, 79.0, 0.0)
            om.add("DCGM_FI_DEV_XID_ERRORS", "gauge",
                   "Value of the last XID error encountered.", lab, ts, xid)
    if variant == "gpu_only":
        return
    # --- node_exporter ---
    ts = scrape_times(a, b, every, rng)
    hs = host_signals(tl, rng)
    for name, m in tl.disks.items():
        dm = disk_model(tl, name)
        lab = f'device="{name}",{node_l}'
        for metric, v, help_ in (
            ("node_disk_read_bytes_total", np.floor(m["read"].integral(ts) / 512) * 512,
             "The total number of bytes read successfully."),
            ("node_disk_written_bytes_total", np.floor(m["write"].integral(ts) / 512) * 512,
             "The total number of bytes written successfully."),
            ("node_disk_reads_completed_total", np.floor(m["read_ops"].integral(ts)),
             "The total number of reads completed successfully."),
            ("node_disk_writes_completed_total", np.floor(m["write_ops"].integral(ts)),
             "The total number of writes completed successfully."),
            ("node_disk_read_time_seconds_total", np.floor(dm["queue"].integral(ts) * 1e3) / 1e3,
             "The total number of seconds spent by all reads."),
            ("node_disk_write_time_seconds_total", np.zeros(len(ts)),
             "This is the total number of seconds spent by all writes."),
            ("node_disk_io_time_seconds_total", np.floor(dm["busy"].integral(ts) * 1e3) / 1e3,
             "Total seconds spent doing I/Os."),
            ("node_disk_io_time_weighted_seconds_total",
             np.floor(dm["queue"].integral(ts) * 1e3) / 1e3,
             "The weighted # of seconds spent doing I/Os."),
        ):
            om.add(metric, "counter", help_, lab, ts, v + _offset(name + metric))
    # CPU: the node's busy time spread over its CPUs (the analysis reads sums and counts).
    cores = node.cores
    base = ts - a + 86400.0
    user = hs["user"].integral(ts)
    system = hs["system"].integral(ts)
    iowait = hs["iowait"].integral(ts)
    for c in range(cores):
        lab = f'cpu="{c}",{node_l}'
        u, s_, w = user / cores, system / cores, iowait / cores
        for mode, v in (("user", u), ("system", s_), ("iowait", w),
                        ("idle", base - u - s_ - w)):
            om.add("node_cpu_seconds_total", "counter", "Seconds the CPUs spent in each mode.",
                   f'{lab},mode="{mode}"', ts, np.floor(v * 100) / 100)
    for res, key, kind in (("io", "psi_io", "waiting"), ("io", "psi_io_full", "stalled"),
                           ("cpu", "psi_cpu", "waiting"), ("memory", "psi_mem", "waiting")):
        om.add(f"node_pressure_{res}_{kind}_seconds_total", "counter",
               f"Total time in seconds that processes have {kind} for {res}.", node_l, ts,
               np.floor(hs[key].integral(ts) * 1e6) / 1e6 + _offset(res + kind))
    mem = node_memory(tl, ts)
    om.add("node_memory_MemAvailable_bytes", "gauge", "Memory information field "
           "MemAvailable_bytes.", node_l, ts, mem["available"])
    om.add("node_memory_Cached_bytes", "gauge", "Memory information field Cached_bytes.",
           node_l, ts, mem["cached"])
    om.add("node_memory_MemTotal_bytes", "gauge", "Memory information field MemTotal_bytes.",
           node_l, ts, np.full(len(ts), node.memory_total))
    om.add("node_procs_blocked", "gauge", "Number of processes blocked waiting for I/O to "
           "complete.", node_l, ts, np.round(hs["blocked"].at(ts)))
    eth = 2.5e5 * (ts - a) + _offset("eth")
    for d in ("receive", "transmit"):
        om.add(f"node_network_{d}_bytes_total", "counter", f"Network device statistic "
               f"{d}_bytes.", f'device="{node.netdev}",{node_l}', ts, np.floor(eth))
    for nic, p in tl.net.items():
        for d, key in (("received", "rx"), ("transmitted", "tx")):
            om.add(f"node_infiniband_port_data_{d}_bytes_total", "counter",
                   f"Number of data octets {d} on all links",
                   f'device="{nic}",port="1",{node_l}', ts,
                   np.floor(p[key].integral(ts) / 4) * 4 + _offset(nic + d))


def _offset(key: str) -> float:
    """Counters do not start at zero: the node has been up for a while."""
    return float(zlib.crc32(key.encode()) % 10_000_000)


def _temperature(tl: Timeline, g: int, t: np.ndarray) -> np.ndarray:
    inlet = tl.node.extras.get("inlet_c", 28.0)
    theta = tl.node.extras.get("theta", {}).get(g, 0.058)
    p = tl.gpu[g]["power"]
    return inlet + theta * p.mean(t - 20, t)


# --- a real Prometheus over backfilled blocks ----------------------------------------------------

def backfill(om_path: str, tsdb: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        raise RuntimeError("promtool is not installed (Debian package prometheus)")
    r = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", om_path, tsdb],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"promtool failed: {r.stderr.strip()[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus on its own port over a backfilled TSDB, with a retention long enough
    that the backfilled blocks are not deleted at start."""

    def __init__(self, tsdb: str, workdir: str):
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (Debian package prometheus)")
        self.port = free_port()
        cfg = os.path.join(workdir, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 15s\n")
        self.log = open(os.path.join(workdir, "prometheus.log"), "w")
        self.p = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tsdb}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=100000d", "--query.max-samples=200000000"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.p.returncode}); see "
                                   f"{self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
