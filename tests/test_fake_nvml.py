"""The fake libnvidia-ml, exercised through the real pynvml module: the same calls, error
classes, units and latencies as a driver."""

from __future__ import annotations

import time

import pynvml as N
import pytest

from agentd.gpu.fake import ScenarioError, library_from_dict, load_scenario

ONE_GPU = {"gpus": [{"count": 1, "utilization": 0.5, "memory_used_bytes": 1e9,
                     "power_busy_watts": 400, "power_idle_watts": 100,
                     "temperature_celsius": 66, "pcie_rx_bytes_per_second": 1e9}]}


def test_no_library_is_library_not_found():
    """Without a driver (this machine), pynvml raises LibraryNotFound, value 12."""
    from agentd.gpu.fake import uninstall

    uninstall()
    with pytest.raises(N.NVMLError_LibraryNotFound) as e:
        N.nvmlInit()
    assert e.value.value == 12


@pytest.mark.parametrize("mode, cls", [("library_not_found", N.NVMLError_LibraryNotFound),
                                       ("driver_not_loaded", N.NVMLError_DriverNotLoaded)])
def test_init_errors(fake_gpus, mode, cls):
    fake_gpus({"init_error": mode, "gpus": [{"count": 1}]})
    with pytest.raises(cls):
        N.nvmlInit()


def test_uninitialized_before_init(fake_gpus):
    fake_gpus(ONE_GPU)
    with pytest.raises(N.NVMLError_Uninitialized):
        N.nvmlDeviceGetCount()


def test_units(fake_gpus, clock):
    fake_gpus(ONE_GPU, clock=clock)
    N.nvmlInit()
    clock.advance(1.0)
    h = N.nvmlDeviceGetHandleByIndex(0)
    assert N.nvmlDeviceGetMemoryInfo(h).used == 10**9  # bytes
    assert N.nvmlDeviceGetMemoryInfo(h).total == N.nvmlDeviceGetMemoryInfo(h).free + 10**9
    assert N.nvmlDeviceGetPowerUsage(h) == 250_000  # milliwatts: idle + (busy-idle) x 0.5
    assert N.nvmlDeviceGetEnforcedPowerLimit(h) == 700_000
    assert N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU) == 66  # celsius
    assert N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_SM) == 1980  # MHz
    assert N.nvmlDeviceGetUtilizationRates(h).gpu == 50  # percent
    assert N.nvmlDeviceGetName(h) == "NVIDIA H100 80GB HBM3"  # str, through convertStrBytes
    assert N.nvmlDeviceGetUUID(h).startswith("GPU-")
    bus_id = N.nvmlDeviceGetPciInfo(h).busId
    assert (bus_id.decode() if isinstance(bus_id, bytes) else bus_id) == "00000000:18:00.0"


def test_samples_buffer_and_not_found(fake_gpus, clock):
    fake_gpus({"gpus": [{"count": 1, "step_period_s": 1.0, "step_busy_s": 0.5,
                         "util_sample_period_s": 0.25}]}, clock=clock)
    N.nvmlInit()
    clock.advance(2.0)
    h = N.nvmlDeviceGetHandleByIndex(0)
    vtype, samples = N.nvmlDeviceGetSamples(h, N.NVML_GPU_UTILIZATION_SAMPLES, 0)
    assert vtype == N.NVML_VALUE_TYPE_UNSIGNED_INT
    values = [s.sampleValue.uiVal for s in samples]
    assert values == [100, 100, 0, 0, 100, 100, 0, 0]  # busy first half of each second
    gaps = {b.timeStamp - a.timeStamp for a, b in zip(samples, samples[1:])}
    assert gaps == {250_000}  # microseconds
    assert samples[-1].timeStamp < 1e15  # not Unix-epoch microseconds: only differences count
    with pytest.raises(N.NVMLError_NotFound):
        N.nvmlDeviceGetSamples(h, N.NVML_GPU_UTILIZATION_SAMPLES, samples[-1].timeStamp)


def test_not_supported_and_function_not_found(fake_gpus):
    fake_gpus({"missing_functions": ["nvmlDeviceGetRemappedRows"],
               "gpus": [{"count": 1, "not_supported": ["nvmlDeviceGetPowerUsage"],
                         "unsupported_fields": [197]}]})
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(N.NVMLError_NotSupported):
        N.nvmlDeviceGetPowerUsage(h)
    with pytest.raises(N.NVMLError_FunctionNotFound):
        N.nvmlDeviceGetRemappedRows(h)
    tx, rx = N.nvmlDeviceGetFieldValues(h, [N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES,
                                            N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES])
    assert tx.nvmlReturn == N.NVML_ERROR_NOT_SUPPORTED
    assert rx.nvmlReturn == N.NVML_SUCCESS


