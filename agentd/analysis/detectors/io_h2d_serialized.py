"""No prefetch: reading, preprocessing and copying the next batch start only when the step
asks for it, so they alternate with compute instead of overlapping it. Seen at fine
resolution as the loader's CPU (or the reads) running while the GPU idles and
resting while it computes: a significant positive correlation of the GPU's idle share with
that activity, tested with the samples' effective number (steps span several samples).
Steps shorter than a few samples hide the alternation: then nothing is claimed."""

from __future__ import annotations

import numpy as np

from agentd.analysis.detectors.common import confidence, input_finding, trainer_alone
from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding
from agentd.analysis.stats import correlation


READING = 1e6  # bytes/s the node's data disks read while it trains

REST = 0.5  # while the GPU computes, the activity runs at most at this share of its level
#             in the gaps (a prefetching loader keeps working during compute)
READS_EXPLAIN = 0.25  # the reads, at the drives' ceiling, need at least this share of the
#                       time the GPU waits (serialized loaders: 45-77% in the robustness
#                       suite; a prefetching worker reading the batch after next: ~3%)
READS_FIT = 3.0  # ... and at most this multiple of it: reads that need more time than the
#                 GPU idles, even at the drives' ceiling, run while it computes (a loader
#                 streaming shards ahead: 7-12x in the robustness suite, against 0.5-0.8 for
#                 serialized loaders; 3 leaves room for a nominal ceiling twice too low)
IN_GAPS = 2 / 3  # reads in at least this share of the gappiest samples: each step's batch is
#                  read in its gap (a prefetching worker, woken when a batch is taken, reads
#                  in some gaps, ahead, and not in the others)


def _series(ev: Evidence, g: str, what: str, disk):
    if what == "loader CPU":
        return ev.loaders[g].cpu
    return disk


def _rests(idle: np.ndarray, activity: np.ndarray, every_gap: bool = False) -> bool:
    """The activity rests while the GPU computes and works while it idles (with
    `every_gap`: in nearly every gap)."""
    x = np.asarray(activity, dtype=float)
    ok = np.isfinite(idle) & np.isfinite(x)
    if ok.sum() < 40:
        return False
    # The samples most and least in a gap (a gap may be shorter than a sample).
    hi, lo = np.quantile(idle[ok], [0.75, 0.25])
    if hi - lo < 0.05:
        return False
    gap, work = ok & (idle >= hi), ok & (idle <= lo)
    in_gaps = np.nanmean(x[gap])
    during = np.nanmean(x[work])
    if every_gap and np.mean(x[gap] > 0.05 * np.max(x[ok])) < IN_GAPS:
        return False
    return bool(in_gaps > 0 and during <= REST * in_gaps)


def _no_workers(ev: Evidence, starved: list[str]) -> list[Finding]:
    """The process tree shows no data-loader workers: the trainer reads and decodes each
    batch itself, between steps (PyTorch's DataLoader with num_workers=0 has no prefetch)."""
    alone = [g for g in starved if trainer_alone(ev, g)]
    reading = ev.read_total.n and ev.read_total.mean >= READING
    if not alone or not reading:
        return []
    cores = float(np.mean([ev.loaders[g].cores.mean for g in alone]))
    return [input_finding(
        ev, "io_h2d_serialized", alone, confidence(0.7, ev),
        "the training process has no data-loader workers: it reads and decodes each batch "
        "itself, between steps",
        f"no prefetch: the training process loads each batch itself (no DataLoader workers; "
        f"{cores:.1f} cores busy) while the GPU waits",
        {"loader_workers": 0, "trainer_cores": cores,
         "read_bytes_per_second": ev.read_total.mean},
        ["Load in worker processes that prefetch: DataLoader(num_workers=N, prefetch_factor=2, "
         "pin_memory=True, persistent_workers=True); tf.data: .prefetch(tf.data.AUTOTUNE).",
         "Copy the next batch with non_blocking=True on a side stream while the current step "
         "runs."])]


def _reads_take_time(ev: Evidence, g: str) -> bool:
    """The node's reads could fill the GPU's gaps, and fit in them: at the drives' ceiling
    (the fastest they can be) they need at least READS_EXPLAIN of its idle time and at most
    READS_FIT times it. Reads that take a millisecond of a 30 ms gap are a prefetching
    worker's, whenever they happen; reads that need several times the gaps run through the
    compute, overlapping it. With no ceiling known, nothing says how long they take."""
    cap = sum(d.limit.value for d in ev.disks.values() if d.limit.known)
    idle = ev.gpus[g].idle.mean
    if not cap or not ev.read_total.n or not idle > 0:
        return False
    return READS_EXPLAIN * idle <= ev.read_total.mean / cap <= READS_FIT * idle


def _reads_are_its_job(ev: Evidence, g: str, starved: list[str]) -> bool:
    """The node's reads can stand for the GPU's own loading: at most two GPUs starve, or
    every starved GPU is a rank of the GPU's job (its ranks step together, so their reads
    do too). Starved GPUs of other jobs, stepping on their own, would mix their reads in."""
    if len(starved) <= 2:
        return True
    job = next((grp for grp in ev.jobs if g in grp), [g])
    return set(starved) <= set(job)


def detect(ev: Evidence, starved: list[str]) -> list[Finding]:
    if ev.coarse or not starved:
        return []
    sig = ev.sig
    disk = None
    if ev.disks:
        disk = sum(np.nan_to_num(sig.get("disk.read", d)) for d in ev.disks)
    hits = {}
    for g in starved:
        s = ev.gpus[g]
        m = s.present & ~s.benign
        idle = np.where(m, s.idle_aligned, np.nan)
        tests = {}
        ld = ev.loaders.get(g)
        if ld is not None and ld.cpu is not None:
            tests["loader CPU"] = correlation(idle, ld.cpu)
        if disk is not None and len(ev.disks) and _reads_are_its_job(ev, g, starved) and \
                _reads_take_time(ev, g):
            tests["storage reads"] = correlation(idle, disk)
        # (Copies are no evidence: in any input-bound pipeline a batch is copied when it is
        # ready, i.e. while the GPU waits for it.)
        good = {k: c for k, c in tests.items() if c.significant(+1) and
                _rests(idle, _series(ev, g, k, disk), every_gap=k == "storage reads")}
        if good:
            best = max(good.items(), key=lambda kv: kv[1].r)
            hits[g] = best
    if not hits:
        return _no_workers(ev, starved)
    gpus = sorted(hits, key=lambda g: (len(g), g))
    what, corr = max(hits.values(), key=lambda kv: kv[1].r)
    r = float(np.mean([c.r for _, c in hits.values()]))
    conf = 0.5 + 0.4 * min(max(r - 0.3, 0.0) / 0.4, 1.0)
    return [input_finding(
        ev, "io_h2d_serialized", gpus, confidence(conf, ev),
        f"{what} runs while the GPU idles and rests while it computes "
        f"(correlation {r:+.2f}, effective samples {corr.n_eff:.0f})",
        "the next batch is fetched only when the step needs it: loading alternates with "
        f"compute instead of overlapping it ({what}: in the GPU's gaps, r={r:+.2f})",
        {"alternation_correlation": r, "alternating": what, "p_value": corr.p},
        ["Overlap loading with compute: DataLoader(num_workers=N, prefetch_factor=2, "
         "pin_memory=True, persistent_workers=True) and copies with non_blocking=True; "
         "tf.data: .prefetch(tf.data.AUTOTUNE).",
         "Prefetch the next batch to the GPU on a side CUDA stream while the current step "
         "runs."])]
