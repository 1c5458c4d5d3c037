"""Grafana dashboards, generated with grafanalib: `agentd dashboards` writes
grafana/dashboards/*.json; the tests fail when the committed files are stale.

grafanalib 0.7's panel classes write some pre-Grafana-7 structures (a bar gauge's
options.fieldOptions, stat thresholds as "", the legacy heatmap), which current Grafana
(10, 11) ignores or migrates badly. So every panel here is a `Panel` below: grafanalib's base
panel (datasource, grid position, targets, links, transformations) with the fields current
Grafana reads: fieldConfig.defaults {unit, min, max, decimals, thresholds {mode, steps: the
first step's value null}, color, links, custom} and the panel type's options.

Every query uses the datasource variable in the modern reference form {"type": "prometheus",
"uid": "${datasource}"}. GPU time lost counts only GPUs a job holds memory on (idle GPUs
without a job are unallocated capacity, lost GPUs failures: each has its own panel).
"""

from __future__ import annotations

import json
import os

import attr
from grafanalib import core as G
from grafanalib._gen import DashboardEncoder

from agentd.jobs import JOB_LABELS

DS = {"type": "prometheus", "uid": "${datasource}"}
CURRENCY = "USD"  # agentd dashboards --currency EUR: Grafana's currencyEUR unit

# The colours of current Grafana's palette.
GREEN, YELLOW, ORANGE, RED, BLUE = "green", "yellow", "orange", "red", "blue"
LOW_IS_BAD = ((RED, None), (ORANGE, 0.5), (GREEN, 0.8))  # busy shares
HIGH_IS_BAD = ((GREEN, None), (ORANGE, 0.1), (RED, 0.3))  # shares lost
COUNT_IS_BAD = ((GREEN, None), (RED, 1))

# A node of a job across nodes (agentd/rules.py CLUSTER_JOB_LABELS).
CLUSTER_JOB_LEGEND = "{{instance}} in {{slurm_job_id}}{{namespace}} {{workload}}{{systemd_unit}}"
PEER_Z = ((GREEN, None), (ORANGE, 3), (RED, 4))
# The legend of a job: the labels that identify it (only one kind is set: agentd/jobs.py).
JOB_LEGEND = ("{{slurm_job_id}}{{namespace}} {{pod}} {{container}}{{pod_uid}}{{container_id}}"
              "{{systemd_unit}}{{comm}}")


@attr.s
class Target(G.Target):
    """A Prometheus query as Grafana 10 stores it (range or instant, code editor)."""

    def to_json_data(self):
        d = super().to_json_data()
        d.update(range=not self.instant, editorMode="code")
        for legacy in ("query", "target", "metric", "step", "intervalFactor"):
            d.pop(legacy, None)
        return d


@attr.s
class Panel(G.Panel):
    """A panel of any current type with the fields Grafana 10/11 reads."""

    type = attr.ib(default="timeseries")
    unit = attr.ib(default="none")
    min = attr.ib(default=None)
    max = attr.ib(default=None)
    decimals = attr.ib(default=None)
    steps = attr.ib(default=((GREEN, None),))
    color = attr.ib(default=attr.Factory(lambda: {"mode": "thresholds"}))
    custom = attr.ib(default=attr.Factory(dict))
    options = attr.ib(default=attr.Factory(dict))
    overrides = attr.ib(default=attr.Factory(list))
    dataLinks = attr.ib(default=attr.Factory(list))
    mappings = attr.ib(default=attr.Factory(list))

    def to_json_data(self):
        defaults = {
            "unit": self.unit,
            "thresholds": {"mode": "absolute",
                           "steps": [{"color": c, "value": v} for c, v in self.steps]},
            "color": self.color,
            "custom": self.custom,
            "links": self.dataLinks,
            "mappings": self.mappings,
        }
        for key in ("min", "max", "decimals"):
            if getattr(self, key) is not None:
                defaults[key] = getattr(self, key)
        d = self.panel_json({"type": self.type, "options": self.options})
        d["fieldConfig"] = {"defaults": defaults, "overrides": self.overrides}
        d["maxDataPoints"] = None if self.type in ("timeseries", "state-timeline") else 100
        return d


