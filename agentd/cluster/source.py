"""The cluster's per-node summaries from a Prometheus query API (Prometheus, VictoriaMetrics,
Thanos, Mimir): PromQL aggregations, so a query returns one series per node (or per job on a
node), never the raw per-GPU series.

Two flavours, found in the data (agentd's own metrics, else dcgm-exporter + node_exporter):

- agentd: GPUs join their jobs through agentd_gpu_process_memory_used_bytes{gpu, <job labels>}
  (which job holds memory on which GPU); host and RDMA series are agentd's.
- exporters: dcgm-exporter's GPU series carry their Kubernetes pod (namespace, pod) or HPC job
  (hpc_job) where it maps them; host series are node_exporter's, RDMA `node_infiniband_*`.

A node is the host part of `instance` (the two exporters differ by port on one host),
overridden by dcgm-exporter's `Hostname`/`hostname`, or the label given with --node-label
(e.g. a `kubernetes_node` that relabelling adds to both exporters' series).

What it costs (a 512-node, 4,096-GPU hour: bench/cluster_scale.py, docs/cluster.md):
- Which families the server holds: one label-values request (the index, no sample read).
- Each family the detectors compare is one range query at the base step (a counter's rate()
  or a gauge's avg_over_time() over the step), aggregated in Prometheus per scrape target
  and job (min/max/avg over the GPUs, max/sum over disks and ports): one series per node,
  never per GPU. The node is named here, from the target's labels (`instance`'s host,
  `Hostname`, or --node-label): a label_replace() in PromQL would run at every step on every
  node's series, ~40% of the server's time on such a query. Targets of one node merge here.
- The families that only explain a finding (power, temperature, clock-event reasons) are
  fetched afterwards for the flagged nodes only (evidence()), and so is each finding's
  per-GPU detail: a handful of series.
- The base step grows with the range (an hour: 60 s; a day: 4 min), so a range query
  returns at most a few hundred points per node.
The sliding analysis windows are means of the steps, taken in numpy. Queries run a few at a
time (a small thread pool).
"""

from __future__ import annotations

import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from agentd.cluster.data import GPU_FAMILIES, NODE_FAMILIES, Fleet, _quiet, merge_rows
from agentd.cluster.groups import ALL_NODES, OWNER_LABELS, job_of
from agentd.daemon.config import parse_duration
from agentd.diagnose.sources import SourceError
from agentd.diagnose.sources.http import redact
from agentd.diagnose.sources.promclient import Grid, PromClient, promql_string, \
    regex_escape, scrape_interval, window
from agentd.gpu import models
from agentd.jobs import JOB_LABELS
from agentd.rules import CLUSTER_JOB_LABELS

THROTTLE_REASONS = "sw_power_cap|hw_slowdown|sw_thermal_slowdown|hw_thermal_slowdown|" \
                   "hw_power_brake_slowdown"
IB_ERRORS = "symbol_error|port_errors_received|local_link_integrity_errors|" \
            "excessive_buffer_overrun_errors"
IB_RECOVERIES = "link_error_recovery|link_downed"
NAMING = ("instance", "Hostname", "hostname")  # the labels a node is named from
EVIDENCE = ("power_max", "temp_max", "throttle_max")  # fetched for flagged nodes only
# How each family's rows of one node (several scrape targets) merge, by its aggregation.
MERGE = {"busy_min": "min", "busy_avg": "avg", "act_max": "max", "clock_min": "min",
         "power_max": "max", "temp_max": "max", "throttle_max": "max", "disk_busy": "max",
         "psi_io": "max", "psi_cpu": "max", "cpu_busy": "avg", "net_rate": "min",
         "net_util": "max", "net_tx": "sum", "net_errors": "sum", "net_recover": "sum",
         "net_wait": "sum"}
MAX_POINTS = 360  # base steps per range query, at most: the step grows with the range
_HOST = re.compile(r"(.*?)(:[0-9]+)?")


