"""MinMax: the observed extremes; exact coverage, no clipping, sensitive to outliers."""

from __future__ import annotations

import numpy as np

from modelkiln.quant.calibrators.base import Calibrator, Range


class MinMaxCalibrator(Calibrator):
    def __init__(self) -> None:
        self._min: dict[str, float] = {}
        self._max: dict[str, float] = {}

    def observe(self, tensors: dict[str, np.ndarray]) -> None:
        for name, x in tensors.items():
            if x.size == 0:
                continue
            lo, hi = float(np.min(x)), float(np.max(x))
            self._min[name] = min(lo, self._min.get(name, lo))
            self._max[name] = max(hi, self._max.get(name, hi))

    def compute(self) -> dict[str, Range]:
        return {k: Range(self._min[k], self._max[k]) for k in self._min}
