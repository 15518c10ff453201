"""The anchor both INT8 benchmarks compare against: ONNX Runtime's quantize_static (QDQ, per-channel)
fed with the same calibration images through the zoo model's own preprocessing."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from modelkiln.data.feeds import model_feeds
from modelkiln.zoo import get


def ort_quantize_static(src: Path, out: Path, calib: Path, zoo: str, method: str, size: int) -> float:
    """Quantize ``src`` into ``out`` with ORT on images through the zoo's preprocessing; returns
    the seconds it took."""
    feeds = model_feeds(src, calib, get(zoo), 1, size)
    t = time.perf_counter()
    ort_quantize_feeds(src, out, feeds, method)
    return time.perf_counter() - t


def ort_quantize_feeds(
    src: Path,
    out: Path,
    feeds: Iterable[dict],
    method: str,
    reduce_range: bool = False,
    nodes_to_exclude: list[str] | None = None,
) -> None:
    """ORT's quantize_static (QDQ, per-channel weights, its defaults: u8 activations, s8 weights)
    calibrated on ``feeds``; ``reduce_range`` is ORT's 7-bit-weight remedy for CPUs without VNNI."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with contextlib.redirect_stdout(sys.stderr):  # ORT prints progress to stdout
        quantize_static(
            str(src),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=methods[method],
            reduce_range=reduce_range,
            nodes_to_exclude=nodes_to_exclude or [],
        )
