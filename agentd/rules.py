"""Prometheus recording and alerting rules, generated from a small config (a mixin).

`agentd rules` writes rules/agentd.rules.yml; the checked-in file is the default render and a
test fails when it drifts. Like the jsonnet mixins (node-mixin, kubernetes-mixin), everything
site-specific is configuration, not an edit of the output:

- `selector`: the label matchers that pick agentd's series in your Prometheus (your scrape
  job's name, a cluster label...), applied to every agentd series and to `up`;
- `runbook_url`: where you host docs/runbook.md; each alert links to its section;
- thresholds and durations (RulesConfig below).

The GPU price is no number in the rules: the operator provides a series
`agentd_gpu_price_per_hour` (one price, or one per GPU model with a `name` label as in
agentd_gpu_info), e.g. from a recording rule of their own; agentd:gpu_price_per_hour puts it
on each GPU, and the cost rules follow it. Without it there is no cost, rather than a made-up
one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

import yaml

from agentd.cluster.groups import POD_OWNER_REGEX
from agentd.gpu.xid import CLASSES as XID_CLASSES
from agentd.jobs import JOB_LABELS

# A job across nodes, as the rules see it: a Slurm job, a Kubernetes workload (the owner of
# its pods: agentd/cluster/groups.py pod_owner) or a systemd unit. A pod, a container or a
# process name alone names nothing across nodes.
CLUSTER_JOB_LABELS = ("slurm_job_id", "namespace", "workload", "systemd_unit")

DEFAULT_OUT = "rules/agentd.rules.yml"
# RFC 2606 reserves example.com for documentation: an absolute URL that says "set yours".
DEFAULT_RUNBOOK = "https://runbooks.example.com/agentd/runbook.md"

_MATCHER = r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR = re.compile(rf"^({_MATCHER}(,{_MATCHER})*)?$")
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_SEVERITIES = ("critical", "warning", "info", "none")


class RulesConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RulesConfig:
    selector: str = 'job="agentd"'
    runbook_url: str = DEFAULT_RUNBOOK
    recording_interval: str = "30s"
    rate_window: str = "5m"
    # AgentdGpuAllocatedIdle: memory held, kernels under idle_busy_ratio, for idle_for.
    idle_memory_bytes: float = 2**30
    idle_busy_ratio: float = 0.02
    idle_for: str = "15m"
    # Findings of the rolling analysis: present (at most finding_gap apart) for starved_for.
    starved_for: str = "10m"
    finding_gap: str = "2m"
    throttled_ratio: float = 0.2
    throttled_for: str = "10m"
    xid_window: str = "10m"
    xid_severity: dict = field(default_factory=lambda: {
        "fatal": "critical", "degraded": "warning", "unknown": "warning",
        "application": "info"})
    sampler_failing_for: str = "5m"
    down_for: str = "2m"
    # A sampler is stale when its last success is older than stale_intervals of its interval,
    # and at least stale_min_seconds old.
    stale_intervals: float = 3.0
    stale_min_seconds: float = 120.0
    stale_for: str = "2m"
    # A node counts as a GPU node for this long after it last showed a GPU.
    gpu_node_lookback: str = "24h"
    # AgentdNodeHoldingJobBack: in a job of at least holdback_min_nodes nodes, one node's
    # compute activity, clocks or busy share robustly apart from its peers' (median/MAD,
    # holdback_z spreads and the gaps below, never less than the natural spread floors) for
    # holdback_for (agentd/cluster/causes.py: the same lines as `diagnose --cluster`).
    holdback_for: str = "10m"
    holdback_min_nodes: float = 3.0
    holdback_z: float = 4.0
    holdback_activity_gap: float = 0.08
    holdback_clock_gap: float = 0.05
    holdback_busy_gap: float = 0.05

    def check(self) -> "RulesConfig":
        if not _SELECTOR.match(self.selector):
            raise RulesConfigError(f"selector: {self.selector!r} is not a list of label "
                                   'matchers (e.g. job="gpu-nodes",cluster=~"eu-.*")')
        if not re.match(r"^https?://[^/\s]+", self.runbook_url):
            raise RulesConfigError(f"runbook_url: {self.runbook_url!r} is not an absolute "
                                   "http(s) URL")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "str" and f.name.endswith(("_for", "_window", "_interval", "_gap",
                                                     "_lookback")):
                if not _DURATION.match(v):
                    raise RulesConfigError(f"{f.name}: {v!r} is not a Prometheus duration "
                                           "(e.g. 30s, 10m, 1h30m)")
            elif f.type == "float" and not (isinstance(v, (int, float)) and v >= 0):
                raise RulesConfigError(f"{f.name}: {v!r} is not a non-negative number")
        unknown = set(self.xid_severity) - set(XID_CLASSES)
        if unknown:
            raise RulesConfigError(f"xid_severity: unknown XID class {sorted(unknown)[0]!r} "
                                   f"(classes: {', '.join(XID_CLASSES)})")
        for k, v in self.xid_severity.items():
            if v not in _SEVERITIES:
                raise RulesConfigError(f"xid_severity.{k}: {v!r} is not one of "
                                       f"{', '.join(_SEVERITIES)}")
        return self


def load_config(doc: dict[str, Any], base: RulesConfig | None = None) -> RulesConfig:
    """A RulesConfig from a TOML document's keys (unknown keys are errors)."""
    names = {f.name: f for f in fields(RulesConfig)}
    changes = {}
    for k, v in doc.items():
        if k not in names:
            raise RulesConfigError(f"unknown key {k!r} (known: {', '.join(names)})")
        if k == "xid_severity":
            if not isinstance(v, dict):
                raise RulesConfigError("xid_severity must be a table")
            v = {**RulesConfig().xid_severity, **v}
        elif names[k].type == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RulesConfigError(f"{k}: expected a number, got {v!r}")
            v = float(v)
        elif not isinstance(v, str):
            raise RulesConfigError(f"{k}: expected a string, got {v!r}")
        changes[k] = v
    return replace(base or RulesConfig(), **changes).check()


