"""The NVML backend and the gpu sampler, on fake GPUs through the real pynvml code path."""

from __future__ import annotations

import time

import pytest

from agentd.gpu.backend import GpuLost
from agentd.gpu.nvml import NvmlBackend, counter_delta
from agentd.jobs import JobResolver
from agentd.pcie import capacity as pcie_capacity
from agentd.paths import Paths
from agentd.samplers.base import Context, Unavailable
from agentd.samplers.gpu import GpuSampler


def series(sampler) -> dict:
    return {(n, labels): v for n, labels, v in sampler.series()}


def by_name(sampler, name: str) -> dict:
    return {labels: v for n, labels, v in sampler.series() if n == name}


def run(sampler, clock, seconds: float, step: float = 0.1, slow_every: int = 10) -> list[dict]:
    rows = []
    for i in range(int(round(seconds / step))):
        clock.advance(step)
        rows.append(sampler.sample(clock.t, i % slow_every == 0))
    return rows


def make_sampler(clock, fake_gpus, doc, **opts) -> GpuSampler:
    fake_gpus(doc, clock=clock)
    s = GpuSampler(Context(Paths(), 0.1, 1.0), opts)
    s.open()
    s.backend.clock = clock
    return s


# --- pure helpers ---------------------------------------------------------------------------


def test_counter_delta_wraps_32_bit_only():
    assert counter_delta(2**32 - 10, 5, 32) == 15
    assert counter_delta(100, 50, 64) == 0  # a 64-bit counter that went back was reset
    assert counter_delta(5, 9, 64) == 4


def test_pcie_capacity():
    assert pcie_capacity(5, 16) == pytest.approx(63.0e9, rel=0.001)  # Gen5 x16
    assert pcie_capacity(4, 16) == pytest.approx(31.5e9, rel=0.001)
    assert pcie_capacity(None, 16) is None


# --- utilization integration ------------------------------------------------------------------


@pytest.mark.parametrize("gpu, expected", [
    ({"utilization": 0.73}, 0.73),
    ({"step_period_s": 0.5, "step_busy_s": 0.35}, 0.70),
    ({"step_period_s": 0.5, "step_busy_s": 0.35, "util_sample_period_s": 1.0}, 0.70),
])
def test_busy_seconds_equal_utilization(fake_gpus, clock, gpu, expected):
    s = make_sampler(clock, fake_gpus, {"gpus": [{"count": 2, **gpu}]})
    run(s, clock, 5.0)
    before = by_name(s, "agentd_gpu_busy_seconds_total")
    run(s, clock, 60.0)
    after = by_name(s, "agentd_gpu_busy_seconds_total")
    for labels, v in after.items():
        # Exact but for up to one driver sample period at either end of the window.
        busy = (v - before[labels]) / 60.0
        assert busy == pytest.approx(expected, abs=0.015)


def test_dry_buffer_counts_as_idle(fake_gpus, clock):
    """Drivers that stop adding samples while idle: the gap counts as idle, not as busy."""
    s = make_sampler(clock, fake_gpus, {"gpus": [{
        "count": 1, "step_period_s": 4.0, "step_busy_s": 1.0, "util_buffer_dry_when_idle": True}]})
    rows = run(s, clock, 40.0)
    busy = by_name(s, "agentd_gpu_busy_seconds_total")[("0", s.gpus[0].uuid)]
    assert busy == pytest.approx(10.0, abs=0.6)
    # The window sees the idle stretches as 0, not as the last busy value held.
    values = [r["gpu.busy:0"] for r in rows if "gpu.busy:0" in r]
    assert min(values) == 0.0 and max(values) == 1.0


def test_window_rows(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [{
        "count": 1, "utilization": 0.5, "pcie_rx_bytes_per_second": 2e9,
        "nvlink_tx_bytes_per_second": 1e10, "sm_active_per_busy": 0.6}]})
    rows = run(s, clock, 3.0)
    last = rows[-1]
    assert last["gpu.busy:0"] == pytest.approx(0.5)
    assert last["gpu.pcie_rx:0"] == pytest.approx(2e9, rel=0.01)
    assert last["gpu.nvlink_tx:0"] == pytest.approx(1e10, rel=0.01)
    gpm = [r for r in rows if "gpu.sm_active:0" in r]
    assert len(gpm) == pytest.approx(len(rows) / 2, abs=1)  # GPM every 0.2 s by default
    assert gpm[-1]["gpu.sm_active:0"] == pytest.approx(0.3)
    slow = [r for r in rows if "gpu.power:0" in r][-1]
    assert slow["gpu.pcie_capacity:0"] == pytest.approx(63.0e9, rel=0.001)
    assert slow["gpu.sm_clock:0"] == 1.98e9


