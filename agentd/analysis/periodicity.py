"""The training step period, or an honest "cannot be resolved at this resolution".

A periodic counter sampled every dt shows any period shorter than 2 dt at a false, longer
one (aliasing): a 0.2 s step read through NVML's 1/6 s samples looks like a 1.0 s step. So:
- each series is searched with a periodogram (the driver's utilization samples carry their
  own timestamps; ticks are slightly irregular: an FFT on their usual grid where they only
  jitter, Lomb-Scargle on their own times where they have holes), only at frequencies well
  inside its Nyquist band, with a false-alarm test, a check that
  the peak is the fundamental and not a harmonic, and a width that bounds the estimate;
- a period is reported only when two series sampled at different rates agree on it (their
  aliases of a faster true period would differ), or, with one series, when it spans many
  samples; and only when its interval is within 10% (MAX_REL_WIDTH);
- a period holding several host-to-device copies (copies_per_cycle) is a cycle of several
  steps bunched by waits, not a step: evidence.py does not report it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_REL_WIDTH = 0.10  # report a period only when known to within 10%
MIN_POWER = 0.15  # normalized Lomb-Scargle power (share of the variance) of the peak
MAX_FAP = 1e-3  # false-alarm probability of the peak
SINGLE_SERIES_MIN_SAMPLES = 10.0  # one series alone: the period spans this many samples
SINGLE_SERIES_MIN_POWER = 0.35  # ... and its peak explains this share of the variance
AGREE = 0.10  # two series agree when their periods differ by less than this
AGREE_MIN_POWER = 0.25  # ... and the stronger peak explains this share of its variance


@dataclass(frozen=True)
class Period:
    seconds: float
    rel_width: float  # half-width of the peak over its frequency: the interval, relative
    power: float
    series: str  # which series found it
    # Seconds per step over the whole span, pauses included (1 / steps completed per second),
    # where steps were counted; a periodogram's period is both.
    mean_seconds: float | None = None

    @property
    def steps_per_second(self) -> float:
        return 1.0 / (self.mean_seconds or self.seconds)

    @property
    def interval(self) -> tuple[float, float]:
        return (self.seconds / (1 + self.rel_width), self.seconds / max(1 - self.rel_width,
                                                                          1e-3))


MAX_SPAN = 300.0  # seconds of the most recent samples searched (periods are local)
LOMB_SCARGLE_WORK = 2_000_000  # samples x frequencies beyond which gappy series go FFT too
HOLE = 2.5  # a spacing this many times the usual one is a hole (two samples or more missed) ...
GAPS = 0.1  # ... and series whose holes add up to less than this share of their span go FFT


def periodogram(t: np.ndarray, y: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Normalized power (share of the variance a sinusoid at each frequency explains).
    On a regular grid, from a zero-padded FFT (N log N). Samples that only jitter around
    their usual spacing (a daemon's ticks on a loaded node, the driver's sample times, GPM
    samples missed one or two at a time: a tenth of them on a loaded node) are put on that
    grid by linear interpolation first: the peaks searched lie far below its Nyquist
    frequency, where interpolation changes next to nothing, and Lomb-Scargle costs N x
    frequencies (0.2-0.3 s of CPU per minute of 8 GPUs, every 10 s in the daemon). Series
    with real holes (a sampler down for seconds, which a straight line would fill with a
    ramp) are searched by Lomb-Scargle on their own times, up to a budget."""
    y = y - y.mean()
    if not np.any(y):
        return np.zeros(len(freqs))
    dt = np.diff(t)
    step = float(np.median(dt))
    regular = step > 0 and np.all(np.abs(dt - step) <= 0.02 * step)
    holes = dt > HOLE * step
    jitter = step > 0 and float(dt[holes].sum()) <= GAPS * float(t[-1] - t[0])
    if not regular and step > 0 and (jitter or len(t) * len(freqs) > LOMB_SCARGLE_WORK):
        grid = np.arange(t[0], t[-1] + step / 2, step)
        y = np.interp(grid, t, y)
        t = grid
        regular = True
    if regular:
        n = len(y)
        size = 1 << int(np.ceil(np.log2(n * 8)))
        spec = np.abs(np.fft.rfft(y, size)) ** 2
        f = np.fft.rfftfreq(size, step)
        power = 2.0 * spec / (n * float(np.dot(y, y)))
        return np.clip(np.interp(freqs, f, power), 0.0, 1.0)
    from scipy.signal import lombscargle

    return np.asarray(lombscargle(t, y, 2 * np.pi * freqs, normalize=True), dtype=float)