def _seconds(duration: str) -> float:
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)",
                                                          duration))


class _Block(str):
    """A string written as a YAML block (|), for multi-line expressions."""


def _block_representer(dumper, data):
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Block, _block_representer)


def _expr(text: str) -> str:
    lines = [ln.rstrip() for ln in text.strip("\n").splitlines()]
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
    out = "\n".join(ln[indent:] for ln in lines)
    return _Block(out + "\n") if "\n" in out else out


def build(cfg: RulesConfig | None = None) -> dict:
    """The rules document (Prometheus rule_files format)."""
    cfg = (cfg or RulesConfig()).check()
    rw = cfg.rate_window

    def s(metric: str, extra: str = "") -> str:
        """The metric with the configured selector (and extra matchers)."""
        inner = ",".join(x for x in (cfg.selector.strip(), extra) if x)
        return f"{metric}{{{inner}}}"

    gpu = "instance, gpu, uuid"
    job = ", ".join(JOB_LABELS)
    # A GPU counts as allocated while a job holds memory on it, and as failed once lost.
    allocated = f"group by ({gpu}) ({s('agentd_gpu_process_memory_used_bytes')} > 0)"
    lost = f"{s('agentd_gpu_lost')} == 1"

    def rec(name: str, expr: str) -> dict:
        return {"record": name, "expr": _expr(expr)}

    def per_job(agg: str, name: str, per_gpu: str) -> dict:
        """A per-GPU series aggregated over the GPUs of each job."""
        return rec(name, f"""
            {agg} by ({job}) (
              {per_gpu}
              * on ({gpu}) group_right () agentd:gpu_job:info
            )""")

    def alert(name: str, expr: str, severity: str, summary: str, description: str,
              duration: str | None = None) -> dict:
        a: dict = {"alert": name, "expr": _expr(expr)}
        if duration:
            a["for"] = duration
        a["labels"] = {"severity": severity}
        a["annotations"] = {"summary": summary, "description": " ".join(description.split()),
                            "runbook_url": f"{cfg.runbook_url}#{name.lower()}"}
        return a

    recording = [
        # --- per GPU -------------------------------------------------------------------------
        rec(f"agentd:gpu_busy:ratio_rate{rw}",
            f"rate({s('agentd_gpu_busy_seconds_total')}[{rw}])"),
        rec(f"agentd:gpu_stall:ratio_rate{rw}",
            f"clamp_min(1 - rate({s('agentd_gpu_busy_seconds_total')}[{rw}]), 0)"),
        rec(f"agentd:gpu_sm_active:ratio_rate{rw}",
            f"rate({s('agentd_gpu_sm_active_seconds_total')}[{rw}])"),
        rec(f"agentd:gpu_pcie_rx:bytes_rate{rw}",
            f"rate({s('agentd_gpu_pcie_rx_bytes_total')}[{rw}])"),
        rec(f"agentd:gpu_pcie_rx:capacity_ratio_rate{rw}", f"""
            rate({s('agentd_gpu_pcie_rx_bytes_total')}[{rw}])
            / on ({gpu}) {s('agentd_gpu_pcie_link_capacity_bytes_per_second')}"""),
        rec(f"agentd:gpu_throttled:ratio_rate{rw}", f"""
            max by ({gpu}) (
              rate({s('agentd_gpu_clock_event_seconds_total', 'reason=~"sw_power_cap|hw_slowdown|sw_thermal_slowdown|hw_thermal_slowdown|hw_power_brake_slowdown"')}[{rw}])
            )"""),
        # GPU -> the jobs holding memory on it (job labels: agentd/jobs.py).
        rec("agentd:gpu_job:info", f"""
            group by ({gpu}, {job}) (
              {s('agentd_gpu_process_memory_used_bytes')} > 0
            )"""),
        # Stall of the GPUs a job holds, lost GPUs excluded: GPU time lost to starvation.
        # Idle GPUs without a job are unallocated capacity, lost GPUs failures: both apart.
        rec(f"agentd:gpu_stall_allocated:ratio_rate{rw}", f"""
            agentd:gpu_stall:ratio_rate{rw}
            and on ({gpu}) {allocated}
            unless on ({gpu}) {lost}"""),
        # The price of an hour of each GPU, from the operator's agentd_gpu_price_per_hour:
        # the series with the GPU's model as `name`, else the one without `name`.
        rec("agentd:gpu_price_per_hour", f"""
            max by ({gpu}) (
              {s('agentd_gpu_info')}
              * on (name) group_left () max by (name) (agentd_gpu_price_per_hour{{name!=""}})
            )
            or on ({gpu})
            max by ({gpu}) (
              {s('agentd_gpu_info')}
              * on () group_left () max (agentd_gpu_price_per_hour{{name=""}})
            )"""),

        # --- per node --------------------------------------------------------------------------
        rec("agentd:node_gpus:count", f"count by (instance) ({s('agentd_gpu_info')})"),
        rec("agentd:node_gpus_failed:count", f"""
            count by (instance) ({lost})
            or on (instance) count by (instance) ({s('agentd_gpu_info')}) * 0"""),
        rec("agentd:node_gpus_unallocated:count", f"""
            count by (instance) (
              {s('agentd_gpu_info')}
              unless on ({gpu}) {allocated}
              unless on ({gpu}) {lost}
            )
            or on (instance) count by (instance) ({s('agentd_gpu_info')}) * 0"""),
        rec(f"agentd:node_gpu_busy:ratio_avg_rate{rw}", f"""
            avg by (instance) (agentd:gpu_busy:ratio_rate{rw} unless on ({gpu}) {lost})"""),
        rec(f"agentd:node_disk_read:bytes_rate{rw}",
            f"sum by (instance) (rate({s('agentd_disk_read_bytes_total')}[{rw}]))"),
        rec(f"agentd:node_disk_busy:ratio_max_rate{rw}",
            f"max by (instance) (rate({s('agentd_disk_io_time_seconds_total')}[{rw}]))"),
        rec(f"agentd:node_cpu_busy:ratio_rate{rw}", f"""
            sum by (instance) (rate({s('agentd_cpu_seconds_total', 'mode!~"idle|iowait|steal"')}[{rw}]))
            / on (instance) {s('agentd_cpu_online')}"""),
        # GPU-hours lost per hour of wall time by the GPUs jobs hold (8 GPUs stalled half the
        # time: 4), and their cost per hour.
        rec(f"agentd:node_gpu_lost_hours:rate{rw}",
            f"sum by (instance) (agentd:gpu_stall_allocated:ratio_rate{rw})"),
        rec(f"agentd:node_gpu_lost_cost:rate{rw}", f"""
            sum by (instance) (
              agentd:gpu_stall_allocated:ratio_rate{rw}
              * on ({gpu}) agentd:gpu_price_per_hour
            )"""),

        # --- per job (across nodes: a Slurm job or a pod is one job cluster-wide) ------------
        per_job("avg", f"agentd:job_gpu_busy:ratio_avg_rate{rw}",
                f"agentd:gpu_busy:ratio_rate{rw}"),
        per_job("avg", f"agentd:job_gpu_stall:ratio_avg_rate{rw}",
                f"agentd:gpu_stall_allocated:ratio_rate{rw}"),
        per_job("sum", f"agentd:job_gpu_lost_hours:rate{rw}",
                f"agentd:gpu_stall_allocated:ratio_rate{rw}"),

        # --- cluster ---------------------------------------------------------------------------
        rec(f"agentd:cluster_gpu_busy:ratio_avg_rate{rw}",
            f"avg(agentd:gpu_busy:ratio_rate{rw} unless on ({gpu}) {lost})"),
        rec(f"agentd:cluster_gpu_lost_hours:rate{rw}",
            f"sum(agentd:node_gpu_lost_hours:rate{rw})"),
        rec(f"agentd:cluster_gpu_lost_cost:rate{rw}",
            f"sum(agentd:node_gpu_lost_cost:rate{rw})"),
    ] + _peer_rules(cfg, s, rec)

    def finding(kinds: str) -> str:
        # One series per (kind, GPU); a gap of one analysis run must not restart `for:`.
        # The GPU's cluster job rides along (when it has one), so that Alertmanager can
        # group a job's GPUs into one notification.
        active = f"""max by ({gpu}, kind) (
              max_over_time({s('agentd_finding_active', f'kind=~"{kinds}",severity=~"warning|critical"')}[{cfg.finding_gap}])
            ) == 1"""
        # A GPU whose job has an identity alerts with it only (never first without it, then
        # with it, while the recording rules catch up: that would page twice).
        mem = "agentd_gpu_process_memory_used_bytes"
        known = " or ".join(s(mem, f'{k}!=""') for k in ("slurm_job_id", "pod", "systemd_unit"))
        return f"""
            (
              {active}
            ) * on ({gpu}) group_left ({", ".join(CLUSTER_JOB_LABELS)})
              topk by ({gpu}) (1, agentd:gpu_cluster_job:info)
            or (
              {active}
            ) unless on ({gpu}) ({known})"""

    stale_after = f"clamp_min({_num(cfg.stale_intervals)} * " \
                  f"{s('agentd_sampler_interval_seconds')}, {_num(cfg.stale_min_seconds)})"
    lookback = cfg.gpu_node_lookback
    alerts = [
        alert("AgentdGpuAllocatedIdle", f"""
            max_over_time({s('agentd_gpu_memory_used_bytes')}[{cfg.idle_for}]) > {_num(cfg.idle_memory_bytes)}
            and on ({gpu}) rate({s('agentd_gpu_busy_seconds_total')}[{cfg.idle_for}]) < {_num(cfg.idle_busy_ratio)}""",
              "warning", "GPU {{ $labels.gpu }} on {{ $labels.instance }} is allocated but idle",
              f"""
            A process holds memory on GPU {{{{ $labels.gpu }}}} ({{{{ $labels.uuid }}}}) of
            {{{{ $labels.instance }}}}, yet it ran kernels under {cfg.idle_busy_ratio * 100:g}% of the time for
            {_human(_seconds(cfg.idle_for) * 2)}.""", cfg.idle_for),
        alert("AgentdGpuInputStarved",
              finding("input_storage|input_cpu|io_h2d_serialized|shared_link|memory_pressure"),
              "warning",
              "GPU {{ $labels.gpu }} on {{ $labels.instance }} is starved ({{ $labels.kind }})",
              f"""
            agentd finds the input pipeline of GPU {{{{ $labels.gpu }}}} ({{{{ $labels.uuid }}}}) on
            {{{{ $labels.instance }}}} bound by {{{{ $labels.kind }}}} for {_human(_seconds(cfg.starved_for))}.
            `agentd diagnose --daemon` on the node gives the evidence, expected gain and what
            to change.""", cfg.starved_for),
        alert("AgentdGpuPcieBound", finding("h2d_pcie"), "warning",
              "Host-to-device copies to GPU {{ $labels.gpu }} on {{ $labels.instance }} are "
              "bound by PCIe", """
            The copies to GPU {{ $labels.gpu }} ({{ $labels.uuid }}) on {{ $labels.instance }}
            keep PCIe busy and the GPU waits for them.""", cfg.starved_for),
        alert("AgentdGpuThrottled",
              f"agentd:gpu_throttled:ratio_rate{rw} > {_num(cfg.throttled_ratio)}", "warning",
              "GPU {{ $labels.gpu }} on {{ $labels.instance }} is throttled", """
            Power or thermal clock-event reasons were active {{ $value | humanizePercentage }}
            of the time on GPU {{ $labels.gpu }} ({{ $labels.uuid }}).""", cfg.throttled_for),
    ]
    # One rule per severity, over the XID classes the config gives it (classes:
    # agentd/gpu/xid.py). agentd_gpu_xid_errors_total{class} exists at 0 from the start:
    # increase() sees the first event.
    last = ('{{ with printf "max(agentd_gpu_xid_last_code{instance=%q,gpu=%q})" '
            '$labels.instance $labels.gpu | query }}{{ . | first | value }}{{ end }}')
    for severity in _SEVERITIES[:-1]:
        classes = "|".join(c for c in XID_CLASSES if cfg.xid_severity.get(c) == severity)
        if not classes:
            continue
        alerts.append(alert(
            "AgentdGpuXid",
            f"increase({s('agentd_gpu_xid_errors_total', f'class=~{chr(34)}{classes}{chr(34)}')}"
            f"[{cfg.xid_window}]) > 0",
            severity,
            "XID ({{ $labels.class }}) on GPU {{ $labels.gpu }} of {{ $labels.instance }}",
            f"""
            The NVIDIA driver reported {{{{ printf "%.0f" $value }}}} XID event(s) of class
            {{{{ $labels.class }}}} on GPU {{{{ $labels.gpu }}}} ({{{{ $labels.uuid }}}}) in the last
            {_human(_seconds(cfg.xid_window))}; the last code was {last}."""))
    alerts.append(_holdback_alert(cfg, alert))
    alerts += [
        alert("AgentdGpuLost", lost, "critical",
              "GPU {{ $labels.gpu }} on {{ $labels.instance }} fell off the bus", """
            NVML reports GPU {{ $labels.gpu }} ({{ $labels.uuid }}) lost; it is no longer
            sampled and its jobs have failed or hang."""),
        alert("AgentdGpuDriverLost", f"""
            max_over_time(agentd:node_gpus:count[{lookback}]) > 0
            unless on (instance) agentd:node_gpus:count
            and on (instance) {s('up')} == 1""", "critical",
              "{{ $labels.instance }} had GPUs and now shows none", f"""
            agentd on {{{{ $labels.instance }}}} showed GPUs in the last {_human(_seconds(lookback))} and now
            shows none: the NVIDIA driver is gone or failed to load
            (agentd_sampler_available{{sampler="gpu"}} 0), or the gpu collector is off."""),
        alert("AgentdGpusMissing", f"""
            agentd:node_gpus:count
            < on (instance) max_over_time(agentd:node_gpus:count[{lookback}])""", "critical",
              "{{ $labels.instance }} shows fewer GPUs than before", f"""
            agentd on {{{{ $labels.instance }}}} shows {{{{ $value }}}} GPU(s), fewer than in the last
            {_human(_seconds(lookback))}: a GPU is no longer enumerated (fallen off the bus before a
            restart, or disabled)."""),
        alert("AgentdSamplerFailing", f"""
            {s('agentd_sampler_success')} == 0
            and on (instance, sampler) {s('agentd_sampler_available')} == 1""", "warning",
              "agentd sampler {{ $labels.sampler }} fails on {{ $labels.instance }}", """
            The {{ $labels.sampler }} sampler's runs fail; its metrics are stale. The log
            (journalctl -u agentd) says why.""", cfg.sampler_failing_for),
        alert("AgentdDown", f"{s('up')} == 0", "warning",
              "agentd on {{ $labels.instance }} is down",
              "Prometheus cannot scrape agentd on {{ $labels.instance }}.", cfg.down_for),
        alert("AgentdStaleData", f"""
            time() - {s('agentd_sampler_last_success_timestamp_seconds')}
            > on (instance, sampler) {stale_after}
            and on (instance, sampler) {s('agentd_sampler_available')} == 1""", "warning",
              "agentd's {{ $labels.sampler }} data on {{ $labels.instance }} is stale", """
            The {{ $labels.sampler }} sampler last succeeded {{ $value | humanizeDuration }}
            ago: a read may be stuck (a hung NFS mount, a wedged driver).""", cfg.stale_for),
    ]
    return {"groups": [
        {"name": "agentd.recording", "interval": cfg.recording_interval, "rules": recording},
        {"name": "agentd.alerts", "rules": alerts},
    ]}


