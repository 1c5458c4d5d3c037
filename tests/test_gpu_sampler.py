"""The NVML backend and the gpu sampler, on fake GPUs through the real pynvml code path."""

from __future__ import annotations

import time

import pytest

from agentd.gpu.backend import GpuLost
from agentd.gpu.nvml import NvmlBackend, counter_delta
from agentd.catalog import METRICS_BY_NAME
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
    assert counter_delta(100, 50, 64) is None  # a 64-bit counter that went back was reset
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


def test_gpus_that_wait_are_shared_with_the_process_sampler(fake_gpus, clock):
    """Each slow tick names the GPUs whose kernels ran under 95% of the second since the
    last (from the busy counter), so their trees' workers are read every tick."""
    s = make_sampler(clock, fake_gpus, {"gpus": [{"count": 1, "utilization": 0.99},
                                                 {"count": 1, "utilization": 0.80}]})
    assert s.ctx.shared.gpus_waiting == frozenset()
    run(s, clock, 5.0)
    assert s.ctx.shared.gpus_waiting == frozenset({1})


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


# --- faults: one GPU's error, missing functions, no sample buffer, lost at start, XIDs ------


def _errors(sampler) -> dict:
    return {g: v for (g, _), v in by_name(sampler, "agentd_gpu_errors_total").items()}


def test_one_gpus_nvml_error_costs_only_that_value(fake_gpus, clock, caplog):
    """NVML_ERROR_UNKNOWN from field values on GPU 1: GPUs 0 and 2 keep every 10 Hz row,
    GPU 1 keeps its busy rows and loses only the PCIe figures; the failing call is retried
    with back-off, counted, logged once; the sampler itself never fails."""
    s = make_sampler(clock, fake_gpus, {"gpus": [
        {"count": 1, "utilization": 0.5, "pcie_rx_bytes_per_second": 1e9},
        {"count": 1, "utilization": 0.5, "pcie_rx_bytes_per_second": 1e9, "errors": [
            {"function": "nvmlDeviceGetFieldValues", "error": "unknown", "start_s": 1,
             "end_s": 21}]},
        {"count": 1, "utilization": 0.5, "pcie_rx_bytes_per_second": 1e9}]})
    lib = s.backend.N.nvmlLib
    with caplog.at_level("INFO", logger="agentd"):
        rows = run(s, clock, 30.0)  # sample() raising would fail the test here
    during = rows[15:200]  # 1.5 s .. 20 s
    for gpu in ("0", "2"):
        assert all(f"gpu.busy:{gpu}" in r and f"gpu.pcie_rx:{gpu}" in r for r in during)
    assert all("gpu.busy:1" in r for r in during)
    assert not any("gpu.pcie_rx:1" in r for r in during)
    assert any("gpu.pcie_rx:1" in r for r in rows[-50:])  # back after the fault ends
    # Every real failure counted; the back-off (0.1 s doubling, at most 30 s) spares calls:
    # ~10 tries in 20 s, not 200.
    errors = _errors(s)
    assert errors["0"] == errors["2"] == 0 and 6 <= errors["1"] <= 12
    assert lib.calls["nvmlDeviceGetFieldValues"] < 3 * 301 - 150
    logged = [r for r in caplog.records if "nvmlDeviceGetFieldValues failed" in r.getMessage()]
    assert len(logged) == 1 and "NVML_ERROR_UNKNOWN" in logged[0].getMessage()
    assert logged[0].levelname == "WARNING"
    # The bytes moved while the counter could not be read are counted on recovery.
    rx = by_name(s, "agentd_gpu_pcie_rx_bytes_total")
    assert rx[("1", s.gpus[1].uuid)] == pytest.approx(rx[("0", s.gpus[0].uuid)], rel=0.01)


