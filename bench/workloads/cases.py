"""The workload cases: each a real input pipeline built to have one bottleneck (or none).

What makes each case what it is is real: files on the real disk, real worker processes, the
kernel's page cache and cgroup limits; nothing here simulates a counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dataset import DatasetSpec

MIB = 1 << 20

SMALL = DatasetSpec("small-160px", 2000, 160, 160)  # ~10 KB JPEGs, cheap to decode
# ~90 KB JPEGs, ~90 MB. The cold cases drop each file from the page cache once read, as a
# dataset far larger than memory would have it, so a small set serves them all.
PHOTOS = DatasetSpec("photos-640px", 1000, 640, 480)


@dataclass(frozen=True)
class Case:
    name: str
    expected: str | None  # the class it is built to have (None: healthy, no finding)
    shows: str  # what it shows, for the table and the docs
    dataset: DatasetSpec
    batch: int
    workers: int
    prefetch: int
    compute_seconds: float
    transform: dict = field(default_factory=dict)
    cache: str = "warm"  # "warm": every file read once before; "cold": evicted first
    read_bps: int | None = None  # read-bandwidth limit on the data disk (cgroup)
    memory_cache_bytes: int | None = None  # memory limit: resident set + this much cache
    pinned: bool = True
    checkpoint_every_seconds: float = 0.0
    checkpoint_bytes: int = 0
    ready_after_steps: int = 5
    gpu_only: bool = False
    min_seconds: float = 10.0


CASES = [
    Case("healthy", None,
         "cached data, two workers with prefetch, cheap decode: the GPU never waits",
         SMALL, batch=16, workers=2, prefetch=4, compute_seconds=0.40,
         transform={"crop": 112}),
    Case("input_storage", "input_storage",
         "cold files read through a cgroup read limit of 8 MB/s on the data disk; four "
         "workers mostly wait in D state for reads",
         PHOTOS, batch=16, workers=4, prefetch=2, compute_seconds=0.08,
         transform={"crop": 112, "drop_after_read": True}, cache="cold", read_bps=8 * MIB),
    Case("input_cpu", "input_cpu",
         "cached data, heavy augmentation (three blurred crops per image) on one worker: the "
         "worker runs at 100% of a core",
         PHOTOS, batch=16, workers=1, prefetch=2, compute_seconds=0.06,
         transform={"crop": 160, "blur": 2.0, "passes": 3}),
    Case("io_h2d_serialized", "io_h2d_serialized",
         "no workers, no prefetch: the trainer reads (cold files), decodes, copies float32 "
         "batches and computes, one after the other",
         PHOTOS, batch=16, workers=0, prefetch=0, compute_seconds=0.08,
         transform={"crop": 224, "float32": True, "drop_after_read": True}, cache="cold",
         pinned=False),
    Case("memory_pressure", "memory_pressure",
         "a cgroup memory limit leaves ~32 MiB of page cache for a 90 MB dataset read epoch "
         "after epoch, on a disk limited to 10 MB/s: evicted files are read again",
         PHOTOS, batch=16, workers=2, prefetch=2, compute_seconds=0.08,
         transform={"crop": 112}, cache="cold", read_bps=10 * MIB,
         memory_cache_bytes=32 * MIB, ready_after_steps=70, min_seconds=15.0),
    Case("healthy_checkpoint", None,
         "the healthy pipeline writing a 128 MiB checkpoint (and fsync) every 8 s: the GPU "
         "idles while it writes, which is no input stall",
         SMALL, batch=16, workers=2, prefetch=4, compute_seconds=0.40,
         transform={"crop": 112}, checkpoint_every_seconds=8.0, checkpoint_bytes=128 * MIB,
         min_seconds=15.0),
    Case("h2d_pcie", "h2d_pcie",
         "16-frame float32 clips (150 MiB a batch) copied from pageable memory: copies, not "
         "the loader, hold the GPU",
         SMALL, batch=16, workers=4, prefetch=2, compute_seconds=0.015,
         transform={"crop": 224, "float32": True, "frames": 16}, pinned=False,
         gpu_only=True),
]

BY_NAME = {c.name: c for c in CASES}
