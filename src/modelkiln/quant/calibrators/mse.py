"""MSE: the clipping threshold minimising the expected squared quantization error over the
observed histogram (uniform rounding noise inside the range, clipping error outside)."""

from __future__ import annotations

import numpy as np

from modelkiln.quant.calibrators.base import Range
from modelkiln.quant.calibrators.histogram import HistogramCalibrator, SymmetricHistogram


def mse_threshold(counts: np.ndarray, upper: np.ndarray, levels: int = 255, candidates: int = 256) -> float:
    """Threshold t over |x| minimising sum(count * err(|x|, t)) with step = t / levels."""
    centers = upper - (upper[1] - upper[0]) / 2 if upper.size > 1 else upper
    total = counts.sum()
    if total == 0:
        return float(upper[-1])
    best_t, best_err = float(upper[-1]), np.inf
    for t in np.linspace(upper[-1] / candidates, upper[-1], candidates):
        step = t / levels
        inside = centers <= t
        err = np.sum(counts[inside]) * step**2 / 12 + np.sum(counts[~inside] * (centers[~inside] - t) ** 2)
        if err < best_err:
            best_t, best_err = float(t), err
    return best_t


class MSECalibrator(HistogramCalibrator):
    def range_of(self, hist: SymmetricHistogram) -> Range:
        counts, upper = hist.absolute()
        one_sided = hist.min >= 0  # e.g. after ReLU: all 255 levels cover [0, t]
        t = mse_threshold(counts, upper, levels=255 if one_sided else 127)
        return Range(max(hist.min, -t), min(hist.max, t))