def test_pcie_and_nvlink_counters(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [{
        "count": 1, "utilization": 1.0, "pcie_rx_bytes_per_second": 3e9, "pcie_counter_bits": 32,
        "pcie_tx_bytes_per_second": 1e8, "nvlink_rx_bytes_per_second": 5e10}]})
    run(s, clock, 10.0)
    lab = ("0", s.gpus[0].uuid)
    got = series(s)
    # 30 GB through a 32-bit counter that wraps every 4.3 GB, read every 100 ms.
    assert got[("agentd_gpu_pcie_rx_bytes_total", lab)] == pytest.approx(3e10, rel=0.001)
    assert got[("agentd_gpu_pcie_tx_bytes_total", lab)] == pytest.approx(1e9, rel=0.001)
    assert got[("agentd_gpu_nvlink_rx_bytes_total", lab)] == pytest.approx(5e11, rel=0.001)


def test_pcie_fallback_off_the_fast_path(fake_gpus):
    """Without PCIe counters, nvmlDeviceGetPcieThroughput (20 ms each) runs in a helper
    thread; the fast reading never waits for it."""
    lib = fake_gpus({"gpus": [{"count": 2, "utilization": 1.0, "unsupported_fields": [197, 198],
                               "pcie_rx_bytes_per_second": 2e9}]})
    s = GpuSampler(Context(Paths(), 0.1, 0.05), {})
    s.open()
    try:
        assert {g.pcie_counter_source for g in s.gpus.values()} == {"throughput_sampled"}
        durations = []
        for _ in range(15):
            time.sleep(0.05)
            t0 = time.perf_counter()
            s.sample(time.time(), False)
            durations.append(time.perf_counter() - t0)
        assert max(durations) < 0.02  # never a 20 ms blocking call on the fast path
        assert lib.calls["nvmlDeviceGetPcieThroughput"] >= 4
        rx = by_name(s, "agentd_gpu_pcie_rx_bytes_total")
        assert all(v > 0 for v in rx.values())
    finally:
        s.close()


def test_gpm_activity_counters(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [{
        "count": 1, "utilization": 0.9, "sm_active_per_busy": 0.4,
        "tensor_active_per_busy": 0.5}]})
    run(s, clock, 10.0)
    lab = ("0", s.gpus[0].uuid)
    got = series(s)
    # 10 s at 0.9 busy x 0.4 SM-active, less the first 0.2 s GPM interval (no sample before)
    assert got[("agentd_gpu_sm_active_seconds_total", lab)] == pytest.approx(3.6 * 0.98, rel=0.01)
    assert got[("agentd_gpu_tensor_active_seconds_total", lab)] == pytest.approx(4.5 * 0.98,
                                                                                rel=0.01)


def test_no_gpm_before_hopper(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [{"count": 1, "gpm": False}]})
    run(s, clock, 2.0)
    assert not by_name(s, "agentd_gpu_sm_active_seconds_total")


# --- state, throttling, reliability -------------------------------------------------------------


def test_slow_gauges_and_throttle(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [{
        "count": 1, "utilization": 0.9, "memory_used_bytes": 4e10,
        "throttle": [{"start_s": 2, "end_s": 6, "reasons": ["sw_power_cap"],
                      "sm_clock_hz": 1.41e9}]}]})
    run(s, clock, 4.0)
    lab = ("0", s.gpus[0].uuid)
    got = series(s)
    assert got[("agentd_gpu_memory_used_bytes", lab)] == 4e10
    assert got[("agentd_gpu_sm_clock_hertz", lab)] == 1.41e9
    assert got[("agentd_gpu_clock_event_active", lab + ("sw_power_cap",))] == 1.0
    assert got[("agentd_gpu_clock_event_active", lab + ("hw_thermal_slowdown",))] == 0.0
    run(s, clock, 6.0)
    got = series(s)
    assert got[("agentd_gpu_clock_event_active", lab + ("sw_power_cap",))] == 0.0
    assert got[("agentd_gpu_clock_event_seconds_total", lab + ("sw_power_cap",))] == \
        pytest.approx(4.0, abs=1.01)


