"""Cheap at scale: `agentd diagnose --cluster` over a 512-node, 4,096-GPU hour in a local
Prometheus.

Sixteen 32-node jobs (8 GPUs each) of dcgm-exporter (default counters) and node_exporter
(diskstats, pressure, cpu, infiniband) series at a 15 s scrape, four of them with a planted
cause (agentd/cluster/synth.py), backfilled with promtool (cached between runs), then
diagnosed through the HTTP API as an operator would. Prints the queries, series and bytes
fetched, the wall time per phase (discovering the families, fetching the per-node summaries,
assembling them, the flagged nodes' evidence; the analysis' CPU), the CPU time of agentd and
of Prometheus answering it, the load average, and whether the planted nodes were named.
Goal: under 10 s.

    python bench/cluster_scale.py [--nodes 512] [--keep DIR] [--runs 2] [--per-query]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agentd.cluster.synth import simulate_job, write_exporters  # noqa: E402

START = 1_750_000_000.0
CAUSES = ["throttled", "slow_link", "input_starved", "slow_gpu"]


def build(tsdb: str, nodes: int, seed: int, per_job: int = 32) -> list[tuple[str, str]]:
    """Backfill the jobs into tsdb; the planted (node, cause) pairs."""
    rng = np.random.default_rng(seed)
    truth = []
    work = tempfile.mkdtemp(prefix="cluster-scale-")
    try:
        for j in range(nodes // per_job):
            cause = CAUSES[j % len(CAUSES)] if j < 4 else None
            sim = simulate_job(rng, per_job, cause, START, seconds=3600, job=f"train{j:02d}",
                               onset=900.0, namespace=f"team{j % 4}")
            if cause:
                truth.append((sim.truth.node, cause))
            om = os.path.join(work, f"job{j}.om")
            with open(om, "w") as f:
                write_exporters([sim], f)
            r = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", om,
                                tsdb], capture_output=True, text=True)
            os.unlink(om)
            if r.returncode != 0:
                raise SystemExit(f"promtool failed: {r.stderr[-500:]}")
            print(f"  backfilled job {j + 1}/{nodes // per_job}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(tsdb, "truth.json"), "w") as f:
        json.dump(truth, f)
    return truth


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_query(url: str) -> None:
    """Each query of one diagnosis, one at a time, with Prometheus' own statistics (samples
    read, evaluation time), the reply's bytes and series and the JSON decoding time here."""
    from agentd.cluster.source import ClusterSource
    from agentd.diagnose.sources.promclient import PromClient

    rows = []

    class Measured(PromClient):
        def _data(self, path, params):
            t = time.monotonic()
            body = urllib.request.urlopen(f"{self.url}{path}?" + urllib.parse.urlencode(
                {**params, "stats": "all"}, doseq=True), timeout=300).read()
            wall = time.monotonic() - t
            t = time.monotonic()
            doc = json.loads(body)
            decode = time.monotonic() - t
            self.queries += 1
            self.bytes += len(body)
            data = doc["data"]
            st = data.get("stats", {}) if isinstance(data, dict) else {}
            rows.append((wall, decode, len(body), len(data.get("result", [])) if
                         isinstance(data, dict) else len(data),
                         st.get("samples", {}).get("totalQueryableSamples", 0),
                         st.get("timings", {}).get("evalTotalTime", 0.0), path.split("/")[-1],
                         params.get("query", str(params.get("match[]", ""))))[:100])
            return data

    src = ClusterSource(Measured(url), START, START + 3600, parallel=1)
    fleet, _ = src.read()
    print("per query (one at a time): wall, Prometheus eval, samples read, series, bytes, "
          "JSON decode here")
    for r in sorted(rows, key=lambda r: -r[0]):
        print(f"  {r[0]:5.2f} s  eval {r[5]:5.2f} s  {r[4]:>9,} samples  {r[3]:>5} series  "
              f"{r[2] / 1e6:5.2f} MB  decode {r[1]:4.2f} s  {r[6]}: {r[7]}")
    print(f"  total {sum(r[0] for r in rows):.2f} s wall, {sum(r[5] for r in rows):.2f} s "
          f"eval, {sum(r[4] for r in rows):,} samples, {sum(r[2] for r in rows) / 1e6:.1f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=512)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", default=os.path.join(tempfile.gettempdir(), "agentd-cluster-scale"),
                    help="where the backfilled TSDB is kept between runs")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--per-query", action="store_true",
                    help="then each query alone, with Prometheus' samples and eval time")
    a = ap.parse_args()
    tsdb = os.path.join(a.keep, f"n{a.nodes}-s{a.seed}")
    if not os.path.exists(os.path.join(tsdb, "truth.json")):
        shutil.rmtree(tsdb, ignore_errors=True)
        os.makedirs(tsdb)
        t = time.monotonic()
        build(tsdb, a.nodes, a.seed)
        print(f"backfill: {time.monotonic() - t:.0f} s", file=sys.stderr)
    with open(os.path.join(tsdb, "truth.json")) as f:
        truth = {tuple(x) for x in json.load(f)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = os.path.join(a.keep, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write("global:\n  scrape_interval: 15s\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={cfg}",
                             f"--storage.tsdb.path={tsdb}", f"--web.listen-address=127.0.0.1:{port}",
                             "--storage.tsdb.retention.time=100000d"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/-/ready", timeout=1).read()
                break
            except OSError:
                time.sleep(0.5)
        # Let start-up (head replay, compaction of the backfilled blocks) settle.
        idle = _cpu_of(prom.pid)
        while True:
            time.sleep(5)
            now = _cpu_of(prom.pid)
            if now - idle < 0.5:
                break
            idle = now
        # An installed agentd has its bytecode compiled; with PYTHONDONTWRITEBYTECODE set (as
        # on the team's machines) a source tree would compile ~70 modules at every start.
        subprocess.run([sys.executable, "-m", "compileall", "-q",
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                     "agentd")], env={**os.environ,
                                                      "PYTHONDONTWRITEBYTECODE": ""})
        print(f"cluster scale: {a.nodes} nodes, {a.nodes * 8} GPUs, 1 h at a 15 s scrape "
              f"(dcgm-exporter + node_exporter), Prometheus {url}; machine: {os.cpu_count()} "
              "CPUs shared with other work (figures are from a loaded machine)")
        for run in range(a.runs):
            p0 = _cpu_of(prom.pid)
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "agentd", "diagnose", "--prometheus", url,
                                "--cluster", "--start", f"{START:.0f}", "--end",
                                f"{START + 3600:.0f}", "--json"], capture_output=True,
                               text=True)
            wall = time.monotonic() - t
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            p1 = _cpu_of(prom.pid)
            if r.returncode not in (0, 1):
                print(r.stderr)
                return 1
            doc = json.loads(r.stdout)
            q = doc["query"]
            named = {(f["subject"]["node"], f["kind"]) for f in doc["findings"]}
            ph = q.get("phases", {})
            cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
            print(f"  run {run + 1}: {wall:.1f} s wall (goal < 10 s), load {os.getloadavg()[0]:.1f}: "
                  f"{q['queries']} queries, {q['series']} series, {q['bytes'] / 1e6:.1f} MB; "
                  f"agentd CPU {cpu:.1f} s, Prometheus CPU {p1 - p0:.1f} s; planted found "
                  f"{len(named & truth)}/{len(truth)}, other findings {len(named - truth)}\n"
                  "    wall per phase: " + ", ".join(
                      f"{k} {ph[k]:.2f} s" for k in ("discover", "fetch", "assemble",
                                                     "evidence") if k in ph) +
                  f"; analysis CPU {ph.get('analysis_cpu', float('nan')):.2f} s; "
                  f"start-up, rendering and the rest {wall - q['seconds'] - ph.get('analysis_cpu', 0):.2f} s")
        if a.per_query:
            per_query(url)
    finally:
        prom.terminate()
        prom.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