def _peer_rules(cfg: RulesConfig, s, rec) -> list[dict]:
    """Per-job peer statistics across nodes: per (node, job) summaries of the job's GPUs,
    their median and MAD per job, and each node's robust z (agentd/cluster/peers.py)."""
    rw = cfg.rate_window
    gpu = "instance, gpu, uuid"
    cj = ", ".join(CLUSTER_JOB_LABELS)
    node_job = f"instance, {cj}"
    out = [
        # GPU -> its job across nodes (the pod's owner as `workload`).
        rec("agentd:gpu_cluster_job:info", f"""
            group by ({gpu}, {cj}) (
              label_replace(agentd:gpu_job:info{{pod!=""}}, "workload", "$1", "pod", "{POD_OWNER_REGEX}")
              or agentd:gpu_job:info{{slurm_job_id!=""}}
              or agentd:gpu_job:info{{systemd_unit!=""}}
            )"""),
    ]
    per_gpu = {
        # the rank that computes longest (tensor pipes, else SMs: NCCL's spin uses neither
        # tensor cores nor many SMs)
        "activity": ("max", "ratio", f"""
              rate({s('agentd_gpu_tensor_active_seconds_total')}[{rw}])
              or rate({s('agentd_gpu_sm_active_seconds_total')}[{rw}])"""),
        "clock": ("min", "hertz", f"avg_over_time({s('agentd_gpu_sm_clock_hertz')}[{rw}])"),
        "busy": ("min", "ratio", f"agentd:gpu_busy:ratio_rate{rw}"),
    }
    floors = {"activity": 0.03, "clock": 0.02, "busy": None}
    for name, (agg, unit, expr) in per_gpu.items():
        node = f"agentd:job_node_gpu_{name}:{unit}_{agg}_rate{rw}"
        med = f"agentd:job_gpu_{name}:{unit}_median_rate{rw}"
        mad = f"agentd:job_gpu_{name}:{unit}_mad_rate{rw}"
        out += [
            rec(node, f"""
                {agg} by ({node_job}) (
                  ({expr.strip()})
                  * on ({gpu}) group_right () agentd:gpu_cluster_job:info
                )"""),
            rec(med, f"quantile by ({cj}) (0.5, {node})"),
            rec(mad, f"""
                quantile by ({cj}) (0.5,
                  abs({node} - on ({cj}) group_left () {med})
                )"""),
        ]
        spread = f"1.4826 * {mad}"
        floor = f"{floors[name]} * {med}" if floors[name] else f"0 * {med} + 0.015"
        out.append(rec(f"agentd:job_node_gpu_{name}:robust_z_rate{rw}", f"""
            ({node} - on ({cj}) group_left () {med})
            / on ({cj}) group_left () (({spread} >= {floor}) or {floor})"""))
    out.append(rec("agentd:job_nodes:count",
                   f"count by ({cj}) (agentd:job_node_gpu_busy:ratio_min_rate{rw})"))
    return out


