"""Entropy (TensorRT's calibrator): the clipping threshold whose 128-level quantized distribution
has the least KL divergence from the observed |x| distribution."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from modelkiln.quant.calibrators.base import Calibrator, Range
from modelkiln.quant.calibrators.histogram import SymmetricHistogram

LEVELS = 128


def kl_threshold(counts: np.ndarray, edges: np.ndarray, levels: int = LEVELS, stride: int = 4) -> float:
    """Upper edge of the bin count i >= levels minimising KL(P_i || Q_i) (outliers folded into P's
    last bin; Q spreads each of ``levels`` merged bins evenly over its non-empty source bins)."""
    counts = counts.astype(np.float64)
    n = counts.size
    if counts.sum() == 0 or n <= levels:
        return float(edges[-1])
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1, stride):
        p = counts[:i].copy()
        p[-1] += counts[i:].sum()
        nonzero = p > 0
        # quantize the first i bins into `levels` groups, then expand back over non-empty bins
        groups = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for g in groups:
            mass = counts[g].sum()
            nz = nonzero[g]
            if nz.any():
                q[g[nz]] = mass / nz.sum()
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-12)
        mask = pn > 0
        if (qn[mask] == 0).any():
            continue
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(edges[min(best_i, n) - 1])


class EntropyCalibrator(Calibrator):
    def __init__(self, bins: int = 4096) -> None:
        self._hist: dict[str, SymmetricHistogram] = defaultdict(lambda: SymmetricHistogram(bins))

    def observe(self, tensors: dict[str, np.ndarray]) -> None:
        for name, x in tensors.items():
            self._hist[name].add(x)

    def compute(self) -> dict[str, Range]:
        out = {}
        for name, h in self._hist.items():
            if not np.isfinite(h.min):
                continue
            counts, upper = h.absolute()
            t = kl_threshold(counts, upper)
            out[name] = Range(max(h.min, -t), min(h.max, t))
        return out
