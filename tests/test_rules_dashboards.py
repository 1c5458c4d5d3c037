"""rules/ and grafana/: promtool checks and unit tests; dashboards current, well formed and
importable; every PromQL expression runs against a real Prometheus scraping simulated nodes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from agentd import rules as rules_mod
from agentd.catalog import METRICS_BY_NAME
from agentd.dashboards import DASHBOARDS, render
from agentd.gpu.xid import XIDS
from agentd.jobs import JOB_LABELS
from conftest import agentd_cmd, free_port, need, wait_http

ROOT = os.path.join(os.path.dirname(__file__), "..")
RULES = os.path.join(ROOT, "rules", "agentd.rules.yml")
DASH_DIR = os.path.join(ROOT, "grafana", "dashboards")


def test_promtool_check_rules():
    r = subprocess.run([need("promtool"), "check", "rules", RULES], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_committed_rules_are_the_default_render():
    """Regenerate with `agentd rules` (make rules); edit agentd/rules.py, not the file."""
    with open(RULES) as f:
        assert f.read() == rules_mod.render(), "rules/agentd.rules.yml is stale: agentd rules"


AGENTD_SERIES = re.compile(r"\b(agentd_[a-z0-9_]+|up)\b(\{[^}]*\})?(?!\s*\()")


def test_a_custom_config_reaches_every_selector_and_link(tmp_path):
    """Like a jsonnet mixin's config: the selector of agentd's series, the runbook's URL and
    thresholds are configuration, and every expression uses them."""
    config = tmp_path / "rules.toml"
    config.write_text('idle_for = "30m"\nthrottled_ratio = 0.35\n'
                      '[xid_severity]\napplication = "none"\n')
    out = tmp_path / "agentd.rules.yml"
    r = subprocess.run(agentd_cmd("rules", "--config", str(config), "--selector",
                                  'job="gpu-nodes",cluster="eu1"', "--runbook-url",
                                  "https://wiki.example.org/agentd", "--out", str(out)),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([need("promtool"), "check", "rules", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = yaml.safe_load(out.read_text())
    rules = [rule for g in doc["groups"] for rule in g["rules"]]
    for rule in rules:
        for m in AGENTD_SERIES.finditer(rule["expr"]):
            if m.group(1) == "agentd_gpu_price_per_hour":
                continue  # the operator's own series
            assert m.group(2) and 'job="gpu-nodes",cluster="eu1"' in m.group(2), \
                f"{rule.get('record') or rule['alert']}: {m.group(0)} lacks the selector"
        if "alert" in rule:
            assert rule["annotations"]["runbook_url"] == \
                f"https://wiki.example.org/agentd#{rule['alert'].lower()}"
    exprs = " ".join(rule["expr"] for rule in rules)
    assert "[30m]" in exprs and "> 0.35" in exprs
    xid = [rule for rule in rules if rule.get("alert") == "AgentdGpuXid"]
    assert {rule["labels"]["severity"] for rule in xid} == {"critical", "warning"}


@pytest.mark.parametrize("args, message", [
    (["--selector", "job=agentd"], "not a list of label matchers"),
    (["--runbook-url", "docs/runbook.md"], "not an absolute http(s) URL"),
])
def test_bad_rules_config_is_one_line_and_exit_2(args, message):
    r = subprocess.run(agentd_cmd("rules", "--out", "-", *args), capture_output=True,
                       text=True)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1


def test_bad_rules_config_file(tmp_path):
    for text, message in (('idle_for = "ten minutes"\n', "not a Prometheus duration"),
                          ("frobnicate = 1\n", "unknown key 'frobnicate'"),
                          ('[xid_severity]\nfatal = "page"\n', "not one of")):
        config = tmp_path / "rules.toml"
        config.write_text(text)
        r = subprocess.run(agentd_cmd("rules", "--config", str(config), "--out", "-"),
                           capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, r.stderr


# Series the exporter creates at an event, never before: a test input that starts them at 0
# feeds a value the exporter never writes, and hides an increase() that misses the event.
BORN_AT_EVENT = {"agentd_gpu_xid_code_errors_total", "agentd_finding_active",
                 "agentd_gpu_process_memory_used_bytes"}


def test_rule_tests_feed_series_as_the_exporter_writes_them():
    with open(os.path.join(ROOT, "rules", "tests", "agentd.test.yml")) as f:
        doc = yaml.safe_load(f)
    names = set(METRICS_BY_NAME) | {"up", "agentd_gpu_price_per_hour"}
    for t in doc["tests"]:
        for series in t["input_series"]:
            name = series["series"].split("{")[0]
            assert name in names, f"{name} is not a metric agentd exports"
            first = series["values"].split()[0]
            if name in BORN_AT_EVENT:
                assert not re.match(r"^0(\D|$)", first), \
                    f"{series['series']} starts at 0, which the exporter never writes"
            if name in METRICS_BY_NAME and name != "up":
                labels = set(re.findall(r'(\w+)=', series["series"])) - {"job", "instance"}
                assert labels <= set(METRICS_BY_NAME[name].labels), series["series"]


def test_promtool_unit_tests_cover_every_alert():
    tests = os.path.join(ROOT, "rules", "tests", "agentd.test.yml")
    r = subprocess.run([need("promtool"), "test", "rules", tests], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(RULES) as f:
        alerts = {rule["alert"] for g in yaml.safe_load(f)["groups"] for rule in g["rules"]
                  if "alert" in rule}
    with open(tests) as f:
        doc = yaml.safe_load(f)
    firing, quiet = set(), set()
    for t in doc["tests"]:
        for a in t.get("alert_rule_test", []):
            (firing if a["exp_alerts"] else quiet).add(a["alertname"])
    assert alerts <= firing, f"never tested firing: {alerts - firing}"
    assert alerts <= quiet, f"never tested quiet: {alerts - quiet}"


def test_every_alert_has_annotations_and_a_runbook_section():
    with open(RULES) as f:
        groups = yaml.safe_load(f)["groups"]
    with open(os.path.join(ROOT, "docs", "runbook.md")) as f:
        runbook = f.read().lower()
    for g in groups:
        for rule in g["rules"]:
            if "alert" not in rule:
                continue
            ann = rule["annotations"]
            assert ann["summary"] and ann["description"]
            url, anchor = ann["runbook_url"].split("#")
            assert re.match(r"^https://[^/]+/", url), "runbook_url must be absolute"
            assert f"## {rule['alert'].lower()}" in runbook and anchor == rule["alert"].lower()


def test_runbook_xid_table_is_agentds():
    """docs/runbook.md lists the XID classes the exporter uses (agentd/gpu/xid.py)."""
    with open(os.path.join(ROOT, "docs", "runbook.md")) as f:
        rows = set(re.findall(r"^\| (\d+) \| (\w+) \| (.+?) \|$", f.read(), re.M))
    assert rows == {(str(x.code), x.klass, x.name) for x in XIDS.values()}


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_committed_dashboards_are_current(name):
    """Regenerate with `agentd dashboards` (make dashboards)."""
    with open(os.path.join(DASH_DIR, name)) as f:
        assert f.read() == render(DASHBOARDS[name]), f"{name} is stale: run agentd dashboards"


def _panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


DS = {"type": "prometheus", "uid": "${datasource}"}
# What current Grafana (10, 11) reads in each panel type's options; no schema validator
# installs here, so the tests check these fields themselves.
PANEL_OPTIONS = {
    "stat": {"reduceOptions", "orientation", "textMode", "colorMode", "graphMode",
             "justifyMode"},
    "bargauge": {"reduceOptions", "orientation", "displayMode", "valueMode", "showUnfilled"},
    "timeseries": {"legend", "tooltip"},
    "state-timeline": {"showValue", "rowHeight", "mergeValues", "alignValue", "legend",
                       "tooltip"},
    "table": {"showHeader", "cellHeight", "footer"},
}
# Keys of panels before Grafana 7 (the legacy heatmap, singlestat, old bar gauges).
LEGACY = {"cards", "dataFormat", "heatmap", "xBucketSize", "yBucketSize", "xAxis", "yAxis",
          "legend", "thresholds", "format", "valueName", "colorBackground"}


def check_thresholds(where: str, th: dict) -> None:
    assert th["mode"] in ("absolute", "percentage"), where
    steps = th["steps"]
    assert isinstance(steps, list) and steps, f"{where}: thresholds.steps must be a list"
    assert steps[0]["value"] is None, f"{where}: the first step's value must be null"
    values = [st["value"] for st in steps[1:]]
    assert all(isinstance(v, (int, float)) for v in values), where
    assert values == sorted(set(values)), f"{where}: steps must rise"
    assert all(isinstance(st["color"], str) and st["color"] for st in steps), where


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_dashboard_fields_current_grafana_reads(name):
    d = json.loads(render(DASHBOARDS[name]))
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time",
                "annotations"):
        assert key in d, key
    assert d["schemaVersion"] >= 36
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", d["uid"])
    uids = {json.loads(render(b))["uid"] for b in DASHBOARDS.values()}
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "node" in variables
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    cells = set()
    for p in _panels(d):
        where = f"{name}: {p['title']}"
        gp = p["gridPos"]
        assert 0 <= gp["x"] < 24 and gp["w"] > 0 and gp["x"] + gp["w"] <= 24 and gp["h"] > 0
        for x in range(gp["x"], gp["x"] + gp["w"]):
            for y in range(gp["y"], gp["y"] + gp["h"]):
                assert (x, y) not in cells, f"{where} overlaps another panel"
                cells.add((x, y))
        assert p["type"] in PANEL_OPTIONS, f"{where}: {p['type']}"
        assert not LEGACY & set(p), f"{where}: legacy keys {LEGACY & set(p)}"
        missing = PANEL_OPTIONS[p["type"]] - set(p["options"])
        assert not missing, f"{where}: options lack {missing}"
        assert "fieldOptions" not in p["options"], f"{where}: pre-Grafana-7 fieldOptions"
        if "reduceOptions" in p["options"]:
            r = p["options"]["reduceOptions"]
            assert isinstance(r["calcs"], list) and r["calcs"] and isinstance(r["values"], bool)
        assert p["datasource"] == DS
        defaults = p["fieldConfig"]["defaults"]
        check_thresholds(where, defaults["thresholds"])
        for o in p["fieldConfig"]["overrides"]:
            for prop in o["properties"]:
                if prop["id"] == "thresholds":
                    check_thresholds(f"{where} override", prop["value"])
        if p["type"] != "table":
            assert isinstance(defaults["unit"], str) and defaults["unit"], f"{where}: no unit"
            assert defaults["color"]["mode"] in ("thresholds", "palette-classic"), where
        if "cost" in p["title"].lower():
            assert defaults["unit"].startswith("currency"), f"{where}: a cost needs a currency"
        if defaults.get("unit") == "percentunit" and "max" in defaults:
            assert defaults["max"] <= 1, where
        if "min" in defaults and "max" in defaults:
            assert defaults["min"] < defaults["max"], where
        links = list(defaults["links"]) + [
            v for o in p["fieldConfig"]["overrides"] for prop in o["properties"]
            if prop["id"] == "links" for v in prop["value"]]
        for link in links:
            assert link["title"] and link["url"], where
            m = re.match(r"^/d/([^/?]+)", link["url"])
            assert m and m.group(1) in uids, f"{where}: link to an unknown dashboard"
        if p["type"] == "timeseries":
            assert p["options"]["legend"]["displayMode"] in ("list", "table", "hidden")
            assert {"drawStyle", "lineWidth", "fillOpacity"} <= set(defaults["custom"])
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(re.fullmatch(r"[A-Z]", r) for r in refs)
        for t in p["targets"]:
            assert t["datasource"] == DS and t["expr"], where
            assert isinstance(t["legendFormat"], str), where
            assert t["range"] is not t["instant"], where
    for a in d["annotations"]["list"]:
        assert a["datasource"] == DS


def test_dashboards_drill_down_and_keep_nodes_apart():
    cluster = json.loads(render(DASHBOARDS["agentd-cluster.json"]))
    urls = [link["url"] for p in _panels(cluster)
            for link in p["fieldConfig"]["defaults"]["links"]]
    assert any(u.startswith("/d/agentd-node/") and "var-node=" in u for u in urls)
    assert any(p["type"] == "state-timeline" and "one row per node" in p["title"]
               for p in _panels(cluster))
    node = json.loads(render(DASHBOARDS["agentd-node.json"]))
    var = {v["name"]: v for v in node["templating"]["list"]}["node"]
    # One node at a time: per-GPU legends ("GPU 3") cannot mix two nodes.
    assert var["multi"] is False and var["includeAll"] is False
    job = json.loads(render(DASHBOARDS["agentd-job.json"]))
    var = {v["name"]: v for v in job["templating"]["list"]}["job"]
    # Every job identity, not only systemd units (agentd/jobs.py).
    assert all(label in var["query"] for label in JOB_LABELS)


def _variable_query(v: dict) -> str | None:
    m = re.fullmatch(r"(?:label_values|query_result)\((.+?)(?:, \w+)?\)", v.get("query") or "")
    return m.group(1) if m and v["type"] == "query" else None


# Series that exist only after an event the simulated nodes do not produce in a minute.
EVENT_DRIVEN = {"AgentdGpuXid", "AgentdGpuLost", "AgentdGpuDriverLost", "AgentdGpusMissing",
                "agentd-node.json: XID events"}

# The operator's GPU prices (outside agentd's rules): one default, one for a model.
PRICES = """groups:
  - name: prices
    rules:
      - record: agentd_gpu_price_per_hour
        expr: vector(2.5)
      - record: agentd_gpu_price_per_hour
        expr: vector(4.1)
        labels: {name: "NVIDIA H100 80GB HBM3"}
