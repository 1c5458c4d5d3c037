"""Simulated runs written as the series scrapers would have stored (OpenMetrics with
timestamps), for `promtool tsdb create-blocks-from openmetrics FILE DIR`: how the tests, the
benchmarks and the demo put node- and fleet-scale data into a real Prometheus (or
VictoriaMetrics) without running the exporters or the daemons.

One node's window (agentd.analysis.signals.Signals):

    exporters_openmetrics(sig, host, scrape=15.0) -> str
        dcgm-exporter and node_exporter series of one simulated node.

A multi-node job (agentd/sim/cluster_scenario.py), any size, streamed to a file:

    write_cluster(out, scenario, seconds, interval=15.0, *, start=1.7e9,
                  flavour="both", seed=None, nodes=None, gpus=None, exact=False,
                  dcgm_fields="default", cpu_cores=None, families=None) -> dict
        out       a path or a text file object
        scenario  a ClusterScenario, or a name/path loaded with seed, nodes and gpus
        seconds   simulated span; one scrape every `interval` seconds, the first at
                  start + interval (Unix seconds)
        flavour   "agentd" (agentd's own metrics, job="agentd", instance HOST:9445),
                  "exporters" (dcgm-exporter, job="dcgm", HOST:9400, and node_exporter,
                  job="node", HOST:9100) or "both"
        exact     False: the step model (agentd/sim/stepmodel.py: every training step of
                  every rank, vectorised; a 512-node x 8-GPU hour in tens of seconds);
                  True: the 10 ms ClusterSimulator (small jobs; tests)
        dcgm_fields  "default" (dcgm-exporter's default counters: GPU_UTIL, SM_CLOCK,
                  POWER_USAGE, GPU_TEMP, FB_USED/FREE, XID_ERRORS, remapped rows,
                  PROF_GR_ENGINE_ACTIVE, PROF_PIPE_TENSOR_ACTIVE, PROF_DRAM_ACTIVE,
                  PROF_PCIE_TX/RX_BYTES) or "all" (plus PROF_SM_ACTIVE, PROF_SM_OCCUPANCY,
                  PROF_NVLINK_TX/RX_BYTES, CLOCK_THROTTLE_REASONS)
        cpu_cores write node_cpu_seconds_total for this many of each node's cores (None:
                  all, as node_exporter does); the simulated cores are alike, so every
                  per-core ratio holds with fewer
        families  only these metric names (None: all)
      returns {"series", "samples", "bytes", "seconds" (CPU), "nodes", "gpus", "scrapes"}

    write_fleet(out, nodes, gpus, seconds, interval=15.0, *, flavour="both",
                nodes_per_job=16, scenarios=FLEET_MIX, seed=0, start=1.7e9, onset_s=None,
                dcgm_fields="default", cpu_cores=None, families=None) -> dict
        N nodes x G GPUs x T seconds of a fleet: jobs of nodes_per_job nodes drawn in turn
        from `scenarios` (half healthy, then each planted cause), hosts gpu-node-0000..,
        one Slurm job id (or Kubernetes job) per job, by the step model; the result's
        "truth" lists every job's hosts and planted cause, node, GPUs and onset

    write_scrapes(f, scrapes, flavour, ...) -> dict    the same from a ClusterScrapes

Series carry what Prometheus' scrape would have added: instance (HOST:PORT) and job.
dcgm-exporter's series carry Hostname, and namespace/pod/container where the job runs in
Kubernetes pods (hpc_job for a Slurm job, as with dcgm-exporter's HPC job mapping); agentd's
process series carry the job labels its process sampler resolves (agentd/jobs.py). Empty
labels are left out, as Prometheus drops them on ingest. RDMA traffic is in
node_infiniband_* (and agentd_rdma_*), never in node_network_*.
"""

from __future__ import annotations

import os
import time

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


# --- a multi-node job --------------------------------------------------------------------------

SM_CLOCK_MAX_MHZ = 1980.0
POWER_LIMIT_W = 700.0
DRIVER = "550.90.07"
PORTS = {"agentd": 9445, "dcgm": 9400, "node": 9100}


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels_text(labels: dict) -> str:
    """{k="v",...} without the empty ones (Prometheus drops them on ingest)."""
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items() if v != "")