def test_injected_errors_per_device_function_and_time(fake_gpus, clock):
    """A scenario makes one function of one GPU answer an NVML error for a time span."""
    fake_gpus({"missing_functions": ["nvmlDeviceGetComputeRunningProcesses_v3"], "gpus": [
        {"count": 1},
        {"count": 1, "errors": [{"function": "nvmlDeviceGetFieldValues", "error": "unknown",
                                 "start_s": 2, "end_s": 4},
                                {"function": "nvmlDeviceGetTemperature",
                                 "error": "NVML_ERROR_TIMEOUT"}]}]}, clock=clock)
    N.nvmlInit()
    h0, h1 = N.nvmlDeviceGetHandleByIndex(0), N.nvmlDeviceGetHandleByIndex(1)
    fields = [N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES]
    N.nvmlDeviceGetFieldValues(h1, fields)
    clock.advance(2.5)
    with pytest.raises(N.nvmlExceptionClass(N.NVML_ERROR_UNKNOWN)):
        N.nvmlDeviceGetFieldValues(h1, fields)
    N.nvmlDeviceGetFieldValues(h0, fields)  # the other GPU answers
    with pytest.raises(N.nvmlExceptionClass(N.NVML_ERROR_TIMEOUT)):
        N.nvmlDeviceGetTemperature(h1, N.NVML_TEMPERATURE_GPU)
    clock.advance(2.0)
    N.nvmlDeviceGetFieldValues(h1, fields)  # the span is over
    # What pynvml 13 really raises for a missing _v3 symbol: not an NVMLError.
    with pytest.raises(N.NVMLLibraryMismatchError):
        N.nvmlDeviceGetComputeRunningProcesses(h0)
    assert N.nvmlDeviceGetComputeRunningProcesses_v2(h0) == []


@pytest.mark.parametrize("error, message", [
    ({"function": "nvmlDeviceFrobnicate"}, "not an NVML function"),
    ({"function": "nvmlDeviceGetSamples", "error": "melted"}, "not an NVML error"),
    ({"function": "nvmlDeviceGetSamples", "error": "success"}, "not an NVML error"),
    ({"function": "nvmlDeviceGetSamples", "when": 3}, "unknown key 'when'"),
])
def test_bad_injected_errors(error, message):
    with pytest.raises(ScenarioError, match=message):
        library_from_dict({"gpus": [{"errors": [error]}]})


def test_gpu_lost_mid_run(fake_gpus, clock):
    fake_gpus({"gpus": [{"count": 2, "lost_at_s": 5}]}, clock=clock)
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(0)
    N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU)
    clock.advance(5.0)
    with pytest.raises(N.nvmlExceptionClass(N.NVML_ERROR_GPU_IS_LOST)) as e:
        N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU)
    assert e.value.value == N.NVML_ERROR_GPU_IS_LOST


def test_pcie_throughput_blocks_20ms(fake_gpus):
    fake_gpus(ONE_GPU)
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(0)
    t0 = time.perf_counter()
    kbps = N.nvmlDeviceGetPcieThroughput(h, N.NVML_PCIE_UTIL_RX_BYTES)
    assert time.perf_counter() - t0 >= 0.019
    assert kbps == pytest.approx(1e9 / 1000, rel=0.01)  # KB/s


def test_pcie_counter_32bit_wraps(fake_gpus, clock):
    fake_gpus({"gpus": [{"count": 1, "utilization": 1.0, "pcie_counter_bits": 32,
                         "pcie_rx_bytes_per_second": 3e9}]}, clock=clock)
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(0)
    values = []
    for _ in range(4):
        fv = N.nvmlDeviceGetFieldValues(h, [N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES])[0]
        assert fv.valueType == N.NVML_VALUE_TYPE_UNSIGNED_INT
        values.append(fv.value.uiVal)
        clock.advance(1.0)
    assert any(b < a for a, b in zip(values, values[1:]))  # it wrapped


