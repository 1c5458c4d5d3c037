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

from agentd.dashboards import DASHBOARDS, render
from conftest import agentd_cmd, free_port, need, wait_http

ROOT = os.path.join(os.path.dirname(__file__), "..")
RULES = os.path.join(ROOT, "rules", "agentd.rules.yml")
DASH_DIR = os.path.join(ROOT, "grafana", "dashboards")


def test_promtool_check_rules():
    r = subprocess.run([need("promtool"), "check", "rules", RULES], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


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
            anchor = ann["runbook_url"].split("#")[1]
            assert f"## {rule['alert'].lower()}" in runbook and anchor == rule["alert"].lower()


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
EVENT_DRIVEN = {"AgentdGpuXid", "AgentdGpuLost"}


def _substitute(expr: str) -> str:
    return (expr.replace("$__rate_interval", "30s").replace("$node", ".*")
            .replace("$gpu", ".*").replace("$job", ".*"))


@pytest.mark.prometheus
@pytest.mark.slow
def test_every_expression_runs_against_prometheus_scraping_simulated_nodes(tmp_path, spawn):
    prometheus = need("prometheus")
    ports = {}
    for scenario in ("input-storage", "straggler"):
        port = free_port()
        spawn(agentd_cmd("run", "--simulate", scenario, "--web.listen-address",
                         f"127.0.0.1:{port}", "--analysis.interval", "5s",
                         "--analysis.window", "20s"))
        ports[scenario] = port
    for port in ports.values():
        wait_http(f"http://127.0.0.1:{port}/metrics")
    rules = tmp_path / "agentd.rules.yml"
    with open(RULES) as f:
        doc = yaml.safe_load(f)
    for g in doc["groups"]:
        g["interval"] = "2s"  # evaluate quickly for the test
    rules.write_text(yaml.safe_dump(doc))
    prom_port = free_port()
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports.values())
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 2s\n"
                   f"rule_files: ['{rules}']\n"
                   f"scrape_configs:\n  - job_name: agentd\n    static_configs:\n"
                   f"      - targets: [{targets}]\n")
    spawn([prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{prom_port}"])
    base = f"http://127.0.0.1:{prom_port}"
    wait_http(base + "/-/ready", timeout=20)
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