def test_ecc_remapped_and_processes(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [{
        "count": 1, "ecc_corrected": 12, "ecc_uncorrected": 1, "remapped_rows": [3, 1, 1, 0],
        "processes": [{"pid": 777, "memory_bytes": 2e9, "sm_util": 0.6}]}]})
    run(s, clock, 1.0)
    lab = ("0", s.gpus[0].uuid)
    got = series(s)
    assert got[("agentd_gpu_ecc_errors_total", lab + ("uncorrected",))] == 1
    assert got[("agentd_gpu_remapped_rows", lab + ("correctable",))] == 3
    assert got[("agentd_gpu_remapped_rows_pending", lab)] == 1
    job = JobResolver(Paths()).labels(777)  # per job, not per pid (tests/test_jobs.py)
    assert got[("agentd_gpu_process_memory_used_bytes", lab + job)] == 2e9
    assert got[("agentd_gpu_process_sm_utilization_ratio", lab + job)] == 0.6
    assert s.ctx.shared.gpu_processes == {777: (0,)}


def test_xid_counted_by_class_and_code(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [
        {"count": 2, "xid": [{"at_s": 1.5, "code": 48}, {"at_s": 2.5, "code": 13},
                             {"at_s": 2.6, "code": 13}, {"at_s": 2.7, "code": 999}]}]})
    run(s, clock, 4.0)
    u0 = s.gpus[0].uuid
    classes = by_name(s, "agentd_gpu_xid_errors_total")
    assert {k: v for k, v in classes.items() if k[0] == "0"} == {
        ("0", u0, "fatal"): 1, ("0", u0, "application"): 2, ("0", u0, "unknown"): 1,
        ("0", u0, "degraded"): 0}
    codes = by_name(s, "agentd_gpu_xid_code_errors_total")
    assert {k: v for k, v in codes.items() if k[0] == "0"} == {
        ("0", u0, "48"): 1, ("0", u0, "13"): 2, ("0", u0, "999"): 1}
    assert by_name(s, "agentd_gpu_xid_last_code")[("0", u0)] == 999


def test_xid_classes_exported_at_zero_before_any_event(fake_gpus, clock):
    """increase() over a counter born at 1 is 0: the first XID of a class would never alert.
    Every class of every GPU exists at 0 from the first sample."""
    s = make_sampler(clock, fake_gpus, {"gpus": [{"count": 2}]})
    run(s, clock, 0.5)
    classes = by_name(s, "agentd_gpu_xid_errors_total")
    assert len(classes) == 8 and set(classes.values()) == {0.0}
    assert {k[2] for k in classes} == {"application", "degraded", "fatal", "unknown"}
    assert set(by_name(s, "agentd_gpu_xid_last_code").values()) == {0.0}
    assert not by_name(s, "agentd_gpu_xid_code_errors_total")


def test_gpu_lost_mid_run_others_continue(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [
        {"count": 1, "utilization": 0.5, "lost_at_s": 2.0},
        {"count": 3, "utilization": 0.5}]})
    run(s, clock, 5.0)
    lost = by_name(s, "agentd_gpu_lost")
    assert [v for (g, _), v in sorted(lost.items())] == [1.0, 0.0, 0.0, 0.0]
    busy = by_name(s, "agentd_gpu_busy_seconds_total")
    assert busy[("0", s.gpus[0].uuid)] == pytest.approx(1.0, abs=0.2)  # stopped at 2 s
    assert busy[("3", s.gpus[3].uuid)] == pytest.approx(2.5, abs=0.2)
    # The lost GPU's state gauges are gone; the others' remain.
    temps = by_name(s, "agentd_gpu_temperature_celsius")
    assert {g for g, _ in temps} == {"1", "2", "3"}


def test_backend_raises_gpu_lost(fake_gpus, clock):
    fake_gpus({"gpus": [{"count": 1, "lost_at_s": 1.0}]}, clock=clock)
    b = NvmlBackend(clock=clock)
    b.open()
    clock.advance(2.0)
    with pytest.raises(GpuLost):
        b.read_fast(0)
    with pytest.raises(GpuLost):
        b.read_slow(0)


def test_not_supported_values_are_absent(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [{
        "count": 1, "not_supported": ["nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEccErrors"]}]})
    run(s, clock, 2.0)
    names = {n for n, _, _ in s.series()}
    assert "agentd_gpu_power_watts" not in names
    assert "agentd_gpu_ecc_errors_total" not in names
    assert "agentd_gpu_temperature_celsius" in names


@pytest.mark.parametrize("mode", ["library_not_found", "driver_not_loaded"])
def test_no_driver_is_unavailable(fake_gpus, mode):
    fake_gpus({"init_error": mode})
    s = GpuSampler(Context(Paths(), 0.1, 1.0), {})
    with pytest.raises(Unavailable, match="no NVIDIA driver"):
        s.open()


def test_no_library_on_this_machine_is_unavailable():
    from agentd.gpu.fake import uninstall

    uninstall()
    with pytest.raises(Unavailable, match="no NVIDIA driver"):
        GpuSampler(Context(Paths(), 0.1, 1.0), {}).open()
