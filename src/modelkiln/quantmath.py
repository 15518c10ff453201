"""Pure numpy quantization arithmetic, exactly as ONNX QuantizeLinear/DequantizeLinear define it:
y = saturate(round_half_to_even(x / scale) + zero_point); x' = (y - zero_point) * scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Integer ranges per quantized dtype.
QRANGE = {
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int32): (-(2**31), 2**31 - 1),
}


@dataclass(frozen=True)
class QParams:
    """Scale and zero point, scalars or per-channel vectors along ``axis``."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int8 / uint8 / int32
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype


def compute_qparams(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    dtype: np.dtype | type,
    symmetric: bool,
    axis: int | None = None,
) -> QParams:
    """Scale/zero point covering [rmin, rmax] (always including 0, so zero is exact).

    Symmetric: zero point 0 for int8 (128 for uint8) and scale = max|r| / 127 (int8 uses the
    restricted range -127..127 so that negation is exact, as TensorRT and ORT's weights do).
    """
    dtype = np.dtype(dtype)
    qmin, qmax = QRANGE[dtype]
    rmin = np.minimum(np.asarray(rmin, np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, np.float64), 0.0)
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        half = (qmax - qmin) // 2 if dtype == np.uint8 else qmax  # 127
        scale = absmax / half
        zero = np.full(scale.shape, 0 if dtype == np.int8 else 128, np.int64)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        zero = np.round(qmin - rmin / np.where(scale > 0, scale, 1.0))
        zero = np.clip(zero, qmin, qmax).astype(np.int64)
    tiny = scale <= np.finfo(np.float32).tiny
    scale = np.where(tiny, 1.0, scale).astype(np.float32)
    zero = np.where(tiny, 0 if dtype == np.int8 and symmetric else zero, zero)
    return QParams(scale, zero.astype(dtype), axis)


def _broadcast(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = p.size
    return p.reshape(shape)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """QuantizeLinear: round half to even, then saturate to the integer range."""
    qmin, qmax = QRANGE[qp.dtype]
    scale = _broadcast(qp.scale.astype(np.float32), x.ndim, qp.axis)
    zero = _broadcast(qp.zero_point.astype(np.int64), x.ndim, qp.axis)
    y = np.rint(x.astype(np.float32) / scale) + zero  # np.rint rounds half to even
    q: np.ndarray = np.clip(y, qmin, qmax).astype(qp.dtype)
    return q


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """DequantizeLinear: (q - zero_point) * scale in float32."""
    scale = _broadcast(qp.scale.astype(np.float32), q.ndim, qp.axis)
    zero = _broadcast(qp.zero_point.astype(np.int64), q.ndim, qp.axis)
    x: np.ndarray = ((q.astype(np.int64) - zero) * scale).astype(np.float32)
    return x


def weight_qparams(w: np.ndarray, axis: int | None, dtype: type = np.int8) -> QParams:
    """Symmetric int8 parameters of a weight, per channel along ``axis`` or per tensor."""
    if axis is None:
        return compute_qparams(w.min(), w.max(), dtype, symmetric=True)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return compute_qparams(moved.min(1), moved.max(1), dtype, symmetric=True, axis=axis)


def bias_qparams(input_scale: np.ndarray, weight_scale: np.ndarray) -> QParams:
    """int32 bias with scale = input scale x weight scale and zero point 0 (what integer kernels need)."""
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    return QParams(
        scale.reshape(-1) if scale.ndim else scale,
        np.zeros(scale.shape, np.int32).reshape(-1) if scale.ndim else np.zeros((), np.int32),
        0 if scale.ndim else None,
    )