def _holdback_alert(cfg: RulesConfig, alert) -> dict:
    rw = cfg.rate_window
    cj = ", ".join(CLUSTER_JOB_LABELS)
    on = f"on (instance, {cj})"
    z, n = _num(cfg.holdback_z), _num(cfg.holdback_min_nodes)
    big = f"and on ({cj}) agentd:job_nodes:count >= {n}"

    def gap(name: str, unit: str, agg: str, cmp: str, bound: str) -> str:
        return (f"agentd:job_node_gpu_{name}:{unit}_{agg}_rate{rw} {cmp} on ({cj}) "
                f"group_left () ({bound} agentd:job_gpu_{name}:{unit}_median_rate{rw})")

    longer = f"""agentd:job_node_gpu_activity:robust_z_rate{rw} > {z}
                and {on} {gap('activity', 'ratio', 'max', '>', _num(1 + cfg.holdback_activity_gap) + ' *')}"""
    slow_clock = f"""agentd:job_node_gpu_clock:robust_z_rate{rw} < -{_num(cfg.holdback_z - 1)}
                and {on} {gap('clock', 'hertz', 'min', '<', _num(1 - cfg.holdback_clock_gap) + ' *')}"""
    idles = f"""agentd:job_node_gpu_busy:robust_z_rate{rw} < -{z}
                and {on} {gap('busy', 'ratio', 'min', '<', '-' + _num(cfg.holdback_busy_gap) + ' +')}"""
    expr = f"""
        label_replace(
          ({longer}) and {on} ({slow_clock}) {big},
          "kind", "throttled", "", "")
        or label_replace(
          ({longer}) unless {on} ({slow_clock}) {big},
          "kind", "slow_gpu", "", "")
        or label_replace(
          ({idles}) {big},
          "kind", "idle", "", "")"""
    return alert(
        "AgentdNodeHoldingJobBack", expr, "warning",
        "{{ $labels.instance }} is holding its job back ({{ $labels.kind }})",
        f"""
        In job {{{{ $labels.slurm_job_id }}}}{{{{ $labels.namespace }}}}
        {{{{ $labels.workload }}}}{{{{ $labels.systemd_unit }}}}, {{{{ $labels.instance }}}}
        deviates from its peers by {{{{ printf "%.1f" $value }}}} robust spreads
        as {{{{ $labels.kind }}}} (throttled: it computes longer at lower clocks; slow_gpu: it
        computes longer at normal clocks; idle: its GPUs wait while its peers spin). Every
        step of the job waits for it. `agentd diagnose --prometheus URL --cluster` gives the
        cause, the evidence and the job time it costs.""", cfg.holdback_for)


