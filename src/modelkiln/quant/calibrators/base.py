"""Calibrator lifecycle (as ONNX Runtime's): observe batches, then compute one range per tensor."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Range:
    """Calibrated float range of a tensor (rmin <= 0 <= rmax after qparams are computed)."""

    rmin: float
    rmax: float

    @property
    def width(self) -> float:
        return self.rmax - self.rmin


class Calibrator(abc.ABC):
    """Observes tensors by name across batches; memory stays bounded per tensor."""

    @abc.abstractmethod
    def observe(self, tensors: dict[str, np.ndarray]) -> None: ...

    @abc.abstractmethod
    def compute(self) -> dict[str, Range]: ...
