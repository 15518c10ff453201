"""Calibrators, one per file: ``observe(tensors)`` per batch, ``compute()`` -> ranges per tensor."""

from __future__ import annotations

from modelkiln.quant.calibrators.base import Calibrator, Range
from modelkiln.quant.calibrators.entropy import EntropyCalibrator
from modelkiln.quant.calibrators.minmax import MinMaxCalibrator
from modelkiln.quant.calibrators.mse import MSECalibrator
from modelkiln.quant.calibrators.percentile import PercentileCalibrator

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "EntropyCalibrator",
    "MSECalibrator",
    "MinMaxCalibrator",
    "PercentileCalibrator",
    "Range",
]

CALIBRATORS: dict[str, type[Calibrator]] = {
    "minmax": MinMaxCalibrator,
    "percentile": PercentileCalibrator,
    "entropy": EntropyCalibrator,
    "mse": MSECalibrator,
}