def _target(expr: str, legend: str = "", ref: str = "A", instant: bool = False,
            fmt: str = "time_series") -> Target:
    return Target(expr=expr, legendFormat=legend or "__auto", refId=ref, datasource=DS,
                  instant=instant, format=fmt)


def _grid(x: int, y: int, w: int, h: int) -> G.GridPos:
    return G.GridPos(h=h, w=w, x=x, y=y)


def _reduce(calc: str = "lastNotNull") -> dict:
    return {"values": False, "calcs": [calc], "fields": ""}


def stat(title: str, expr: str, x: int, y: int, unit: str = "none",
         steps=((GREEN, None),), description: str = "", decimals: int | None = None,
         w: int = 4, h: int = 4, links: list | None = None) -> Panel:
    return Panel(type="stat", title=title, dataSource=DS, targets=[_target(expr)],
                 gridPos=_grid(x, y, w, h), unit=unit, steps=steps, decimals=decimals,
                 description=description, dataLinks=links or [],
                 options={"reduceOptions": _reduce(), "orientation": "auto",
                          "textMode": "value", "colorMode": "value", "graphMode": "area",
                          "justifyMode": "center", "wideLayout": True,
                          "showPercentChange": False})


def timeseries(title: str, targets: list[Target], x: int, y: int, unit: str,
               w: int = 12, h: int = 8, vmax=None, description: str = "",
               steps=((GREEN, None),), stack: bool = False, bars: bool = False) -> Panel:
    return Panel(type="timeseries", title=title, dataSource=DS, targets=targets,
                 gridPos=_grid(x, y, w, h), unit=unit, min=0, max=vmax, steps=steps,
                 description=description, color={"mode": "palette-classic"},
                 custom={"drawStyle": "bars" if bars else "line", "lineWidth": 1,
                         "fillOpacity": 60 if bars else 10, "showPoints": "never",
                         "spanNulls": False, "axisSoftMin": 0,
                         "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                         "thresholdsStyle": {"mode": "off"}},
                 options={"legend": {"showLegend": True, "displayMode": "table",
                                     "placement": "right", "calcs": ["mean", "max"]},
                          "tooltip": {"mode": "multi", "sort": "desc"}})


def bargauge(title: str, expr: str, legend: str, x: int, y: int, unit: str, steps,
             w: int = 12, h: int = 8, vmax=None, description: str = "",
             links: list | None = None) -> Panel:
    return Panel(type="bargauge", title=title, dataSource=DS,
                 targets=[_target(expr, legend, instant=True)], gridPos=_grid(x, y, w, h),
                 unit=unit, min=0, max=vmax, steps=steps, description=description,
                 dataLinks=links or [],
                 options={"reduceOptions": _reduce(), "orientation": "horizontal",
                          "displayMode": "gradient", "valueMode": "color",
                          "showUnfilled": True, "namePlacement": "auto", "sizing": "auto",
                          "minVizWidth": 8, "minVizHeight": 16, "maxVizHeight": 300})


def _node_link(title: str, var: str) -> dict:
    """A drill-down to the node dashboard for the series' node (`var` is Grafana's
    reference to its instance: ${__field.labels.instance} or ${__value.raw})."""
    return {"title": title, "targetBlank": False,
            "url": f"/d/agentd-node/agentd-node?var-node={var}&${{__url_time_range}}"
                   "&var-datasource=${datasource}"}


NODE_LINK = _node_link("Node ${__field.labels.instance}", "${__field.labels.instance}")


def _variables(node_multi: bool, extra: list[G.Template] | None = None,
               gpu: bool = True) -> G.Templating:
    ds = G.Template(name="datasource", query="prometheus", type="datasource",
                    label="Data source", default="Prometheus")
    node = G.Template(name="node", label="Node", dataSource=DS, includeAll=node_multi,
                      multi=node_multi, allValue=".*" if node_multi else None,
                      query="label_values(agentd_build_info, instance)",
                      default="$__all" if node_multi else None, refresh=2)
    out = [ds, node]
    if gpu:
        sel = 'instance=~"$node"' if node_multi else 'instance="$node"'
        out.append(G.Template(name="gpu", label="GPU", dataSource=DS, includeAll=True,
                              multi=True, allValue=".*", default="$__all", refresh=2,
                              query=f"label_values(agentd_gpu_info{{{sel}}}, gpu)"))
    return G.Templating(list=out + (extra or []))


def _findings_annotation(sel: str) -> G.Annotations:
    return G.Annotations(list=[{
        "name": "agentd findings",
        "datasource": DS,
        "enable": True,
        "iconColor": "red",
        "expr": f'max by (instance, kind, gpu, severity) '
                f'(agentd_finding_active{{{sel},severity=~"warning|critical"}})',
        "step": "60s",
        "titleFormat": "{{kind}} on {{instance}}",
        "textFormat": "GPU {{gpu}}: {{severity}}",
        "useValueForTime": False,
    }])


def _findings_table(y: int, sel: str, gpus: str = "") -> Panel:
    """One row per (node, kind, GPU); `gpus` restricts it to some GPUs (a set expression)."""
    keep = f" and on (instance, gpu) {gpus}" if gpus else ""

    def q(metric: str, by: str = "instance, kind, gpu") -> str:
        return f"max by ({by}) ({metric}{{{sel}}}){keep}"

    return Panel(
        type="table",
        title="Findings: why the GPUs are idle (ranked by expected speed-up)",
        description="From agentd's rolling analysis (every 10 s over the last 60 s), one row "
                    "per node, kind and GPU. `agentd diagnose --daemon http://NODE:9445` gives "
                    "the evidence and what to change; docs/runbook.md explains each kind.",
        dataSource=DS,
        targets=[_target(q("agentd_finding_expected_speedup_ratio"), ref="A", instant=True,
                         fmt="table"),
                 _target(q("agentd_finding_active", "instance, kind, gpu, severity"),
                         ref="B", instant=True, fmt="table"),
                 _target(q("agentd_finding_stall_ratio"), ref="C", instant=True, fmt="table"),
                 _target(q("agentd_finding_confidence_ratio"), ref="D", instant=True,
                         fmt="table")],
        gridPos=_grid(0, y, 24, 7),
        custom={"align": "auto", "cellOptions": {"type": "auto"}, "filterable": True},
        options={"showHeader": True, "cellHeight": "sm",
                 "footer": {"show": False, "reducer": ["sum"], "fields": ""},
                 "sortBy": [{"displayName": "expected speed-up", "desc": True}]},
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {
                "excludeByName": {"Time": True, "Value #B": True},
                "renameByName": {"Value #A": "expected speed-up", "Value #C": "GPU time lost",
                                 "Value #D": "confidence"}}}],
        overrides=[
            {"matcher": {"id": "byName", "options": "expected speed-up"},
             "properties": [{"id": "unit", "value": "x"}, {"id": "decimals", "value": 2}]},
            {"matcher": {"id": "byName", "options": "GPU time lost"},
             "properties": [{"id": "unit", "value": "percentunit"},
                            {"id": "custom.cellOptions", "value": {"type": "color-text"}},
                            {"id": "thresholds", "value": {"mode": "absolute", "steps": [
                                {"color": GREEN, "value": None},
                                {"color": ORANGE, "value": 0.05},
                                {"color": RED, "value": 0.2}]}}]},
            {"matcher": {"id": "byName", "options": "confidence"},
             "properties": [{"id": "unit", "value": "percentunit"}]},
            {"matcher": {"id": "byName", "options": "instance"},
             "properties": [{"id": "links", "value": [
                 _node_link("Node ${__value.raw}", "${__value.raw}")]}]},
        ],
    )


