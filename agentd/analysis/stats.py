"""Noise-aware statistics for the detectors: every rate compared with a threshold carries its
uncertainty from the source.

Samples of one window are autocorrelated (a step spans several samples; a slow signal is held
between its readings), so an i.i.d. standard error would be far too small. Means are given
with batch-means standard errors (the window cut into contiguous blocks whose means are close
to independent), correlations with an effective sample size from the lag-1 autocorrelations
(Bartlett), peer comparisons with the median and the MAD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special  # the distributions' functions, without scipy.stats' 1 s import

MAD_SCALE = 1.4826  # MAD x this estimates the standard deviation of normal data


@dataclass(frozen=True)
class Estimate:
    """A mean with its uncertainty: `lo`/`hi` bound a one-sided 95% interval each."""

    mean: float
    se: float
    n: int  # samples that went in

    @property
    def lo(self) -> float:
        return self.mean - 1.645 * self.se

    @property
    def hi(self) -> float:
        return self.mean + 1.645 * self.se

    def above(self, threshold: float) -> bool:
        """Significantly above the threshold (one-sided, 95%)."""
        return self.n > 0 and self.lo > threshold

    def to_json(self) -> dict:
        return {"mean": self.mean, "standard_error": self.se, "samples": self.n}


NONE = Estimate(float("nan"), float("nan"), 0)


def estimate(x: np.ndarray | None, floor_se: float = 0.0, blocks: int = 12) -> Estimate:
    """Mean of the finite values of x with a batch-means standard error (at least floor_se,
    the resolution of the source itself, e.g. integer-percent samples)."""
    if x is None:
        return NONE
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return NONE
    mean = float(x.mean())
    if n < 4:
        se = float(np.std(x)) if n > 1 else abs(mean)
        return Estimate(mean, max(se, floor_se), n)
    k = int(min(blocks, max(n // 4, 2)))
    size = n // k
    means = x[: k * size].reshape(k, size).mean(axis=1)
    se = float(np.std(means, ddof=1) / math.sqrt(k))
    # Few blocks understate the spread: widen by Student's t against the normal quantile.
    se *= float(special.stdtrit(k - 1, 0.95) / 1.645)
    return Estimate(mean, max(se, floor_se), n)


def ratio(num: Estimate, den: float) -> Estimate:
    if not den or den != den or num.n == 0:
        return NONE
    return Estimate(num.mean / den, num.se / abs(den), num.n)


def lag1(x: np.ndarray) -> float:
    x = x - x.mean()
    d = float(np.dot(x, x))
    return float(np.dot(x[1:], x[:-1]) / d) if d > 0 else 0.0


@dataclass(frozen=True)
class Correlation:
    r: float
    p: float  # two-sided p-value against r = 0, with the effective sample size
    n_eff: float

    def significant(self, sign: int, alpha: float = 0.01, min_abs: float = 0.3) -> bool:
        return (self.r == self.r and self.r * sign >= min_abs and self.p < alpha)


NO_CORRELATION = Correlation(float("nan"), 1.0, 0.0)


def correlation(a: np.ndarray | None, b: np.ndarray | None) -> Correlation:
    """Pearson's r of two aligned series, tested with Bartlett's effective sample size."""
    if a is None or b is None:
        return NO_CORRELATION
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 20:
        return NO_CORRELATION
    a, b = a[ok], b[ok]
    if np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return NO_CORRELATION
    r = float(np.corrcoef(a, b)[0, 1])
    r1, r2 = lag1(a), lag1(b)
    n_eff = len(a) * (1 - r1 * r2) / (1 + r1 * r2) if r1 * r2 > -1 else len(a)
    n_eff = float(min(max(n_eff, 3.5), len(a)))
    z = math.atanh(min(max(r, -0.999999), 0.999999)) * math.sqrt(max(n_eff - 3, 0.5))
    p = float(2 * special.ndtr(-abs(z)))
    return Correlation(r, p, n_eff)


@dataclass(frozen=True)
class Robust:
    median: float
    sigma: float  # MAD x 1.4826, at least the floor given

    def z(self, x: float) -> float:
        return (x - self.median) / self.sigma if self.sigma > 0 else 0.0


def robust(values, floor: float) -> Robust:
    """Median and MAD-based spread of peers' values (the spread never below `floor`, the
    natural variation one expects between healthy peers)."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) == 0:
        return Robust(float("nan"), floor)
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * MAD_SCALE
    return Robust(med, max(mad, floor))


def share(mask: np.ndarray) -> Estimate:
    """The share of samples where mask holds, as an Estimate."""
    return estimate(np.asarray(mask, dtype=float))
