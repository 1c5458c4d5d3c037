"""The Prometheus HTTP API (query, query_range) and what both Prometheus sources share: which
series belong to the node, the scrape interval the data was collected at, and placing range
results on one time grid.

A node is named by host (`--node gpu-a-17`) or by label matchers (`--node
'kubernetes_node="gpu-a-17"'`). A host matches `instance="HOST"` or `instance="HOST:PORT"`
(dcgm-exporter and node_exporter differ by port), and otherwise dcgm-exporter's
`Hostname`/`hostname`, or the `node`, `nodename`, `kubernetes_node`, `host` labels that
relabelling and Kubernetes service discovery add. Each metric family is looked up with the
first form that finds it, so the two exporters may be labelled differently.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse

import numpy as np

from agentd.diagnose.sources import SourceError
from agentd.diagnose.sources.http import HttpOptions, get, redact

HOST_LABELS = ("Hostname", "hostname", "node", "nodename", "kubernetes_node", "host")
_MATCHER = re.compile(r'^\s*\{?\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*".*"\s*\}?\s*$')


def promql_string(value: str) -> str:
    """A PromQL double-quoted string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def regex_escape(value: str) -> str:
    """A literal for RE2 (Prometheus' regexes): metacharacters escaped, nothing else."""
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", value)


class PromClient:
    def __init__(self, url: str, opts: HttpOptions | None = None):
        self.url = url.rstrip("/")
        self.opts = opts or HttpOptions()
        self.queries = 0
        self.bytes = 0

    def _get(self, path: str, params: dict) -> dict:
        data = self._data(path, params)
        if not isinstance(data, dict) or not isinstance(data.get("result"), list):
            raise SourceError(f"Prometheus at {redact(self.url)} answered without a result")
        return data

    def _data(self, path: str, params) -> object:
        url = f"{self.url}{path}?" + urllib.parse.urlencode(params, doseq=True)
        status, body = get(url, "Prometheus", self.opts, accept="application/json")
        self.queries += 1
        self.bytes += len(body)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise SourceError(f"Prometheus at {redact(self.url)} answered {status} with "
                              "something that is not JSON (or nested too deeply)") from None
        if not isinstance(doc, dict):
            raise SourceError(f"Prometheus at {redact(self.url)} answered unexpected JSON")
        if status == 401:
            raise SourceError(f"Prometheus at {redact(self.url)} wants credentials: give them "
                              "with --auth-file FILE (user:password)")
        if status != 200 or doc.get("status") != "success":
            detail = str(doc.get("error", ""))[:300]
            raise SourceError(f"Prometheus at {redact(self.url)} answered {status}: {detail}")
        return doc.get("data")

    def query_range(self, query: str, start: float, end: float, step: float) -> list[dict]:
        return self._series(self._get("/api/v1/query_range", {
            "query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"
        })["result"])

    def query(self, query: str, at: float | None = None) -> list[dict]:
        params = {"query": query}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._series(self._get("/api/v1/query", params)["result"])

    def label_values(self, label: str, start: float, end: float,
                     match: str | None = None) -> list[str]:
        """The values of `label` on the series with samples between start and end (the
        index's answer: Prometheus may count a whole block around the range), of those
        matching `match` where given. One request, no sample read: the cheap way to learn
        which metric families (`__name__`) a server holds."""
        params: dict = {"start": f"{start:.3f}", "end": f"{end:.3f}"}
        if match:
            params["match[]"] = [match]
        data = self._data(f"/api/v1/label/{urllib.parse.quote(label)}/values", params)
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise SourceError(f"Prometheus at {redact(self.url)} answered label values that "
                              "are not a list of strings")
        return data

    def _series(self, result: list) -> list[dict]:
        """The series of a result, each checked to be shaped as the HTTP API documents:
        {"metric": {...}, "value": [ts, "v"]} or {"metric": {...}, "values": [[ts, "v"],
        ...]}, so that the sources can read them without guarding every access."""
        for s in result:
            if not _well_formed(s):
                raise SourceError(f"Prometheus at {redact(self.url)} answered a series that "
                                  f"is not shaped as its API documents: {str(s)[:120]}")
        return result


def _point(p) -> bool:
    return isinstance(p, list) and len(p) == 2 and isinstance(p[1], str) and \
        isinstance(p[0], (int, float)) and not isinstance(p[0], bool) and math.isfinite(p[0])