def test_processes(fake_gpus):
    fake_gpus({"gpus": [{"count": 1, "processes": [
        {"pid": 4242, "memory_bytes": 5e9, "sm_util": 0.8},
        {"pid": 4243, "memory_bytes": 1e9}]}]})
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(0)
    procs = N.nvmlDeviceGetComputeRunningProcesses(h)
    assert [(p.pid, p.usedGpuMemory) for p in procs] == [(4242, 5 * 10**9), (4243, 10**9)]
    util = N.nvmlDeviceGetProcessUtilization(h, 0)
    assert {u.pid: u.smUtil for u in util} == {4242: 80, 4243: 0}


def test_xid_events(fake_gpus, clock):
    lib = fake_gpus({"gpus": [{"count": 2, "xid": [{"at_s": 3, "code": 79}]}]}, clock=clock)
    N.nvmlInit()
    es = N.nvmlEventSetCreate()
    for i in range(2):
        N.nvmlDeviceRegisterEvents(N.nvmlDeviceGetHandleByIndex(i),
                                   N.nvmlEventTypeXidCriticalError, es)
    with pytest.raises(N.NVMLError_Timeout):
        N.nvmlEventSetWait(es, 0)
    clock.advance(4)
    got = [N.nvmlEventSetWait(es, 0) for _ in range(2)]
    assert [(g.eventType, g.eventData) for g in got] == [(N.nvmlEventTypeXidCriticalError, 79)] * 2
    with pytest.raises(N.NVMLError_Timeout):
        N.nvmlEventSetWait(es, 0)
    N.nvmlEventSetFree(es)
    assert lib.calls["nvmlEventSetWait_v2"] == 4


def test_gpm_metrics(fake_gpus, clock):
    fake_gpus({"gpus": [{"count": 1, "utilization": 0.8, "sm_active_per_busy": 0.5}]},
              clock=clock)
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(0)
    assert N.nvmlGpmQueryDeviceSupport(h).isSupportedDevice == 1
    a, b = N.nvmlGpmSampleAlloc(), N.nvmlGpmSampleAlloc()
    N.nvmlGpmSampleGet(h, a)
    clock.advance(1.0)
    N.nvmlGpmSampleGet(h, b)
    req = N.c_nvmlGpmMetricsGet_t()
    req.version, req.numMetrics, req.sample1, req.sample2 = N.NVML_GPM_METRICS_GET_VERSION, 1, a, b
    req.metrics[0].metricId = N.NVML_GPM_METRIC_SM_UTIL
    N.nvmlGpmMetricsGet(req)
    assert req.metrics[0].value == pytest.approx(40.0)  # percent


@pytest.mark.parametrize("doc, message", [
    ({"gpus": [{"count": 1, "utilization": 1.5}]}, "utilization: 1.5 is outside"),
    ({"gpus": [{"count": 1, "bogus": 1}]}, "unknown key 'bogus'"),
    ({"gpus": [{"throttle": [{"reasons": ["melting"]}]}]}, "unknown reason 'melting'"),
    ({"init_error": "maybe"}, "init_error: expected one of"),
    ({"gpus": [{"step_period_s": 1, "step_busy_s": 2}]}, "exceeds step_period_s"),
])
def test_bad_scenarios(doc, message):
    with pytest.raises(ScenarioError, match=message):
        library_from_dict(doc)


def test_shipped_scenarios_load():
    import glob
    import os

    import agentd

    files = glob.glob(os.path.join(os.path.dirname(agentd.__file__), "scenarios", "*.toml"))
    assert files
    for f in files:
        assert load_scenario(f).devices


def test_library_scenarios_by_name(tmp_path, monkeypatch):
    """`--fake-nvml h100x8-steady` names a library file, as `--simulate NAME` does; a path
    still wins, and an unknown name is a one-line configuration error listing the names."""
    import argparse

    from agentd.daemon import config as configmod
    from agentd.gpu.fake.scenario import library, resolve

    assert "h100x8-steady" in library()
    assert len(load_scenario("h100x8-steady").devices) == 8
    monkeypatch.chdir(tmp_path)  # nothing relative to the repository
    cfg = configmod.build(argparse.Namespace(fake_nvml="h100x8-steady"), env={})
    assert cfg.fake_nvml == "h100x8-steady"
    own = tmp_path / "h100x8-steady"
    own.write_text('[[gpus]]\ncount = 2\n')
    assert resolve("h100x8-steady") == "h100x8-steady"  # the file in the cwd
    assert len(load_scenario("h100x8-steady").devices) == 2
    with pytest.raises(configmod.ConfigError, match="does not exist.*h100x8-steady"):
        configmod.build(argparse.Namespace(fake_nvml="no-such-gpus"), env={})
