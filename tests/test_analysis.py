"""The analysis core: every detector on simulated runs whose bottleneck is known, negatives
included; the simulator's direct window against the real samplers; the CLI's sources,
reports and exit codes."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from agentd.analysis.core import Options, analyze
from agentd.analysis.signals import Signals, from_groups
from agentd.sim import scenario as S
from agentd.sim.model import Episode
from agentd.sim.signals import simulate
from conftest import agentd_cmd

CLASS_SCENARIOS = [n for n in S.library() if S.load(n).klass != "healthy"]
HEALTHY = [n for n in S.library() if S.load(n).klass == "healthy"]


def diagnose(name: str, seed: int | None = 0, seconds: float = 90, skip: float = 30,
             **job) -> tuple:
    sc = S.load(name, seed=seed)
    if job:
        sc = replace(sc, job=replace(sc.job, **job))
    sig, tr = simulate(sc, seconds=seconds)
    return analyze(sig.slice(sig.t[0] + skip, sig.t[-1])), sc, tr


@pytest.mark.parametrize("name", CLASS_SCENARIOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_class_is_named_first(name, seed):
    report, sc, _ = diagnose(name, seed)
    assert report.findings, f"{name}: no finding"
    top = report.findings[0]
    assert top.kind == sc.klass
    assert top.evidence and top.advice and 0 < top.confidence <= 1
    assert top.subject["node"] and top.subject["gpus"]
    assert top.gain["speedup"] >= 1.0


@pytest.mark.parametrize("name", HEALTHY)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_runs_have_no_finding(name, seed):
    report, _, _ = diagnose(name, seed)
    assert report.findings == [], [f.headline() for f in report.findings]


@pytest.mark.parametrize("name", ["input-storage", "input-cpu", "h2d-pcie", "shared-link",
                                  "io-h2d-serialized"])
def test_stall_fraction_within_3_points_of_truth(name):
    report, _, tr = diagnose(name, seed=3)
    k0 = int(30 / tr.dt)
    truth = (tr.stall[-1] - tr.stall[k0]).mean() / (tr.t[-1] - tr.t[k0])
    assert report.findings[0].stall_fraction == pytest.approx(truth, abs=0.03)


def test_mild_storage_stall_of_5_percent_is_found():
    sc = S.load("input-storage")
    # Storage just short of what compute needs: ~5-6% of step time waiting for input.
    bw = 8 * sc.job.storage_bytes_per_step * 4.0 * 0.945
    report, _, tr = diagnose("input-storage", seed=None, storage_bandwidth=bw)
    assert report.findings and report.findings[0].kind == "input_storage"
    assert 0.04 <= report.findings[0].stall_fraction <= 0.08


def test_step_period_and_throughput():
    report, sc, _ = diagnose("healthy-4gpu-2s", seed=None, seconds=120)
    assert report.gpus[0].step_period_seconds == pytest.approx(sc.job.compute_s + 4e9 / 300e9,
                                                               rel=0.05)
    r = analyze(simulate(S.load("input-cpu"), seconds=60)[0],
                Options(samples_per_step=180, price_per_gpu_hour=2.5))
    steps = r.throughput["steps_per_second"]
    assert r.throughput["samples_per_second"] == pytest.approx(steps * 180)
    assert r.lost_cost == pytest.approx(r.lost_gpu_hours * 2.5)


# --- negatives: each detector stays quiet when its signature is incomplete ----------------------


def test_saturated_disk_without_starved_gpus_is_not_input_storage():
    """A backup job saturating the disk while training is compute-bound: no finding."""
    sig, _ = simulate(S.load("healthy-8gpu-250ms"), seconds=60)
    sig.channels["disk.busy:nvme0n1"] = np.full(len(sig.t), 0.99)
    sig.channels["disk.queue:nvme0n1"] = np.full(len(sig.t), 30.0)
    assert analyze(sig).findings == []


def test_busy_cpu_without_starved_gpus_is_not_input_cpu():
    sig, _ = simulate(S.load("healthy-8gpu-250ms"), seconds=60)
    sig.channels["cpu.busy:"] = sig.channels["cpu.count:"] * 0.99
    assert analyze(sig).findings == []


def test_idle_gpu_without_memory_or_process_is_not_idle_allocated():
    sig, _ = simulate(S.load("idle-allocated"), seconds=60)
    for g in sig.gpus():
        del sig.channels[f"gpu.mem_used:{g}"]
    sig.meta["processes"] = {}
    assert [f.kind for f in analyze(sig).findings] == []


def test_comm_wait_and_straggler_need_sm_activity():
    sig, _ = simulate(S.load("comm-wait"), seconds=60)
    for g in sig.gpus():
        del sig.channels[f"gpu.sm_active:{g}"]
    r = analyze(sig)
    assert r.findings == []
    assert any("no SM activity" in n for n in r.notes)


def test_gpu_idle_clock_reason_is_not_throttling():
    sig, _ = simulate(S.load("idle-allocated"), seconds=60)  # gpu_idle bit set throughout
    assert "throttled" not in [f.kind for f in analyze(sig).findings]


def test_refaults_without_starvation_are_not_memory_pressure():
    report, _, _ = diagnose("memory-pressure", seed=None, storage_bandwidth=20e9)
    assert report.findings == []


def test_single_gpu_cannot_straggle():
    report, _, _ = diagnose("straggler", seed=None, gpus=1, straggler_gpu=0)
    assert "straggler" not in [f.kind for f in report.findings]


def test_checkpoint_gaps_are_not_input_stalls():
    report, _, _ = diagnose("checkpoint-eval", seed=None, seconds=150)
    assert report.findings == []


def test_throttled_straggler_reports_the_cause():
    sc = S.load("straggler", seed=None)
    job = replace(sc.job, straggler_factor=1.0,
                  episodes=[Episode(start_s=0, end_s=1e9, gpus=(2,), clock_factor=0.6)])
    sig, _ = simulate(replace(sc, job=job), seconds=60)
    kinds = [f.kind for f in analyze(sig).findings]
    assert "throttled" in kinds and "straggler" in kinds


# --- coarse sources ------------------------------------------------------------------------------


def coarsen(sig: Signals, step: float) -> Signals:
    """What a Prometheus scrape every `step` seconds keeps: means over each step."""
    k = int(round(step / sig.resolution))
    n = len(sig.t) // k
    ch = {}
    import warnings

    for key, v in sig.channels.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps stay NaN
            ch[key] = np.nanmean(v[: n * k].reshape(n, k), axis=1)
    return Signals(sig.t[k - 1: n * k: k], ch, step, "coarse", sig.node, sig.meta)


@pytest.mark.parametrize("name", ["input-storage", "input-cpu", "idle-allocated",
                                  "comm-wait", "throttled"])
def test_coarse_15s_data_still_classifies_and_says_what_it_cannot_see(name):
    sc = S.load(name, seed=0)
    sig, _ = simulate(sc, seconds=240)
    r = analyze(coarsen(sig.slice(sig.t[0] + 30, sig.t[-1]), 15.0))
    assert r.findings and r.findings[0].kind == sc.klass
    assert any("cannot be resolved" in n for n in r.notes)
    assert all(g.step_period_seconds is None for g in r.gpus)


# --- the direct window against the real samplers ---------------------------------------------------


def test_direct_window_agrees_with_real_samplers():
    """agentd/sim/signals.py (used by the benchmark) and the real samplers on a simulated
    node see the same run: the same diagnosis and close numbers."""
    from agentd.gpu.fake import install, uninstall
    from agentd.paths import Paths
    from agentd.samplers import registry
    from agentd.samplers.base import Context
    from agentd.sim.node import SimulatedNode
    from agentd.sim.signals import window_from_trace
    from conftest import FakeClock

    sc = S.load("input-cpu", seed=2)
    clock = FakeClock(1_800_000_000.0)
    node = SimulatedNode(sc, clock=clock)
    install(node.nvml_library())
    try:
        ctx = Context(Paths(node.procfs, node.sysfs), 0.1, 1.0)
        names = ("gpu", "cpu", "storage", "process", "memory", "pressure")
        samplers = {n: registry()[n](ctx, {}) for n in names}
        node.write(0.0)
        for s in samplers.values():
            s.open()
        samplers["gpu"].backend.clock = clock
        rows = {n: [] for n in names}
        times = []
        for k in range(500):
            clock.advance(0.1)
            node.write()
            times.append(clock.t)
            for n, s in samplers.items():
                rows[n].append(s.sample(clock.t, k % 10 == 0) or {})
        groups = {}
        for n in names:
            cols = sorted({c for r in rows[n] for c in r})
            groups[n] = {"interval": 0.1, "t": np.array(times), "columns": cols,
                         "values": np.array([[r.get(c, np.nan) for c in cols] for r in rows[n]])}
        meta = {**samplers["process"].meta(), **samplers["gpu"].meta()}
        real = from_groups(groups, step=0.1, meta=meta).slice(clock.t - 30, clock.t)
        direct_full = window_from_trace(sc, _trace(node), start=node.t0)
        direct = direct_full.slice(clock.t - 30, clock.t)
    finally:
        uninstall()
        node.stop()
    a, b = analyze(real), analyze(direct)
    assert [f.kind for f in a.findings] == [f.kind for f in b.findings] == ["input_cpu"]
    for ga, gb in zip(a.gpus, b.gpus):
        assert ga.busy == pytest.approx(gb.busy, abs=0.03)
    assert a.findings[0].stall_fraction == pytest.approx(b.findings[0].stall_fraction, abs=0.03)
    ea, eb = a.findings[0].evidence, b.findings[0].evidence
    assert ea["loader_saturation"] == pytest.approx(eb["loader_saturation"], abs=0.1)


def _trace(node):
    """The whole trace the node's simulator produced, from its history."""
    from agentd.sim.model import Trace

    h = node.history
    d = h.data
    n = len(h.t)
    return Trace(dt=node.sim.dt, t=h.t[1:], busy=d["busy"][1:], sm_active=d["sm_active"][1:],
                 pcie_rx=d["pcie_rx"][1:], nvlink=d["nvlink"][1:], steps=d["steps"][1:],
                 stall=d["stall"][1:], blame=np.zeros((n - 1, node.scenario.job.gpus)),
                 storage_read=d["storage_read"][1:], storage_ops=d["storage_ops"][1:],
                 storage_busy=d["storage_busy"][1:], storage_weighted=d["storage_weighted"][1:],
                 cache_read=d["cache_read"][1:], worker_cpu=d["worker_cpu"][1:],
                 trainer_cpu=d["trainer_cpu"][1:], gpu_read=d["gpu_read"][1:],
                 io_wait=d["io_wait"][1:], cpu_wait=d["cpu_wait"][1:],
                 clock_factor=d["clock_factor"][1:],
                 memory_held=np.ones((n - 1, node.scenario.job.gpus)), write=d["write"][1:])


