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


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_dashboard_structure_grafana_import_needs(name):
    d = json.loads(render(DASHBOARDS[name]))
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time"):
        assert key in d, key
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", d["uid"])
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"node", "gpu"} <= set(variables)
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    cells = set()
    for p in _panels(d):
        gp = p["gridPos"]
        assert 0 <= gp["x"] < 24 and gp["w"] > 0 and gp["x"] + gp["w"] <= 24 and gp["h"] > 0
        for x in range(gp["x"], gp["x"] + gp["w"]):
            for y in range(gp["y"], gp["y"] + gp["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        assert p["type"] in ("timeseries", "stat", "table", "heatmap", "bargauge")
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(re.fullmatch(r"[A-Z]", r) for r in refs)
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert t["expr"]
    for a in d["annotations"]["list"]:
        assert a["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def _queries() -> list[tuple[str, str, bool]]:
    """(where, PromQL, must return data) from the dashboards and the rules."""
    out = []
    for name, build in DASHBOARDS.items():
        d = json.loads(render(build))
        for p in _panels(d):
            for t in p["targets"]:
                out.append((f"{name}: {p['title']}", t["expr"], True))
        for a in d["annotations"]["list"]:
            out.append((f"{name}: annotation", a["expr"], True))
        for v in d["templating"]["list"]:
            m = re.fullmatch(r"label_values\((.+), \w+\)", v.get("query", ""))
            if m:
                out.append((f"{name}: variable {v['name']}", m.group(1), True))
    with open(RULES) as f:
        for g in yaml.safe_load(f)["groups"]:
            for rule in g["rules"]:
                # Recording rules must produce data; alert conditions need only run.
                out.append((rule.get("record") or rule["alert"], rule["expr"],
                            "record" in rule))
    return out


# Series that exist only after an event the simulated nodes do not produce in a minute.
EVENT_DRIVEN = {"AgentdGpuXid", "AgentdGpuLost", "AgentdGpuDriverLost", "AgentdGpusMissing"}

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


def _substitute(expr: str) -> str:
    return (expr.replace("$__rate_interval", "30s").replace("$node", ".*")
            .replace("$gpu", ".*").replace("$job", ".*"))


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
    for where, expr, needs_data in _queries():
        q = _substitute(expr)
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            problems.append(f"{where}: {e.code} {json.load(e).get('error')}")
            continue
        if doc["status"] != "success":
            problems.append(f"{where}: {doc.get('error')}")
        elif needs_data and where not in EVENT_DRIVEN and not doc["data"]["result"]:
            problems.append(f"{where}: no data for {q}")
    assert not problems, "\n".join(problems)