# --- GPU selections (PromQL set expressions) ---------------------------------------------------

def _lost(sel: str) -> str:
    return f"agentd_gpu_lost{{{sel}}} == 1"


def _held(sel: str) -> str:
    """GPUs on which a job holds memory."""
    return f"agentd_gpu_process_memory_used_bytes{{{sel}}} > 0"


def _busy(sel: str) -> str:
    """Busy share of each GPU that has not fallen off the bus."""
    return (f"rate(agentd_gpu_busy_seconds_total{{{sel}}}[$__rate_interval]) "
            f"unless on (instance, gpu, uuid) {_lost(sel)}")


def _stall_held(sel: str, node_sel: str | None = None) -> str:
    """Stall share of the GPUs jobs hold (GPU time lost), lost GPUs excluded."""
    n = node_sel or sel
    return (f"clamp_min(1 - rate(agentd_gpu_busy_seconds_total{{{sel}}}[$__rate_interval]), 0)"
            f" and on (instance, gpu, uuid) ({_held(n)})"
            f" unless on (instance, gpu, uuid) {_lost(n)}")


def _cost(stall: str) -> str:
    return f"({stall}) * on (instance, gpu, uuid) group_left () agentd:gpu_price_per_hour"


def _gpu_time_stats(title: str, gpu: str, node: str, currency: str, scale: float) -> list:
    """Busy, GPU time lost and its cost: the first three stats of a node or of the fleet
    (`scale`: how many nodes' worth the thresholds stand for)."""
    return [
        stat(title, f"avg({_busy(gpu)})", 0, 0, "percentunit", LOW_IS_BAD,
             "Mean share of time the GPUs ran a kernel (lost GPUs excluded)."),
        stat("GPU time lost to stalls", f"sum({_stall_held(gpu, node)}) or vector(0)", 4, 0,
             "suffix: GPU-h/h", ((GREEN, None), (ORANGE, 0.5 * scale), (RED, 2 * scale)),
             "GPU-hours lost per hour by GPUs a job holds while they wait (8 GPUs stalled "
             "half the time: 4). Idle GPUs without a job and lost GPUs are not counted.", 1),
        stat("Cost of stalls per hour", f"sum({_cost(_stall_held(gpu, node))})", 8, 0,
             f"currency{currency}", ((GREEN, None), (ORANGE, 5 * scale), (RED, 20 * scale)),
             "GPU time lost times each GPU's price (agentd:gpu_price_per_hour, from your "
             "agentd_gpu_price_per_hour series; empty without it).", 2),
    ]


