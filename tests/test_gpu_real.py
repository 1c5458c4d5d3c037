"""Checks against a real NVIDIA driver. Skipped where none is present (CI has no GPU); run
on a GPU node with `pytest -m gpu -v` and record the outcome in docs/gpu-validation.md."""

from __future__ import annotations

import time

import pytest

pynvml = pytest.importorskip("pynvml")


def _has_gpu() -> bool:
    from agentd.gpu.fake import installed

    if installed() is not None:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _has_gpu(), reason="no NVIDIA GPU and driver here")]


def test_backend_opens_and_reads_every_gpu():
    from agentd.gpu.nvml import NvmlBackend

    b = NvmlBackend()
    gpus = b.open()
    try:
        assert gpus
        for g in gpus:
            assert g.uuid.startswith(("GPU-", "MIG-"))
            assert g.memory_total and g.memory_total > 2**30
            assert g.sm_clock_max_hz and 3e8 < g.sm_clock_max_hz < 4e9
            s = b.read_slow(g.index)
            assert s.memory_used is not None and 0 <= s.memory_used <= g.memory_total
            assert s.power_w is None or 0 < s.power_w < 2000
            assert s.temperature_c is None or 0 < s.temperature_c < 120
        time.sleep(1.0)
        for g in gpus:
            r = b.read_fast(g.index)
            assert r.covered_seconds > 0 or r.seconds_since_sample is not None
        b.events()
    finally:
        b.close()


def test_sampler_busy_counter_advances_with_time():
    from agentd.paths import Paths
    from agentd.samplers.base import Context
    from agentd.samplers.gpu import GpuSampler

    s = GpuSampler(Context(Paths(), 0.1, 1.0), {})
    s.open()
    try:
        for i in range(30):
            time.sleep(0.1)
            s.sample(time.time(), i % 10 == 0)
        names = {n for n, _, _ in s.series()}
        assert "agentd_gpu_busy_seconds_total" in names
        assert "agentd_gpu_memory_used_bytes" in names
    finally:
        s.close()


def test_pcie_throughput_blocks_about_20ms():
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        t0 = time.perf_counter()
        try:
            pynvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES)
        except pynvml.NVMLError as e:
            pytest.skip(f"nvmlDeviceGetPcieThroughput: {e}")
        assert time.perf_counter() - t0 > 0.005
    finally:
        pynvml.nvmlShutdown()
