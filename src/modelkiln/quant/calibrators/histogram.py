"""A fixed-size histogram over a symmetric range that grows by doubling, so batches merge exactly:
when a batch exceeds the range, adjacent bin pairs merge and the range doubles (bounded memory)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from modelkiln.quant.calibrators.base import Calibrator, Range


class SymmetricHistogram:
    """Counts of values in ``bins`` equal bins over [-limit, limit], plus the true min and max."""

    def __init__(self, bins: int = 4096) -> None:
        if bins % 2:
            raise ValueError("bins must be even")
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.limit = 0.0
        self.min = np.inf
        self.max = -np.inf

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).ravel()
        x = x[np.isfinite(x)]
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        need = max(abs(lo), abs(hi))
        if self.limit == 0.0:
            self.limit = need if need > 0 else 1e-8
        while need > self.limit:
            self._double()
        counts, _ = np.histogram(x, bins=self.bins, range=(-self.limit, self.limit))
        self.counts += counts

    def _double(self) -> None:
        """New range [-2L, 2L]: the old histogram merges pairwise into the middle half."""
        merged = self.counts.reshape(-1, 2).sum(1)
        quarter = self.bins // 4
        new = np.zeros(self.bins, np.int64)
        new[quarter : quarter + merged.size] = merged
        self.counts = new
        self.limit *= 2

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, self.bins + 1)

    def absolute(self) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of |x|: ``bins // 2`` counts and their upper edges in [0, limit]."""
        half = self.bins // 2
        counts = self.counts[half:] + self.counts[:half][::-1]
        return counts, np.linspace(0, self.limit, half + 1)[1:]


class HistogramCalibrator(Calibrator):
    """Shared lifecycle of histogram calibrators: one SymmetricHistogram per tensor, then a
    per-tensor ``range_of(hist)`` chosen by the subclass."""

    def __init__(self, bins: int = 4096) -> None:
        self._hist: dict[str, SymmetricHistogram] = defaultdict(lambda: SymmetricHistogram(bins))

    def observe(self, tensors: dict[str, np.ndarray]) -> None:
        for name, x in tensors.items():
            self._hist[name].add(x)

    def compute(self) -> dict[str, Range]:
        return {name: self.range_of(h) for name, h in self._hist.items() if np.isfinite(h.min)}

    def range_of(self, hist: SymmetricHistogram) -> Range:
        raise NotImplementedError
