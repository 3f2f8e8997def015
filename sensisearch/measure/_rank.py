"""Spearman's rank correlation, numpy only.

Used by stage 2 (predicted vs measured speed-up) and by the sensitivity
ranking's stability check. scipy is only a dev dependency, so the library keeps
its own: average ranks for ties, then Pearson's correlation of the ranks, which
is exactly ``scipy.stats.spearmanr`` (tests/test_measure.py checks it against scipy).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their positions (scipy's ``rankdata(method="average")``)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, x.size + 1):
        if end == x.size or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of 1-based positions start+1 .. end
            start = end
    return ranks


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho of paired samples; None below 3 pairs or when either side has no spread."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length ({len(a)} vs {len(b)})")
    if len(a) < 3:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0.0:
        return None
    return float((ra * rb).sum() / denominator)
