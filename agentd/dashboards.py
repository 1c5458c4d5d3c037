"""Grafana dashboards, generated with grafanalib: `agentd dashboards` writes
grafana/dashboards/*.json; the tests fail when the committed files are stale.

Every query uses the datasource variable (${datasource}) in the modern reference form
{"type": "prometheus", "uid": "${datasource}"}, and the node/GPU/job variables.
"""

from __future__ import annotations

import json
import os

from grafanalib import core as G
from grafanalib._gen import DashboardEncoder

DS = {"type": "prometheus", "uid": "${datasource}"}
NODE = 'instance=~"$node"'
GPU = 'instance=~"$node",gpu=~"$gpu"'


def _target(expr: str, legend: str = "", ref: str = "A", instant: bool = False,
            fmt: str = "time_series") -> G.Target:
    return G.Target(expr=expr, legendFormat=legend, refId=ref, datasource=DS, instant=instant,
                    format=fmt)


def _ts(title: str, targets: list[G.Target], unit: str = "", x: int = 0, y: int = 0,
        w: int = 12, h: int = 8, vmax=None, description: str = "") -> G.TimeSeries:
    return G.TimeSeries(title=title, dataSource=DS, targets=targets, unit=unit,
                        gridPos=G.GridPos(h=h, w=w, x=x, y=y), valueMin=0, valueMax=vmax,
                        description=description, legendDisplayMode="table",
                        legendPlacement="right", lineWidth=1, fillOpacity=10)


def _variables(extra: list[G.Template] | None = None) -> G.Templating:
    ds = G.Template(name="datasource", query="prometheus", type="datasource", label="Data source",
                    default="Prometheus")
    node = G.Template(name="node", label="Node", dataSource=DS, includeAll=True, multi=True,
                      query="label_values(agentd_build_info, instance)", default="$__all",
                      refresh=2)
    gpu = G.Template(name="gpu", label="GPU", dataSource=DS, includeAll=True, multi=True,
                     query='label_values(agentd_gpu_info{instance=~"$node"}, gpu)',
                     default="$__all", refresh=2)
    return G.Templating(list=[ds, node, gpu] + (extra or []))


def _findings_annotation() -> G.Annotations:
    return G.Annotations(list=[{
        "name": "agentd findings",
        "datasource": DS,
        "enable": True,
        "iconColor": "red",
        "expr": 'max by (instance, kind, gpus, severity) '
                '(agentd_finding_active{instance=~"$node",severity=~"warning|critical"})',
        "step": "60s",
        "titleFormat": "{{kind}} on {{instance}}",
        "textFormat": "GPUs {{gpus}}: {{severity}}",
        "useValueForTime": False,
    }])


def _findings_table(y: int, selector: str = NODE) -> G.Table:
    expr = (f"max by (instance, kind, severity, gpus) (agentd_finding_active{{{selector}}})"
            f" * on (instance, kind, gpus) group_left () "
            f"max by (instance, kind, gpus) (agentd_finding_expected_speedup_ratio{{{selector}}})")
    stall = f"max by (instance, kind, gpus) (agentd_finding_stall_ratio{{{selector}}})"
    conf = f"max by (instance, kind, gpus) (agentd_finding_confidence_ratio{{{selector}}})"
    return G.Table(
        title="Findings: why the GPUs are idle (ranked by expected speed-up)",
        description="From agentd's rolling analysis (every 10 s over the last 60 s). "
                    "`agentd diagnose --daemon http://NODE:9445` gives the evidence and what "
                    "to change; docs/runbook.md explains each kind.",
        dataSource=DS,
        targets=[_target(expr, ref="A", instant=True, fmt="table"),
                 _target(stall, ref="B", instant=True, fmt="table"),
                 _target(conf, ref="C", instant=True, fmt="table")],
        gridPos=G.GridPos(h=7, w=24, x=0, y=y),
        transformations=[{"id": "merge", "options": {}},
                         {"id": "organize", "options": {
                             "excludeByName": {"Time": True},
                             "renameByName": {"Value #A": "expected speed-up",
                                              "Value #B": "GPU time lost",
                                              "Value #C": "confidence"}}},
                         {"id": "sortBy", "options": {"sort": [{"field": "expected speed-up",
                                                                "desc": True}]}}],
    )


