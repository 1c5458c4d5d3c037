"""Signals from a Prometheus server's HTTP API: agentd's own metrics, or only what clusters
already run (dcgm-exporter `DCGM_FI_*` and node_exporter `node_*`).

Counters become rates over twice the step; gauges are averaged over the step. The two
exporters' `instance` labels differ by port on the same host, so a node is selected by host
name: `instance=~"HOST(:[0-9]+)?"` (or dcgm-exporter's Hostname/hostname label).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from agentd.analysis.signals import Signals


class SourceError(Exception):
    """The source cannot be reached or read (exit status 3)."""


class PromClient:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict) -> dict:
        url = f"{self.url}{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            try:
                detail = json.load(e).get("error", "")
            except Exception:
                detail = ""
            raise SourceError(f"Prometheus at {self.url} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise SourceError(f"cannot reach Prometheus at {self.url}: {reason}") from None
        except ValueError:
            raise SourceError(f"Prometheus at {self.url} did not answer JSON") from None
        if doc.get("status") != "success":
            raise SourceError(f"Prometheus query failed: {doc.get('error', doc)}")
        return doc["data"]

    def query_range(self, query: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", {"query": query, "start": f"{start:.3f}",
                                                 "end": f"{end:.3f}", "step": f"{step:g}"}
                         )["result"]

    def query(self, query: str, at: float | None = None) -> list[dict]:
        params = {"query": query}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", params)["result"]


def _selector(node: str, extra: str = "") -> str:
    host = re.escape(node).replace("\\", "\\\\")
    parts = [f'instance=~"{host}(:[0-9]+)?"']
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


class _Grid:
    def __init__(self, start: float, end: float, step: float):
        self.t = np.arange(start, end + step / 2, step)
        self.step = step

    def place(self, values: list) -> np.ndarray:
        out = np.full(len(self.t), np.nan)
        for ts, v in values:
            i = int(round((float(ts) - self.t[0]) / self.step))
            if 0 <= i < len(out):
                try:
                    out[i] = float(v)
                except ValueError:
                    pass
        return out


def load_prometheus(url: str, node: str, start: float, end: float, step: float = 15.0,
                    flavour: str = "auto") -> Signals:
    client = PromClient(url)
    grid = _Grid(start, end, step)
    win = f"{int(max(step * 2, 30))}s"
    if flavour == "auto":
        have = client.query(f"count(agentd_build_info{_selector(node)})", at=end)
        flavour = "agentd" if have else "exporters"
    ch: dict[str, np.ndarray] = {}
    meta: dict = {"node": node}

    def fetch(key_fmt: str, query: str, label: str | None = None, scale: float = 1.0) -> None:
        for series in client.query_range(query, start, end, step):
            subject = series["metric"].get(label, "") if label else ""
            ch[key_fmt.format(subject)] = grid.place(series["values"]) * scale

    sel = _selector(node)
    idle_sel = _selector(node, 'mode="idle"')
    if flavour == "agentd":
        r = f"[{win}]"
        for sig, metric, label in (
            ("gpu.busy:{}", f"rate(agentd_gpu_busy_seconds_total{sel}{r})", "gpu"),
            ("gpu.sm_active:{}", f"rate(agentd_gpu_sm_active_seconds_total{sel}{r})", "gpu"),
            ("gpu.pcie_rx:{}", f"rate(agentd_gpu_pcie_rx_bytes_total{sel}{r})", "gpu"),
            ("gpu.nvlink_rx:{}", f"rate(agentd_gpu_nvlink_rx_bytes_total{sel}{r})", "gpu"),
            ("gpu.pcie_capacity:{}", f"agentd_gpu_pcie_link_capacity_bytes_per_second{sel}",
             "gpu"),
            ("gpu.mem_used:{}", f"agentd_gpu_memory_used_bytes{sel}", "gpu"),
            ("gpu.sm_clock:{}", f"agentd_gpu_sm_clock_hertz{sel}", "gpu"),
            ("gpu.sm_clock_max:{}", f"agentd_gpu_sm_clock_max_hertz{sel}", "gpu"),
            ("gpu.power:{}", f"agentd_gpu_power_watts{sel}", "gpu"),
            ("gpu.temperature:{}", f"agentd_gpu_temperature_celsius{sel}", "gpu"),
            ("disk.read:{}", f"rate(agentd_disk_read_bytes_total{sel}{r})", "device"),
            ("disk.write:{}", f"rate(agentd_disk_written_bytes_total{sel}{r})", "device"),
            ("disk.busy:{}", f"rate(agentd_disk_io_time_seconds_total{sel}{r})", "device"),
            ("disk.queue:{}", f"rate(agentd_disk_io_time_weighted_seconds_total{sel}{r})",
             "device"),
            ("proc.cpu:{}", f"rate(agentd_process_cpu_seconds_total{sel}{r})", "pid"),
            ("proc.members:{}", f"agentd_process_members{sel}", "pid"),
            ("net.rx:{}", f"rate(agentd_network_receive_bytes_total{sel}{r})", "device"),
        ):
            fetch(sig, metric, label)
        fetch("cpu.busy:{}", "sum(rate(agentd_cpu_seconds_total" +
              _selector(node, 'mode!~"idle|iowait|steal"') + f"{r}))")
        fetch("cpu.count:{}", f"count(agentd_cpu_seconds_total{idle_sel})")
        fetch("psi.io:{}", "rate(agentd_pressure_waiting_seconds_total" +
              _selector(node, 'resource="io",kind="some"') + f"{r})")
        fetch("psi.cpu:{}", "rate(agentd_pressure_waiting_seconds_total" +
              _selector(node, 'resource="cpu",kind="some"') + f"{r})")
        fetch("psi.memory:{}", "rate(agentd_pressure_waiting_seconds_total" +
              _selector(node, 'resource="memory",kind="some"') + f"{r})")
        fetch("mem.refault:{}", f"rate(agentd_memory_file_refaults_total{sel}{r})")
        # Throttle reasons as bits, from the share of each step the reason was active.
        seen = False
        from agentd.gpu.backend import CLOCK_EVENT_REASONS
        by_gpu: dict[str, np.ndarray] = {}
        for series in client.query_range(
                f"rate(agentd_gpu_clock_event_seconds_total{sel}{r})", start, end, step):
            m = series["metric"]
            if m.get("reason") not in CLOCK_EVENT_REASONS:
                continue
            seen = True
            share = np.nan_to_num(grid.place(series["values"]))
            g = m.get("gpu", "")
            by_gpu.setdefault(g, np.zeros(len(grid.t)))
            by_gpu[g] += (share >= 0.5) * (1 << CLOCK_EVENT_REASONS.index(m["reason"]))
        if seen:
            for g, b in by_gpu.items():
                ch[f"gpu.throttle:{g}"] = b
        procs = {}
        for s in client.query(f"agentd_process_info{sel}", at=end):
            m = s["metric"]
            procs[m["pid"]] = {"gpus": [int(x) for x in m.get("gpus", "").split(",") if x],
                               "comm": m.get("comm", ""),
                               "systemd_unit": m.get("systemd_unit", ""),
                               "container_id": m.get("container_id", ""),
                               "pod_uid": m.get("pod_uid", ""),
                               "slurm_job_id": m.get("slurm_job_id", "")}
        meta["processes"] = procs
        meta["shared_uplinks"] = _shared_uplinks(client, sel, end)
        source = "prometheus (agentd)"
    else:
        gsel = "{" + f'Hostname=~"{re.escape(node)}"' + "}"
        hsel = "{" + f'hostname=~"{re.escape(node)}"' + "}"
        for s in (sel, gsel, hsel):
            if client.query(f"count(DCGM_FI_DEV_GPU_UTIL{s})", at=end):
                dsel = s
                break
        else:
            dsel = sel
        w = f"[{int(step)}s]"
        for sig, metric, scale in (
            ("gpu.busy:{}", f"avg_over_time(DCGM_FI_DEV_GPU_UTIL{dsel}{w})", 0.01),
            ("gpu.sm_active:{}", f"avg_over_time(DCGM_FI_PROF_SM_ACTIVE{dsel}{w})", 1.0),
            ("gpu.pcie_rx:{}", f"avg_over_time(DCGM_FI_PROF_PCIE_RX_BYTES{dsel}{w})", 1.0),
            ("gpu.nvlink_rx:{}", f"avg_over_time(DCGM_FI_PROF_NVLINK_RX_BYTES{dsel}{w})", 1.0),
            ("gpu.mem_used:{}", f"DCGM_FI_DEV_FB_USED{dsel}", 2**20),
            ("gpu.sm_clock:{}", f"avg_over_time(DCGM_FI_DEV_SM_CLOCK{dsel}{w})", 1e6),
            ("gpu.power:{}", f"avg_over_time(DCGM_FI_DEV_POWER_USAGE{dsel}{w})", 1.0),
            ("gpu.temperature:{}", f"DCGM_FI_DEV_GPU_TEMP{dsel}", 1.0),
        ):
            fetch(sig, metric, "gpu", scale)
        r = f"[{win}]"
        fetch("disk.read:{}", f"rate(node_disk_read_bytes_total{sel}{r})", "device")
        fetch("disk.write:{}", f"rate(node_disk_written_bytes_total{sel}{r})", "device")
        fetch("disk.busy:{}", f"rate(node_disk_io_time_seconds_total{sel}{r})", "device")
        fetch("disk.queue:{}", f"rate(node_disk_io_time_weighted_seconds_total{sel}{r})",
              "device")
        fetch("cpu.busy:{}", "sum(rate(node_cpu_seconds_total" +
              _selector(node, 'mode!~"idle|iowait|steal"') + f"{r}))")
        fetch("cpu.count:{}", f"count(node_cpu_seconds_total{idle_sel})")
        fetch("psi.io:{}", f"rate(node_pressure_io_waiting_seconds_total{sel}{r})")
        fetch("psi.cpu:{}", f"rate(node_pressure_cpu_waiting_seconds_total{sel}{r})")
        fetch("psi.memory:{}", f"rate(node_pressure_memory_waiting_seconds_total{sel}{r})")
        fetch("net.rx:{}", f"rate(node_network_receive_bytes_total{sel}{r})", "device")
        meta["limits"] = ("dcgm-exporter and node_exporter do not show the data-loader "
                          "processes, the PCIe topology or throttle reasons; CPU is judged "
                          "node-wide and shared PCIe uplinks cannot be seen")
        source = "prometheus (dcgm-exporter + node_exporter)"
    if not any(k.startswith("gpu.busy:") for k in ch):
        raise SourceError(f"Prometheus at {url} holds no GPU utilization for node {node!r} "
                          f"between {start:.0f} and {end:.0f}")
    sig = Signals(grid.t, ch, step, source=source, node=node, meta=meta)
    return sig


def _shared_uplinks(client: PromClient, sel: str, at: float) -> list[dict]:
    gpus = {}
    for s in client.query(f"agentd_gpu_info{sel}", at=at):
        m = s["metric"]
        gpus[m.get("pci_bus_id", "").lower()[-12:]] = int(m.get("gpu", "-1"))
    disks = {}
    for s in client.query(f"agentd_disk_info{sel}", at=at):
        m = s["metric"]
        if m.get("pci_address"):
            disks[m["pci_address"]] = m["device"]
    links: dict[str, dict] = {}
    for s in client.query(f"agentd_pcie_shared_uplink{sel}", at=at):
        m = s["metric"]
        link = links.setdefault(m["switch"], {
            "switch": m["switch"], "gpus": [], "disks": [],
            "uplink_bytes_per_second": float(m.get("uplink_bytes_per_second") or 0)})
        g = gpus.get(m["gpu_address"])
        if g is not None and g not in link["gpus"]:
            link["gpus"].append(g)
        d = disks.get(m["nvme_address"])
        if d and d not in link["disks"]:
            link["disks"].append(d)
    return list(links.values())