def _local_max_near(p: np.ndarray, i: int, span: int) -> int:
    lo, hi = max(i - span, 0), min(i + span + 1, len(p))
    return lo + int(np.argmax(p[lo:hi])) if hi > lo else i


def find_period(t: np.ndarray, y: np.ndarray, name: str, min_s: float = 0.05,
                max_s: float = 60.0) -> Period | None:
    """The fundamental period of one series (sample times t, values y), or None."""
    ok = np.isfinite(t) & np.isfinite(y)
    t, y = np.asarray(t[ok], dtype=float), np.asarray(y[ok], dtype=float)
    if len(t) < 64 or np.std(y) < 1e-9:
        return None
    order = np.argsort(t)
    t, y = t[order], y[order]
    recent = t >= t[-1] - MAX_SPAN
    t, y = t[recent] - t[recent][0], y[recent]
    if len(t) < 64:
        return None
    span = float(t[-1])
    dt = float(np.median(np.diff(t)))
    if span <= 0 or dt <= 0:
        return None
    # Inside the band: at most 0.45 of the sampling rate, at least 4 cycles in the window.
    f_hi = min(0.45 / dt, 1.0 / min_s)
    f_lo = max(4.0 / span, 1.0 / max_s)
    if f_hi <= f_lo * 1.2:
        return None
    df = 1.0 / (span * 8)  # 8x oversampled against the natural resolution 1/span
    n = int((f_hi - f_lo) / df) + 1
    if n > 40_000:
        df = (f_hi - f_lo) / 40_000
        n = 40_001
    freqs = f_lo + np.arange(n) * df
    p = periodogram(t, y, freqs)
    i = int(np.argmax(p))
    peak = float(p[i])
    if peak < MIN_POWER:
        return None
    # False alarms among ~ (f range x span) independent frequencies (Scargle; Baluev's bound
    # is close for these sizes).
    m = max((f_hi - f_lo) * span, 1.0)
    single = (1 - peak) ** ((len(t) - 3) / 2)
    if min(m * single, 1.0) > MAX_FAP:
        return None
    # The fundamental: a pulse train puts power at f0, 2 f0, 3 f0 ...; when a sub-harmonic
    # of the peak carries comparable power, the true step is that much longer.
    width_bins = max(int(round(1.0 / (span * df))), 1)
    best = i
    for k in (2, 3, 4):
        j = int(round((freqs[i] / k - f_lo) / df))
        if j < 0:
            break
        j = _local_max_near(p, j, width_bins)
        if p[j] >= 0.5 * peak and abs(freqs[j] * k - freqs[i]) <= 2 * width_bins * df * k:
            best = j
    i, peak = best, float(p[best])
    # The peak's half width at half maximum, in frequency.
    left = i
    while left > 0 and p[left] > peak / 2:
        left -= 1
    right = i
    while right < n - 1 and p[right] > peak / 2:
        right += 1
    f = float(freqs[i])
    half = max((freqs[right] - freqs[left]) / 2, df)
    return Period(1.0 / f, half / f, peak, name)


def commensurate(dt_a: float, dt_b: float) -> bool:
    """One sampling interval is (within 5%) a whole multiple of the other: every alias of a
    fast step at the finer rate is one at the coarser rate too (0.1 s PCIe ticks and 0.2 s
    GPM samples agree on the same false period), so their agreement proves nothing."""
    k = max(dt_a, dt_b) / max(min(dt_a, dt_b), 1e-9)
    return abs(k - round(k)) <= 0.05 * k