def node_dashboard() -> G.Dashboard:
    panels = [
        G.Stat(title="GPU busy (mean)", dataSource=DS, format="percentunit",
               targets=[_target(f"avg(rate(agentd_gpu_busy_seconds_total{{{GPU}}}[$__rate_interval]))")],
               gridPos=G.GridPos(h=4, w=6, x=0, y=0), decimals=0),
        G.Stat(title="GPU time lost (GPU-hours per hour)", dataSource=DS,
               targets=[_target(f"sum(clamp_min(1 - rate(agentd_gpu_busy_seconds_total{{{GPU}}}"
                                f"[$__rate_interval]), 0))")],
               gridPos=G.GridPos(h=4, w=6, x=6, y=0), decimals=2),
        G.Stat(title="Active findings", dataSource=DS,
               targets=[_target(f"count(agentd_finding_active{{{NODE},severity=~\"warning|critical\"}}) or vector(0)")],
               gridPos=G.GridPos(h=4, w=6, x=12, y=0)),
        G.Stat(title="Samplers failing", dataSource=DS,
               targets=[_target(f"count(agentd_sampler_success{{{NODE}}} == 0 and on (instance, sampler) agentd_sampler_available{{{NODE}}} == 1) or vector(0)")],
               gridPos=G.GridPos(h=4, w=6, x=18, y=0)),
        _findings_table(4),
        _ts("GPU busy (NVML utilization)", [_target(
            f"rate(agentd_gpu_busy_seconds_total{{{GPU}}}[$__rate_interval])",
            "GPU {{gpu}}")], "percentunit", 0, 11, vmax=1,
            description="Share of time a kernel ran, exact over any range (a counter)."),
        _ts("SM activity (GPM)", [_target(
            f"rate(agentd_gpu_sm_active_seconds_total{{{GPU}}}[$__rate_interval])",
            "GPU {{gpu}}")], "percentunit", 12, 11, vmax=1,
            description="Busy yet low SM activity: time in collectives or light kernels."),
        _ts("PCIe host-to-device against link capacity", [
            _target(f"rate(agentd_gpu_pcie_rx_bytes_total{{{GPU}}}[$__rate_interval])",
                    "GPU {{gpu}} RX"),
            _target(f"max(agentd_gpu_pcie_link_capacity_bytes_per_second{{{GPU}}})",
                    "link capacity", "B")], "Bps", 0, 19),
        _ts("Storage reads against device busy time", [
            _target(f"rate(agentd_disk_read_bytes_total{{{NODE}}}[$__rate_interval])",
                    "{{device}} read"),
            _target(f"rate(agentd_disk_io_time_seconds_total{{{NODE}}}[$__rate_interval]) * 1e9",
                    "{{device}} busy (1 GB/s = 100%)", "B")], "Bps", 12, 19,
            description="A device busy near 100% with requests queueing is at its ceiling."),
        _ts("CPU", [
            _target(f"sum by (instance) (rate(agentd_cpu_seconds_total{{{NODE},mode!~\"idle|iowait|steal\"}}[$__rate_interval]))",
                    "busy cores"),
            _target(f"sum by (instance) (rate(agentd_cpu_seconds_total{{{NODE},mode=\"iowait\"}}[$__rate_interval]))",
                    "iowait cores", "B"),
            _target(f"agentd_cpu_online{{{NODE}}}", "cores", "C")], "", 0, 27),
        _ts("Pressure stall (share of time)", [_target(
            f"rate(agentd_pressure_waiting_seconds_total{{{NODE},kind=\"some\"}}[$__rate_interval])",
            "{{resource}}")], "percentunit", 12, 27, vmax=1),
        _ts("Data-loader process trees: CPU cores", [_target(
            f"rate(agentd_process_cpu_seconds_total{{{NODE}}}[$__rate_interval])",
            "pid {{pid}}")], "", 0, 35),
        _ts("Clocks: SM clock against maximum", [
            _target(f"agentd_gpu_sm_clock_hertz{{{GPU}}} / agentd_gpu_sm_clock_max_hertz{{{GPU}}}",
                    "GPU {{gpu}}")], "percentunit", 12, 35, vmax=1),
    ]
    return G.Dashboard(
        title="agentd / Node", uid="agentd-node", tags=["agentd", "gpu"],
        description="Is this node's GPU input pipeline starved, and why?",
        templating=_variables(), annotations=_findings_annotation(), panels=panels,
        time=G.Time("now-1h", "now"), refresh="30s", timezone="browser",
        schemaVersion=39, graphTooltip=1).auto_panel_ids()


