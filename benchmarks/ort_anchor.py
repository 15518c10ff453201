"""The anchor both INT8 benchmarks compare against: ONNX Runtime's quantize_static (QDQ, per-channel)
fed with the same calibration images through the zoo model's own preprocessing."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from modelkiln.quant.data import batches, list_samples
from modelkiln.zoo import get


def ort_quantize_static(src: Path, out: Path, calib: Path, zoo: str, method: str, size: int) -> float:
    """Quantize ``src`` into ``out`` with ORT; returns the seconds it took."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    entry = get(zoo)
    files = list_samples(calib, size)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches(files, [entry.parts[0].inputs[0].name], entry, 1))

        def get_next(self) -> dict | None:
            return next(self.it, None)

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # ORT prints progress to stdout
        quantize_static(
            str(src),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=methods[method],
        )
    return time.perf_counter() - t
