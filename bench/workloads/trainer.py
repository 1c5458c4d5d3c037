"""The trainer of a workload case: a step loop that times what it is blocked on.

Each step: wait for the next batch from the loader, copy it to the device, compute, and
sometimes write a checkpoint. The time blocked waiting for the batch and for the copy is the
ground truth agentd is scored against (a profiler's input-wait share). Every step's times go
to the step log:

    s T_START T_BATCH T_COPIED T_COMPUTED     (Unix seconds)
    c T_START T_END                           (a checkpoint)

The device: with CUDA (torch.cuda.is_available() and not --stand-in) real copies and real
kernels (matmuls calibrated to the step's compute time). Otherwise a stand-in that the fake
NVML follows: the copy is a real memcpy into a "device" buffer and the compute a sleep (a
GPU computes while its host thread waits), each published to the feed
(agentd/gpu/fake/trainer.py) with its real start and end, so agentd's NVML utilization, busy
time and PCIe counters follow exactly what this process did.

    python bench/workloads/trainer.py CONFIG.json     (SIGTERM ends it after the step)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class StandIn:
    """The fake device: copies and kernels published to the feed."""

    name = "stand-in"

    def __init__(self, feed_path: str, memory_used: int):
        from agentd.gpu.fake.trainer import FeedWriter

        self.feed = FeedWriter(feed_path, memory_used=memory_used)
        self._dst = None

    def to_device(self, batch, pinned: bool):
        import numpy as np

        arr = batch.numpy() if hasattr(batch, "numpy") else batch
        if self._dst is None or self._dst.shape != arr.shape or self._dst.dtype != arr.dtype:
            self._dst = np.empty_like(arr)
        start = time.time()
        if not pinned:
            # A pageable copy is staged through a pinned buffer by the driver: two passes.
            staged = arr.copy()
            np.copyto(self._dst, staged)
        else:
            np.copyto(self._dst, arr)
        end = time.time()
        from agentd.gpu.fake.trainer import H2D

        self.feed.copy(H2D, arr.nbytes, start, end)
        return self._dst

    def compute(self, seconds: float) -> None:
        start = time.time()
        self.feed.kernel_start(start)
        time.sleep(seconds)
        self.feed.kernel_end(time.time())

    def to_host(self, nbytes: int) -> bytes:
        from agentd.gpu.fake.trainer import D2H

        start = time.time()
        data = os.urandom(1 << 20) * max(nbytes >> 20, 1)
        self.feed.copy(D2H, len(data), start, time.time())
        return data


class Cuda:
    """A real GPU (torch): copies with .to(device), kernels as matmuls."""

    name = "cuda"

    def __init__(self):
        import torch

        self.torch = torch
        self.dev = torch.device("cuda", 0)
        n = 4096
        self.a = torch.randn(n, n, device=self.dev, dtype=torch.float16)
        self.b = torch.randn(n, n, device=self.dev, dtype=torch.float16)
        for _ in range(3):
            self.a @ self.b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            self.a @ self.b
        torch.cuda.synchronize()
        self.matmul_s = (time.perf_counter() - t0) / 20

    def to_device(self, batch, pinned: bool):
        torch = self.torch
        t = batch if hasattr(batch, "to") else torch.from_numpy(batch)
        if pinned and not t.is_pinned():
            t = t.pin_memory()
        out = t.to(self.dev, non_blocking=pinned)
        torch.cuda.synchronize()
        return out

    def compute(self, seconds: float) -> None:
        for _ in range(max(int(seconds / self.matmul_s), 1)):
            self.a @ self.b
        self.torch.cuda.synchronize()

    def to_host(self, nbytes: int) -> bytes:
        n = max(nbytes // 2, 1)
        t = self.torch.empty(n, dtype=self.torch.float16, device=self.dev)
        return t.cpu().numpy().tobytes()


def main(config_path: str) -> int:
    with open(config_path) as f:
        cfg = json.load(f)
    if cfg.get("cgroup_procs"):
        from cgroups import join

        join(cfg["cgroup_procs"])  # before anything is allocated: it is charged here
    import loader as L

    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    device = None
    if not cfg.get("stand_in"):
        try:
            import torch

            if torch.cuda.is_available():
                device = Cuda()
        except ImportError:
            pass
    if device is None:
        device = StandIn(cfg["feed"], int(cfg.get("device_memory_bytes", 2 << 30)))
    t = L.Transform(**cfg["transform"])
    batches, close = L.make(cfg["files"], cfg["batch"], cfg["workers"], cfg["prefetch"], t,
                            seed=cfg.get("seed", 0), pin_memory=cfg.get("pinned", True)
                            and device.name == "cuda")
    log = open(cfg["step_log"], "w", buffering=1)
    log.write(f"# device {device.name} pid {os.getpid()}\n")
    compute_s = cfg["compute_seconds"]
    every = cfg.get("checkpoint_every_seconds") or 0
    next_ckpt = time.time() + every if every else None
    steps = 0
    it = iter(batches)
    try:
        while not stop:
            t0 = time.time()
            batch = next(it)
            t1 = time.time()
            device.to_device(batch, cfg.get("pinned", True))
            t2 = time.time()
            device.compute(compute_s)
            t3 = time.time()
            log.write(f"s {t0:.6f} {t1:.6f} {t2:.6f} {t3:.6f}\n")
            steps += 1
            if steps == cfg.get("ready_after_steps", 5):
                with open(cfg["ready_file"], "w") as f:
                    f.write(str(os.getpid()))
            if next_ckpt is not None and t3 >= next_ckpt:
                c0 = time.time()
                state = device.to_host(cfg["checkpoint_bytes"])
                path = cfg["checkpoint_path"]
                with open(path + ".tmp", "wb") as f:
                    f.write(state)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(path + ".tmp", path)
                c1 = time.time()
                log.write(f"c {c0:.6f} {c1:.6f}\n")
                next_ckpt = c1 + every
    finally:
        log.close()
        close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
