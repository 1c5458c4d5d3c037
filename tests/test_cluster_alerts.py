"""Alerts end to end: a real Prometheus scrapes four agentd nodes of one job, evaluates
agentd's generated rules, and a real Alertmanager delivers the straggler and starvation
alerts to a webhook receiver, grouped by job: one notification per alert and job, not one
per GPU.

The nodes' /metrics are served here as agentd writes them (the counters grow with wall time):
n4's GPUs compute 4/3 as long as their peers at 78% of their clocks (throttled), and n2's
rolling analysis finds its 8 GPUs starved by storage (agentd_finding_active per GPU) while
they idle a fifth of the time (the peers spin)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import agentd_cmd, free_port, need, wait_http

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

T0 = time.time()


def exposition(node: int) -> str:
    t = time.time() - T0
    tensor = 0.4 if node == 4 else 0.3
    clock = 1.4e9 if node == 4 else 1.8e9
    lines = []
    for name, kind in (("agentd_gpu_busy_seconds_total", "counter"),
                       ("agentd_gpu_tensor_active_seconds_total", "counter"),
                       ("agentd_gpu_sm_clock_hertz", "gauge"),
                       ("agentd_gpu_process_memory_used_bytes", "gauge"),
                       ("agentd_finding_active", "gauge")):
        lines.append(f"# TYPE {name} {kind}")
        for g in range(8):
            gpu = f'gpu="{g}",uuid="GPU-{node}-{g}"'
            job = f'namespace="ml",pod="train-worker-{node - 1}",container="main"'
            if name == "agentd_gpu_busy_seconds_total":
                lines.append(f"{name}{{{gpu}}} {t * (0.8 if node == 2 else 1.0):.3f}")
            elif name == "agentd_gpu_tensor_active_seconds_total":
                lines.append(f"{name}{{{gpu}}} {t * tensor:.3f}")
            elif name == "agentd_gpu_sm_clock_hertz":
                lines.append(f"{name}{{{gpu}}} {clock:.0f}")
            elif name == "agentd_gpu_process_memory_used_bytes":
                lines.append(f"{name}{{{gpu},{job}}} 1e10")
            elif node == 2:
                lines.append(f'{name}{{kind="input_storage",severity="warning",{gpu}}} 1')
    return "\n".join(lines) + "\n"


class Nodes:
    def __init__(self):
        self.servers = []
        for node in range(1, 5):
            class H(BaseHTTPRequestHandler):
                n = node

                def do_GET(self):
                    body = exposition(self.n).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.end_headers()
                    self.wfile.write(body)

                def log_message(self, *a):
                    pass

            srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            self.servers.append(srv)

    def targets(self) -> list[str]:
        return [f"127.0.0.1:{s.server_address[1]}" for s in self.servers]

    def close(self):
        for s in self.servers:
            s.shutdown()


class Receiver:
    def __init__(self):
        self.notifications: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                outer.notifications.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/hook"


def test_alertmanager_delivers_one_notification_per_job_and_alert(tmp_path, spawn):
    prometheus, alertmanager = need("prometheus"), need("prometheus-alertmanager")
    nodes, hook = Nodes(), Receiver()
    try:
        rules = tmp_path / "agentd.rules.yml"
        (tmp_path / "rules.toml").write_text(
            'recording_interval = "1s"\nrate_window = "10s"\nholdback_for = "5s"\n'
            'starved_for = "5s"\nfinding_gap = "5s"\n')
        r = subprocess.run(agentd_cmd("rules", "--config", str(tmp_path / "rules.toml"),
                                      "--selector", 'job="agentd"', "--out", str(rules)),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        am_port = free_port()
        (tmp_path / "am.yml").write_text(f"""
route:
  receiver: hook
  group_by: [alertname, slurm_job_id, namespace, workload, systemd_unit]
  group_wait: 2s
  group_interval: 5s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {hook.url}
        send_resolved: false
