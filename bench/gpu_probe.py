"""Print what a real NVIDIA driver does that agentd's fake must match: the utilization sample
period, the PCIe counter field's value type and width, call latencies, GPM support; and what
agentd's gpu sampler costs per tick on it (CPU time of its NVML calls at 10 Hz, all GPUs).

    python bench/gpu_probe.py        # on a GPU node; paste the output into docs/gpu-validation.md
    python bench/gpu_probe.py --fake-nvml agentd/scenarios/h100x8-steady.toml   # a dry run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pynvml as N

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def timed(fn, *args, n: int = 20) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def tick_cost(seconds: float, interval: float = 0.1) -> None:
    """The gpu sampler as the daemon runs it: fast reads every tick, slow ones every tenth;
    CPU time (this thread's, so the driver's work in our process counts) per tick."""
    from agentd.paths import Paths
    from agentd.samplers.base import Context
    from agentd.samplers.gpu import GpuSampler

    sampler = GpuSampler(Context(Paths(), interval, 1.0))
    sampler.open()
    ticks, cpu, slow_cpu, slow_ticks = 0, 0.0, 0.0, 0
    next_t = time.monotonic()
    end = next_t + seconds
    try:
        while time.monotonic() < end:
            slow = ticks % 10 == 0
            c0 = time.thread_time()
            sampler.sample(time.time(), slow)
            used = time.thread_time() - c0
            cpu += used
            if slow:
                slow_cpu += used
                slow_ticks += 1
            ticks += 1
            next_t += interval
            time.sleep(max(next_t - time.monotonic(), 0))
    finally:
        sampler.close()
    fast = (cpu - slow_cpu) / max(ticks - slow_ticks, 1)
    print(f"gpu sampler, {len(sampler.gpus)} GPU(s), {ticks} ticks at {1 / interval:g} Hz: "
          f"{cpu / ticks * 1e3:.2f} ms CPU per tick ({fast * 1e3:.2f} fast, "
          f"{slow_cpu / max(slow_ticks, 1) * 1e3:.2f} slow), {cpu / seconds * 100:.2f}% of a core")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tick-seconds", type=float, default=30.0,
                   help="how long to run the gpu sampler for its cost per tick (0: skip)")
    p.add_argument("--fake-nvml", metavar="SCENARIO", help="a fake driver, to try this out")
    args = p.parse_args()
    if args.fake_nvml:
        from agentd.gpu.fake import install, load_scenario

        install(load_scenario(args.fake_nvml))
    facts()
    if args.tick_seconds > 0:
        tick_cost(args.tick_seconds)


def facts() -> None:
    N.nvmlInit()
    print("driver", N.nvmlSystemGetDriverVersion(), "NVML", N.nvmlSystemGetNVMLVersion())
    for i in range(N.nvmlDeviceGetCount()):
        h = N.nvmlDeviceGetHandleByIndex(i)
        print(f"GPU {i}: {N.nvmlDeviceGetName(h)}")
        time.sleep(2)
        try:
            _, samples = N.nvmlDeviceGetSamples(h, N.NVML_GPU_UTILIZATION_SAMPLES, 0)
            ts = [s.timeStamp for s in samples]
            gaps = [b - a for a, b in zip(ts, ts[1:])]
            print(f"  utilization samples: {len(ts)} buffered, period {min(gaps) / 1e6:.4f} s, "
                  f"newest timestamp {ts[-1]} us (Unix now {time.time() * 1e6:.0f} us)")
        except N.NVMLError as e:
            print("  nvmlDeviceGetSamples:", e)
        fields = [N.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES,
                  (N.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, 0xFFFFFFFF)]
        for fv in N.nvmlDeviceGetFieldValues(h, fields):
            print(f"  field {fv.fieldId}: return {fv.nvmlReturn}, valueType {fv.valueType}, "
                  f"ull {fv.value.ullVal}, timestamp {fv.timestamp}")
        print(f"  nvmlDeviceGetFieldValues: {timed(N.nvmlDeviceGetFieldValues, h, fields) * 1e3:.3f} ms")
        print(f"  nvmlDeviceGetSamples: "
              f"{timed(_samples, h) * 1e3:.3f} ms")
        print(f"  nvmlDeviceGetPcieThroughput: "
              f"{timed(N.nvmlDeviceGetPcieThroughput, h, N.NVML_PCIE_UTIL_RX_BYTES, n=5) * 1e3:.1f} ms")
        try:
            print("  GPM supported:", bool(N.nvmlGpmQueryDeviceSupport(h).isSupportedDevice))
        except N.NVMLError as e:
            print("  GPM:", e)
        _short_samples_buffer(h)
    N.nvmlShutdown()
    _fast_path_cost()


def _short_samples_buffer(h) -> None:
    """agentd reads utilization samples in one call with a 128-slot buffer (no count query
    first). Which samples does the driver put in a buffer smaller than what it holds?"""
    import ctypes

    _, every = N.nvmlDeviceGetSamples(h, N.NVML_GPU_UTILIZATION_SAMPLES, 0)
    all_ts = [s.timeStamp for s in every]
    buf, vtype, count = (N.c_nvmlSample_t * 4)(), N._nvmlValueType_t(), ctypes.c_uint(4)
    ret = N._nvmlGetFunctionPointer("nvmlDeviceGetSamples")(
        h, N._nvmlSamplingType_t(N.NVML_GPU_UTILIZATION_SAMPLES), ctypes.c_ulonglong(0),
        ctypes.byref(vtype), ctypes.byref(count), buf)
    got = [buf[i].timeStamp for i in range(min(count.value, 4))]
    where = ("the oldest" if got == all_ts[:len(got)] else
             "the newest" if got == all_ts[-len(got):] else "others")
    print(f"  4-slot buffer, {len(all_ts)} held: return {ret}, {count.value} filled, {where}")


def _fast_path_cost() -> None:
    """CPU time of agentd's 10 Hz GPU read (NvmlBackend.read_fast) per GPU, driver included."""
    from agentd.gpu.nvml import NvmlBackend

    b = NvmlBackend()
    b.open()
    cpu, reads = 0.0, 0
    for _ in range(50):
        time.sleep(0.1)
        for dev in b.devices:
            if not dev.lost:
                t0 = time.thread_time()
                b.read_fast(dev.index)
                cpu += time.thread_time() - t0
                reads += 1
    b.close()
    print(f"agentd read_fast: {cpu / max(reads, 1) * 1e6:.0f} us of CPU per GPU per tick "
          f"({reads} reads): x GPUs x 10 Hz is the GPU loop's share of a core")


def _samples(h):
    try:
        N.nvmlDeviceGetSamples(h, N.NVML_GPU_UTILIZATION_SAMPLES, 0)
    except N.NVMLError:
        pass


if __name__ == "__main__":
    main()