# --- dashboards ----------------------------------------------------------------------------------

def node_dashboard(currency: str = CURRENCY) -> G.Dashboard:
    node = 'instance="$node"'
    gpu = 'instance="$node",gpu=~"$gpu"'
    panels = [
        *_gpu_time_stats("GPU busy", gpu, node, currency, scale=1),
        stat("Active findings", f'count(max by (kind, gpu) (agentd_finding_active{{{node},'
             f'severity=~"warning|critical"}})) or vector(0)', 12, 0, "none",
             ((GREEN, None), (ORANGE, 1))),
        stat("Lost GPUs", f"count({_lost(node)}) or vector(0)", 16, 0, "none", COUNT_IS_BAD,
             "GPUs fallen off the bus (AgentdGpuLost)."),
        stat("Samplers failing", f"count(agentd_sampler_success{{{node}}} == 0 and on "
             f"(instance, sampler) agentd_sampler_available{{{node}}} == 1) or vector(0)",
             20, 0, "none", COUNT_IS_BAD),
        _findings_table(4, node),
        timeseries("GPU busy (NVML utilization)", [_target(_busy(gpu), "GPU {{gpu}}")],
                   0, 11, "percentunit", vmax=1,
                   description="Share of time a kernel ran, exact over any range (a counter)."),
        timeseries("SM activity (GPM)", [_target(
            f"rate(agentd_gpu_sm_active_seconds_total{{{gpu}}}[$__rate_interval])",
            "GPU {{gpu}}")], 12, 11, "percentunit", vmax=1,
            description="Busy yet low SM activity: time in collectives or light kernels."),
        timeseries("PCIe host-to-device against link capacity", [
            _target(f"rate(agentd_gpu_pcie_rx_bytes_total{{{gpu}}}[$__rate_interval])",
                    "GPU {{gpu}} RX"),
            _target(f"agentd_gpu_pcie_link_capacity_bytes_per_second{{{gpu}}}",
                    "GPU {{gpu}} link capacity", "B")], 0, 19, "Bps"),
        timeseries("GPU memory used", [_target(
            f"agentd_gpu_memory_used_bytes{{{gpu}}}", "GPU {{gpu}}")], 12, 19, "bytes"),
        timeseries("Storage reads", [_target(
            f"rate(agentd_disk_read_bytes_total{{{node}}}[$__rate_interval])",
            "{{device}}")], 0, 27, "Bps",
            description="Bytes read per whole block device."),
        timeseries("Storage devices busy", [_target(
            # rate() of a time counter read a little late can exceed 1: a share is at most 1.
            f"clamp_max(rate(agentd_disk_io_time_seconds_total{{{node}}}[$__rate_interval]), "
            "1)", "{{device}}")], 12, 27, "percentunit", vmax=1,
            description="Share of time the device had I/O in flight. Busy is no ceiling (an "
                        "NVMe drive reads ~100% busy at half its throughput): compare reads "
                        "with the drive's measured ceiling."),
        timeseries("CPU", [
            _target(f'sum(rate(agentd_cpu_seconds_total{{{node},mode!~"idle|iowait|steal"}}'
                    f'[$__rate_interval]))', "busy cores"),
            _target(f'sum(rate(agentd_cpu_seconds_total{{{node},mode="iowait"}}'
                    f'[$__rate_interval]))', "iowait cores", "B"),
            _target(f"agentd_cpu_online{{{node}}}", "online cores", "C")], 0, 35, "none"),
        timeseries("Pressure stall (share of time)", [_target(
            f'clamp_max(rate(agentd_pressure_waiting_seconds_total{{{node},kind="some"}}'
            f'[$__rate_interval]), 1)', "{{resource}}")], 12, 35, "percentunit", vmax=1),
        timeseries("Data-loader CPU per job (cores, trees summed)", [_target(
            f"rate(agentd_process_cpu_seconds_total{{{node}}}[$__rate_interval])",
            JOB_LEGEND)], 0, 43, "none",
            description="CPU of each job's GPU process trees (trainers and their data-loader "
                        "workers), by job: Slurm job, pod, container, unit or name."),
        timeseries("Clocks: SM clock against maximum", [_target(
            f"agentd_gpu_sm_clock_hertz{{{gpu}}} / agentd_gpu_sm_clock_max_hertz{{{gpu}}}",
            "GPU {{gpu}}")], 12, 43, "percentunit", vmax=1),
        timeseries("XID events", [_target(
            f"increase(agentd_gpu_xid_errors_total{{{gpu}}}[$__rate_interval]) > 0",
            "GPU {{gpu}} {{class}}")], 0, 51, "none", w=24, h=6, bars=True,
            description="XIDs by class (application, degraded, fatal, unknown); the code is "
                        "in agentd_gpu_xid_last_code and the kernel log."),
    ]
    return G.Dashboard(
        title="agentd / Node", uid="agentd-node", tags=["agentd", "gpu"],
        description="Is this node's GPU input pipeline starved, and why?",
        templating=_variables(node_multi=False),
        annotations=_findings_annotation(node), panels=panels,
        links=[G.DashboardLink(title="Cluster", uri="/d/agentd-cluster/agentd-cluster",
                               type="link", keepTime=True, includeVars=False)],
        time=G.Time("now-1h", "now"), refresh="30s", timezone="browser",
        schemaVersion=39, graphTooltip=1).auto_panel_ids()


