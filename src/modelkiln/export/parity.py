"""Parity of an exported model with torch: same inputs, both runtimes, per output error figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from modelkiln.accuracy.metrics import cosine, max_abs_error, max_rel_error


@dataclass(frozen=True)
class Tolerance:
    """An output passes when max_abs <= atol + rtol * max|reference| and cosine >= min_cosine."""

    atol: float = 1e-4
    rtol: float = 1e-4
    min_cosine: float = 0.99999

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0 or not 0 <= self.min_cosine <= 1:
            raise ValueError(f"invalid tolerance {self}")


@dataclass(frozen=True)
class OutputParity:
    part: str
    output: str
    batch: int
    max_abs: float
    max_rel: float
    cosine: float
    limit_abs: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def compare_output(
    part: str, name: str, batch: int, onnx_out: np.ndarray, torch_out: np.ndarray, tol: Tolerance
) -> OutputParity:
    """Error figures of one output and whether they are within ``tol``."""
    if onnx_out.shape != torch_out.shape:
        return OutputParity(part, name, batch, float("inf"), float("inf"), 0.0, 0.0, False)
    limit = tol.atol + tol.rtol * float(np.max(np.abs(torch_out))) if torch_out.size else tol.atol
    mae, cos = max_abs_error(onnx_out, torch_out), cosine(onnx_out, torch_out)
    passed = bool(mae <= limit and cos >= tol.min_cosine)
    return OutputParity(part, name, batch, mae, max_rel_error(onnx_out, torch_out), cos, limit, passed)
