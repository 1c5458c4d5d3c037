"""Host-to-device copies bound by PCIe, from byte counts rather than per-sample duty (a copy
shorter than one 0.1 s sample never reads "at capacity" in it): the bytes a GPU receives,
moved at the achievable rate (pinned, or pageable: measured by `agentd probe`, else shares of
the link), need either nearly all the time there is (the link never rests), or about the
time the GPU idles (copies serialized with compute fill its gaps)."""

from __future__ import annotations

import numpy as np

from agentd.analysis.detectors.common import (EXPLAINS_HI, EXPLAINS_LO, SATURATED, confidence,
                                              fmt_rate, input_finding, margin)
from agentd.analysis.evidence import Evidence
from agentd.analysis.findings import Finding
from agentd.analysis.periodicity import copying
from agentd.analysis.stats import correlation

GAP_RATE = 0.25  # pageable without a measured ceiling: rx through the gaps >= this x link


GAPS_P = 0.01  # the copies' coincidence with idle samples, one-sided enough
# A sample's copy rate this far above the pageable ceiling: pinned copies. A measured
# ceiling (`agentd probe`: the median of the rates within 5% of the best, on copies large
# enough to amortise their start) leaves 5% for the probe's spread and 3% for a sample's
# timing; the nominal one (half the pinned rate) is a guess, and leaves more.
FASTER = 1.15
FASTER_MEASURED = 1.08
# Copies are seen running at the pageable rate when the fastest copying sample reaches this
# share of it: a copy that fills a sample reads its own rate (every pageable node of the
# robustness suite's kept seeds read 1.00-1.02 of the measured rate); a pinned copy of a
# few ms reads a fraction of it (0.06-0.30), and its bytes at the pageable rate may match
# the ordinary gaps by coincidence.
SEEN_PAGEABLE = 0.8


def peak_rate(link) -> float:
    """The fastest copying seen in a sample: the 95th percentile of the samples that copy
    (a sample's rate carries a few percent of timing noise; the 99th percentile of a hundred
    copies is its outliers)."""
    rx = link.rx_series
    if rx is None:
        return float("nan")
    rx = np.asarray(rx, dtype=float)
    rx = rx[np.isfinite(rx)]
    if not len(rx) or rx.max() <= 0:
        return float("nan")
    on = rx[copying(rx)]
    return float(np.percentile(on, 95)) if len(on) >= 20 else float("nan")


SUSTAINED_SAMPLES = 50  # samples wholly inside copies, for their rate to be read from them
# Sustained copies at this share of the pinned ceiling are slow copies: pageable copies run
# at 20-50% of pinned ones (the CPU stages them); slower still is data trickling in as a
# loader produces it, not a copy limit.
SLOW = (0.2, 0.5)
IDLE_INSIDE = 0.4  # the GPU idles in the samples inside the copies, on average at least this
#                   share: they are its gaps (copies the GPU waits for read ~0.5 through the
#                   driver's 1/6 s samples; a side-stream copy it computes through, <= 1/3)


def sustained_rate(link) -> tuple[float, np.ndarray]:
    """(median rate, mask of the samples) of the samples wholly inside a copy: a copy
    spanning three samples or more fills its middle ones, which read its own rate (a sample
    at a copy's end, or holding a copy shorter than itself, averages it with an idle link)."""
    rx = link.rx_series
    if rx is None:
        return float("nan"), np.zeros(0, dtype=bool)
    rx = np.nan_to_num(np.asarray(rx, dtype=float))
    inside = np.zeros(len(rx), dtype=bool)
    if len(rx) < 3:
        return float("nan"), inside
    on = copying(rx)
    inside[1:-1] = on[1:-1] & on[:-2] & on[2:]
    return (float(np.median(rx[inside])) if inside.any() else float("nan")), inside


def _slow_sustained(ev: Evidence, g: str, link, idle: float) -> tuple | None:
    """Without a measured pageable ceiling: copies seen running slow throughout (pageable
    memory, or a link shared with other devices), at a rate at which they need about the
    time the GPU idles, and in its gaps. Only at fine resolution: a scrape's sample averages
    many copies with the link's rests, so its rate is no copy's."""
    if ev.coarse:
        return None
    rate, inside = sustained_rate(link)
    n = int(inside.sum())
    if n < SUSTAINED_SAMPLES or not SLOW[0] * link.pinned.value <= rate <= \
            SLOW[1] * link.pinned.value:
        return None
    # The copies are the gaps: the GPU idles through them (a copy on a side stream that the
    # GPU computes through explains no gap, however its bytes add up).
    s = ev.gpus[g]
    idle_inside = np.asarray(s.idle_aligned, dtype=float)[inside & s.present & ~s.benign]
    idle_inside = idle_inside[np.isfinite(idle_inside)]
    if not len(idle_inside) or float(np.mean(idle_inside)) < IDLE_INSIDE:
        return None
    share = link.rx.mean / rate
    explained = share / idle if idle > 0 else 0.0
    if not (EXPLAINS_LO <= explained <= EXPLAINS_HI and in_gaps(ev, g, link)):
        return None
    return share, explained, rate, n


def in_gaps(ev: Evidence, g: str, link) -> bool:
    """The copies coincide with the GPU's idle time: at fine resolution, a significant positive
    correlation of the bytes per sample with the idle share per sample (on the driver's own
    sample times); at coarse resolution nothing can show it, and the byte count stands."""
    if ev.coarse or link.rx_series is None:
        return True
    s = ev.gpus[g]
    idle = np.where(s.present & ~s.benign, s.idle_aligned, np.nan)
    c = correlation(idle, link.rx_series)
    return c.r == c.r and c.r > 0 and c.p < GAPS_P


