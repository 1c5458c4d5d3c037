"""The robustness suite's own invariants (bench/robustness): its generator's timelines, what
its emulated samplers and exporters record of them, and that agentd reads both. agentd's
accuracy on it is measured by `python -m bench.robustness` (docs/robustness.md), not here;
the one accuracy check here is that healthy nodes raise no warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.robustness import agentd_metrics as A  # noqa: E402
from bench.robustness import cases as C  # noqa: E402
from bench.robustness import exporters as E  # noqa: E402
from bench.robustness import sampling as S  # noqa: E402
from bench.robustness.pwc import Pwc, Segments, fluid_queue  # noqa: E402
from conftest import agentd_cmd, need  # noqa: E402

pytestmark = pytest.mark.slow

W0 = 1.75e9
SPAN = 240.0


def build(name: str, seed: int = 11, index: int = 0, span: float = SPAN):
    case, tl = C.build(name, seed, index, W0, span)
    return case, tl, C.measure(case, tl)


def column(groups: dict, group: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    g = groups[group]
    return g["t"], g["values"][:, g["columns"].index(key)].astype(float)


def test_segments_add_up_and_integrate_exactly():
    s = Segments()
    s.put(0.0, 2.0, 1.0)
    s.put(1.0, 3.0, 2.0)
    s.add([2.5], [2.75], [4.0])
    p = s.build(0.0, 4.0)
    assert p.at([0.5, 1.5, 2.6, 3.5]).tolist() == [1.0, 3.0, 6.0, 0.0]
    assert p.between(0.0, 4.0) == pytest.approx(2.0 + 4.0 + 1.0)
    assert p.mean(0.5, 1.5) == pytest.approx(2.0)


def test_fluid_queue_conserves_work_and_never_exceeds_capacity():
    demand = Pwc(np.array([0.0, 1.0, 2.0, 5.0]), np.array([3.0, 0.5, 0.0]))
    served = fluid_queue(demand, 2.0)
    assert served.v.max() <= 2.0
    assert served.total() == pytest.approx(demand.total())
    # The backlog of the first second (1 unit) drains during the next ones.
    assert served.between(1.0, 2.0) == pytest.approx(1.5)


@pytest.mark.parametrize("name", ["input-storage", "h2d-bursts", "input-cpu-dp"])
def test_recorded_counters_integrate_to_the_timeline(name):
    case, tl, truth = build(name)
    a, b = case.window
    groups = S.sample_groups(tl, np.random.default_rng(1), a, b)
    gpus = truth.gpus
    for g in gpus:
        t, busy_time = column(groups, "gpu", f"gpu.busy_time:{g}")
        ok = ~np.isnan(busy_time)
        dt = np.diff(t, prepend=np.nan)
        measured = np.nansum(busy_time[ok] * dt[ok]) / np.nansum(dt[ok])
        # Integer-percent samples over 1/6 s periods: the mean is exact to ~1%.
        assert measured == pytest.approx(1 - truth.idle_fraction[g], abs=0.015)
        t, rx = column(groups, "gpu", f"gpu.pcie_rx:{g}")
        moved = np.nansum(rx[1:] * np.diff(t))
        assert moved == pytest.approx(tl.gpu[g]["pcie_rx"].between(t[0], t[-1]), rel=1e-4,
                                      abs=len(t))
        # busy holds the driver's latest sample (integer percent); a tick that collects two
        # samples holds their time-weighted mean.
        _, busy = column(groups, "gpu", f"gpu.busy:{g}")
        pct = busy[~np.isnan(busy)] * 100
        assert pct.min() >= 0 and pct.max() <= 100
        assert np.mean(np.abs(pct - np.round(pct)) < 1e-3) > 0.6
        # The samples that arrived in a tick: their mean and how long ago their periods'
        # middle lies (half a period plus the publishing delay, up to a tick more).
        _, sample = column(groups, "gpu", f"gpu.util_sample:{g}")
        _, age = column(groups, "gpu", f"gpu.util_sample_age:{g}")
        got = ~np.isnan(sample)
        assert got.sum() > 0.4 * len(sample) and np.array_equal(got, ~np.isnan(age))
        assert np.all((age[got] > 0.05) & (age[got] < 0.35))
    for d, m in tl.disks.items():
        t, rd = column(groups, "storage", f"disk.read:{d}")
        assert np.nansum(rd[1:] * np.diff(t)) == pytest.approx(m["read"].between(t[0], t[-1]),
                                                                 rel=1e-3, abs=512 * len(t))
        _, busy = column(groups, "storage", f"disk.busy:{d}")
        assert np.nanmax(busy) <= 1.0
    for pid, p in tl.procs.items():
        key = f"proc.cpu:{pid}"
        if key not in groups["process"]["columns"]:
            continue
        t, cpu = column(groups, "process", key)
        ok = ~np.isnan(cpu)
        dt = np.diff(t, prepend=np.nan)[ok]
        span = (t[ok][0] - dt[0], t[ok][-1])
        # Jiffies (10 ms) per tree: the total is exact to one jiffy.
        assert np.sum(cpu[ok] * dt) == pytest.approx(p["cpu"].between(*span), abs=0.02)
        _, root = column(groups, "process", f"proc.root_cpu:{pid}")
        assert np.sum(root[ok] * dt) == pytest.approx(p["root"].between(*span), abs=0.02)
        assert np.all(root[ok] <= cpu[ok] + 1e-6)


def test_cases_are_what_they_say():
    for i, name in enumerate(C.BUILDERS):
        case, tl, truth = build(name, seed=5, index=i)
        a, b = case.window
        assert set(truth.gpus) <= set(range(case.node.gpus)), name
        if case.healthy:
            assert truth.stall_fraction == 0.0, name
        else:
            assert truth.stall_fraction >= 0.08, (name, truth.stall_fraction)
        if name in ("input-storage", "input-storage-small-reads"):
            (d, m), = tl.disks.items()
            ceiling = case.node.drive(d).read_ceiling(m["request"])
            assert m["read"].mean(a, b) >= 0.9 * ceiling, name
        if name == "healthy-nvme-busy":
            (d, m), = tl.disks.items()
            ratio = m["read"].mean(a, b) / case.node.drive(d).read_ceiling(m["request"])
            assert 0.45 <= ratio <= 0.72, ratio
            busy = S.disk_model(tl, d)["busy"].mean(a, b)
            assert busy > 0.9  # the drive reads ~100% busy with headroom left
        if name == "idle-between-jobs":
            assert all(p["mem"].at(a) < 2**30 for p in tl.gpu.values())
        if case.klass == "idle_allocated":
            for g in truth.gpus:
                assert tl.gpu[g]["mem"].at(a) > 2**30 and truth.idle_fraction[g] == 1.0
        if case.klass == "gpu_lost":
            assert set(tl.lost) == set(truth.origin)
        if name in ("healthy-llm", "healthy-short-steps", "healthy-multinode"):
            # Ordinary gaps between steps: a few percent, not zero.
            assert 0.015 < np.mean(list(truth.idle_fraction.values())) < 0.1, name


# The last draw lost its GPU between two collectives: its peers once went idle instead.
@pytest.mark.parametrize("seed,index,span", [(0, 0, SPAN), (1, 1, SPAN), (2, 2, SPAN),
                                             (1676823680, 32, 600.0)])
def test_peers_of_a_lost_gpu_spin_until_the_window_ends(seed, index, span):
    case, tl, truth = build("gpu-lost", seed=seed, index=index, span=span)
    (k, t_lost), = tl.lost.items()
    a, b = case.window
    after = (b - t_lost) / (b - a)
    assert truth.stall_fraction >= 0.9 * after * (case.node.gpus - 1) / case.node.gpus
    for g in range(case.node.gpus):
        if g != k:
            assert tl.gpu[g]["kernel"].mean(t_lost + 5, b) == pytest.approx(1.0)
            assert tl.gpu[g]["sm"].mean(t_lost + 5, b) < 0.05


def test_cases_are_drawn_from_their_seed():
    a = build("straggler", seed=1)[2]
    b = build("straggler", seed=1)[2]
    c = build("straggler", seed=2)[2]
    assert a.stall_fraction == b.stall_fraction and a.step_period == b.step_period
    assert a.step_period != c.step_period


def test_agentd_reads_the_recordings(tmp_path):
    case, tl, truth = build("gpu-lost")
    groups = S.sample_groups(tl, np.random.default_rng(2), *case.window)
    path = tmp_path / "node.rec"
    S.write_recording(str(path), groups, S.meta(tl, S.ceilings_for(tl)))
    r = subprocess.run(agentd_cmd("diagnose", "--recording", str(path), "--json"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr
    doc = json.loads(r.stdout)
    assert doc["node"] == case.node.host
    assert len(doc["gpus"]) >= case.node.gpus - 1


def _busy_and_diagnosis(tmp_path, om: E.OpenMetrics, query: str, case, truth, host: str,
                        source: str, check=None) -> None:
    """Backfill `om` into a real Prometheus: `query` (an instant query at the window's end)
    gives each GPU's busy share as the truth has it, and `agentd diagnose --prometheus`
    reads the node's series as `source`."""
    need("promtool")
    need("prometheus")
    a, b = case.window
    path = tmp_path / "node.om"
    with open(path, "w") as f:
        om.write(f)
        f.write("# EOF\n")
    E.backfill(str(path), str(tmp_path / "tsdb"))
    prom = E.Prometheus(str(tmp_path / "tsdb"), str(tmp_path))
    try:
        q = urllib.parse.urlencode({"query": query, "time": f"{b:.3f}"})
        with urllib.request.urlopen(f"{prom.url}/api/v1/query?{q}", timeout=30) as resp:
            result = json.load(resp)["data"]["result"]
        assert len(result) == case.node.gpus
        for s in result:
            g = int(s["metric"]["gpu"])
            assert float(s["value"][1]) == pytest.approx(1 - truth.idle_fraction[g], abs=0.02)
        r = subprocess.run(agentd_cmd("diagnose", "--prometheus", prom.url, "--node", host,
                                      "--start", f"{a:.0f}", "--end", f"{b:.0f}", "--json"),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode in (0, 1), r.stderr
        doc = json.loads(r.stdout)
        assert doc["source"] == source
        assert len(doc["gpus"]) == case.node.gpus
        if check is not None:
            check(prom.url)
    finally:
        prom.stop()


@pytest.mark.prometheus
def test_backfilled_exporter_series_are_queryable(tmp_path):
    case, tl, truth = build("input-cpu-dp")
    a, b = case.window
    om = E.OpenMetrics()
    host = "dgx-h100-007.rack2.cluster.example"
    E.exporters_series(tl, a - C.LEAD + 5, b, 5.0, "full", np.random.default_rng(3), om, host)
    _busy_and_diagnosis(
        tmp_path, om, f'avg by (gpu) (avg_over_time(DCGM_FI_PROF_GR_ENGINE_ACTIVE'
                      f'{{hostname=~"{host}|",Hostname=~"{host}|"}}[{int(b - a)}s]))',
        case, truth, host, "prometheus (dcgm-exporter + node_exporter)")


def test_agentd_counters_integrate_each_reading_over_the_span_it_covers():
    t = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    # GPM-like: a mean every other tick, covering the 0.2 s since the previous one.
    gpm = np.array([np.nan, np.nan, 0.5, np.nan, 1.0, np.nan])
    assert A.integrate(t, gpm).tolist() == pytest.approx([0, 0, 0, 0, 0.2, 0.2])
    busy = np.array([np.nan, 1.0, 1.0, 0.0, 0.5, 1.0])
    assert A.integrate(t, busy)[-1] == pytest.approx(0.1 + 0 + 0.05 + 0.1)
    # A scrape serves the value as of the last tick before it; gauges hold between readings.
    assert A.at_scrapes(t, np.arange(6.0), np.array([-1, 0.25, 9])).tolist()[1:] == [2, 5]
    assert A.held(np.array([np.nan, 3, np.nan, 4])).tolist()[1:] == [3, 3, 4]


@pytest.mark.prometheus
def test_backfilled_agentd_series_are_queryable(tmp_path):
    """agentd's own /metrics, as the daemon would have served them: the busy counter's rate
    is each GPU's busy share, and `agentd diagnose --prometheus` reads them as agentd's."""
    case, tl, truth = build("input-cpu-one-rank")
    a, b = case.window
    rng = np.random.default_rng(5)
    groups = S.sample_groups(tl, rng, a - C.LEAD + 5, b)
    om = E.OpenMetrics()
    host = "dgx-h100-008.rack2.cluster.example"
    A.agentd_series(tl, groups, S.meta(tl, S.ceilings_for(tl)), a - C.LEAD + 5, b, 5.0, rng,
                    om, host)
    _busy_and_diagnosis(
        tmp_path, om, f'rate(agentd_gpu_busy_seconds_total{{instance="{host}:9101"}}'
                      f'[{int(b - a)}s])', case, truth, host, "prometheus (agentd)",
        check=lambda url: _one_tree_per_rank(url, host, case))


@pytest.mark.prometheus
def test_the_daemons_findings_reach_diagnose_through_prometheus(tmp_path):
    """The daemon's rolling analysis (every 10 s over the last minute of its 10 Hz window)
    served as agentd_finding_*: read back at 5 s scrapes, it names the loading that
    alternates with compute, which the 5 s series alone show only as idle time."""
    from agentd.analysis.core import analyze
    from agentd.diagnose.sources.prometheus_agentd import AgentdPrometheusSource

    case, tl, truth = build("io-h2d-serialized")
    a, b = case.window
    rng = np.random.default_rng(6)
    groups = S.sample_groups(tl, rng, a - C.LEAD + 5, b)
    meta = S.meta(tl, S.ceilings_for(tl))
    reports = A.daemon_reports(groups, meta, a - C.LEAD + 5, b)
    # The looks as the daemon makes them: every 10 s from 30 s after its start, the first
    # running the analysis.
    assert np.diff([t for t, _, _ in reports]) == pytest.approx(10.0) and reports[0][2]
    named = [r["findings"][0]["kind"] for t, r, _ in reports if t > a and r["findings"]]
    om = E.OpenMetrics()
    host = "dgx-h100-009.rack2.cluster.example"
    A.agentd_series(tl, groups, meta, a - C.LEAD + 5, b, 5.0, rng, om, host, reports)

    def check(url: str) -> None:
        from agentd.analysis import daemon_view

        sig = AgentdPrometheusSource(url, host, a, b).read()
        level = sig.get("daemon.finding", f"io_h2d_serialized@{truth.gpus[0]}")
        assert level is not None
        # Served while current: every step of the range has a report, warning or worse in
        # the share of runs that named it ...
        assert np.isfinite(level).mean() > 0.95
        share = named.count("io_h2d_serialized") / len(named)
        assert np.mean(level[np.isfinite(level)] >= 2) == pytest.approx(share, abs=0.15)
        top = analyze(sig).findings[0]
        assert top.kind in truth.accept and top.evidence["daemon_runs_share"] >= 0.5
        assert "10 Hz" in top.summary
        # ... and the same share and stall at a step of a minute (12 scrapes a step): what
        # the step's scrapes served, not whether one of them served it.
        view = {h.kind: h for h in daemon_view.read(sig).persistent}
        coarse = AgentdPrometheusSource(url, host, a, b, step=60.0).read()
        got = daemon_view.read(coarse)
        assert "io_h2d_serialized" in {h.kind for h in got.persistent}
        for h in got.persistent + got.transient:
            assert h.kind in view, h
            assert h.share == pytest.approx(view[h.kind].share, abs=0.1)
            assert h.stall == pytest.approx(view[h.kind].stall, abs=0.05)

    _busy_and_diagnosis(
        tmp_path, om, f'rate(agentd_gpu_busy_seconds_total{{instance="{host}:9101"}}'
                      f'[{int(b - a)}s])', case, truth, host, "prometheus (agentd)", check)


@pytest.mark.prometheus
def test_hostile_finding_series_are_ignored_or_bounded(tmp_path):
    """What the daemon's findings read back from is a server's data, not agentd's word: a
    NaN or 0 value names nothing, an unknown class or GPU is ignored, a duplicate scrape
    (two jobs) counts once, out-of-range figures are bounded, and a cause on GPUs the
    series show fed is a note. On a healthy node."""
    from agentd.analysis.core import analyze
    from agentd.diagnose.sources.prometheus_agentd import AgentdPrometheusSource

    case, tl, truth = build("healthy-cpu-heavy")  # every GPU idles 3%: fed
    a, b = case.window
    rng = np.random.default_rng(7)
    groups = S.sample_groups(tl, rng, a - C.LEAD + 5, b)
    om = E.OpenMetrics()
    host = "dgx-h100-010.rack2.cluster.example"
    A.agentd_series(tl, groups, S.meta(tl), a - C.LEAD + 5, b, 5.0, rng, om, host)
    ts = np.arange(a - 60, b, 5.0) + 1.3
    one = np.ones(len(ts))

    def put(name: str, labels: str, v: np.ndarray, job: str = "agentd") -> None:
        om.add(name, "gauge", name, f'{labels},instance="{host}:9101",job="{job}"', ts, v)

    for g in range(case.node.gpus):
        put("agentd_gpu_stall_ratio", f'gpu="{g}"', 0.02 * one)
    active = "agentd_finding_active"
    put(active, 'kind="io_h2d_serialized",severity="warning",gpu="0"', np.full(len(ts), np.nan))
    put(active, 'kind="input_storage",severity="critical",gpu="1"', 0 * one)
    put(active, 'kind="x\\"y",severity="warning",gpu="2"', one)
    put(active, 'kind="comm_wait",severity="warning",gpu="99"', one)
    fed = 3
    put(active, f'kind="io_h2d_serialized",severity="warning",gpu="{fed}"', one)
    put("agentd_finding_stall_ratio", f'kind="io_h2d_serialized",gpu="{fed}"', 1e300 * one)
    put("agentd_finding_confidence_ratio", f'kind="io_h2d_serialized",gpu="{fed}"',
        1000 * one)
    for job in ("agentd", "agentd-dup"):
        put(active, 'kind="comm_wait",severity="warning",gpu="4"', one, job)
        put("agentd_finding_stall_ratio", 'kind="comm_wait",gpu="4"', 0.3 * one, job)
        put("agentd_finding_confidence_ratio", 'kind="comm_wait",gpu="4"', 0.8 * one, job)

    def check(url: str) -> None:
        r = analyze(AgentdPrometheusSource(url, host, a, b).read())
        warned = [(f.kind, f.gpus) for f in r.findings if f.severity != "info"]
        assert warned == [("comm_wait", ["4"])], [f.headline() for f in r.findings]
        assert r.findings[0].stall_fraction == pytest.approx(0.3, abs=0.01)
        assert r.findings[0].confidence == pytest.approx(0.8)
        notes = " ".join(r.notes)
        assert f"held io_h2d_serialized on GPU {fed} (100% of its reports); these series show " \
            "no significant stall" in notes, r.notes
        for word in ("x\"y", "GPU 99", "input_storage", "GPU 0 "):
            assert word not in notes
        json.dumps(r.to_json(), allow_nan=False)

    _busy_and_diagnosis(
        tmp_path, om, f'rate(agentd_gpu_busy_seconds_total{{instance="{host}:9101"}}'
                      f'[{int(b - a)}s])', case, truth, host, "prometheus (agentd)", check)


def _one_tree_per_rank(url: str, host: str, case) -> None:
    """The job's trees per GPU (agentd_gpu_process_*) give each rank a tree of its own, and
    the rank whose loader is the bottleneck stands out from the job's mean tree."""
    from agentd.diagnose.sources.prometheus_agentd import AgentdPrometheusSource

    sig = AgentdPrometheusSource(url, host, *case.window).read()
    trees = sig.meta["processes"]
    assert sorted(g for info in trees.values() for g in info["gpus"]) == \
        list(range(case.node.gpus))
    assert all(k.endswith(f",gpu={info['gpus'][0]}") for k, info in trees.items())
    cpu = {info["gpus"][0]: float(np.nanmean(sig.get("proc.cpu", k)) /
                                  max(float(np.nanmean(sig.get("proc.members", k))) - 1, 1))
           for k, info in trees.items()}
    slow = case.origin[0]
    assert cpu[slow] > 1.5 * np.median([v for g, v in cpu.items() if g != slow]), cpu


HEALTHY = [n for n in C.BUILDERS if n.startswith(("healthy", "idle-between", "job-"))]


# Was xfail(strict=False) until the analysis rewrite of issue #8 (356b220) landed; it passes
# since, and guards what the rewrite achieved.
@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_nodes_raise_no_warning(name, tmp_path):
    from agentd.analysis.core import analyze
    from agentd.diagnose.sources.recording import RecordingSource

    case, tl, truth = build(name, seed=8)
    assert case.healthy
    groups = S.sample_groups(tl, np.random.default_rng(4), *case.window)
    path = tmp_path / "node.rec"
    S.write_recording(str(path), groups, S.meta(tl))
    report = analyze(RecordingSource(str(path)).read()).to_json()
    warnings = [f for f in report["findings"] if f["severity"] in ("warning", "critical")]
    assert not warnings, [(f["kind"], f["summary"]) for f in warnings]


def test_a_drive_read_without_pause_is_no_storage_bound_at_the_moderate_line(tmp_path):
    """Fresh seed 468325879, healthy-nvme-busy: loaders read without pause from an NVMe at
    65% of its link (pressure "some" 100%, workers in D state 56% of the time) and keep up;
    the GPUs idle 4-5% in their ordinary gaps. Four of the daemon's 60 s runs warned
    input_storage at a stall of 5.0%, within the noise of the moderate line. Without a
    ceiling reached, waiting readers name storage only for a stall clearly above it."""
    from agentd.analysis.core import analyze_rolling
    from agentd.diagnose.sources.recording import RecordingSource

    seed, index = 468325879, 2
    case, tl = C.build("healthy-nvme-busy", seed, index, 1.75e9 + (seed % 1000) * 3600.0,
                       600.0)
    a, b = case.window
    groups = S.sample_groups(tl, np.random.default_rng([seed, index, 7]), a, b)
    path = tmp_path / "node.rec"
    S.write_recording(str(path), groups, S.meta(tl, S.ceilings_for(tl) if case.ceilings
                                                else None))
    sig = RecordingSource(str(path)).read()
    for end in (150, 510, 520, 530):  # the runs that warned
        t = float(sig.t[0]) + end
        report = analyze_rolling(sig.slice(t - 60, t))
        assert not [f.kind for f in report.findings if f.severity != "info"], end


def test_reuse_scores_the_kept_recordings_without_rewriting_them(tmp_path, capsys):
    """--reuse diagnoses what an earlier run with the same seed kept in its workdir (to score
    kept data with changed code); it rewrites nothing, and needs the seed and workdir."""
    from bench.robustness import run

    with pytest.raises(SystemExit) as e:
        run.main(["--reuse"])
    assert e.value.code == 2
    args = ["--seed", "11", "--cases", "healthy-llm", "--sources", "recording",
            "--duration", "120", "--workdir", str(tmp_path)]
    assert run.main(args) == 0
    first = capsys.readouterr().out
    kept = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.rec")}
    assert len(kept) == 4
    assert run.main(args + ["--reuse"]) == 0
    again = capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.rec")} == kept
    table = [line for line in first.splitlines() if line.startswith("recording")]
    assert table and table == [line for line in again.splitlines()
                               if line.startswith("recording")]
    # The daemon's rolling analysis replayed over the full recording (every 10 s over the
    # last 60 s of ~120 s: 6 runs), scored as the alerts would see it.
    assert "  healthy: 0 of 6 runs warned, on 0 of 1 cases" in first.splitlines()