def _well_formed(s) -> bool:
    if not isinstance(s, dict) or not isinstance(s.get("metric"), dict):
        return False
    if "value" in s and not _point(s["value"]):
        return False
    values = s.get("values", [])
    return isinstance(values, list) and all(_point(p) for p in values)


class PrometheusSource:
    """What both Prometheus sources take: the server, the node and the range."""

    name = "prometheus"
    # Set when `--flavour auto` chose this source because the other held nothing for the
    # node: a source that finds nothing either says that neither flavour was there.
    auto = False

    def __init__(self, url: str, node: str, start: float, end: float, step: float | None = None,
                 opts: HttpOptions | None = None, client: PromClient | None = None):
        self.client = client or PromClient(url, opts)
        self.node, self.start, self.end, self.step = node, start, end, step


class NodeSelector:
    """Label matchers that select one node's series, found per metric family."""

    def __init__(self, client: PromClient, node: str, at: float):
        self.client = client
        self.node = node
        self.at = at
        self._found: dict[str, str | None] = {}
        node = node.strip()
        if not node:
            raise SourceError("--node is empty")
        if _MATCHER.match(node) or "," in node and "=" in node:
            inner = node.strip().strip("{}")
            self.candidates = ["{" + inner + "}"]
            self.host = None
        else:
            self.host = node
            rx = regex_escape(node)
            self.candidates = ["{instance=~" + promql_string(f"{rx}(:[0-9]+)?") + "}"] + [
                "{" + f"{label}={promql_string(node)}" + "}" for label in HOST_LABELS]

    def for_metric(self, metric: str, lookback: str = "1h") -> str | None:
        """The first candidate selector under which `metric` has series near the range end,
        or None."""
        if metric in self._found:
            return self._found[metric]
        found = None
        for sel in self.candidates:
            if self.client.query(f"count(last_over_time({metric}{sel}[{lookback}]))",
                                 at=self.at):
                found = sel
                break
        self._found[metric] = found
        return found


def window(seconds: float, least: float = 1.0) -> str:
    """A PromQL range of `seconds`, at least `least`, in milliseconds: rounded to whole
    seconds, a 2.5 s step read its gauges over 2 s windows that missed a scrape whenever
    the scrape phase fell in the step's first half second."""
    return f"{max(int(round(seconds * 1000)), int(round(least * 1000)))}ms"


def with_matchers(selector: str, extra: str) -> str:
    """`{a="b"}` plus `c="d"` -> `{a="b",c="d"}`."""
    inner = selector.strip()[1:-1]
    return "{" + ",".join(x for x in (inner, extra) if x) + "}"


def scrape_interval(client: PromClient, metric: str, sel: str, at: float) -> float | None:
    """The interval a series was scraped at: the median gap between its raw samples over the
    10 minutes before `at` (rounded to 0.1 s). The raw samples of one series only: on a
    fleet, `metric{sel}[10m]` would be every GPU's (megabytes)."""
    one = client.query(f"topk(1, count_over_time({metric}{sel}[10m]))", at=at)
    if not one:
        return None
    labels = ",".join(f"{k}={promql_string(v)}" for k, v in sorted(one[0]["metric"].items())
                      if k != "__name__")
    for s in client.query(f"{metric}{{{labels}}}[10m]", at=at)[:4]:
        ts = np.array([float(v[0]) for v in s.get("values", [])])
        if len(ts) >= 3:
            gaps = np.diff(ts)
            gaps = gaps[gaps > 0]
            if len(gaps):
                return float(round(np.median(gaps), 1)) or None
    return None


class Grid:
    def __init__(self, start: float, end: float, step: float):
        if not (math.isfinite(start) and math.isfinite(end) and step > 0):
            raise SourceError("the range to query is not finite")
        n = int((end - start) / step) + 1
        if n > 200_000:
            raise SourceError(f"{n} points of {step:g} s: choose a shorter range or a "
                              "longer --step")
        self.t = start + np.arange(n) * step
        self.step = step

    def place(self, values: list) -> np.ndarray:
        out = np.full(len(self.t), np.nan)
        for item in values:
            try:
                ts, v = item
                i = int(round((float(ts) - self.t[0]) / self.step))
                if 0 <= i < len(out):
                    out[i] = float(v)
            except (TypeError, ValueError, OverflowError):
                continue
        out[~np.isfinite(out)] = np.nan
        return out