class OpenMetricsWriter:
    """Streams OpenMetrics with timestamps, one family at a time, each series' samples
    together, as promtool's backfill wants them; counts what it wrote."""

    def __init__(self, f, t: np.ndarray, families: set[str] | None = None):
        self.f = f
        self.ts = [f" {x:.3f}\n" for x in t]  # formatted once for every series
        self.families = families
        self.series = self.samples = self.bytes = 0
        self._current: str | None = None
        self._skip = False

    def family(self, name: str, kind: str, help_: str) -> bool:
        """Start a family; False when it is filtered out (its series are then ignored)."""
        self._skip = self.families is not None and name not in self.families
        if self._skip:
            return False
        base = name[:-6] if kind == "counter" and name.endswith("_total") else name
        self._current = name
        self._write(f"# HELP {base} {help_}\n# TYPE {base} {kind}\n")
        return True

    def values(self, values: np.ndarray, counter: bool) -> list[str]:
        """Formatted values (share them between series with equal values)."""
        return list(map(("%.10g" if counter else "%.6g").__mod__, values.tolist()))

    def write(self, labels: str, formatted: list[str]) -> None:
        if self._skip:
            return
        prefix = f"{self._current}{{{labels}}} "
        text = "".join([prefix + v + t for v, t in zip(formatted, self.ts) if v != "nan"])
        self.series += 1
        self.samples += len(formatted)
        self._write(text)

    def series_of(self, labels: str, values: np.ndarray, counter: bool) -> None:
        if not self._skip:
            self.write(labels, self.values(values, counter))

    def _write(self, text: str) -> None:
        self.f.write(text)
        self.bytes += len(text)

    def close(self) -> None:
        self._write("# EOF\n")


def _target(host: str, job: str) -> dict:
    return {"instance": f"{host}:{PORTS[job]}", "job": job}


def _gpu_labels(node, g: int, dcgm: bool) -> dict:
    info = node.gpus[g]
    if dcgm:
        out = {"gpu": str(g), "UUID": info.uuid, "pci_bus_id": info.pci_bus_id,
               "device": f"nvidia{g}", "modelName": info.name, "Hostname": node.host}
        out.update(node.pod)
        if node.hpc_job:
            out["hpc_job"] = node.hpc_job
        return {**out, **_target(node.host, "dcgm")}
    return {"gpu": str(g), "uuid": info.uuid, **_target(node.host, "agentd")}


def _per_gpu(w: OpenMetricsWriter, sc, name: str, kind: str, help_: str, values: np.ndarray,
             dcgm: bool) -> None:
    """values [S, N, G]: one series per GPU."""
    if not w.family(name, kind, help_):
        return
    counter = kind == "counter"
    for k, node in enumerate(sc.nodes):
        for g in range(len(node.gpus)):
            w.series_of(labels_text(_gpu_labels(node, g, dcgm)), values[:, k, g], counter)


def _interval_mean(cum: np.ndarray, interval: float) -> np.ndarray:
    return np.diff(cum, axis=0, prepend=0.0) / interval