def cluster_dashboard(currency: str = CURRENCY) -> G.Dashboard:
    node = 'instance=~"$node"'
    panels = [
        *_gpu_time_stats("Cluster GPU busy", node, node, currency, scale=16),
        stat("Nodes with findings", f'count(count by (instance) (agentd_finding_active{{'
             f'{node},severity=~"warning|critical"}})) or vector(0)', 12, 0, "none",
             ((GREEN, None), (ORANGE, 1))),
        stat("Lost GPUs", f"count({_lost(node)}) or vector(0)", 16, 0, "none", COUNT_IS_BAD,
             "GPUs fallen off the bus, not counted as GPU time lost."),
        stat("Unallocated GPUs", f"count(agentd_gpu_info{{{node}}} unless on (instance, gpu, "
             f"uuid) ({_held(node)}) unless on (instance, gpu, uuid) {_lost(node)}) or "
             "vector(0)", 20, 0, "none", ((BLUE, None),),
             "GPUs no job holds memory on: spare capacity, not GPU time lost."),
        Panel(type="state-timeline", title="GPU busy by node (one row per node)",
              dataSource=DS, targets=[_target(f"avg by (instance) ({_busy(node)})",
                                              "{{instance}}")],
              gridPos=_grid(0, 4, 24, 10), unit="percentunit", min=0, max=1,
              steps=LOW_IS_BAD, dataLinks=[NODE_LINK],
              description="Mean busy share of each node's GPUs over time; click a row for "
                          "the node's dashboard.",
              custom={"lineWidth": 0, "fillOpacity": 80, "hideFrom": {
                  "legend": False, "tooltip": False, "viz": False}},
              options={"showValue": "never", "rowHeight": 0.9, "mergeValues": False,
                       "alignValue": "left",
                       "legend": {"showLegend": True, "displayMode": "list",
                                  "placement": "bottom"},
                       "tooltip": {"mode": "single", "sort": "none"}}),
        _findings_table(14, node),
        bargauge("Most starved nodes (GPU time lost)",
                 f"topk(10, sum by (instance) ({_stall_held(node)}))", "{{instance}}", 0, 21,
                 "suffix: GPU-h/h", ((GREEN, None), (ORANGE, 0.5), (RED, 2)),
                 description="GPU-hours lost per hour on each node, GPUs jobs hold only.",
                 links=[NODE_LINK]),
        bargauge("Stragglers and throttled GPUs",
                 f'max by (instance, kind, gpu) (agentd_finding_stall_ratio{{{node},'
                 f'kind=~"straggler|throttled"}})', "{{instance}} GPU {{gpu}} {{kind}}",
                 12, 21, "percentunit", HIGH_IS_BAD, vmax=1,
                 description="Share of the GPU's time lost; a straggler slows every peer.",
                 links=[NODE_LINK]),
        timeseries("GPU time lost by node", [_target(
            f"sum by (instance) ({_stall_held(node)})", "{{instance}}")], 0, 29,
            "suffix: GPU-h/h", w=24),
        bargauge("Most starved jobs (share of their GPU time lost)",
                 "topk(10, agentd:job_gpu_stall:ratio_avg_rate5m)", JOB_LEGEND, 0, 37,
                 "percentunit", HIGH_IS_BAD, w=24, vmax=1,
                 description="From the recording rules of `agentd rules`: a job's GPUs' "
                             "stall share, across nodes (a Slurm job, a pod)."),
        bargauge("Nodes computing longer than their job's peers (robust z)",
                 f'topk(10, agentd:job_node_gpu_activity:robust_z_rate5m{{{node}}} > 0)',
                 CLUSTER_JOB_LEGEND, 0, 45, "none", PEER_Z, vmax=12,
                 description="Tensor (else SM) activity of each node's GPUs of a job against "
                             "the job's other nodes: median/MAD spreads, never below 3%. Past "
                             "4 (and 8%) the node holds the job back: throttled at lower "
                             "clocks, a slower GPU at normal ones (AgentdNodeHoldingJobBack; "
                             "`agentd diagnose --cluster` says why).", links=[NODE_LINK]),
        bargauge("Nodes idling more than their job's peers (robust z)",
                 f'topk(10, -agentd:job_node_gpu_busy:robust_z_rate5m{{{node}}} > 0)',
                 CLUSTER_JOB_LEGEND, 12, 45, "none", PEER_Z, vmax=12,
                 description="Busy share of each node's GPUs of a job under the job's other "
                             "nodes', in spreads (never below 1.5 points): its GPUs wait for "
                             "input while the others spin in the collective.",
                 links=[NODE_LINK]),
    ]
    return G.Dashboard(
        title="agentd / Cluster", uid="agentd-cluster", tags=["agentd", "gpu"],
        description="Where GPU time goes idle across the fleet, and why.",
        templating=_variables(node_multi=True, gpu=False),
        annotations=_findings_annotation(node), panels=panels,
        time=G.Time("now-6h", "now"), refresh="1m", timezone="browser",
        schemaVersion=39).auto_panel_ids()