def cluster_dashboard() -> G.Dashboard:
    panels = [
        G.Stat(title="Cluster GPU busy", dataSource=DS, format="percentunit",
               targets=[_target("avg(rate(agentd_gpu_busy_seconds_total[$__rate_interval]))")],
               gridPos=G.GridPos(h=4, w=6, x=0, y=0), decimals=0),
        G.Stat(title="GPU-hours idle per hour", dataSource=DS,
               targets=[_target("sum(clamp_min(1 - rate(agentd_gpu_busy_seconds_total[$__rate_interval]), 0))")],
               gridPos=G.GridPos(h=4, w=6, x=6, y=0), decimals=1),
        G.Stat(title="Idle cost per hour", dataSource=DS,
               targets=[_target("sum(clamp_min(1 - rate(agentd_gpu_busy_seconds_total[$__rate_interval]), 0)) * scalar(agentd:gpu_hour_price or vector(2.5))")],
               gridPos=G.GridPos(h=4, w=6, x=12, y=0), decimals=2),
        G.Stat(title="Nodes with findings", dataSource=DS,
               targets=[_target('count(count by (instance) (agentd_finding_active{severity=~"warning|critical"})) or vector(0)')],
               gridPos=G.GridPos(h=4, w=6, x=18, y=0)),
        G.Heatmap(title="GPU busy across the fleet", dataSource=DS,
                  targets=[_target('avg by (instance) (rate(agentd_gpu_busy_seconds_total{instance=~"$node"}[$__rate_interval]))',
                                   "{{instance}}", fmt="heatmap")],
                  gridPos=G.GridPos(h=10, w=24, x=0, y=4),
                  description="One row per node: the mean busy share of its GPUs."),
        _findings_table(14, selector='instance=~"$node"'),
        G.BarGauge(title="Most starved nodes (GPU time lost)", dataSource=DS,
                   targets=[_target('topk(10, sum by (instance) (clamp_min(1 - rate(agentd_gpu_busy_seconds_total[$__rate_interval]), 0)))',
                                    "{{instance}}", instant=True)],
                   gridPos=G.GridPos(h=8, w=12, x=0, y=21), max=8, orientation="horizontal"),
        G.BarGauge(title="Stragglers and throttled GPUs", dataSource=DS,
                   targets=[_target('max by (instance, kind, gpus) (agentd_finding_stall_ratio{kind=~"straggler|throttled"})',
                                    "{{instance}} {{kind}} GPU {{gpus}}", instant=True)],
                   gridPos=G.GridPos(h=8, w=12, x=12, y=21), max=1, format="percentunit",
                   orientation="horizontal"),
        G.BarGauge(title="Most starved jobs (share of their GPU time lost)", dataSource=DS,
                   targets=[_target('topk(10, agentd:job_gpu_stall:ratio_avg_rate5m)',
                                    "{{systemd_unit}}{{pod_uid}} {{slurm_job_id}}",
                                    instant=True)],
                   gridPos=G.GridPos(h=8, w=24, x=0, y=37), max=1, format="percentunit",
                   orientation="horizontal",
                   description="From the recording rules in rules/agentd.rules.yml."),
        _ts("Idle GPU-hours per hour, by node", [_target(
            'sum by (instance) (clamp_min(1 - rate(agentd_gpu_busy_seconds_total{instance=~"$node"}[$__rate_interval]), 0))',
            "{{instance}}")], "", 0, 29, w=24),
    ]
    return G.Dashboard(
        title="agentd / Cluster", uid="agentd-cluster", tags=["agentd", "gpu"],
        description="Where GPU time goes idle across the fleet, and why.",
        templating=_variables(), annotations=_findings_annotation(), panels=panels,
        time=G.Time("now-6h", "now"), refresh="1m", timezone="browser",
        schemaVersion=39).auto_panel_ids()