def test_one_gpus_error_in_every_call_leaves_the_others(fake_gpus, clock):
    """A GPU whose utilization and state calls all fail: no false 0 for it, and the other
    GPUs' rows and gauges are complete."""
    fails = [{"function": f, "error": "unknown"} for f in (
        "nvmlDeviceGetSamples", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage", "nvmlDeviceGetComputeRunningProcesses_v3")]
    s = make_sampler(clock, fake_gpus, {"gpus": [
        {"count": 1, "utilization": 0.8, "errors": fails},
        {"count": 1, "utilization": 0.8, "memory_used_bytes": 1e9}]})
    rows = run(s, clock, 5.0)
    assert not any("gpu.busy:0" in r or "gpu.busy_time:0" in r for r in rows)
    assert all("gpu.busy:1" in r for r in rows[2:])
    assert {g for g, _ in by_name(s, "agentd_gpu_temperature_celsius")} == {"1"}
    assert by_name(s, "agentd_gpu_memory_used_bytes") == {("1", s.gpus[1].uuid): 1e9}
    assert by_name(s, "agentd_gpu_busy_seconds_total")[("1", s.gpus[1].uuid)] > 0
    assert ("0", s.gpus[0].uuid) not in by_name(s, "agentd_gpu_busy_seconds_total")
    assert _errors(s)["0"] > 0 and _errors(s)["1"] == 0
    # The clock rate still reads on the failing GPU: only the failing values are absent.
    assert {g for g, _ in by_name(s, "agentd_gpu_sm_clock_hertz")} == {"0", "1"}


def test_transient_sample_error_loses_no_busy_time(fake_gpus, clock):
    """A failed nvmlDeviceGetSamples for 0.5 s: the driver's buffer still holds those
    samples, so the busy counter stays exact."""
    s = make_sampler(clock, fake_gpus, {"gpus": [{"count": 1, "utilization": 0.6, "errors": [
        {"function": "nvmlDeviceGetSamples", "error": "timeout", "start_s": 3, "end_s": 3.5}]}]})
    run(s, clock, 2.0)
    before = by_name(s, "agentd_gpu_busy_seconds_total")[("0", s.gpus[0].uuid)]
    run(s, clock, 10.0)
    after = by_name(s, "agentd_gpu_busy_seconds_total")[("0", s.gpus[0].uuid)]
    assert (after - before) / 10.0 == pytest.approx(0.6, abs=0.02)
    assert _errors(s)["0"] >= 1


def test_missing_v3_process_call_is_absent_once(fake_gpus, clock, caplog):
    """A driver without nvmlDeviceGetComputeRunningProcesses_v3 (pynvml raises
    NVMLLibraryMismatchError from the unversioned wrapper): processes come from _v2, and
    memory, power, temperature and clocks of every GPU are read; one log line, no ERROR."""
    doc = {"missing_functions": ["nvmlDeviceGetComputeRunningProcesses_v3"],
           "gpus": [{"count": 2, "utilization": 0.5, "memory_used_bytes": 2e9,
                     "processes": [{"pid": 4242, "memory_bytes": 1e9}]}]}
    with caplog.at_level("INFO", logger="agentd"):
        s = make_sampler(clock, fake_gpus, doc)
        run(s, clock, 5.0)
    for name in ("agentd_gpu_memory_used_bytes", "agentd_gpu_power_watts",
                 "agentd_gpu_temperature_celsius", "agentd_gpu_sm_clock_hertz"):
        assert len(by_name(s, name)) == 2, name
    assert len(by_name(s, "agentd_gpu_process_memory_used_bytes")) == 2
    assert s.ctx.shared.gpu_processes == {4242: (0, 1)}
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    missing = [r for r in caplog.records if "missing from this driver" in r.getMessage()]
    assert len(missing) == 1
    assert _errors(s) == {"0": 0, "1": 0}


def test_missing_process_calls_leave_the_rest(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {
        "missing_functions": ["nvmlDeviceGetComputeRunningProcesses_v3",
                              "nvmlDeviceGetComputeRunningProcesses_v2"],
        "gpus": [{"count": 2, "processes": [{"pid": 4242, "memory_bytes": 1e9}]}]})
    run(s, clock, 3.0)
    assert not by_name(s, "agentd_gpu_process_memory_used_bytes")
    assert len(by_name(s, "agentd_gpu_temperature_celsius")) == 2
    assert len(by_name(s, "agentd_gpu_power_watts")) == 2


def test_no_sample_buffer_falls_back_to_utilization_rates(fake_gpus, clock):
    """nvmlDeviceGetSamples NotSupported: a 90%-busy GPU reads 90% busy from the
    utilization rates (not 0%), and agentd_gpu_info says which source it is."""
    s = make_sampler(clock, fake_gpus, {"gpus": [
        {"count": 1, "utilization": 0.9, "not_supported": ["nvmlDeviceGetSamples"]},
        {"count": 1, "utilization": 0.9}]})
    rows = run(s, clock, 20.0)
    busy = by_name(s, "agentd_gpu_busy_seconds_total")
    assert busy[("0", s.gpus[0].uuid)] / 20.0 == pytest.approx(0.9, abs=0.02)
    assert busy[("1", s.gpus[1].uuid)] / 20.0 == pytest.approx(0.9, abs=0.02)
    assert rows[-1]["gpu.busy:0"] == pytest.approx(0.9)
    means = sum(r["gpu.busy_time:0"] for r in rows[1:]) / len(rows[1:])
    assert means == pytest.approx(0.9, abs=0.02)
    sources = {labels[0]: labels[INFO_UTILIZATION_SOURCE]
               for labels in by_name(s, "agentd_gpu_info")}
    assert sources == {"0": "rates", "1": "samples"}


INFO_UTILIZATION_SOURCE = METRICS_BY_NAME["agentd_gpu_info"].labels.index("utilization_source")


def test_no_utilization_at_all_is_absent_not_zero(fake_gpus, clock):
    s = make_sampler(clock, fake_gpus, {"gpus": [{"count": 1, "utilization": 0.9, "not_supported": [
        "nvmlDeviceGetSamples", "nvmlDeviceGetUtilizationRates"]}]})
    rows = run(s, clock, 5.0)
    assert not by_name(s, "agentd_gpu_busy_seconds_total")
    assert not any("gpu.busy:0" in r or "gpu.busy_time:0" in r for r in rows)
    assert [labels[INFO_UTILIZATION_SOURCE] for labels in by_name(s, "agentd_gpu_info")] == \
        ["none"]
    assert len(by_name(s, "agentd_gpu_temperature_celsius")) == 1


@pytest.mark.parametrize("fault", [
    {"lost_at_s": 0},  # identity calls answer GPU_IS_LOST
    {"errors": [{"function": "nvmlDeviceGetHandleByIndex_v2", "error": "gpu_is_lost"}]},
    {"errors": [{"function": "nvmlDeviceGetPciInfo_v3", "error": "gpu_is_lost"}]},
])
def test_gpu_lost_at_start_stays_visible(fake_gpus, clock, fault):
    """A GPU already lost when agentd starts (after any restart) is exported as lost, with
    what could be read, and listed in the window meta; the others are sampled."""
    s = make_sampler(clock, fake_gpus, {"gpus": [{"count": 1, "utilization": 0.5},
                                                 {"count": 1, **fault},
                                                 {"count": 1, "utilization": 0.5}]})
    rows = run(s, clock, 2.0)
    lost = {g: v for (g, _), v in by_name(s, "agentd_gpu_lost").items()}
    assert lost == {"0": 0.0, "1": 1.0, "2": 0.0}
    info = {labels[0]: labels for labels in by_name(s, "agentd_gpu_info")}
    assert set(info) == {"0", "1", "2"}
    meta = s.meta()["gpus"]
    assert sorted(meta) == ["0", "1", "2"]
    assert meta["1"]["lost"] is True and meta["0"]["lost"] is False
    assert set(meta["1"]) == {"uuid", "name", "pci_bus_id", "lost"}
    if "errors" in fault and "PciInfo" in fault["errors"][0]["function"]:
        # UUID and name were read before the GPU answered GPU_IS_LOST.
        assert meta["1"]["uuid"].startswith("GPU-") and meta["1"]["name"]
        assert info["1"][1] == meta["1"]["uuid"]
    else:
        assert meta["1"]["uuid"] == "" and info["1"][1] == ""
    assert all("gpu.busy:0" in r and "gpu.busy:2" in r for r in rows[2:])
    assert not any(k.endswith(":1") for r in rows for k in r)


def test_xid_storm_is_rate_limited_in_the_log(fake_gpus, clock, caplog):
    """1,000 XID 79s and 10 XID 48s on GPU 0 in 2 minutes: every event counted; the log has
    the first of each code, then one line per minute saying how many more came."""
    storm = [{"at_s": 1 + i * 0.1, "code": 79} for i in range(1000)] + \
        [{"at_s": 50 + i, "code": 48} for i in range(10)]
    s = make_sampler(clock, fake_gpus, {"gpus": [{"count": 1, "xid": storm}]})
    with caplog.at_level("INFO", logger="agentd"):
        run(s, clock, 130.0, step=0.5, slow_every=2)
        s.close()
    codes = by_name(s, "agentd_gpu_xid_code_errors_total")
    uuid = s.gpus[0].uuid
    assert codes == {("0", uuid, "79"): 1000, ("0", uuid, "48"): 10}
    classes = by_name(s, "agentd_gpu_xid_errors_total")
    assert classes[("0", uuid, "fatal")] == 1010
    lines = [r.getMessage() for r in caplog.records if "XID" in r.getMessage()]
    assert lines[:1] == ["GPU 0: XID 79"] and "GPU 0: XID 48" in lines
    summaries = [m for m in lines if "more XID events" in m]
    assert 2 <= len(summaries) <= 3, lines
    assert sum(int(m.split()[2]) for m in summaries) == 1000 + 10 - 2
    assert len(lines) <= 5


def test_counter_probe_failing_at_start_is_retried(fake_gpus, clock):
    """Field values failing when agentd starts: PCIe is 'unknown' until the call answers,
    then read from the counters, not given up for the GPU's life."""
    s = make_sampler(clock, fake_gpus, {"gpus": [{"count": 1, "pcie_rx_bytes_per_second": 2e9,
                                                  "errors": [{
        "function": "nvmlDeviceGetFieldValues", "error": "unknown", "end_s": 1.0}]}]})
    source = lambda: [labels[5] for labels in by_name(s, "agentd_gpu_info")]  # noqa: E731
    assert source() == ["unknown"]
    rows = run(s, clock, 5.0)
    assert source() == ["counter"]
    assert rows[-1]["gpu.pcie_rx:0"] == pytest.approx(2e9, rel=0.01)
    assert _errors(s)["0"] >= 1


def test_fast_tick_makes_few_nvml_calls(fake_gpus, clock):
    """The 10 Hz path per GPU: one field-values call (PCIe and NVLink together), at most one
    utilization-samples call (the buffer is big enough: no call to ask for the count first),
    and GPM every other tick; the slow readings only on slow ticks."""
    lib = fake_gpus({"gpus": [{"count": 4, "utilization": 0.6}]}, clock=clock)
    s = GpuSampler(Context(Paths(), 0.1, 1.0), {})
    s.open()
    s.backend.clock = clock
    run(s, clock, 1.0)  # past the first reads
    before = dict(lib.calls)
    ticks = 20
    for _ in range(ticks):
        clock.advance(0.1)
        s.sample(clock.t, False)
    calls = {k: v - before.get(k, 0) for k, v in lib.calls.items() if v != before.get(k, 0)}
    assert calls["nvmlDeviceGetFieldValues"] == 4 * ticks
    # A new driver sample every 1/6 s: read every other tick, one call each.
    assert calls["nvmlDeviceGetSamples"] <= 4 * ticks / 2 + 4
    assert calls["nvmlGpmSampleGet"] <= 4 * ticks / 2 + 4
    assert set(calls) <= {"nvmlDeviceGetFieldValues", "nvmlDeviceGetSamples",
                          "nvmlGpmSampleGet", "nvmlGpmMetricsGet"}, calls
    assert sum(calls.values()) <= 4 * ticks * 2.5