def resolve(periods: list[Period], sample_dt: dict[str, float]) -> tuple[Period | None, str]:
    """One period from the series' candidates, or None with the reason."""
    found = [p for p in periods if p is not None]
    if not found:
        return None, "no periodic activity found at this resolution"
    found.sort(key=lambda p: -p.power)
    for a in found:
        for b in found:
            if b is a or commensurate(sample_dt[a.series], sample_dt[b.series]):
                continue  # one rate a multiple of the other: the coarser has the same aliases
            k = b.seconds / a.seconds
            if abs(k - 1) <= AGREE and max(a.power, b.power) >= AGREE_MIN_POWER:
                best = a if a.rel_width <= b.rel_width else b
                if best.rel_width <= MAX_REL_WIDTH:
                    return best, ""
    if len(found) == 1 or all(commensurate(sample_dt[p.series], sample_dt[found[0].series])
                              for p in found):
        a = found[0]
        if a.seconds >= SINGLE_SERIES_MIN_SAMPLES * sample_dt[a.series] and \
                a.rel_width <= MAX_REL_WIDTH and a.power >= SINGLE_SERIES_MIN_POWER:
            return a, ""
        return None, (f"one series suggests {a.seconds:.3g} s, too few samples per step to "
                      "rule out aliasing")
    return None, "the series disagree (aliasing at this resolution)"


STEPS_PER_CYCLE = 1.5  # a period holding this many copies on average holds several steps
COPYING = 0.02  # a sample moving this share of the busiest sample's bytes is copying


def copying(x: np.ndarray) -> np.ndarray:
    """The samples of a PCIe byte series that copy: over COPYING of the busiest one (a NaN
    copies nothing)."""
    x = np.nan_to_num(np.asarray(x, dtype=float))
    if not len(x) or x.max() <= 0:
        return np.zeros(len(x), dtype=bool)
    return x > COPYING * x.max()


def copies_per_cycle(rx: np.ndarray, resolution: float, seconds: float) -> float | None:
    """How many host-to-device copies (runs of samples that copy) a period of `seconds`
    holds on average: about one where it is the step's (a copy spanning samples is one run;
    steps shorter than a sample merge theirs), two or more where the activity repeats
    every few steps. None with fewer than 10 copies to count."""
    on = copying(rx)
    runs = int((np.diff(np.concatenate(([0], on.astype(np.int8)))) == 1).sum())
    if runs < 10:
        return None
    return seconds * runs / (len(on) * resolution)


GAP_LEVEL = 0.95  # a held utilization under this shows a gap in the driver's window


def gaps_per_cycle(level: np.ndarray, resolution: float, seconds: float) -> float | None:
    """How many gaps between kernels (a held utilization dipping under GAP_LEVEL after a
    sample at or over it) a period of `seconds` holds on average: a step has one, the wait
    for its batch and launch; where the activity repeats every few steps (steps bunched by
    stalls) a cycle holds several. The counterpart of copies_per_cycle for sources without
    PCIe counters. None with fewer than 10 gaps to count."""
    x = np.asarray(level, dtype=float)
    ok = np.isfinite(x)
    high = ok & (x >= GAP_LEVEL)
    low = ok & (x < GAP_LEVEL)
    gaps = int((low[1:] & high[:-1]).sum())
    if gaps < 10:
        return None
    return seconds * gaps / (len(x) * resolution)


HIDDEN_GAPS = 0.02  # busy samples idling this share (their median) hide gaps ...
CLEAR_SAMPLES = 4  # ... in a cycle of at least this many driver samples (a shorter step
#                    touches its gap in most of its samples: 0.45-0.58 s steps of 0.2 s
#                    samples read 3-16% idle in them, and their periods are right)