def write_dcgm(w: OpenMetricsWriter, sc, fields: str = "default") -> None:
    """dcgm-exporter's series (its units: MHz, W, C, MiB, percent; PROF fields averaged
    over the interval)."""
    gpu, iv = sc.gpu, sc.interval
    mem_total = sc.nodes[0].gpus[0].memory_total / MIB
    used = np.full_like(gpu["util"], 0.82 * mem_total)
    rows = [
        ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).",
         gpu["clock"] * SM_CLOCK_MAX_MHZ),
        ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", gpu["temperature_c"]),
        ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", gpu["power_w"]),
        ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", gpu["util"] * 100),
        ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).",
         mem_total - used),
        ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", used),
        ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.",
         np.zeros_like(used)),
        ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter",
         "Number of remapped rows for uncorrectable errors", gpu["remapped_uncorrectable"]),
        ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter",
         "Number of remapped rows for correctable errors", gpu["remapped_correctable"]),
        ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed",
         np.zeros_like(used)),
        ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge",
         "Ratio of time the graphics engine is active.", _interval_mean(gpu["busy_s"], iv)),
        ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge",
         "Ratio of cycles the tensor (HMMA) pipe is active.",
         _interval_mean(gpu["tensor_active_s"], iv)),
        ("DCGM_FI_PROF_DRAM_ACTIVE", "gauge",
         "Ratio of cycles the device memory interface is active sending or receiving data.",
         _interval_mean(gpu["dram_active_s"], iv)),
        ("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge", "The rate of data transmitted over the PCIe "
         "bus - including both protocol headers and data payloads - in bytes per second.",
         _interval_mean(gpu["pcie_tx_bytes"], iv)),
        ("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge", "The rate of data received over the PCIe bus "
         "- including both protocol headers and data payloads - in bytes per second.",
         _interval_mean(gpu["pcie_rx_bytes"], iv)),
    ]
    if fields == "all":
        nvlink = _interval_mean(gpu["nvlink_bytes"], iv)
        reasons = np.where(gpu["slowed"] > 0, np.where(
            _thermal(sc)[None, :, None], 0x48, 0x4), 0)
        rows += [
            ("DCGM_FI_PROF_SM_ACTIVE", "gauge",
             "The ratio of cycles an SM has at least 1 warp assigned.",
             _interval_mean(gpu["sm_active_s"], iv)),
            ("DCGM_FI_PROF_SM_OCCUPANCY", "gauge",
             "The ratio of number of warps resident on an SM.",
             _interval_mean(gpu["sm_occupancy_s"], iv)),
            ("DCGM_FI_PROF_NVLINK_TX_BYTES", "gauge",
             "The rate of data transmitted over NVLink, not including protocol headers, in "
             "bytes per second.", nvlink),
            ("DCGM_FI_PROF_NVLINK_RX_BYTES", "gauge",
             "The rate of data received over NVLink, not including protocol headers, in "
             "bytes per second.", nvlink),
            ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "gauge",
             "Current clock throttle reasons (bitmask of DCGM_CLOCKS_THROTTLE_REASON_*).",
             reasons.astype(float)),
        ]
    elif fields != "default":
        raise ValueError("dcgm_fields: default or all")
    for name, kind, help_, values in rows:
        _per_gpu(w, sc, name, kind, help_, values, dcgm=True)


def _thermal(sc) -> np.ndarray:
    return np.array([n.thermal for n in sc.nodes])


def _per_node(w, sc, name, kind, help_, values, job, extra=None) -> None:
    """values [S, N]: one series per node (extra: labels for all, e.g. a device)."""
    if not w.family(name, kind, help_):
        return
    for k, node in enumerate(sc.nodes):
        w.series_of(labels_text({**(extra or {}), **_target(node.host, job)}), values[:, k],
                    kind == "counter")


def _per_device(w, sc, name, kind, help_, per_device, job) -> None:
    """per_device: callable(node index, node) -> [(labels, values [S])]."""
    if not w.family(name, kind, help_):
        return
    for k, node in enumerate(sc.nodes):
        for labels, values in per_device(k, node):
            w.series_of(labels_text({**labels, **_target(node.host, job)}), values,
                        kind == "counter")


def _disks(sc, key: str, share: bool):
    """Per block device of each node: the node's total split evenly (share) or not."""
    def rows(k, node):
        v = sc.host[key][:, k]
        return [({"device": d}, v / len(node.disks) if share else v) for d in node.disks]
    return rows


def _cpu_modes(sc) -> dict[str, np.ndarray]:
    h = sc.host
    return {"user": h["cpu_user_s"], "system": np.zeros_like(h["cpu_user_s"]),
            "iowait": h["cpu_iowait_s"], "idle": h["cpu_idle_s"]}


def _ports(sc, key: str, scale: float = 1.0, words: bool = False):
    def rows(k, node):
        out = []
        for r, dev in enumerate(node.nics):
            v = sc.port[key][:, k, r]
            if words:  # sysfs counts octets / 4
                v = np.floor(v / 4) * 4
            out.append(({"device": dev, "port": "1"}, v * scale))
        return out
    return rows