class ClusterSource:
    def __init__(self, client: PromClient, start: float, end: float, step: float | None = None,
                 selector: str = "", group_by: str | None = None,
                 node_label: str | None = None, flavour: str = "auto", parallel: int = 4):
        self.c = client
        self.start, self.end = start, end
        self.step = step
        self.sel = selector.strip().strip("{}").strip()
        self.group_by = group_by
        self.node_label = node_label
        self.flavour = flavour
        self.parallel = parallel
        self._lock = threading.Lock()
        self.series = 0
        self.only = ""  # an extra matcher: the flagged nodes' targets (evidence, detail)
        self._names: set[str] | None = None  # the metric names in range (label-values API)
        self._probe = False  # no such API: one count() probe per family
        self._targets: dict[str, set[str]] = {}  # node -> its GPU series' naming values
        self.recorded: dict[str, str] = {}  # family -> the recording rule read instead
        self.phases: dict[str, float] = {}

    # --- PromQL pieces -------------------------------------------------------------------------
    def s(self, metric: str, extra: str = "") -> str:
        inner = ",".join(x for x in (self.sel, extra, self.only) if x)
        return f"{metric}{{{inner}}}"

    def naming(self) -> tuple[str, ...]:
        return (self.node_label,) if self.node_label else NAMING

    def node_of(self, m: dict) -> str:
        """The node a series (aggregated per scrape target) belongs to: --node-label, else
        dcgm-exporter's hostname/Hostname, else the host part of instance."""
        if self.node_label:
            return m.get(self.node_label, "")
        return m.get("hostname") or m.get("Hostname") or \
            _HOST.fullmatch(m.get("instance", "")).group(1)

    def by_node(self, agg: str, inner: str, ids: str = "") -> str:
        """agg of inner per scrape target (and ids): one series per node. The node is named
        and a node's targets merged in _rows()."""
        extra = f", {ids}" if ids else ""
        return f"{agg} by ({', '.join(self.naming())}{extra}) ({inner})"

    def _q(self, query: str) -> list[dict]:
        out = self.c.query_range(query, self.grid.t[0], self.grid.t[-1], self.grid.step)
        with self._lock:
            self.series += len(out)
        return out

    def _i(self, query: str, at: float | None = None) -> list[dict]:
        out = self.c.query(query, at=self.end if at is None else at)
        with self._lock:
            self.series += len(out)
        return out

    def _has(self, metric: str) -> bool:
        if self._names is None:
            try:
                self._names = set(self.c.label_values(
                    "__name__", self.start, self.end, "{" + self.sel + "}" if self.sel
                    else None))
            except SourceError:
                self._names = set()
            # a store without the label-values API (or that answers it with nothing): probe
            # each family with a query
            self._probe = not self._names
        if not self._probe:
            return metric in self._names
        lookback = f"{max(int(self.end - self.start), 60)}s"
        return bool(self._i(f"count(last_over_time({self.s(metric)}[{lookback}]))"))

    # --- reading -------------------------------------------------------------------------------
    def read(self) -> tuple[Fleet, object]:
        t_start = time.monotonic()
        q0, b0 = self.c.queries, self.c.bytes
        flavour = self.flavour
        if flavour == "auto":
            flavour = "agentd" if self._has("agentd_gpu_busy_seconds_total") else "exporters"
        busy_metric = "agentd_gpu_busy_seconds_total" if flavour == "agentd" else None
        if flavour == "exporters":
            for m in ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_DEV_GPU_UTIL"):
                if self._has(m):
                    busy_metric = m
                    break
            if busy_metric is None:
                raise SourceError(f"Prometheus at {self.c.url} holds neither agentd's nor "
                                  "dcgm-exporter's GPU series in the range"
                                  + (f" for {{{self.sel}}}" if self.sel else ""))
        self._flavour, self._busy = flavour, busy_metric
        scrape = self._scrape(busy_metric)
        span = self.end - self.start
        step = self.step or float(max(60, math.ceil(2 * (scrape or 15.0)),
                                      math.ceil(span / MAX_POINTS / 15) * 15))
        n = int(span // step)
        if n < 2:
            raise SourceError(f"the range holds {n} step(s) of {step:g} s: give a longer "
                              "--last or --start")
        self.grid = Grid(self.end - (n - 1) * step, self.end, step)
        self.phases["discover"] = time.monotonic() - t_start
        t = time.monotonic()
        plan = self._plan()
        rng = {f: q for f, q in plan["range"].items() if q and f not in EVIDENCE}
        results, inst = self._run(rng, plan["instant"])
        self.phases["fetch"] = time.monotonic() - t
        t = time.monotonic()
        fleet = self._assemble(results, inst, plan, flavour)
        self.phases["assemble"] = time.monotonic() - t
        self._stats(fleet, q0, b0, scrape)
        return fleet, self._detail(plan["detail"])

    def _stats(self, fleet: Fleet, q0: int, b0: int, scrape) -> None:
        fleet.stats = {"queries": self.c.queries - q0, "series": self.series,
                       "bytes": self.c.bytes - b0,
                       "seconds": round(sum(self.phases.values()), 3),
                       "flavour": self._flavour, "scrape_interval_seconds": scrape,
                       "recording_rules": sorted(self.recorded.values()),
                       "phases": {k: round(v, 3) for k, v in self.phases.items()}}
        self._q0, self._b0, self._scrape_s = q0, b0, scrape

    def _plan(self) -> dict:
        return self._agentd_plan() if self._flavour == "agentd" else \
            self._exporters_plan(self._busy)

    def _run(self, rng: dict, instant: dict) -> tuple[dict, dict]:
        with ThreadPoolExecutor(self.parallel) as pool:
            futs = {fam: pool.submit(self._q, q) for fam, q in rng.items() if q}
            inst = {k: pool.submit(self._i, q) for k, q in instant.items() if q}
            return ({fam: f.result() for fam, f in futs.items()},
                    {k: f.result() for k, f in inst.items()})

    def evidence(self, fleet: Fleet, nodes) -> bool:
        """Fill the families that only explain a finding (power, temperature, clock-event
        reasons) for these nodes' members, from their targets' series alone; True when any
        came back. The other members keep NaN: no detector compares them."""
        only = self._only(nodes)
        if not only:
            return False
        t = time.monotonic()
        self.only = only
        try:
            plan = self._plan()
        finally:
            self.only = ""
        rng = {f: q for f, q in plan["range"].items() if q and f in EVIDENCE}
        results, _ = self._run(rng, {})
        index = {(m.job, m.node): i for i, m in enumerate(fleet.members)}
        got = False
        for fam, series in results.items():
            for key, (_, arr) in self._rows(series, fam).items():
                i = index.get((self._job_of_key.get(key), key[0]))
                if i is None or not np.isfinite(arr).any():
                    continue
                if fam == "power_max" and not self._power_limit:
                    # dcgm-exporter's default set has no power limit: the model's.
                    gm = models.lookup(self._model_of.get(key[0]))
                    arr = arr / gm.power_limit_watts if gm and gm.power_limit_watts \
                        else arr * np.nan
                if fam not in fleet.gpu:
                    fleet.gpu[fam] = np.full((len(fleet.members), len(fleet.t)), np.nan)
                row = fleet.gpu[fam][i]
                fleet.gpu[fam][i] = arr if not np.isfinite(row).any() else \
                    _merge(MERGE[fam], row, arr)
                got = True
        self.phases["evidence"] = time.monotonic() - t
        self._stats(fleet, self._q0, self._b0, self._scrape_s)
        return got

    def _only(self, nodes) -> str:
        """A matcher for the GPU series of these nodes."""
        if self.node_label:
            values = sorted(set(nodes))
            label = self.node_label
        else:
            values = sorted({v for n in nodes for v in self._targets.get(n, ())})
            label = "instance"
        if not values:
            return ""
        return f'{label}=~{promql_string("|".join(regex_escape(v) for v in values))}'

    def _scrape(self, metric: str) -> float | None:
        return scrape_interval(self.c, metric, "{" + self.sel + "}", self.end)

    def _win(self) -> str:
        return window(self.grid.step)

    def _over_range(self, fn: str, metric: str, extra: str = "") -> str:
        """fn over the whole range, per series."""
        span = f"{int(self.end - self.start)}s"
        return f"{fn}({self.s(metric, extra)}[{span}])"

    def _exporters_plan(self, busy_metric: str) -> dict:
        w = self._win()
        ids = list(dict.fromkeys(([self.group_by] if self.group_by else []) +
                                 ["hpc_job", "namespace", "pod", "slurm_job_id"] +
                                 list(OWNER_LABELS)))
        ids_s = ", ".join(ids)
        scale = " / 100" if busy_metric == "DCGM_FI_DEV_GPU_UTIL" else ""
        act = next((m for m in ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_SM_ACTIVE")
                    if self._has(m)), None)
        self._activity = {"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "tensor",
                          "DCGM_FI_PROF_SM_ACTIVE": "sm"}.get(act or "", "")

        def gpu(agg: str, metric: str, post: str = "") -> str:
            return self.by_node(agg, f"avg_over_time({self.s(metric)}[{w}]){post}", ids_s)

        power = f"avg_over_time({self.s('DCGM_FI_DEV_POWER_USAGE')}[{w}])"
        has_limit = self._has("DCGM_FI_DEV_POWER_MGMT_LIMIT")
        if has_limit:
            power = f"{power} / avg_over_time({self.s('DCGM_FI_DEV_POWER_MGMT_LIMIT')}[{w}])"
        rng = {
            "busy_min": gpu("min", busy_metric, scale),
            "busy_avg": gpu("avg", busy_metric, scale),
            "act_max": gpu("max", act) if act else None,
            "clock_min": gpu("min", "DCGM_FI_DEV_SM_CLOCK", " * 1e6"),
            "power_max": self.by_node("max", power, ids_s),
            "temp_max": gpu("max", "DCGM_FI_DEV_GPU_TEMP"),
        }
        rng.update(self._host_exporters(w))
        inst = {
            # GPUs per (node, job) and the node's model, in one pass over the range
            "gpus": self.by_node("count", self._over_range("last_over_time", busy_metric),
                                 f"{ids_s}, modelName"),
            "remapped_rows": self.by_node("max", self._over_range(
                "max_over_time", "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS")),
            "row_remap_failed": self.by_node("max", self._over_range(
                "max_over_time", "DCGM_FI_DEV_ROW_REMAP_FAILURE")),
            "last_xid": self.by_node("max", self._over_range(
                "max_over_time", "DCGM_FI_DEV_XID_ERRORS")),
            "price": "agentd_gpu_price_per_hour",
        }
        detail = {"act_max": (act, "avg_over_time", "") if act else None,
                  "clock_min": ("DCGM_FI_DEV_SM_CLOCK", "avg_over_time", " * 1e6"),
                  "busy_min": (busy_metric, "avg_over_time", scale)}
        return {"range": rng, "instant": inst, "detail": detail, "ids": ids,
                "power_limit": has_limit}

    def _rates(self, prefix: str, names: str, w: str) -> str:
        """The rates of several counters of one port, each kept apart by a `counter` label:
        rate() drops the metric name, and node_exporter's counters of one port share their
        other labels, so rate({__name__=~"a|b"}) is an error ("vector cannot contain
        metrics with the same labelset")."""
        return " or ".join(
            f'label_replace(rate({self.s(f"{prefix}{n}_total")}[{w}]), "counter", "{n}", "", "")'
            for n in names.split("|"))

    def _host_exporters(self, w: str) -> dict:
        def host(agg: str, inner: str) -> str:
            return self.by_node(agg, inner)

        ib = "node_infiniband_"
        return {
            "disk_busy": host("max", f"rate({self.s('node_disk_io_time_seconds_total')}[{w}])"),
            "psi_io": host("max", f"rate({self.s('node_pressure_io_waiting_seconds_total')}"
                                  f"[{w}])"),
            "psi_cpu": host("max", f"rate({self.s('node_pressure_cpu_waiting_seconds_total')}"
                                   f"[{w}])"),
            "cpu_busy": "{} / {}".format(
                host("sum", "rate({}[{}])".format(self.s(
                    "node_cpu_seconds_total", 'mode!~"idle|iowait|steal"'), w)),
                host("count", self.s("node_cpu_seconds_total", 'mode="idle"'))),
            "net_rate": host("min", f"avg_over_time({self.s(ib + 'rate_bytes_per_second')}"
                                    f"[{w}])"),
            "net_util": host("max", f"rate({self.s(ib + 'port_data_transmitted_bytes_total')}"
                                    f"[{w}]) / {self.s(ib + 'rate_bytes_per_second')}"),
            "net_errors": host("sum", self._rates(ib, IB_ERRORS, w)),
            "net_recover": host("sum", self._rates(ib, IB_RECOVERIES, w)),
            "net_wait": host("sum", f"rate({self.s(ib + 'port_transmit_wait_total')}[{w}])"),
        }

    def _recorded(self, activity: bool) -> dict[str, str]:
        """family -> the `agentd rules` series that holds it per (node, job), where those
        rules run and can stand for the raw series: their rate window no longer than the
        base step (a 5-minute rate read every minute would blur each onset over five), the
        nodes named by `instance` and the jobs by the rules' labels (no --selector, whose
        labels the rules aggregate away; --group-by only by one of the rules' job labels)."""
        if self.sel or self.node_label not in (None, "instance") or \
                self.group_by not in (None, *CLUSTER_JOB_LABELS) or self._probe:
            return {}
        want = {"busy_min": ("busy", "ratio_min"), "clock_min": ("clock", "hertz_min")}
        if activity:
            want["act_max"] = ("activity", "ratio_max")
        out = {}
        for fam, (name, unit) in want.items():
            best = None
            for n in self._names or ():
                m = re.fullmatch(rf"agentd:job_node_gpu_{name}:{unit}_rate([0-9a-z]+)", n)
                if not m:
                    continue
                try:
                    window = parse_duration(m.group(1), "rate window")
                except ValueError:
                    continue
                if window <= self.grid.step and (best is None or window > best[0]):
                    best = (window, n)  # the longest window within the step: least noise
            if best:
                out[fam] = best[1]
        self.recorded = out
        return out

    def _agentd_plan(self) -> dict:
        w = self._win()
        has_jobs = self._has("agentd_gpu_process_memory_used_bytes")
        ids = list(JOB_LABELS) if has_jobs else []
        if self.group_by and self.group_by not in ids:
            ids.append(self.group_by)
        ids_s = ", ".join(ids)
        gpu_id = "instance, gpu, uuid"
        jobs = (f"group by ({gpu_id}, {', '.join(JOB_LABELS)}) "
                f"({self.s('agentd_gpu_process_memory_used_bytes')} > 0)")

        def join(per_gpu: str) -> str:
            return f"({per_gpu}) * on ({gpu_id}) group_right () {jobs}" if has_jobs \
                else per_gpu

        def gpu(agg: str, per_gpu: str) -> str:
            return self.by_node(agg, join(per_gpu), ids_s)

        act = next((m for m in ("agentd_gpu_tensor_active_seconds_total",
                                "agentd_gpu_sm_active_seconds_total") if self._has(m)), None)
        self._activity = {"agentd_gpu_tensor_active_seconds_total": "tensor",
                          "agentd_gpu_sm_active_seconds_total": "sm"}.get(act or "", "")
        busy = f"rate({self.s('agentd_gpu_busy_seconds_total')}[{w}])"
        events = self.s("agentd_gpu_clock_event_seconds_total", f'reason=~"{THROTTLE_REASONS}"')
        throttle = f"max by ({gpu_id}) (rate({events}[{w}]))"
        rng = {
            "busy_min": gpu("min", busy),
            "busy_avg": gpu("avg", busy),
            "act_max": gpu("max", f"rate({self.s(act)}[{w}])") if act else None,
            "clock_min": gpu("min", f"avg_over_time({self.s('agentd_gpu_sm_clock_hertz')}[{w}])"),
            "power_max": gpu("max", f"avg_over_time({self.s('agentd_gpu_power_watts')}[{w}]) / "
                                    f"on ({gpu_id}) {self.s('agentd_gpu_power_limit_watts')}"),
            "temp_max": gpu("max", f"avg_over_time({self.s('agentd_gpu_temperature_celsius')}"
                                   f"[{w}])"),
            "throttle_max": gpu("max", throttle),
        }
        # Where `agentd rules` runs, its per (node, job) series hold the compared families
        # already aggregated over the GPUs: one series per node instead of 8.
        for fam, name in self._recorded(act is not None).items():
            rng[fam] = f"avg_over_time({self.s(name)}[{w}])"

        def host(agg: str, inner: str) -> str:
            return self.by_node(agg, inner)

        rd = "agentd_rdma_"
        rng.update({
            "disk_busy": host("max", f"rate({self.s('agentd_disk_io_time_seconds_total')}"
                                     f"[{w}])"),
            "psi_io": host("max", "rate({}[{}])".format(self.s(
                "agentd_pressure_waiting_seconds_total", 'resource="io",kind="some"'), w)),
            "psi_cpu": host("max", "rate({}[{}])".format(self.s(
                "agentd_pressure_waiting_seconds_total", 'resource="cpu",kind="some"'), w)),
            "cpu_busy": "{} / {}".format(
                host("sum", "rate({}[{}])".format(self.s(
                    "agentd_cpu_seconds_total", 'mode!~"idle|iowait|steal"'), w)),
                host("max", self.s("agentd_cpu_online"))),
            "net_rate": host("min", f"avg_over_time({self.s(rd + 'port_speed_bytes')}[{w}])"),
            "net_util": host("max", f"rate({self.s(rd + 'transmit_bytes_total')}[{w}]) / "
                                    f"{self.s(rd + 'port_speed_bytes')}"),
            "net_errors": host("sum", "rate({}[{}])".format(self.s(
                rd + "port_errors_total", 'type!~"link_error_recovery|link_downed"'), w)),
            "net_recover": host("sum", "rate({}[{}])".format(self.s(
                rd + "port_errors_total", 'type=~"link_error_recovery|link_downed"'), w)),
            "net_wait": host("sum", f"rate({self.s(rd + 'transmit_wait_total')}[{w}])"),
        })
        info = self.s("agentd_gpu_info")
        span = f"{int(self.end - self.start)}s"
        inst = {
            "gpus": self.by_node("count", join("last_over_time({}[{}])".format(
                self.s("agentd_gpu_busy_seconds_total"), span)), ids_s),
            "models": self.by_node("count", self._over_range("last_over_time",
                                                             "agentd_gpu_info"), "name"),
            "clock_max": self.by_node("max", self._over_range(
                "max_over_time", "agentd_gpu_sm_clock_max_hertz")),
            "remapped_rows": self.by_node("max", self._over_range(
                "max_over_time", "agentd_gpu_remapped_rows")),
            "row_remap_failed": self.by_node("max", self._over_range(
                "max_over_time", "agentd_gpu_remapped_rows_failed")),
            "xid_events": self.by_node("sum", "increase({}[{}])".format(
                self.s("agentd_gpu_xid_errors_total"), span)),
            "price": "agentd_gpu_price_per_hour",
        }
        detail = {"act_max": (act, "rate", "") if act else None,
                  "clock_min": ("agentd_gpu_sm_clock_hertz", "avg_over_time", ""),
                  "busy_min": ("agentd_gpu_busy_seconds_total", "rate", "")}
        return {"range": rng, "instant": inst, "detail": detail, "ids": ids}

    def _rows(self, series: list[dict], fam: str) -> dict[tuple, tuple[dict, np.ndarray]]:
        """A family's per-target series as rows per (node, job labels): the node named, the
        targets of one node merged. Remembers each node's GPU targets (for evidence())."""
        out: dict[tuple, tuple[dict, np.ndarray]] = {}
        naming = self.naming()
        gpu = fam in GPU_FAMILIES or fam == "gpus"
        for s in series:
            m = s["metric"]
            node = self.node_of(m)
            if not node:
                continue
            rest = {k: v for k, v in m.items() if k not in naming and k != "__name__"}
            if gpu:
                target = m.get(self.node_label or "instance")
                if target:
                    self._targets.setdefault(node, set()).add(target)
            key = (node, tuple(sorted(rest.items())))
            arr = _place(self.grid, s.get("values", [])) if "values" in s else \
                np.array([_value(s)])
            if key in out:
                arr = _merge(MERGE.get(fam, "sum"), out[key][1], arr)
            out[key] = ({"node": node, **rest}, arr)
        return out

    # --- assembling the fleet ------------------------------------------------------------------
    def _assemble(self, results: dict, inst: dict, plan: dict, flavour: str) -> Fleet:
        grid = self.grid
        T = len(grid.t)
        gpu_rows: dict[tuple, dict] = {}
        labels_of: dict[tuple, dict] = {}
        recorded_keys = set()
        for fam in GPU_FAMILIES:
            for key, (labels, arr) in self._rows(results.get(fam, []), fam).items():
                labels_of[key] = labels
                gpu_rows.setdefault(key, {})[fam] = arr
                if fam in self.recorded:
                    recorded_keys.add(key)
        count: dict[tuple, int] = {}
        model_gpus: dict[str, dict[str, int]] = {}
        for s in inst.get("gpus", []):
            m = dict(s["metric"])
            model = m.pop("modelName", "")
            v = _value(s)
            if v != v:
                continue
            node = self.node_of(m)
            rest = {k: v for k, v in m.items() if k not in self.naming()}
            key = (node, tuple(sorted(rest.items())))
            count[key] = count.get(key, 0) + int(v)
            if model:
                per = model_gpus.setdefault(node, {})
                per[model] = per.get(model, 0) + int(v)
        if not gpu_rows:
            raise SourceError(f"Prometheus at {self.c.url} holds no GPU series between "
                              f"{self.start:.0f} and {self.end:.0f}"
                              + (f" for {{{self.sel}}}" if self.sel else ""))
        nodes = sorted({k[0] for k in gpu_rows})
        jobs = {key: job_of(labels_of[key], self.group_by) for key in gpu_rows}
        notes: list[str] = []
        any_job = any(j is not None for j in jobs.values())
        rows = []
        spare = set()
        for key, fam in gpu_rows.items():
            j = jobs[key]
            if j is None and any_job:
                spare.add(key[0])
                continue
            job, ident = j if j is not None else (ALL_NODES, {})
            m = labels_of[key]
            # a recording rule's row (pod owner, not pod) counts no GPUs: the raw rows do
            rows.append((job, key[0], ident, {k: v for k, v in m.items() if v}, fam,
                         count.get(key, 0 if key in recorded_keys else 1)))
        # evidence() finds a row's member by (job, node)
        self._job_of_key = {key: (j[0] if j is not None else ALL_NODES)
                            for key, j in jobs.items() if j is not None or not any_job}
        if spare:
            notes.append(f"{len(spare)} node(s) hold GPUs with no job label: left out of the "
                         "peer groups (spare GPUs, or jobs agentd cannot attribute)")
        if not any_job:
            notes.append("no job labels in range: the nodes in range are compared as one "
                         "peer group (--group-by LABEL or --selector narrows it)")
        members, gpu = merge_rows(rows, nodes, T)
        ni = {n: i for i, n in enumerate(nodes)}
        host = {}
        for fam in NODE_FAMILIES:
            arr = np.full((len(nodes), T), np.nan)
            for (n, _), (_, row) in self._rows(results.get(fam, []), fam).items():
                if n in ni:
                    arr[ni[n]] = row if not np.isfinite(arr[ni[n]]).any() else \
                        _merge(MERGE[fam], arr[ni[n]], row)
            if np.isfinite(arr).any():
                host[fam] = arr
        model_of: dict[str, str] = {n: max(per, key=per.get) for n, per in model_gpus.items()}
        for s in inst.get("models", []):  # agentd: agentd_gpu_info{name}
            m = s["metric"]
            model_of.setdefault(self.node_of(m), m.get("modelName") or m.get("name") or "")
        clock_max: dict[str, float] = {}
        for s in inst.get("clock_max", []):
            v = _value(s)
            n = self.node_of(s["metric"])
            if v == v:
                clock_max[n] = max(clock_max.get(n, v), v)
        for n in nodes:
            if n not in clock_max:
                gm = models.lookup(model_of.get(n))
                if gm is not None:
                    clock_max[n] = gm.sm_clock_max_hz
        self._power_limit = plan.get("power_limit", True)
        self._model_of = model_of
        health: dict[str, dict] = {}
        for key, name in (("remapped_rows", "remapped rows"),
                          ("row_remap_failed", "row remapping failed"),
                          ("last_xid", "last XID"), ("xid_events", "XID events")):
            for s in inst.get(key, []):
                v = _value(s)
                if v == v and v > 0:
                    per = health.setdefault(self.node_of(s["metric"]), {})
                    per[name] = v + per.get(name, 0) if key == "xid_events" else \
                        max(per.get(name, v), v)
        prices = {}
        for s in inst.get("price", []):
            v = _value(s)
            if v == v:
                prices[s["metric"].get("name", "")] = v
        missing = []
        for fam, why in (("act_max", "compute activity (DCGM_FI_PROF_PIPE_TENSOR_ACTIVE / "
                                     "SM_ACTIVE, or agentd's GPM counters)"),
                         ("clock_min", "SM clocks"),
                         ("disk_busy", "disk busy time (diskstats)"),
                         ("cpu_busy", "host CPU"),
                         ("psi_io", "pressure stall information"),
                         ("net_rate", "RDMA port rates (node_infiniband_*, agentd_rdma_*)"),
                         ("net_errors", "RDMA link error counters")):
            if fam not in gpu and fam not in host:
                missing.append(why)
        what = "agentd" if flavour == "agentd" else "dcgm-exporter + node_exporter"
        src = f"{redact(self.c.url)} ({what})"
        return Fleet(grid.t, grid.step, nodes, members, gpu, host, source=src,
                     activity=getattr(self, "_activity", ""), models=model_of,
                     clock_max=clock_max, gpu_health=health, missing=missing, notes=notes,
                     price_per_gpu_hour=prices).check()

    def _detail(self, spec: dict):
        """detail(node, family, t0, t1) -> {gpu: mean over (t0, t1]}: one instant query over
        that node's GPU series alone, for the findings only (remembered: the analysis may
        ask twice)."""
        seen: dict[tuple, dict[str, float]] = {}

        def detail(node: str, family: str, t0: float, t1: float) -> dict[str, float]:
            got = spec.get(family)
            only = self._only([node])
            if not got or not only:
                return {}
            if (node, family, t0, t1) in seen:
                return seen[(node, family, t0, t1)]
            metric, fn, post = got
            dur = f"{max(int(t1 - t0), int(self.grid.step))}s"
            sel = ",".join(x for x in (self.sel, only) if x)
            q = self.by_node("max", f"{fn}({metric}{{{sel}}}[{dur}]){post}", "gpu")
            try:
                res = self._i(q, at=t1)
            except SourceError:
                return {}
            out: dict[str, float] = {}
            for s in res:
                g = s["metric"].get("gpu", "")
                if g != "" and self.node_of(s["metric"]) == node:
                    v = _value(s)
                    out[g] = v if g not in out else max(out[g], v)
            seen[(node, family, t0, t1)] = out
            return out

        return detail


def _merge(how: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two targets' rows of one node, merged as the family aggregates (NaN where neither
    has data). A mean is unweighted: two exporters' targets on one node are rare."""
    with np.errstate(all="ignore"), _quiet():
        if how == "min":
            return np.fmin(a, b)
        if how == "max":
            return np.fmax(a, b)
        both = np.isfinite(a) & np.isfinite(b)
        total = np.where(np.isfinite(a), a, 0.0) + np.where(np.isfinite(b), b, 0.0)
        total[~(np.isfinite(a) | np.isfinite(b))] = np.nan
        return np.where(both, total / 2, total) if how == "avg" else total


def _place(grid: Grid, values: list) -> np.ndarray:
    """A range result's [[ts, "v"], ...] on the grid, vectorised (Grid.place is per point)."""
    out = np.full(len(grid.t), np.nan)
    if not values:
        return out
    try:
        a = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return grid.place(values)
    if a.ndim != 2 or a.shape[1] != 2:
        return grid.place(values)
    i = np.rint((a[:, 0] - grid.t[0]) / grid.step).astype(np.int64)
    ok = (i >= 0) & (i < len(out)) & np.isfinite(a[:, 1])
    out[i[ok]] = a[ok, 1]
    return out


def _value(s: dict) -> float:
    try:
        return float(s["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return float("nan")