def _num(v: float) -> str:
    """A number as PromQL reads it back exactly (2**30, not 1.07374e+09)."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _human(seconds: float) -> str:
    for unit, n in (("hours", 3600), ("minutes", 60)):
        if seconds >= n and seconds % n == 0:
            v = int(seconds // n)
            return f"{v} {unit[:-1] if v == 1 else unit}"
    return f"{seconds:g} seconds"


HEADER = """\
# agentd recording and alerting rules: GENERATED by `agentd rules` from its config
# (agentd/rules.py); do not edit: render your own with, e.g.,
#   agentd rules --selector 'job="gpu-nodes"' --runbook-url https://wiki.example/agentd.md \\
#     --config my-rules.toml --out /etc/prometheus/rules/agentd.rules.yml
# This file is the default render (selector {selector}).
# Tests: promtool test rules rules/tests/agentd.test.yml. Runbook: docs/runbook.md.
# Costs need the GPU price as a series of yours (no number here), e.g. a rule of your own:
#   - record: agentd_gpu_price_per_hour
#     expr: vector(2.5)            # or one per model: labels: {{name: "NVIDIA H100 80GB HBM3"}}
"""


def render(cfg: RulesConfig | None = None) -> str:
    cfg = cfg or RulesConfig()
    body = yaml.dump(build(cfg), Dumper=_Dumper, sort_keys=False, width=10_000,
                     default_flow_style=False, allow_unicode=True)
    return HEADER.format(selector=cfg.selector) + body