def _netdevs(sc, what: str):
    def rows(k, node):
        h = sc.host
        if what == "speed":
            return [({"device": "eth0"}, np.full(len(sc.t), 25e9 / 8)),
                    ({"device": "ib0"}, np.full(len(sc.t), 400e9 / 8))]
        if what == "zero":
            z = np.zeros(len(sc.t))
            return [({"device": "eth0"}, z), ({"device": "ib0"}, z)]
        rx = what.startswith("rx")
        eth = h["eth_rx_bytes" if rx else "eth_tx_bytes"][:, k]
        ib = h["ib_rx_bytes" if rx else "ib_tx_bytes"][:, k]
        if what.endswith("packets"):
            eth, ib = np.floor(eth / 1400), np.floor(ib / 2044)
        return [({"device": "eth0"}, eth), ({"device": "ib0"}, ib)]
    return rows


def write_node_exporter(w: OpenMetricsWriter, sc, cpu_cores: int | None = None) -> None:
    """node_exporter's series, as its collectors read the simulated /proc and /sys."""
    h = sc.host
    if w.family("node_cpu_seconds_total", "counter", "Seconds the CPUs spent in each mode."):
        modes = _cpu_modes(sc)
        for k, node in enumerate(sc.nodes):
            n = node.cores if cpu_cores is None else min(cpu_cores, node.cores)
            tgt = _target(node.host, "node")
            for mode, total in modes.items():
                formatted = w.values(total[:, k] / node.cores, True)
                for c in range(n):
                    w.write(labels_text({"cpu": str(c), "mode": mode, **tgt}), formatted)
    for name, key, share, help_ in (
            ("node_disk_read_bytes_total", "disk_read_bytes", True,
             "The total number of bytes read successfully."),
            ("node_disk_reads_completed_total", "disk_reads", True,
             "The total number of reads completed successfully."),
            ("node_disk_written_bytes_total", "disk_written_bytes", True,
             "The total number of bytes written successfully."),
            ("node_disk_io_time_seconds_total", "disk_io_s", False,
             "Total seconds spent doing I/Os."),
            ("node_disk_io_time_weighted_seconds_total", "disk_weighted_s", True,
             "The weighted # of seconds spent doing I/Os.")):
        _per_device(w, sc, name, "counter", help_, _disks(sc, key, share), "node")
    for name, key, help_ in (
            ("node_pressure_io_waiting_seconds_total", "psi_io_s",
             "Total time in seconds that processes have waited due to IO congestion"),
            ("node_pressure_io_stalled_seconds_total", "psi_io_full_s",
             "Total time in seconds no process could make progress due to IO congestion"),
            ("node_pressure_cpu_waiting_seconds_total", "psi_cpu_s",
             "Total time in seconds that processes have waited for CPU time"),
            ("node_pressure_memory_waiting_seconds_total", "psi_mem_s",
             "Total time in seconds that processes have waited for memory")):
        _per_node(w, sc, name, "counter", help_, h[key], "node")
    for name, key in (("node_memory_MemAvailable_bytes", "mem_available_bytes"),
                      ("node_memory_Cached_bytes", "mem_cached_bytes")):
        _per_node(w, sc, name, "gauge", f"Memory information field {name[12:-6]}_bytes.",
                  h[key], "node")
    for name, what, kind, help_ in (
            ("node_network_receive_bytes_total", "rx", "counter",
             "Network device statistic receive_bytes."),
            ("node_network_transmit_bytes_total", "tx", "counter",
             "Network device statistic transmit_bytes."),
            ("node_network_receive_packets_total", "rx_packets", "counter",
             "Network device statistic receive_packets."),
            ("node_network_transmit_packets_total", "tx_packets", "counter",
             "Network device statistic transmit_packets."),
            ("node_network_receive_errs_total", "zero", "counter",
             "Network device statistic receive_errs."),
            ("node_network_transmit_errs_total", "zero", "counter",
             "Network device statistic transmit_errs."),
            ("node_network_receive_drop_total", "zero", "counter",
             "Network device statistic receive_drop."),
            ("node_network_speed_bytes", "speed", "gauge", "speed_bytes value of "
             "/sys/class/net/<iface>.")):
        _per_device(w, sc, name, kind, help_, _netdevs(sc, what), "node")
    for name, key, words, help_ in (
            ("node_infiniband_port_data_received_bytes_total", "rx_bytes", True,
             "Number of data octets received on all links"),
            ("node_infiniband_port_data_transmitted_bytes_total", "tx_bytes", True,
             "Number of data octets transmitted on all links"),
            ("node_infiniband_port_packets_received_total", "rx_packets", False,
             "Number of packets received on all VLs by this port (including errors)"),
            ("node_infiniband_port_packets_transmitted_total", "tx_packets", False,
             "Number of packets transmitted on all VLs from this port (including errors)"),
            ("node_infiniband_port_transmit_wait_total", "xmit_wait", False,
             "Number of ticks during which the port had data to transmit but no data was "
             "sent during the entire tick"),
            ("node_infiniband_symbol_error_total", "symbol_error", False,
             "Number of minor link errors detected on one or more physical lanes."),
            ("node_infiniband_port_errors_received_total", "rcv_errors", False,
             "Number of packets containing an error that were received on this port"),
            ("node_infiniband_link_error_recovery_total", "link_error_recovery", False,
             "Number of times the link successfully recovered from an error state"),
            ("node_infiniband_link_downed_total", "link_downed", False,
             "Number of times the link failed to recover from an error state and went down")):
        _per_device(w, sc, name, "counter", help_, _ports(sc, key, words=words), "node")
    _per_device(w, sc, "node_infiniband_rate_bytes_per_second", "gauge",
                "Maximum signal transfer rate", _ports(sc, "rate"), "node")
    for name, value, help_ in (("node_infiniband_state_id", 4.0, "State of the InfiniBand "
                                "port (0: no change, 1: down, 2: init, 3: armed, 4: active, "
                                "5: act defer)"),
                               ("node_infiniband_physical_state_id", 5.0,
                                "Physical state of the InfiniBand port (0: no change, 1: "
                                "sleep, 2: polling, 3: disable, 4: shift, 5: link up, 6: "
                                "link error recover, 7: phytest)")):
        _per_device(w, sc, name, "gauge", help_, lambda k, node, v=value: [
            ({"device": d, "port": "1"}, np.full(len(sc.t), v)) for d in node.nics], "node")