"""


def start_prometheus(spawn, tmp_path, targets: list[int], interval: str = "2s") -> str:
    """A real Prometheus scraping agentd at `targets` every second, with agentd's rules
    (evaluated every `interval`) and the operator's price rules."""
    rules = tmp_path / "agentd.rules.yml"
    with open(RULES) as f:
        doc = yaml.safe_load(f)
    for g in doc["groups"]:
        g["interval"] = interval  # evaluate quickly for the test
    rules.write_text(yaml.safe_dump(doc))
    prices = tmp_path / "prices.rules.yml"
    prices.write_text(PRICES)
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: {interval}\n"
                   f"rule_files: ['{rules}', '{prices}']\n"
                   f"scrape_configs:\n  - job_name: agentd\n    static_configs:\n"
                   f"      - targets: [{', '.join(repr(f'127.0.0.1:{p}') for p in targets)}]\n")
    spawn([need("prometheus"), f"--config.file={cfg}",
           f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"])
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/-/ready", timeout=20)
    return base


def prom_query(base: str, q: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]["result"]


@pytest.mark.prometheus
@pytest.mark.slow
def test_first_xid_of_a_gpu_alerts_end_to_end(tmp_path, spawn):
    """agentd on fake GPUs whose driver reports XID 79 on GPU 1 and XID 13 on GPU 0 at 25 s,
    a real Prometheus with the rules: the first fatal XID pages (critical), the job's own
    fault is information; increase() over the per-code counter (born at 1) sees neither."""
    scenario = tmp_path / "xid.toml"
    scenario.write_text('[[gpus]]\ncount = 1\nutilization = 0.5\n'
                        'xid = [{at_s = 25, code = 13}]\n'
                        '[[gpus]]\ncount = 1\nutilization = 0.5\n'
                        'xid = [{at_s = 25, code = 79}]\n')
    port = free_port()
    spawn(agentd_cmd("run", "--fake-nvml", str(scenario), "--web.listen-address",
                     f"127.0.0.1:{port}"))
    wait_http(f"http://127.0.0.1:{port}/metrics")
    base = start_prometheus(spawn, tmp_path, [port], interval="1s")
    deadline = time.monotonic() + 90
    firing: dict = {}
    while time.monotonic() < deadline and len(firing) < 2:
        time.sleep(2)
        firing = {a["metric"]["class"]: a["metric"]["severity"] for a in prom_query(
            base, 'ALERTS{alertname="AgentdGpuXid",alertstate="firing"}')}
    assert firing == {"fatal": "critical", "application": "info"}
    time.sleep(3)
    codes = prom_query(base, "agentd_gpu_xid_code_errors_total")
    assert {c["metric"]["xid"]: c["value"][1] for c in codes} == {"13": "1", "79": "1"}
    assert prom_query(base, "increase(agentd_gpu_xid_code_errors_total[10m]) > 0") == []


@pytest.mark.prometheus
@pytest.mark.slow
def test_every_expression_runs_against_prometheus_scraping_simulated_nodes(tmp_path, spawn):
    ports = {}
    for scenario in ("input-storage", "straggler"):
        port = free_port()
        spawn(agentd_cmd("run", "--simulate", scenario, "--web.listen-address",
                         f"127.0.0.1:{port}", "--analysis.interval", "5s",
                         "--analysis.window", "20s"))
        ports[scenario] = port
    for port in ports.values():
        wait_http(f"http://127.0.0.1:{port}/metrics")
    base = start_prometheus(spawn, tmp_path, list(ports.values()))
    time.sleep(50)  # scrapes, the first analyses (findings), a few rule evaluations

    problems = []

    def run(where: str, q: str, needs_data: bool = True) -> list | None:
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            problems.append(f"{where}: {e.code} {json.load(e).get('error')}")
            return None
        if doc["status"] != "success":
            problems.append(f"{where}: {doc.get('error')}")
            return None
        if needs_data and not doc["data"]["result"] and where not in EVENT_DRIVEN:
            problems.append(f"{where}: no data for {q}")
        return doc["data"]["result"]

    with open(RULES) as f:
        for g in yaml.safe_load(f)["groups"]:
            for rule in g["rules"]:
                # Recording rules must produce data; alert conditions need only run.
                run(rule.get("record") or rule["alert"], rule["expr"], "record" in rule)
    for name, build in DASHBOARDS.items():
        d = json.loads(render(build))
        # The variables as a user would set them: All where offered, else the first value.
        values = {"__rate_interval": "30s"}
        for v in d["templating"]["list"]:
            query = _variable_query(v)
            if query is None:
                continue
            for k, val in values.items():
                query = query.replace("$" + k, val)
            rows = run(f"{name}: variable {v['name']}", query) or []
            if v.get("includeAll"):
                values[v["name"]] = v.get("allValue") or ".*"
            elif rows:
                m = rows[0]["metric"]
                text = ",".join(f'{k}="{val}"' for k, val in sorted(m.items()))
                label = re.search(r"label_values\(.*, (\w+)\)", v["query"])
                values[v["name"]] = m[label.group(1)] if label else text
        for p in _panels(d):
            for t in p["targets"]:
                q = t["expr"]
                for k, val in sorted(values.items(), key=lambda kv: -len(kv[0])):
                    q = q.replace("$" + k, val)
                where = f"{name}: {p['title']}"
                result = run(where, q) or []
                if p["type"] == "table":
                    continue
                # Each series tells itself apart in the legend (two nodes, one legend: no).
                legend = t["legendFormat"]
                names = [re.sub(r"\{\{\s*(\w+)\s*\}\}",
                                lambda m: r["metric"].get(m.group(1), ""), legend)
                         for r in result]
                if legend != "__auto" and len(names) != len(set(names)):
                    problems.append(f"{where}: series share a legend: {sorted(names)}")
                # A share is a share: a percent panel showing cores or bytes is wrong.
                unit = p["fieldConfig"]["defaults"]["unit"]
                for r in result:
                    v = float(r["value"][1])
                    if unit == "percentunit" and not -1e-9 <= v <= 1.0001:
                        problems.append(f"{where}: {v} is no share ({r['metric']})")
                    if v < 0 and v == v:
                        problems.append(f"{where}: negative {v} ({r['metric']})")
        for a in d["annotations"]["list"]:
            run(f"{name}: annotation", a["expr"].replace("$node", values.get("node", ".*")))
    assert not problems, "\n".join(problems)
