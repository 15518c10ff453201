"""Entropy (TensorRT's calibrator): the clipping threshold whose 128-level quantized distribution
has the least KL divergence from the observed |x| distribution."""

from __future__ import annotations

import numpy as np

from modelkiln.quant.calibrators.base import Range
from modelkiln.quant.calibrators.histogram import HistogramCalibrator, SymmetricHistogram

LEVELS = 128


def kl_threshold(counts: np.ndarray, edges: np.ndarray, levels: int = LEVELS, stride: int = 4) -> float:
    """Upper edge of the bin count i >= levels minimising KL(P_i || Q_i): P is the first i bins with
    the outliers folded into its last bin; Q merges those i bins (without the outliers) into
    ``levels`` bins and spreads each evenly over its non-empty source bins."""
    counts = counts.astype(np.float64)
    n = counts.size
    if counts.sum() == 0 or n <= levels:
        return float(edges[-1])
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1, stride):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        nonzero = p > 0
        starts = (np.arange(levels) * i) // levels
        group = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
        mass = np.add.reduceat(counts[:i], starts)  # Q comes from the slice without the folded outliers
        filled = np.add.reduceat(nonzero.astype(np.float64), starts)
        q = np.where(nonzero, (mass / np.maximum(filled, 1))[group], 0.0)
        pn, qn = _smooth(p / p.sum()), _smooth(q / max(q.sum(), 1e-12))
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(edges[min(best_i, n) - 1])


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Give empty bins a little mass taken evenly from the others, so KL stays finite."""
    zeros = p == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_zero == 0 or n_nonzero == 0:
        return p
    out = p.astype(np.float64).copy()
    out[zeros] = eps
    out[~zeros] -= eps * n_zero / n_nonzero
    return np.clip(out, 1e-12, None)


class EntropyCalibrator(HistogramCalibrator):
    def range_of(self, hist: SymmetricHistogram) -> Range:
        counts, upper = hist.absolute()
        t = kl_threshold(counts, upper)
        return Range(max(hist.min, -t), min(hist.max, t))