def write_exporters(w: OpenMetricsWriter, sc, dcgm_fields: str = "default",
                    cpu_cores: int | None = None) -> None:
    write_dcgm(w, sc, dcgm_fields)
    write_node_exporter(w, sc, cpu_cores)


def _catalog_help(name: str) -> tuple[str, str, tuple]:
    from agentd.catalog import METRICS_BY_NAME

    m = METRICS_BY_NAME[name]
    return m.type, m.help, m.labels


def _agentd(w, sc, name: str, rows) -> None:
    """An agentd family from the catalog; rows: callable(k, node) -> [(labels, values)],
    each series' labels checked against the catalog's."""
    kind, help_, names = _catalog_help(name)
    if not w.family(name, kind, help_):
        return
    for k, node in enumerate(sc.nodes):
        for labels, values in rows(k, node):
            unknown = set(labels) - set(names)
            if unknown:
                raise KeyError(f"{name}: labels {sorted(unknown)} are not the catalog's")
            ordered = {n: labels[n] for n in names if n in labels}
            w.series_of(labels_text({**ordered, **_target(node.host, "agentd")}), values,
                        kind == "counter")


def write_agentd(w: OpenMetricsWriter, sc) -> None:
    """agentd's own series, as the daemon on each simulated node exports them (names,
    labels and units from agentd/catalog.py)."""
    from agentd import __version__
    from agentd.jobs import JOB_LABELS

    gpu, h, S = sc.gpu, sc.host, len(sc.t)
    one = np.ones(S)

    def per_gpu(values=None, extra=None, fn=None):
        def rows(k, node):
            out = []
            for g, info in enumerate(node.gpus):
                v = fn(k, g, info) if fn else values[:, k, g]
                out.append(({"gpu": str(g), "uuid": info.uuid, **(extra or {})}, v))
            return out
        return rows

    _agentd(w, sc, "agentd_build_info", lambda k, n: [(
        {"version": __version__, "python_version": "3.11", "gpu_backend": "simulated"}, one)])
    _agentd(w, sc, "agentd_gpu_info", lambda k, node: [(
                {"gpu": str(g), "uuid": info.uuid, "name": info.name,
                 "pci_bus_id": info.pci_bus_id, "driver_version": DRIVER,
                 "pcie_counter_source": "counter", "utilization_source": "samples",
                 "UUID": info.uuid, "device": f"nvidia{g}", "hostname": node.host}, one)
                for g, info in enumerate(node.gpus)])
    for name, key in (("agentd_gpu_busy_seconds_total", "busy_s"),
                      ("agentd_gpu_sm_active_seconds_total", "sm_active_s"),
                      ("agentd_gpu_sm_occupancy_seconds_total", "sm_occupancy_s"),
                      ("agentd_gpu_tensor_active_seconds_total", "tensor_active_s"),
                      ("agentd_gpu_dram_active_seconds_total", "dram_active_s"),
                      ("agentd_gpu_pcie_rx_bytes_total", "pcie_rx_bytes"),
                      ("agentd_gpu_pcie_tx_bytes_total", "pcie_tx_bytes"),
                      ("agentd_gpu_nvlink_rx_bytes_total", "nvlink_bytes"),
                      ("agentd_gpu_nvlink_tx_bytes_total", "nvlink_bytes"),
                      ("agentd_gpu_power_watts", "power_w"),
                      ("agentd_gpu_temperature_celsius", "temperature_c")):
        _agentd(w, sc, name, per_gpu(gpu[key]))
    mem_total = sc.nodes[0].gpus[0].memory_total
    _agentd(w, sc, "agentd_gpu_sm_clock_hertz", per_gpu(gpu["clock"] * SM_CLOCK_MAX_MHZ * 1e6))
    _agentd(w, sc, "agentd_gpu_sm_clock_max_hertz",
            per_gpu(fn=lambda k, g, i: one * SM_CLOCK_MAX_MHZ * 1e6))
    _agentd(w, sc, "agentd_gpu_power_limit_watts", per_gpu(fn=lambda k, g, i: one * POWER_LIMIT_W))
    _agentd(w, sc, "agentd_gpu_memory_used_bytes", per_gpu(fn=lambda k, g, i: one * 0.82 * mem_total))
    _agentd(w, sc, "agentd_gpu_memory_total_bytes", per_gpu(fn=lambda k, g, i: one * mem_total))
    # Which job holds which GPU (the daemon's per-job process attribution): what the cluster
    # analysis, the per-job rules and the dashboard join GPUs to their jobs by.
    _agentd(w, sc, "agentd_gpu_process_memory_used_bytes", lambda k, node: [
        ({"gpu": str(g), "uuid": info.uuid, **node.job}, one * 0.8 * mem_total)
        for g, info in enumerate(node.gpus)])
    thermal = _thermal(sc)
    slowed_s = np.cumsum(gpu["slowed"] * sc.interval, axis=0)
    for reason, hot in (("sw_power_cap", False), ("hw_slowdown", True),
                        ("hw_thermal_slowdown", True)):
        mask = (thermal == hot)[None, :, None]
        _agentd(w, sc, "agentd_gpu_clock_event_active",
                per_gpu(gpu["slowed"] * mask, {"reason": reason}))
        _agentd(w, sc, "agentd_gpu_clock_event_seconds_total",
                per_gpu(slowed_s * mask, {"reason": reason}))
    for cause, key in (("correctable", "remapped_correctable"),
                       ("uncorrectable", "remapped_uncorrectable")):
        _agentd(w, sc, "agentd_gpu_remapped_rows", per_gpu(gpu[key], {"cause": cause}))

    def job(k, node, values):
        return [({n: node.job.get(n, "") for n in JOB_LABELS}, values)]

    for name, key in (("agentd_process_cpu_seconds_total", "job_cpu_s"),
                      ("agentd_process_read_bytes_total", "job_read_bytes"),
                      ("agentd_process_read_chars_total", "job_rchar_bytes")):
        _agentd(w, sc, name, lambda k, node, key=key: job(k, node, h[key][:, k]))
    _agentd(w, sc, "agentd_process_members",
            lambda k, node: job(k, node, one * node.members))
    _agentd(w, sc, "agentd_process_trees",
            lambda k, node: job(k, node, one * len(node.gpus)))
    _agentd(w, sc, "agentd_cpu_seconds_total", lambda k, node: [
        ({"mode": m}, v[:, k]) for m, v in _cpu_modes(sc).items()])
    _agentd(w, sc, "agentd_cpu_online", lambda k, node: [({}, one * node.cores)])
    _agentd(w, sc, "agentd_pressure_waiting_seconds_total", lambda k, node: [
        ({"resource": r, "kind": kind}, h[key][:, k]) for r, kind, key in (
            ("io", "some", "psi_io_s"), ("io", "full", "psi_io_full_s"),
            ("cpu", "some", "psi_cpu_s"), ("memory", "some", "psi_mem_s"))])
    for name, key, share in (("agentd_disk_read_bytes_total", "disk_read_bytes", True),
                             ("agentd_disk_reads_completed_total", "disk_reads", True),
                             ("agentd_disk_written_bytes_total", "disk_written_bytes", True),
                             ("agentd_disk_io_time_seconds_total", "disk_io_s", False),
                             ("agentd_disk_io_time_weighted_seconds_total", "disk_weighted_s",
                              True)):
        _agentd(w, sc, name, _disks(sc, key, share))
    _agentd(w, sc, "agentd_memory_available_bytes",
            lambda k, node: [({}, h["mem_available_bytes"][:, k])])
    _agentd(w, sc, "agentd_memory_cached_bytes",
            lambda k, node: [({}, h["mem_cached_bytes"][:, k])])
    for name, what in (("agentd_network_receive_bytes_total", "rx"),
                       ("agentd_network_transmit_bytes_total", "tx"),
                       ("agentd_network_receive_packets_total", "rx_packets"),
                       ("agentd_network_transmit_packets_total", "tx_packets"),
                       ("agentd_network_receive_errors_total", "zero"),
                       ("agentd_network_transmit_errors_total", "zero"),
                       ("agentd_network_speed_bytes", "speed")):
        _agentd(w, sc, name, _netdevs(sc, what))
    for name, key, words in (("agentd_rdma_receive_bytes_total", "rx_bytes", True),
                             ("agentd_rdma_transmit_bytes_total", "tx_bytes", True),
                             ("agentd_rdma_receive_packets_total", "rx_packets", False),
                             ("agentd_rdma_transmit_packets_total", "tx_packets", False),
                             ("agentd_rdma_transmit_wait_total", "xmit_wait", False),
                             ("agentd_rdma_port_speed_bytes", "rate", False)):
        _agentd(w, sc, name, _ports(sc, key, words=words))
    zero = np.zeros(len(sc.t))

    def port_errors(k, node):
        out = []
        for kind, key in RDMA_ERRORS.items():
            for labels, v in (_ports(sc, key)(k, node) if key else
                              [({"device": d, "port": "1"}, zero) for d in node.nics]):
                out.append(({**labels, "type": kind}, v))
        return out

    _agentd(w, sc, "agentd_rdma_port_errors_total", port_errors)


