"""Percentile: clip the (100 - p)% most extreme values, split evenly between the two tails."""

from __future__ import annotations

import numpy as np

from modelkiln.quant.calibrators.base import Range
from modelkiln.quant.calibrators.histogram import HistogramCalibrator, SymmetricHistogram


def quantile_from_histogram(hist: SymmetricHistogram, q: float) -> float:
    """Value below which a fraction ``q`` of the observed values lie (linear inside a bin)."""
    cum = np.cumsum(hist.counts)
    total = cum[-1]
    if total == 0:
        return 0.0
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, hist.bins - 1)
    edges = hist.edges
    prev = cum[i - 1] if i > 0 else 0
    inside = (target - prev) / max(hist.counts[i], 1)
    return float(edges[i] + inside * (edges[i + 1] - edges[i]))


class PercentileCalibrator(HistogramCalibrator):
    def __init__(self, percentile: float = 99.999, bins: int = 4096) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins)
        self.percentile = percentile

    def range_of(self, hist: SymmetricHistogram) -> Range:
        tail = (100.0 - self.percentile) / 200.0
        lo = max(hist.min, quantile_from_histogram(hist, tail))
        hi = min(hist.max, quantile_from_histogram(hist, 1.0 - tail))
        return Range(lo, hi)
