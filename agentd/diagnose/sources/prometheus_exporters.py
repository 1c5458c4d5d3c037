"""Only what clusters already run: dcgm-exporter (`DCGM_FI_*`) and node_exporter (`node_*`)
series in a Prometheus server, mapped into agentd's signals.

What this source cannot provide is absent (never zero) and named in meta["missing"]: the
data-loader process trees, the PCIe topology (so no shared uplink can be judged), and, unless
dcgm-exporter was configured to export them, throttle reasons, SM activity and PCIe bytes.
The GPU model (`modelName`) fills in the PCIe link, maximum SM clock and power limit from
agentd.gpu.models when dcgm-exporter does not export them.

Resolution: by default one point per scrape interval found in the data, with counters as
`irate` (the rate over exactly the last scrape interval) and gauges as their sample, so no
point is averaged with its neighbour.
"""

from __future__ import annotations

import numpy as np

from agentd.analysis.signals import Signals
from agentd.diagnose.sources import SourceError
from agentd.diagnose.sources.promclient import (Grid, NodeSelector, PrometheusSource,
                                                scrape_interval, window, with_matchers)
from agentd.gpu import models
from agentd.pcie import capacity as pcie_capacity

MIB = 2**20

# signal, metric, scale: dcgm-exporter gauges, per GPU (label "gpu").
DCGM_GAUGES = (
    ("gpu.busy", "DCGM_FI_DEV_GPU_UTIL", 0.01),
    # Graphics-engine activity is averaged over dcgm's own interval: the exact busy mean.
    ("gpu.busy_time", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", 1.0),
    ("gpu.sm_active", "DCGM_FI_PROF_SM_ACTIVE", 1.0),
    ("gpu.sm_occupancy", "DCGM_FI_PROF_SM_OCCUPANCY", 1.0),
    ("gpu.tensor_active", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 1.0),
    ("gpu.dram_active", "DCGM_FI_PROF_DRAM_ACTIVE", 1.0),
    ("gpu.pcie_rx", "DCGM_FI_PROF_PCIE_RX_BYTES", 1.0),
    ("gpu.pcie_tx", "DCGM_FI_PROF_PCIE_TX_BYTES", 1.0),
    ("gpu.nvlink_rx", "DCGM_FI_PROF_NVLINK_RX_BYTES", 1.0),
    ("gpu.nvlink_tx", "DCGM_FI_PROF_NVLINK_TX_BYTES", 1.0),
    ("gpu.mem_used", "DCGM_FI_DEV_FB_USED", MIB),
    ("gpu.sm_clock", "DCGM_FI_DEV_SM_CLOCK", 1e6),
    ("gpu.sm_clock_max", "DCGM_FI_DEV_MAX_SM_CLOCK", 1e6),
    ("gpu.power", "DCGM_FI_DEV_POWER_USAGE", 1.0),
    ("gpu.power_limit", "DCGM_FI_DEV_POWER_MGMT_LIMIT", 1.0),
    ("gpu.temperature", "DCGM_FI_DEV_GPU_TEMP", 1.0),
    ("gpu.throttle", "DCGM_FI_DEV_CLOCKS_EVENT_REASONS", 1.0),
    ("gpu.throttle", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", 1.0),
)


class ExportersPrometheusSource(PrometheusSource):
    name = "prometheus (dcgm-exporter + node_exporter)"

    def read(self) -> Signals:
        c = self.client
        nodes = NodeSelector(c, self.node, self.end)
        gsel = nodes.for_metric("DCGM_FI_DEV_GPU_UTIL") or \
            nodes.for_metric("DCGM_FI_PROF_GR_ENGINE_ACTIVE")
        if gsel is None:
            which = "neither agentd's nor dcgm-exporter's" if self.auto else \
                "no dcgm-exporter"
            raise SourceError(f"Prometheus at {c.url} holds {which} GPU series for node "
                              f"{self.node!r} in the hour before the range end")
        scrape = scrape_interval(c, "DCGM_FI_DEV_GPU_UTIL", gsel, self.end) or \
            scrape_interval(c, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", gsel, self.end)
        step = self.step or scrape or 15.0
        grid = Grid(self.start, self.end, step)
        # A gauge's value in each step: the mean of the samples in it (one at the scrape step).
        win = window(step)
        ch: dict[str, np.ndarray] = {}
        meta: dict = {"node": self.node, "scrape_interval_seconds": scrape,
                      "gpus": {}, "missing": []}

        def put(key: str, values: np.ndarray) -> None:
            if key in ch:  # a second metric for the same signal fills gaps only
                ch[key] = np.where(np.isnan(ch[key]), values, ch[key])
            else:
                ch[key] = values

        for signal, metric, scale in DCGM_GAUGES:
            sel = nodes.for_metric(metric)
            if sel is None:
                continue
            q = f"max by (gpu) (avg_over_time({metric}{sel}[{win}]))"
            if signal == "gpu.throttle":
                q = f"max by (gpu) (max_over_time({metric}{sel}[{win}]))"
            for s in c.query_range(q, self.start, self.end, step):
                g = s["metric"].get("gpu", "")
                put(f"{signal}:{g}", grid.place(s.get("values", [])) * scale)
        # Identities: model (for the table's capacities), UUID, Kubernetes owner.
        for s in c.query(f"last_over_time(DCGM_FI_DEV_GPU_UTIL{gsel}[1h])", at=self.end):
            m = s["metric"]
            g = m.get("gpu", "")
            meta["gpus"][g] = {k: m[k] for k in ("UUID", "modelName", "pci_bus_id", "device",
                                                 "namespace", "pod", "container") if m.get(k)}
        present = {s["metric"].get("gpu", "") for s in c.query(
            f"last_over_time(DCGM_FI_DEV_GPU_UTIL{gsel}[{max(int(step * 3), 60)}s])",
            at=self.end)}
        meta["gpus_absent_at_end"] = sorted(set(meta["gpus"]) - present)
        self._fill_from_model(ch, meta, grid)
        xid = nodes.for_metric("DCGM_FI_DEV_XID_ERRORS")
        if xid:
            for s in c.query_range(f"max by (gpu) (max_over_time(DCGM_FI_DEV_XID_ERRORS{xid}"
                                   f"[{win}]))", self.start, self.end, step):
                ch[f"gpu.xid:{s['metric'].get('gpu', '')}"] = grid.place(s.get("values", []))
        self._host(ch, nodes, grid, step)
        if not any(k.startswith(("gpu.busy:", "gpu.busy_time:")) for k in ch):
            raise SourceError(f"Prometheus at {c.url} holds no GPU utilization for node "
                              f"{self.node!r} between {self.start:.0f} and {self.end:.0f}")
        for family, why in (("proc.cpu", "data-loader process trees"),
                            ("gpu.throttle", "throttle (clock-event) reasons"),
                            ("gpu.sm_active", "SM activity (DCGM profiling field 1002)"),
                            ("gpu.pcie_rx", "PCIe bytes (DCGM profiling fields 1009/1010)"),
                            ("disk.read", "storage (node_exporter diskstats)"),
                            ("cpu.busy", "host CPU (node_exporter cpu)")):
            if not any(k.startswith(family + ":") for k in ch):
                meta["missing"].append(why)
        meta["limits"] = ("dcgm-exporter and node_exporter show no data-loader processes and "
                          "no PCIe topology: CPU is judged node-wide and shared uplinks "
                          "cannot be seen")
        return Signals(grid.t, ch, step, source=self.name, node=self.node, meta=meta)

    @staticmethod
    def _fill_from_model(ch: dict, meta: dict, grid: Grid) -> None:
        n = len(grid.t)
        for g, info in meta["gpus"].items():
            model = models.lookup(info.get("modelName"))
            if model is None:
                continue
            for signal, value in (
                ("gpu.sm_clock_max", model.sm_clock_max_hz),
                ("gpu.power_limit", model.power_limit_watts),
                ("gpu.pcie_capacity", pcie_capacity(model.pcie_generation, model.pcie_width)),
            ):
                key = f"{signal}:{g}"
                if key not in ch and value:
                    ch[key] = np.full(n, float(value))
                    meta.setdefault("from_model_table", []).append(signal)

    def _host(self, ch: dict, nodes: NodeSelector, grid: Grid, step: float) -> None:
        c = self.client
        s0, s1 = self.start, self.end
        win = window(step * 3, least=2.0)  # irate: the last two samples in it

        def rate(key: str, metric: str, by: str | None, extra: str = "",
                 expr: str = "irate", agg: str = "sum") -> None:
            sel = nodes.for_metric(metric)
            if sel is None:
                return
            sel = with_matchers(sel, extra) if extra else sel
            group = f" by ({by})" if by else ""
            for s in c.query_range(f"{agg}{group} ({expr}({metric}{sel}[{win}]))", s0, s1,
                                   step):
                subject = s["metric"].get(by, "") if by else ""
                ch[key.format(subject)] = grid.place(s.get("values", []))

        def gauge(key: str, metric: str, scale: float = 1.0) -> None:
            sel = nodes.for_metric(metric)
            if sel is None:
                return
            for s in c.query_range(f"max(avg_over_time({metric}{sel}"
                                   f"[{window(step)}]))", s0, s1, step):
                ch[key] = grid.place(s.get("values", [])) * scale

        rate("disk.read:{}", "node_disk_read_bytes_total", "device")
        rate("disk.write:{}", "node_disk_written_bytes_total", "device")
        rate("disk.read_ops:{}", "node_disk_reads_completed_total", "device")
        rate("disk.busy:{}", "node_disk_io_time_seconds_total", "device")
        rate("disk.queue:{}", "node_disk_io_time_weighted_seconds_total", "device")
        rate("cpu.busy:{}", "node_cpu_seconds_total", None, 'mode!~"idle|iowait|steal"')
        rate("cpu.iowait:{}", "node_cpu_seconds_total", None, 'mode="iowait"')
        rate("cpu.system:{}", "node_cpu_seconds_total", None, 'mode=~"system|irq|softirq"')
        sel = nodes.for_metric("node_cpu_seconds_total")
        if sel is not None:
            for s in c.query_range("count(count by (cpu) (node_cpu_seconds_total" +
                                   with_matchers(sel, 'mode="idle"') + "))", s0, s1, step):
                ch["cpu.count:"] = grid.place(s.get("values", []))
        rate("psi.io:{}", "node_pressure_io_waiting_seconds_total", None)
        rate("psi.io_full:{}", "node_pressure_io_stalled_seconds_total", None)
        rate("psi.cpu:{}", "node_pressure_cpu_waiting_seconds_total", None)
        rate("psi.memory:{}", "node_pressure_memory_waiting_seconds_total", None)
        rate("mem.refault:{}", "node_vmstat_workingset_refault_file", None)
        gauge("mem.available:", "node_memory_MemAvailable_bytes")
        gauge("mem.cached:", "node_memory_Cached_bytes")
        gauge("cpu.procs_blocked:", "node_procs_blocked")
        rate("net.rx:{}", "node_network_receive_bytes_total", "device",
             'device!~"lo|veth.*|docker.*|cali.*|flannel.*|cni.*"')
        rate("net.tx:{}", "node_network_transmit_bytes_total", "device",
             'device!~"lo|veth.*|docker.*|cali.*|flannel.*|cni.*"')
        rate("rdma.rx:{}", "node_infiniband_port_data_received_bytes_total", "device")
        rate("rdma.tx:{}", "node_infiniband_port_data_transmitted_bytes_total", "device")
        # Mean time per request from the read/write time counters.
        sel = nodes.for_metric("node_disk_read_time_seconds_total")
        if sel is not None:
            q = (f"sum by (device) (irate(node_disk_read_time_seconds_total{sel}[{win}]) + "
                 f"irate(node_disk_write_time_seconds_total{sel}[{win}])) / sum by (device) "
                 f"(irate(node_disk_reads_completed_total{sel}[{win}]) + "
                 f"irate(node_disk_writes_completed_total{sel}[{win}]))")
            for s in c.query_range(q, s0, s1, step):
                ch[f"disk.await:{s['metric'].get('device', '')}"] = grid.place(
                    s.get("values", []))