def job_dashboard(currency: str = CURRENCY) -> G.Dashboard:
    # The job's labels as a matcher list (e.g. slurm_job_id="48213", or namespace="ml",
    # pod="trainer-0",container="main"): each job's series carry only its identifying labels.
    job = G.Template(
        name="job", label="Job (Slurm job, pod, container, unit or name)", dataSource=DS,
        query=f'query_result(group by ({", ".join(JOB_LABELS)}) '
              f'(agentd_process_trees{{instance=~"$node"}}))',
        regex="/\\{(.*)\\}/", refresh=2)
    sel = 'instance=~"$node",$job'
    held = f"({_held(sel)})"
    panels = [
        timeseries("GPU busy of the job's GPUs", [_target(
            f"rate(agentd_gpu_busy_seconds_total[$__rate_interval]) and on (instance, gpu, "
            f"uuid) {held}", "{{instance}} GPU {{gpu}}")], 0, 0, "percentunit", vmax=1),
        timeseries("SM activity of the job's GPUs", [_target(
            f"rate(agentd_gpu_sm_active_seconds_total[$__rate_interval]) and on (instance, "
            f"gpu, uuid) {held}", "{{instance}} GPU {{gpu}}")], 12, 0, "percentunit",
            vmax=1),
        timeseries("Data-loader CPU per process tree (cores)", [_target(
            f"rate(agentd_process_cpu_seconds_total{{{sel}}}[$__rate_interval]) / "
            f"agentd_process_trees{{{sel}}}", "{{instance}}")], 0, 8, "none",
            description="A trainer and its data-loader workers; against the workers "
                        "(members - 1) it shows whether the loader is CPU-bound."),
        timeseries("Reads: from storage against all reads (cache hits)", [
            _target(f"rate(agentd_process_read_bytes_total{{{sel}}}[$__rate_interval])",
                    "{{instance}} from storage"),
            _target(f"rate(agentd_process_read_chars_total{{{sel}}}[$__rate_interval])",
                    "{{instance}} all reads", "B")], 12, 8, "Bps"),
        timeseries("Processes in D state (waiting for I/O)", [_target(
            f"agentd_process_blocked{{{sel}}}", "{{instance}}")], 0, 16, "none"),
        timeseries("GPU memory held by the job", [_target(
            f"agentd_gpu_process_memory_used_bytes{{{sel}}}", "{{instance}} GPU {{gpu}}")],
            12, 16, "bytes"),
        _findings_table(24, 'instance=~"$node"', held),
    ]
    return G.Dashboard(
        title="agentd / Job", uid="agentd-job", tags=["agentd", "gpu"],
        description="One training job's GPUs, data loader and reads.",
        templating=_variables(node_multi=True, extra=[job], gpu=False),
        annotations=_findings_annotation('instance=~"$node"'), panels=panels,
        time=G.Time("now-1h", "now"), refresh="30s", timezone="browser",
        schemaVersion=39).auto_panel_ids()


DASHBOARDS = {"agentd-node.json": node_dashboard, "agentd-cluster.json": cluster_dashboard,
              "agentd-job.json": job_dashboard}


def render(build, currency: str = CURRENCY) -> str:
    return json.dumps(build(currency).to_json_data(), cls=DashboardEncoder, indent=2,
                      sort_keys=True) + "\n"


def write_all(directory: str, currency: str = CURRENCY) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, build in DASHBOARDS.items():
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(render(build, currency))
        written.append(path)
    return written
