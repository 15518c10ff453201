"""``quantize``: optimise, calibrate on real inputs, place Q/DQ, save; the result loads in plain
ONNX Runtime (integer kernels on CPU) and in TensorRT (explicit quantization).

The one-call verb over ``Quantizer`` (which sensitivity analysis and accuracy budgets use too)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from modelkiln.quant.build import QuantizeResult
from modelkiln.quant.config import CalibrationData, QuantConfig
from modelkiln.quant.quantizer import ProgressFactory, Quantizer

__all__ = ["QuantizeResult", "quantize"]


def quantize(
    source: str | Path,
    output: str | Path,
    calib: str | Path | None,
    zoo_name: str | None = None,
    config: QuantConfig | None = None,
    calib_size: int = 100,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> QuantizeResult:
    """Quantize ``source`` to INT8 QDQ at ``output``; nothing is written if any step fails.
    ``progress`` advances once per calibration batch."""
    data = CalibrationData(calib, zoo_name, calib_size, batch_size)
    steps = None if progress is None else _every_step(progress)
    return Quantizer(source, config, data, steps).save(output)


def _every_step(advance: Callable[[int], None]) -> ProgressFactory:
    """A progress factory whose every step advances the one bar ``advance``."""

    def factory(label: str, total: int | None) -> Callable[[int], None]:
        return advance

    return factory
