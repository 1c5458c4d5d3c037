"""The training-pipeline simulator: conservation, agreement with the analytic throughput,
ground truth, the scenario library, and the simulated node served through the real samplers."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from agentd.sim import scenario as S
from agentd.sim.model import (BLAME, Episode, JobParams, Simulator,
                              analytic_throughput, speedup_if_removed, stage_rates)

BASE = JobParams(gpus=8, compute_jitter=0.0)

STEADY = {
    "compute-bound": BASE,
    "storage-bound": replace(BASE, storage_bandwidth=0.6e9),
    "cpu-bound": replace(BASE, cpu_per_sample_s=8e-3, cores=64),
    "h2d-bound": replace(BASE, pcie_bandwidth=1.0e9, h2d_bytes_per_sample=1.5e6),
    "serialized": replace(BASE, gpus=1, prefetch_depth=0, storage_bandwidth=3e9),
    "no-device-prefetch": replace(BASE, prefetch_to_device=False, h2d_bytes_per_sample=3e6),
    "uplink-bound": replace(BASE, shared_uplink_bandwidth=2e9, h2d_bytes_per_sample=1.5e6,
                            storage_bandwidth=20e9),
    "collectives": replace(BASE, collective_bytes=2e9, collective_bandwidth=100e9),
    "straggler": replace(BASE, collective_bytes=1e8, straggler_gpu=3, straggler_factor=1.4),
    "20 ms steps": replace(BASE, compute_s=0.02, batch_size=32),
    "2 s steps, 4 GPUs": replace(BASE, gpus=4, compute_s=2.0, batch_size=512),
    "peer wait": replace(BASE, collective_bytes=5e8, collective_bandwidth=4e10,
                         peer_wait_s=0.02),
}


@pytest.mark.parametrize("name", list(STEADY))
def test_throughput_matches_analytic(name):
    p = STEADY[name]
    sim = Simulator(p)
    sim.run(15.0)  # warm up: queues fill
    long = 60.0 if p.compute_s < 1 else 120.0
    tr = sim.run(long)
    rate = (tr.steps[-1] - tr.steps[0]) / (tr.t[-1] - tr.t[0])
    assert rate.mean() == pytest.approx(analytic_throughput(p), rel=0.02)


def test_conservation():
    p = replace(BASE, storage_bandwidth=0.8e9, cpu_per_sample_s=4e-3, cores=48)
    sim = Simulator(p)
    tr = sim.run(40.0)
    c = sim.count
    for i in range(p.gpus):
        # Batches flow: read = preprocessed + waiting to be; preprocessed = copies started +
        # ready in host memory; copies started = computed + on the device or in flight.
        assert c["read"][i] == pytest.approx(c["prepped"][i] + sim.read_q[i], abs=1e-6)
        assert c["prepped"][i] == pytest.approx(c["copy_started"][i] + sim.ready_q[i], abs=1e-6)
        in_flight = sim.dev_slot[i] + (sim.dev_copy_left[i] > 0)
        assert c["copy_started"][i] == pytest.approx(c["computed"][i] + in_flight, abs=1e-6)
        in_progress = sim.phase[i] != 0  # computing, at the barrier or in the collective
        assert c["computed"][i] == pytest.approx(tr.steps[-1, i] + in_progress, abs=1e-6)
    # Bytes: what storage delivered is what the GPUs' jobs read, and what the batches needed.
    assert tr.storage_read[-1] == pytest.approx(tr.gpu_read[-1].sum(), rel=1e-9)
    assert tr.storage_read[-1] == pytest.approx(sum(c["read"]) * p.storage_bytes_per_step,
                                                rel=1e-9)
    # PCIe carried exactly one batch per copy.
    copied = np.array(c["copy_started"]) - (np.array(sim.dev_copy_left) > 0)
    done_bytes = tr.pcie_rx[-1] - (p.h2d_bytes_per_step - np.array(sim.dev_copy_left)) * \
        (np.array(sim.dev_copy_left) > 0)
    assert done_bytes == pytest.approx(copied * p.h2d_bytes_per_step, rel=1e-6)
    # Time: every GPU's time is busy, stalled or (with collectives off) nothing else.
    assert tr.busy[-1] + tr.stall[-1] == pytest.approx(np.full(p.gpus, 40.0), abs=0.02)


@pytest.mark.parametrize("params, stage", [
    (replace(BASE, storage_bandwidth=0.6e9), "storage"),
    (replace(BASE, cpu_per_sample_s=8e-3, cores=64), "cpu"),
    (replace(BASE, pcie_bandwidth=1.0e9, h2d_bytes_per_sample=1.5e6), "h2d"),
    (replace(BASE, gpus=1, prefetch_depth=0, storage_bandwidth=3e9), "serialized"),
    (replace(BASE, shared_uplink_bandwidth=2e9, h2d_bytes_per_sample=1.5e6,
             storage_bandwidth=20e9), "uplink"),
])
def test_ground_truth_blames_the_binding_stage(params, stage):
    sim = Simulator(params)
    sim.run(10.0)
    tr = sim.run(30.0)
    waiting = tr.blame[tr.blame != BLAME.index("compute")]
    counts = np.bincount(waiting, minlength=len(BLAME))
    assert BLAME[int(np.argmax(counts))] == stage
    # The stall fraction the simulation saw is what the analytic rates predict.
    stall = (tr.stall[-1] - tr.stall[0]).mean() / (tr.t[-1] - tr.t[0])
    expected = 1 - analytic_throughput(params) / stage_rates(params)["compute"]
    assert stall == pytest.approx(expected, abs=0.03)
    gain = speedup_if_removed(params)
    assert gain[stage] == pytest.approx(max(gain.values()))
    assert gain[stage] > 1.05


def test_straggler_makes_peers_spin_busy_but_idle_sms():
    p = replace(BASE, collective_bytes=1e8, straggler_gpu=3, straggler_factor=1.5)
    sim = Simulator(p)
    tr = sim.run(20.0)
    busy = tr.busy[-1] / 20.0
    sm = tr.sm_active[-1] / 20.0
    assert busy.min() > 0.97  # NVML utilization stays high on the waiting GPUs...
    others = np.delete(np.arange(8), 3)
    assert sm[others].max() < sm[3] - 0.15  # ...while their SMs idle at the barrier
    assert (tr.blame[:, others] == BLAME.index("straggler")).mean() > 0.2


def test_episodes_throttle_idle_checkpoint_eval():
    p = replace(BASE, episodes=[
        Episode(start_s=5, end_s=10, gpus=(1,), clock_factor=0.5),
        Episode(start_s=12, end_s=15, idle=True),
        Episode(start_s=16, end_s=100, checkpoint_bytes=12e9),
    ], eval_every_s=10, eval_duration_s=2)
    sim = Simulator(p)
    tr = sim.run(20.0)
    k = lambda t: int(t / 0.01) - 1  # noqa: E731
    assert tr.clock_factor[k(7), 1] == 0.5 and tr.clock_factor[k(7), 0] == 1.0
    busy_idle = tr.busy[k(15)] - tr.busy[k(12.5)]
    assert busy_idle.max() < 0.3  # the job ran no steps while idle
    assert tr.write[-1] == pytest.approx(12e9)  # the checkpoint was written
    assert (tr.blame[k(12.5):k(15)] == BLAME.index("idle")).all()


def test_jitter_changes_step_times_not_the_mean():
    p = replace(BASE, compute_jitter=0.1, seed=7)
    tr = Simulator(p).run(60.0)
    rate = tr.steps[-1] / 60.0
    assert rate.mean() == pytest.approx(4.0, rel=0.03)


def test_time_step_limit():
    with pytest.raises(ValueError):
        Simulator(BASE, dt=0.02)


# --- the scenario library -------------------------------------------------------------------


def test_library_covers_every_class_and_loads_with_seeds():
    names = S.library()
    classes = {S.load(n).klass for n in names}
    assert classes == set(S.CLASSES)
    healthy = [S.load(n) for n in names if S.load(n).klass == "healthy"]
    assert {h.job.gpus for h in healthy} >= {1, 4, 8}
    step_times = [h.job.compute_s for h in healthy]
    assert min(step_times) <= 0.02 and max(step_times) >= 2.0
    for n in names:
        for seed in range(3):
            s = S.load(n, seed=seed)
            assert s.job.seed == seed


def test_randomization_is_reproducible_and_within_ranges():
    a, b = S.load("input-storage", seed=11), S.load("input-storage", seed=11)
    c = S.load("input-storage", seed=12)
    assert a.job == b.job and a.job != c.job
    assert 3.0e8 <= a.job.storage_bandwidth <= 7.0e8


@pytest.mark.parametrize("doc, message", [
    ({"class": "nonsense"}, "class must be one of"),
    ({"job": {"warp_drive": 1}}, "unknown job parameter 'warp_drive'"),
    ({"job": {"gpus": -1}}, "must not be negative"),
    ({"job": {"gpus": 2}, "events": [{"at_s": 1, "gpu": 5}]}, "no GPU 5"),
    ({"randomize": {"compute_s": 3}}, "expected \\[low, high\\]"),
])
def test_bad_scenarios(doc, message):
    with pytest.raises(S.ScenarioError, match=message):
        S.from_dict(doc, "bad", seed=1)


def test_unknown_scenario_names_the_library():
    with pytest.raises(S.ScenarioError, match="input-storage"):
        S.load("no-such-scenario")


# --- the simulated node through the real samplers ------------------------------------------------


def test_simulated_node_through_real_samplers():
    """The samplers' rows on a simulated node agree with the simulator's ground truth."""
    from agentd.gpu.fake import install, uninstall
    from agentd.paths import Paths
    from agentd.samplers.base import Context
    from agentd.samplers.cpu import CpuSampler
    from agentd.samplers.gpu import GpuSampler
    from agentd.samplers.process import ProcessSampler
    from agentd.samplers.storage import StorageSampler
    from agentd.sim.node import SimulatedNode
    from conftest import FakeClock

    clock = FakeClock()
    node = SimulatedNode(S.load("input-storage"), clock=clock)
    install(node.nvml_library())
    try:
        ctx = Context(Paths(node.procfs, node.sysfs), 0.1, 1.0)
        samplers = [GpuSampler(ctx, {}), StorageSampler(ctx, {}), CpuSampler(ctx, {}),
                    ProcessSampler(ctx, {})]
        node.write(0.0)
        for smp in samplers:
            smp.open()
        samplers[0].backend.clock = clock
        rows = []
        for k in range(400):  # 40 s at 10 Hz
            clock.advance(0.1)
            node.write()
            row = {}
            for smp in samplers:
                row.update(smp.sample(clock.t, k % 10 == 0) or {})
            rows.append(row)
        t = node.now()
        truth_busy = node.history.between("busy", 10.0, t) / (t - 10.0)
        busy = {(n, lab): v for n, lab, v in samplers[0].series()
                if n == "agentd_gpu_busy_seconds_total"}
        assert len(busy) == 8
        late = rows[100:]
        measured = np.mean([r["gpu.busy:0"] for r in late if "gpu.busy:0" in r])
        assert measured == pytest.approx(truth_busy[0], abs=0.03)
        disk = np.mean([r["disk.read:nvme0n1"] for r in late if "disk.read:nvme0n1" in r])
        assert disk == pytest.approx(node.scenario.job.storage_bandwidth, rel=0.05)
        pid = node.trainer_pid(0)
        members = [r[f"proc.members:{pid}"] for r in late if f"proc.members:{pid}" in r]
        assert members[-1] == 1 + node.scenario.job.workers_per_gpu
    finally:
        uninstall()


def test_simulate_flag_serves_metrics(spawn):
    import urllib.request

    from conftest import agentd_cmd, free_port, wait_http

    port = free_port()
    proc = spawn(agentd_cmd("run", "--simulate", "input-storage", "--simulate.seed", "3",
                            "--web.listen-address", f"127.0.0.1:{port}"))
    wait_http(f"http://127.0.0.1:{port}/metrics")
    time.sleep(3)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'agentd_build_info{version=' in text and 'gpu_backend="simulated"' in text
    assert text.count("agentd_gpu_busy_seconds_total{") == 8
    assert 'agentd_disk_read_bytes_total{device="nvme0n1"}' in text
    assert "agentd_process_cpu_seconds_total{" in text
    assert "agentd_pcie_shared_uplink{" in text
    assert "Traceback" not in proc.output()


@pytest.mark.slow
def test_demo_shows_gpus_storage_and_the_diagnosis():
    import subprocess

    from conftest import agentd_cmd, free_port

    # The first analysis runs after 30 s of data, then every 10 s (in its own process, which
    # a loaded machine may slow): 55 s leaves it two more runs to reach the screen.
    r = subprocess.run(agentd_cmd("demo", "--seconds", "55", "--web.listen-address",
                                  f"127.0.0.1:{free_port()}"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().split("\n\n\n")[-1] if "\n\n\n" in r.stdout else r.stdout
    assert "GPU   busy    SM    PCIe RX" in last and "storage nvme0n1" in last
    assert "input_storage" in r.stdout and "expected gain" in r.stdout