def hidden_gaps(level: np.ndarray) -> float | None:
    """How much the held utilization's busy samples (at or over half) still idle, their
    median: gaps shorter than the driver's sample, inside the stretches that look busy. A
    step's kernels run back to back (NVML reads 100%) until its one gap, so most busy
    samples of steps longer than a sample read 100%. Where most read 96-98% (an input-bound
    rank running four 0.26 s steps on the four batches its workers delivered together, then
    waiting: one dip per 2.2 s cycle) or 80% (0.15 s steps, shorter than the 0.2 s driver
    sample: every sample holds a gap), the cycles hold more steps than the dips counted.
    None without 10 busy samples."""
    x = np.asarray(level, dtype=float)
    busy = np.isfinite(x) & (x >= 0.5)
    if busy.sum() < 10:
        return None
    return float(np.median(1.0 - np.minimum(x[busy], 1.0)))


BAND = 0.5  # intervals within +-50% of the median one are the steps' own ...
TYPICAL = 0.7  # ... and at least this share of them must be, for a typical step to exist,
SPREAD = 0.2  # spread by no more than this share of their mean (and half a tick)


def _one_reading_per_row(x: np.ndarray) -> np.ndarray:
    """A row that came late covers several grid points with one rate (signals.from_groups):
    its bytes are one reading, not one copy per point. Runs of exactly equal non-zero values
    (two readings of a byte counter never are) are summed into the run's last point."""
    same = np.zeros(len(x), dtype=bool)
    same[1:] = (x[1:] == x[:-1]) & (x[1:] > 0)
    if not same.any():
        return x
    out = x.copy()
    edges = np.diff(np.concatenate(([0], same.astype(np.int8), [0])))
    for first, last in zip(np.flatnonzero(edges == 1) - 1, np.flatnonzero(edges == -1) - 1):
        out[first:last] = 0.0
        out[last] = x[first] * (last - first + 1)
    return out


def period_from_bursts(rx: np.ndarray, resolution: float) -> Period | None:
    """Step period from host-to-device copies when each step's copy is one short, isolated
    burst (steps longer than a tick, copies shorter). Exact where a periodogram aliases.

    The period is the typical interval between consecutive copies: the mean of the intervals
    within BAND of their median (and a tick). A tick-quantized interval is unbiased on
    average (a step's phase against the ticks drifts), and pauses (evaluation, a checkpoint,
    a wait for data when prefetched batches arrive together) are not steps: they count in
    `mean_seconds`, the window's length over the number of copies, from which throughput
    comes."""
    x = np.nan_to_num(np.asarray(rx, dtype=float)) * resolution  # bytes per sample
    if len(x) < 50 or x.max() <= 0:
        return None
    x = _one_reading_per_row(x)
    on = copying(x)
    if on.sum() < 10:
        return None
    idx = np.flatnonzero(on)
    isolated = np.mean([(i == 0 or not on[i - 1]) and (i == len(x) - 1 or not on[i + 1])
                        for i in idx])
    if isolated < 0.9:
        return None  # copies span samples: not countable this way
    sizes = x[on]
    per_copy = float(np.median(sizes))
    copies = float(x.sum()) / per_copy
    if copies < 10:
        return None
    gaps = np.diff(idx) * resolution
    # The band takes in a tick each side: a 0.25 s step reads as 0.2 and 0.3 s intervals.
    med = float(np.median(gaps))
    typical = gaps[np.abs(gaps - med) <= BAND * med + 1.01 * resolution]
    if len(typical) < max(TYPICAL * len(gaps), 9):
        return None  # no typical interval: steps too irregular to have one period
    seconds = float(typical.mean())
    if typical.std() > SPREAD * seconds + 0.5 * resolution:
        return None  # intervals spread over the band: no period, however many there are
    # The mean's standard error, and the ambiguity of a count: copies of unequal size.
    rel = float(typical.std() / math.sqrt(len(typical)) / seconds) + 1.0 / len(typical)
    return Period(seconds, rel, 1.0, "pcie bursts", mean_seconds=len(x) * resolution / copies)
