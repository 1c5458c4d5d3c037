"""The fake GPU driven by a real process (agentd/gpu/fake/trainer.py): what the process
publishes is what NVML reports, through the real pynvml."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pynvml as N
import pytest

from agentd.gpu.fake import ScenarioError, installed, library_from_dict
from agentd.gpu.fake.trainer import D2H, H2D, RING, SLACK, FeedReader, FeedWriter

CHILD = r"""
import sys, time
from agentd.gpu.fake.trainer import FeedWriter, H2D
w = FeedWriter(sys.argv[1], memory_used=3 << 30)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    a = time.time(); time.sleep(0.01); w.copy(H2D, 4 << 20, a, time.time())
    w.kernel_start(); time.sleep(0.06); w.kernel_end()
print("done", w.totals[H2D], flush=True)
sys.stdin.readline()  # stay alive (a GPU process) until told
"""


def test_nvml_follows_a_real_process(tmp_path, fake_gpus):
    feed = str(tmp_path / "feed")
    child = subprocess.Popen([sys.executable, "-c", CHILD, feed, "2.5"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # the trainer runs before agentd starts, as in the harness
        fake_gpus({"gpus": [{"count": 1, "trainer_feed": feed}]})
        N.nvmlInit()
        h = N.nvmlDeviceGetHandleByIndex(0)
        _, first = N.nvmlDeviceGetSamples(h, N.NVML_GPU_UTILIZATION_SAMPLES, 0)
        # The driver's buffer reaches back before we started: the process was running.
        assert len(first) >= 2 and max(s.sampleValue.uiVal for s in first) > 0
        last = first[-1].timeStamp
        line = child.stdout.readline().split()
        assert line[0] == "done"
        total = int(line[1])
        _, samples = N.nvmlDeviceGetSamples(h, N.NVML_GPU_UTILIZATION_SAMPLES, last)
        # Each sample against what the child published for its period, from the feed.
        snap = FeedReader(feed).snapshot()
        t0, period = installed().t0, 1 / 6
        for smp in samples:
            end = t0 + smp.timeStamp / 1e6 - installed().BOOT_SECONDS
            busy = sum(max(min(e, end) - max(s, end - period), 0) for s, e in snap.busy)
            assert abs(smp.sampleValue.uiVal - 100 * busy / period) <= 1.0
        mean = np.mean([smp.sampleValue.uiVal for smp in samples])
        assert 40 < mean < 90  # 60 ms of every ~70 ms, less the loop's overhead
        rx = N.nvmlDeviceGetFieldValues(h, [N.NVML_FI_DEV_PCIE_COUNT_RX_BYTES])[0].value.ullVal
        assert rx - 3 * 2**40 == total  # every byte copied, none invented (from a base)
        procs = N.nvmlDeviceGetComputeRunningProcesses(h)
        assert [p.pid for p in procs] == [child.pid]
        assert procs[0].usedGpuMemory == 3 << 30
        assert N.nvmlDeviceGetMemoryInfo(h).used == 3 << 30
    finally:
        child.stdin.close()
        child.wait(10)
    assert N.nvmlDeviceGetComputeRunningProcesses(h) == []  # it exited
    N.nvmlShutdown()


def test_ring_wraps_and_keeps_the_newest(tmp_path):
    w = FeedWriter(str(tmp_path / "feed"), pid=os.getpid())
    for k in range(RING + 100):
        w.kernel_start(float(k))
        w.kernel_end(k + 0.5)
        w.copy(H2D if k % 2 else D2H, 10, float(k), k + 0.1)
    snap = FeedReader(str(tmp_path / "feed")).snapshot()
    assert len(snap.busy) == RING - SLACK
    assert snap.busy[-1].tolist() == [RING + 99.0, RING + 99.5]
    assert np.all(np.diff(snap.busy[:, 0]) == 1.0)
    assert snap.copies[-1, 4] == (RING + 100) // 2 * 10 - 10  # bytes before, per direction


def test_no_feed_yet_is_an_idle_gpu(tmp_path, fake_gpus, clock):
    fake_gpus({"gpus": [{"count": 1, "trainer_feed": str(tmp_path / "not-yet")}]},
              clock=clock)
    N.nvmlInit()
    h = N.nvmlDeviceGetHandleByIndex(0)
    clock.advance(2.0)
    assert N.nvmlDeviceGetUtilizationRates(h).gpu == 0
    assert N.nvmlDeviceGetComputeRunningProcesses(h) == []
    N.nvmlShutdown()


@pytest.mark.parametrize("group, message", [
    ({"count": 2, "trainer_feed": "/x"}, "one GPU per feed"),
    ({"trainer_feed": 5}, "expected a file path"),
])
def test_scenario_errors(group, message):
    with pytest.raises(ScenarioError, match=message):
        library_from_dict({"gpus": [group]})
