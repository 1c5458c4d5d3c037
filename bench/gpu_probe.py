"""Print what a real NVIDIA driver does that agentd's fake must match: the utilization sample
period, the PCIe counter field's value type and width, call latencies, GPM support.

    python bench/gpu_probe.py        # on a GPU node; paste the output into docs/gpu-validation.md
"""

from __future__ import annotations

import statistics
import time

import pynvml as N


def timed(fn, *args, n: int = 20) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
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
    N.nvmlShutdown()


def _samples(h):
    try:
        N.nvmlDeviceGetSamples(h, N.NVML_GPU_UTILIZATION_SAMPLES, 0)
    except N.NVMLError:
        pass


if __name__ == "__main__":
    main()