def job_dashboard() -> G.Dashboard:
    job = G.Template(name="job", label="Job (systemd unit, pod or Slurm job)", dataSource=DS,
                     includeAll=True, multi=True,
                     query='label_values(agentd_process_info{instance=~"$node"}, systemd_unit)',
                     default="$__all", refresh=2)
    sel = 'instance=~"$node",systemd_unit=~"$job"'
    # The GPUs on which the job's processes hold memory (1 per GPU).
    gpus_of_job = (f'max by (instance, gpu, uuid) (((agentd_gpu_process_memory_used_bytes > 0) '
                   f'* 0 + 1) * on (instance, pid) group_left () max by (instance, pid) '
                   f'(agentd_process_info{{{sel}}}))')
    panels = [
        _ts("GPU busy of the job's GPUs", [_target(
            f"rate(agentd_gpu_busy_seconds_total[$__rate_interval]) * on (instance, gpu, uuid) "
            f"group_left () {gpus_of_job}", "{{instance}} GPU {{gpu}}")], "percentunit",
            0, 0, vmax=1),
        _ts("SM activity of the job's GPUs", [_target(
            f"rate(agentd_gpu_sm_active_seconds_total[$__rate_interval]) * on (instance, gpu, "
            f"uuid) group_left () {gpus_of_job}", "{{instance}} GPU {{gpu}}")], "percentunit",
            12, 0, vmax=1),
        _ts("Data-loader CPU (cores)", [_target(
            f"rate(agentd_process_cpu_seconds_total[$__rate_interval]) * on (instance, pid) "
            f"group_left (comm) agentd_process_info{{{sel}}}", "{{instance}} pid {{pid}}")],
            "", 0, 8),
        _ts("Reads: from storage against all reads (cache hits)", [
            _target(f"rate(agentd_process_read_bytes_total[$__rate_interval]) * on (instance, pid) "
                    f"group_left () agentd_process_info{{{sel}}}", "storage pid {{pid}}"),
            _target(f"rate(agentd_process_read_chars_total[$__rate_interval]) * on (instance, pid) "
                    f"group_left () agentd_process_info{{{sel}}}", "all reads pid {{pid}}", "B")],
            "Bps", 12, 8),
        _ts("Processes in D state (waiting for I/O)", [_target(
            f"agentd_process_blocked * on (instance, pid) group_left () agentd_process_info{{{sel}}}",
            "{{instance}} pid {{pid}}")], "", 0, 16),
        _findings_table(16 + 8, selector='instance=~"$node"'),
    ]
    return G.Dashboard(
        title="agentd / Job", uid="agentd-job", tags=["agentd", "gpu"],
        description="One training job's GPUs, data loader and reads.",
        templating=_variables([job]), annotations=_findings_annotation(), panels=panels,
        time=G.Time("now-1h", "now"), refresh="30s", timezone="browser",
        schemaVersion=39).auto_panel_ids()


DASHBOARDS = {"agentd-node.json": node_dashboard, "agentd-cluster.json": cluster_dashboard,
              "agentd-job.json": job_dashboard}


def render(build) -> str:
    return json.dumps(build().to_json_data(), cls=DashboardEncoder, indent=2,
                      sort_keys=True) + "\n"


def write_all(directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, build in DASHBOARDS.items():
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(render(build))
        written.append(path)
    return written