# --- the CLI ---------------------------------------------------------------------------------------


def run(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(agentd_cmd(*args), capture_output=True, text=True, timeout=timeout)


def test_record_then_diagnose_recording(tmp_path):
    out = str(tmp_path / "rec.npz")
    r = run("record", "--simulate", "input-cpu", "--duration", "25s", "--out", out)
    assert r.returncode == 0, r.stderr
    r = run("diagnose", "--recording", out)
    assert r.returncode == 1, r.stdout + r.stderr  # findings at or above warning
    assert "input_cpu" in r.stdout and "expected gain" in r.stdout
    r = run("diagnose", "--recording", out, "--json", "--fail-on", "critical")
    doc = json.loads(r.stdout)
    assert doc["findings"][0]["kind"] == "input_cpu"
    assert r.returncode == (1 if doc["findings"][0]["severity"] == "critical" else 0)


def test_diagnose_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "rec.npz")
    assert run("record", "--simulate", "input-storage", "--duration", "15s", "--out",
               out).returncode == 0
    png = tmp_path / "timeline.png"
    r = run("diagnose", "--recording", out, "--plot", str(png))
    assert r.returncode in (0, 1) and png.stat().st_size > 10_000


@pytest.mark.parametrize("args, code, message", [
    (["diagnose", "--recording", "/nonexistent.npz"], 3, "cannot read recording"),
    (["diagnose", "--daemon", "http://127.0.0.1:9"], 3, "cannot reach agentd"),
    (["diagnose", "--prometheus", "http://127.0.0.1:9", "--node", "x"], 3,
     "cannot reach Prometheus"),
    (["diagnose", "--prometheus", "http://127.0.0.1:9"], 2, "needs --node"),
    (["diagnose", "--fail-on", "sometimes"], 2, "invalid choice"),
    (["diagnose", "--prometheus", "http://x", "--node", "n", "--start", "yesterday"], 2,
     "neither Unix seconds nor"),
])
def test_diagnose_errors(tmp_path, args, code, message):
    r = run(*args)
    assert r.returncode == code, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_garbage_recording_is_exit_3(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a recording")
    r = run("diagnose", "--recording", str(bad))
    assert r.returncode == 3 and "not an agentd" in r.stderr