# agentd_rdma_port_errors_total's types and the simulation's counters (None: always 0).
RDMA_ERRORS = {"symbol_error": "symbol_error", "port_errors_received": "rcv_errors",
               "local_link_integrity_errors": None, "excessive_buffer_overrun_errors": None,
               "port_discards_transmitted": None,
               "link_error_recovery": "link_error_recovery", "link_downed": "link_downed"}


def write_scrapes(f, sc, flavour: str = "both", dcgm_fields: str = "default",
                  cpu_cores: int | None = None, families=None) -> dict:
    """Write a ClusterScrapes (agentd/sim/scrapes.py) to the text file f; see write_cluster."""
    if flavour not in ("agentd", "exporters", "both"):
        raise ValueError("flavour: agentd, exporters or both")
    w = OpenMetricsWriter(f, sc.t, set(families) if families is not None else None)
    if flavour in ("exporters", "both"):
        write_exporters(w, sc, dcgm_fields, cpu_cores)
    if flavour in ("agentd", "both"):
        write_agentd(w, sc)
    w.close()
    return {"series": w.series, "samples": w.samples, "bytes": w.bytes}


def write_cluster(out, scenario, seconds: float, interval: float = 15.0, *,
                  start: float = 1.7e9, flavour: str = "both", seed: int | None = None,
                  nodes: int | None = None, gpus: int | None = None, exact: bool = False,
                  dcgm_fields: str = "default", cpu_cores: int | None = None,
                  families=None) -> dict:
    """Simulate a multi-node job and write what its exporters would have shown (see the
    module's docstring); returns sizes and the CPU seconds it took."""
    from agentd.sim.cluster import ClusterSimulator
    from agentd.sim.cluster_scenario import load
    from agentd.sim.scrapes import scrapes_from_steps, scrapes_from_trace, summary

    t0 = time.process_time()
    cs = scenario if not isinstance(scenario, (str, os.PathLike)) else \
        load(str(scenario), seed, nodes, gpus)
    if exact:
        sc = scrapes_from_trace(cs, ClusterSimulator(cs.spec).run(seconds), interval, start)
    else:
        sc = scrapes_from_steps(cs, seconds, interval, start, seed)
    if hasattr(out, "write"):
        stats = write_scrapes(out, sc, flavour, dcgm_fields, cpu_cores, families)
    else:
        with open(out, "w", buffering=1 << 20) as f:
            stats = write_scrapes(f, sc, flavour, dcgm_fields, cpu_cores, families)
    size = summary(sc)
    return {**stats, "nodes": size["nodes"], "gpus": size["gpus"], "scrapes": size["scrapes"],
            "seconds": time.process_time() - t0, "truth": sc.truth}


