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

Each family is one range query at the base step (a counter's rate() or a gauge's
avg_over_time() over the step, then min/max/avg over the node's GPUs); the sliding analysis
windows are means of those steps, taken in numpy. Queries run a few at a time.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from agentd.cluster.data import GPU_FAMILIES, NODE_FAMILIES, Fleet, merge_rows
from agentd.cluster.groups import ALL_NODES, OWNER_LABELS, job_of
from agentd.diagnose.sources import SourceError
from agentd.diagnose.sources.http import redact
from agentd.diagnose.sources.promclient import Grid, PromClient, promql_string, \
    scrape_interval
from agentd.gpu import models
from agentd.jobs import JOB_LABELS

THROTTLE_REASONS = "sw_power_cap|hw_slowdown|sw_thermal_slowdown|hw_thermal_slowdown|" \
                   "hw_power_brake_slowdown"
IB_ERRORS = "symbol_error|port_errors_received|local_link_integrity_errors|" \
            "excessive_buffer_overrun_errors"
IB_RECOVERIES = "link_error_recovery|link_downed"


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

    # --- PromQL pieces -------------------------------------------------------------------------
    def s(self, metric: str, extra: str = "") -> str:
        inner = ",".join(x for x in (self.sel, extra) if x)
        return f"{metric}{{{inner}}}"

    def node(self, expr: str) -> str:
        """expr with a `node` label: the host part of instance, else Hostname/hostname, or
        --node-label."""
        if self.node_label:
            return f'label_replace({expr}, "node", "$1", "{self.node_label}", "(.+)")'
        e = f'label_replace({expr}, "node", "$1", "instance", "(.*?)(:[0-9]+)?")'
        for label in ("Hostname", "hostname"):
            e = f'label_replace({e}, "node", "$1", "{label}", "(.+)")'
        return e

    def by_node(self, agg: str, inner: str, ids: str = "") -> str:
        """agg of inner per node (and ids): first per scrape target and ids, so the
        label_replace that names the node runs on one series per node, not per GPU or port.
        A count is summed in the second step."""
        pre = self.node_label if self.node_label else "instance, Hostname, hostname"
        extra = f", {ids}" if ids else ""
        outer = "sum" if agg == "count" else agg
        return f"{outer} by (node{extra}) ({self.node(f'{agg} by ({pre}{extra}) ({inner})')})"

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
        scrape = self._scrape(busy_metric)
        step = self.step or max(60.0, 2 * (scrape or 15.0))
        n = int((self.end - self.start) // step)
        if n < 2:
            raise SourceError(f"the range holds {n} step(s) of {step:g} s: give a longer "
                              "--last or --start")
        self.grid = Grid(self.end - (n - 1) * step, self.end, step)
        plan = self._agentd_plan() if flavour == "agentd" else self._exporters_plan(busy_metric)
        results: dict[str, list[dict]] = {}
        with ThreadPoolExecutor(self.parallel) as pool:
            futs = {fam: pool.submit(self._q, q) for fam, q in plan["range"].items() if q}
            instant = {k: pool.submit(self._i, q) for k, q in plan["instant"].items() if q}
            for fam, fut in futs.items():
                results[fam] = fut.result()
            inst = {k: fut.result() for k, fut in instant.items()}
        fleet = self._assemble(results, inst, plan, flavour)
        fleet.stats = {"queries": self.c.queries - q0, "series": self.series,
                       "bytes": self.c.bytes - b0,
                       "seconds": round(time.monotonic() - t_start, 3),
                       "flavour": flavour, "scrape_interval_seconds": scrape}
        return fleet, self._detail(plan["detail"])

    def _scrape(self, metric: str) -> float | None:
        return scrape_interval(self.c, metric, "{" + self.sel + "}", self.end)

    def _win(self) -> str:
        return f"{int(round(self.grid.step))}s"

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
            "gpus": self.by_node("count", self._over_range("last_over_time", busy_metric),
                                 ids_s),
            "models": self.by_node("count", self._over_range("last_over_time", busy_metric),
                                   "modelName"),
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
            "net_tx": host("sum", f"rate({self.s(ib + 'port_data_transmitted_bytes_total')}"
                                  f"[{w}])"),
            "net_errors": host("sum", self._rates(ib, IB_ERRORS, w)),
            "net_recover": host("sum", self._rates(ib, IB_RECOVERIES, w)),
            "net_wait": host("sum", f"rate({self.s(ib + 'port_transmit_wait_total')}[{w}])"),
        }

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
            "net_tx": host("sum", f"rate({self.s(rd + 'transmit_bytes_total')}[{w}])"),
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

    # --- assembling the fleet ------------------------------------------------------------------
    def _assemble(self, results: dict, inst: dict, plan: dict, flavour: str) -> Fleet:
        grid = self.grid
        T = len(grid.t)
        gpu_rows: dict[tuple, dict] = {}
        labels_of: dict[tuple, dict] = {}
        for fam in GPU_FAMILIES:
            for s in results.get(fam, []):
                m = s["metric"]
                node = m.get("node", "")
                if not node:
                    continue
                key = (node, tuple(sorted((k, v) for k, v in m.items() if k != "node")))
                labels_of[key] = m
                gpu_rows.setdefault(key, {})[fam] = _place(grid, s.get("values", []))
        count = {}
        for s in inst.get("gpus", []):
            m = s["metric"]
            key = (m.get("node", ""), tuple(sorted((k, v) for k, v in m.items() if k != "node")))
            try:
                count[key] = int(float(s["value"][1]))
            except (KeyError, IndexError, TypeError, ValueError):
                continue
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
            rows.append((job, key[0], ident, {k: v for k, v in m.items() if v}, fam,
                         count.get(key, 1)))
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
            for s in results.get(fam, []):
                n = s["metric"].get("node", "")
                if n in ni:
                    arr[ni[n]] = _place(grid, s.get("values", []))
            if np.isfinite(arr).any():
                host[fam] = arr
        model_of: dict[str, str] = {}
        for s in inst.get("models", []):
            m = s["metric"]
            model_of[m.get("node", "")] = m.get("modelName") or m.get("name") or ""
        clock_max: dict[str, float] = {}
        for s in inst.get("clock_max", []):
            clock_max[s["metric"].get("node", "")] = _value(s)
        for n in nodes:
            if n not in clock_max:
                gm = models.lookup(model_of.get(n))
                if gm is not None:
                    clock_max[n] = gm.sm_clock_max_hz
        if not plan.get("power_limit", True) and "power_max" in gpu:
            # dcgm-exporter's default set has no power limit: the model's.
            for i, mem in enumerate(members):
                gm = models.lookup(model_of.get(mem.node))
                gpu["power_max"][i] = gpu["power_max"][i] / gm.power_limit_watts if gm \
                    else np.nan
        health: dict[str, dict] = {}
        for key, name in (("remapped_rows", "remapped rows"),
                          ("row_remap_failed", "row remapping failed"),
                          ("last_xid", "last XID"), ("xid_events", "XID events")):
            for s in inst.get(key, []):
                v = _value(s)
                if v == v and v > 0:
                    health.setdefault(s["metric"].get("node", ""), {})[name] = v
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
        """detail(node, family, t0, t1) -> {gpu: mean over (t0, t1]}: one instant query for
        one node's GPUs, for the findings only."""

        def detail(node: str, family: str, t0: float, t1: float) -> dict[str, float]:
            got = spec.get(family)
            if not got:
                return {}
            metric, fn, post = got
            dur = f"{max(int(t1 - t0), int(self.grid.step))}s"
            inner = self.by_node("max", f"{fn}({self.s(metric)}[{dur}]){post}", "gpu")
            value = promql_string(node.replace("$", "$$"))
            only = f'label_replace(vector(1), "node", {value}, "", "")'
            try:
                res = self._i(f"{inner} and on (node) {only}", at=t1)
            except SourceError:
                return {}
            return {s["metric"].get("gpu", ""): _value(s) for s in res
                    if s["metric"].get("gpu", "") != ""}

        return detail


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
