"""Sliding windows and robust peer statistics, vectorised over members and windows.

A window is `k` base steps (the analysis window, 5 minutes by default) ending at each base
step, so a deviation is seen as soon as it fills enough of one window. Within a job, each
family's peer centre is the median over the job's nodes and its spread the MAD x 1.4826, never
below a floor: the natural spread between healthy peers of that family (a few percent of
clock, a point of busy time), so that normal node-to-node variation cannot make a finding
however alike the other nodes happen to be.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agentd.analysis.stats import MAD_SCALE
from agentd.cluster.data import _quiet


def windowed(x: np.ndarray, k: int, min_share: float = 0.5) -> np.ndarray:
    """Mean of the last k steps at each step, per row ([R, T] -> [R, T]); NaN where fewer
    than min_share of the window's steps have data."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    ok = np.isfinite(x)
    z = np.zeros((x.shape[0], 1))
    s = np.cumsum(np.concatenate([z, np.where(ok, x, 0.0)], axis=1), axis=1)
    c = np.cumsum(np.concatenate([z, ok.astype(float)], axis=1), axis=1)
    T = x.shape[1]
    lo = np.maximum(np.arange(1, T + 1) - k, 0)
    hi = np.arange(1, T + 1)
    n = c[:, hi] - c[:, lo]
    with np.errstate(all="ignore"):
        out = (s[:, hi] - s[:, lo]) / n
    out[n < max(min_share * k, 1)] = np.nan
    return out


@dataclass
class Peers:
    """Per window (columns): the peers' centre and spread, and each member's z."""

    median: np.ndarray  # [T]
    sigma: np.ndarray  # [T] MAD x 1.4826, at least the floor
    count: np.ndarray  # [T] members with data
    z: np.ndarray  # [M, T]
    rel: np.ndarray  # [M, T] (x - median) / median


def peers(x: np.ndarray, floor_rel: float = 0.0, floor_abs: float = 0.0) -> Peers:
    """Robust centre and spread over the rows of x ([M, T]) at each column; the spread at
    least floor_abs and floor_rel x |median|."""
    with _quiet(), np.errstate(all="ignore"):
        med = np.nanmedian(x, axis=0)
        mad = np.nanmedian(np.abs(x - med), axis=0) * MAD_SCALE
        sigma = np.fmax(np.fmax(mad, floor_abs), floor_rel * np.abs(med))
        z = (x - med) / sigma
        rel = (x - med) / np.abs(med)
    count = np.isfinite(x).sum(axis=0)
    return Peers(med, sigma, count, z, rel)