FLEET_MIX = ("healthy", "throttled", "healthy", "slow-gpu", "healthy", "starved-storage",
             "healthy", "slow-link", "healthy", "thermal", "healthy", "starved-cpu",
             "healthy", "lossy-link")


def fleet_scrapes(nodes: int, gpus: int, seconds: float, interval: float = 15.0, *,
                  nodes_per_job: int = 16, scenarios=FLEET_MIX, seed: int = 0,
                  start: float = 1.7e9, onset_s: float | None = None):
    """A fleet of `nodes` nodes of `gpus` GPUs, as jobs of `nodes_per_job` nodes (the last
    takes the rest) drawn in turn from `scenarios` (cluster scenario names: half healthy,
    then one of each planted cause, by default), each randomized by its own seed; hosts
    gpu-node-0000.., Slurm job ids (or Kubernetes job names) unique per job. onset_s: when
    the planted problems start (default: each scenario's). The step model runs each job."""
    from agentd.sim.cluster_scenario import load, relabel, with_onset
    from agentd.sim.scrapes import concat, scrapes_from_steps

    if nodes < 1 or nodes_per_job < 1:
        raise ValueError("nodes and nodes_per_job must be positive")
    sizes = [nodes_per_job] * (nodes // nodes_per_job)
    if nodes % nodes_per_job:
        sizes.append(nodes % nodes_per_job)
    width = max(len(str(nodes - 1)), 4)
    parts, first = [], 0
    for j, size in enumerate(sizes):
        cs = load(scenarios[j % len(scenarios)], seed * 1000 + j, size, gpus)
        if onset_s is not None:
            cs = with_onset(cs, onset_s)
        name = f"{cs.job_id}-{j}" if cs.scheduler == "kubernetes" else 4242 + j
        cs = relabel(cs, [f"gpu-node-{first + k:0{width}d}" for k in range(size)], name)
        parts.append(scrapes_from_steps(cs, seconds, interval, start, seed * 1000 + j))
        first += size
    return concat(parts)


def write_fleet(out, nodes: int, gpus: int, seconds: float, interval: float = 15.0, *,
                flavour: str = "both", nodes_per_job: int = 16, scenarios=FLEET_MIX,
                seed: int = 0, start: float = 1.7e9, onset_s: float | None = None,
                dcgm_fields: str = "default", cpu_cores: int | None = None,
                families=None) -> dict:
    """N nodes x G GPUs x T seconds of a fleet (fleet_scrapes) written as OpenMetrics (see
    write_cluster); returns sizes, CPU seconds and each job's truth."""
    t0 = time.process_time()
    sc = fleet_scrapes(nodes, gpus, seconds, interval, nodes_per_job=nodes_per_job,
                       scenarios=scenarios, seed=seed, start=start, onset_s=onset_s)
    model_s = time.process_time() - t0
    if hasattr(out, "write"):
        stats = write_scrapes(out, sc, flavour, dcgm_fields, cpu_cores, families)
    else:
        with open(out, "w", buffering=1 << 20) as f:
            stats = write_scrapes(f, sc, flavour, dcgm_fields, cpu_cores, families)
    return {**stats, "nodes": nodes, "gpus": nodes * gpus, "scrapes": len(sc.t),
            "seconds": time.process_time() - t0, "model_seconds": model_s, "truth": sc.truth}