def judge(ev: Evidence, g: str) -> tuple[str, float, float, dict] | None:
    """(how, share of the gap explained, confidence, evidence) for one GPU, or None."""
    link = ev.links.get(g)
    s = ev.gpus[g]
    if link is None or not link.rx.n or not link.pinned.known or not s.idle.n:
        return None
    idle = s.idle.mean
    pinned = link.rx.mean / link.pinned.value  # time share the copies need at full rate
    pinned_lo = (link.rx.mean - 1.645 * link.rx.se) / link.pinned.value
    ev_out = {"pcie_rx_bytes_per_second": link.rx.mean,
              "pcie_capacity_bytes_per_second": link.capacity,
              "h2d_ceiling_bytes_per_second": link.pinned.value,
              "h2d_ceiling_source": link.pinned.source,
              "copy_time_share": pinned, "idle_share": idle,
              "rx_in_gaps_bytes_per_second": link.rx_in_gaps}
    if pinned >= SATURATED and pinned_lo >= SATURATED - 0.05:
        return "saturated", 1.0, 0.85 * margin(pinned, SATURATED, 0.1), ev_out
    explained = pinned / idle if idle > 0 else 0.0
    if EXPLAINS_LO <= explained <= EXPLAINS_HI:
        return "serialized", explained, 0.75 * margin(explained, EXPLAINS_LO, 0.3), ev_out
    if link.pageable.known:
        pageable = link.rx.mean / link.pageable.value
        explained = pageable / idle if idle > 0 else 0.0
        gap_rate = link.rx_in_gaps / link.capacity if link.capacity and \
            link.rx_in_gaps == link.rx_in_gaps else float("nan")
        measured = link.pageable.source == "measured"
        peak = peak_rate(link)
        # The copies must be seen at about the pageable rate: in a sample they fill (a
        # measured ceiling), or through the gaps (the nominal one).
        seen = (measured and peak >= SEEN_PAGEABLE * link.pageable.value) or \
            (gap_rate == gap_rate and gap_rate >= GAP_RATE)
        # A sample's rate never exceeds the copy's own: copies seen faster than pageable
        # memory allows are pinned (their gaps are some other limit's, a shared uplink's).
        faster = peak > (FASTER_MEASURED if measured else FASTER) * link.pageable.value
        # Copies slow enough (pageable) to need about the GPU's idle time explain it only if
        # they happen in it: a batch prefetched on a side stream is copied while the GPU
        # computes, and its bytes at pageable speed may match the ordinary gaps between steps
        # by coincidence. (Copies at the pageable rate nearly all the time need no such sign.)
        fills = EXPLAINS_LO <= explained <= EXPLAINS_HI and in_gaps(ev, g, link)
        if seen and not faster and (pageable >= SATURATED or fills):
            ev_out.update(pageable_ceiling_bytes_per_second=link.pageable.value,
                          pageable_copy_time_share=pageable)
            return "pageable", min(explained, 1.0), (0.8 if measured else 0.6), ev_out
        if not measured and (slow := _slow_sustained(ev, g, link, idle)) is not None:
            share, explained, rate, n = slow
            ev_out.update(sustained_copy_bytes_per_second=rate, sustained_samples=n,
                          slow_copy_time_share=share)
            return "slow", min(explained, 1.0), 0.6, ev_out
    return None


def detect(ev: Evidence, starved: list[str]) -> list[Finding]:
    hits = {g: j for g in starved if (j := judge(ev, g)) is not None}
    if not hits:
        return []
    gpus = sorted(hits, key=lambda g: (len(g), g))
    how, _, conf, evidence = hits[gpus[0]]
    conf = min(h[2] for h in hits.values())
    link = ev.links[gpus[0]]
    advice = ["Send compact data to the GPU (uint8 images rather than float32; decode and "
              "normalise on the GPU).",
              "Check the link trains at its maximum generation and width "
              "(agentd_gpu_pcie_link_generation against ..._max_generation)."]
    if how == "pageable":
        advice.insert(0, "Copies run at pageable-memory speed: use pinned memory (DataLoader "
                         "pin_memory=True) and non_blocking copies.")
    if how == "slow":
        advice.insert(0, "Copies run at a fraction of the link's rate, as copies from pageable "
                         "memory do: use pinned memory (DataLoader pin_memory=True) and "
                         "non_blocking copies; if they already are, look for other devices "
                         "sharing the GPU's PCIe switch (nvidia-smi topo -m). `agentd probe` "
                         "measures the pinned and pageable rates.")
    if how == "serialized":
        advice.insert(0, "Copies take the GPU's gaps: overlap them with compute "
                         "(pin_memory=True, .to(device, non_blocking=True), prefetch the next "
                         "batch on a side stream).")
    mech = {"saturated": "the link carries copies nearly all the time at its achievable rate",
            "serialized": "copies at link rate need about the time the GPU idles",
            "pageable": "copies at pageable-memory speed fill the GPU's gaps",
            "slow": "copies sustained at a fraction of the link's rate fill the GPU's "
                    "gaps"}[how]
    return [input_finding(
        ev, "h2d_pcie", gpus, confidence(conf, ev), mech,
        f"host-to-device copies bound by PCIe: {fmt_rate(link.rx.mean)} needs "
        f"{evidence['copy_time_share'] * 100:.0f}% of the time at "
        f"{fmt_rate(link.pinned.value)} ({link.pinned.source}); the GPU idles "
        f"{evidence['idle_share'] * 100:.0f}%", {**evidence, "mode": how}, advice)]