""")
        spawn([alertmanager, f"--config.file={tmp_path / 'am.yml'}",
               f"--storage.path={tmp_path / 'am'}",
               f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="])
        wait_http(f"http://127.0.0.1:{am_port}/-/ready", timeout=30)
        targets = ", ".join(f"'{t}'" for t in nodes.targets())
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ['{rules}']
alerting:
  alertmanagers:
    - static_configs:
        - targets: ['127.0.0.1:{am_port}']
scrape_configs:
  - job_name: agentd
    static_configs:
      - targets: [{targets}]
""")
        spawn([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
               f"--storage.tsdb.path={tmp_path / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{prom_port}"])
        wait_http(f"http://127.0.0.1:{prom_port}/-/ready", timeout=30)
        scraping_since = time.monotonic()
        # Wait for both alerts on both nodes (Alertmanager may send a group's alerts in
        # more than one notification as they arrive: one group, updated, is one page).
        want = {(nodes.targets()[3], "throttled"), (nodes.targets()[1], "idle")}
        deadline = time.monotonic() + 180

        def seen(alertname: str) -> list[dict]:
            return [a for n in hook.notifications if n["groupLabels"].get("alertname") ==
                    alertname for a in n["alerts"]]

        while time.monotonic() < deadline:
            hold = {(a["labels"]["instance"], a["labels"]["kind"])
                    for a in seen("AgentdNodeHoldingJobBack")}
            if want <= hold and len(seen("AgentdGpuInputStarved")) >= 8:
                break
            time.sleep(1)
        groups: dict[str, set] = {}
        for n in hook.notifications:
            groups.setdefault(n["groupLabels"]["alertname"], set()).add(n["groupKey"])
        hold = seen("AgentdNodeHoldingJobBack")
        assert {(a["labels"]["instance"], a["labels"]["kind"]) for a in hold} == want, hold
        # One group (one page) per alert and job: n4 throttled and n2 idling (its starved GPUs
        # idle while their peers spin), each alert per node, never per GPU.
        assert len(groups["AgentdNodeHoldingJobBack"]) == 1, hook.notifications
        assert {(a["labels"]["namespace"], a["labels"]["workload"]) for a in hold} == {
            ("ml", "train")}
        assert all("gpu" not in a["labels"] for a in hold)
        # Eight GPUs starved on one node of one job: one group, the job's, with its 8 alerts.
        starved = seen("AgentdGpuInputStarved")
        assert len(groups["AgentdGpuInputStarved"]) == 1, [n["groupLabels"] for n in
                                                            hook.notifications]
        assert {a["labels"]["gpu"] for a in starved} == {str(g) for g in range(8)}
        assert {a["labels"]["instance"] for a in starved} == {nodes.targets()[1]}
        assert {a["labels"]["workload"] for a in starved} == {"train"}
        # The same Prometheus through `diagnose --cluster`, on agentd's own metrics (the four
        # nodes share a host here: --node-label instance names them apart).
        # ... once Prometheus holds the 45 s range and the 1 m rate window before it (T0 is
        # when this module was imported, maybe long before this test when the suite runs).
        while time.monotonic() - scraping_since < 60:
            time.sleep(1)
        r = subprocess.run(agentd_cmd("diagnose", "--prometheus",
                                      f"http://127.0.0.1:{prom_port}", "--cluster", "--last",
                                      "45s", "--step", "3s", "--window", "1m", "--node-label",
                                      "instance", "--json"),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        assert doc["query"]["flavour"] == "agentd"
        named = {(f["subject"]["node"], f["kind"]) for f in doc["findings"]}
        assert named == {(nodes.targets()[3], "throttled"), (nodes.targets()[1], "straggler")}
        assert doc["jobs"][0]["job"] == "namespace=ml,workload=train"
        assert doc["jobs"][0]["gpus"] == 32
        # A 3 s step is finer than the rules' 10 s rates: the raw series. At a 10 s step the
        # rules' per (node, job) series stand for them, and name the same nodes.
        assert doc["query"]["recording_rules"] == []
        r = subprocess.run(agentd_cmd("diagnose", "--prometheus",
                                      f"http://127.0.0.1:{prom_port}", "--cluster", "--last",
                                      "45s", "--step", "10s", "--window", "1m",
                                      "--node-label", "instance", "--json"),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        assert doc["query"]["recording_rules"] == [
            "agentd:job_node_gpu_activity:ratio_max_rate10s",
            "agentd:job_node_gpu_busy:ratio_min_rate10s",
            "agentd:job_node_gpu_clock:hertz_min_rate10s"]
        assert {(f["subject"]["node"], f["kind"]) for f in doc["findings"]} == named
        assert doc["jobs"][0]["job"] == "namespace=ml,workload=train"
        assert doc["jobs"][0]["gpus"] == 32
    finally:
        nodes.close()
        hook.srv.shutdown()
