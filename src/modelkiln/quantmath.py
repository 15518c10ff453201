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


# -- 8-bit MatMulNBits (com.microsoft) blocks: shared by quant/matmul_nbits.py (weight-only INT8 of
# a model) and export/builder/nbits.py (the graph builder's W8), so both write the same bytes -----

#: MatMulNBits' accuracy level 4: int8 activations inside the kernel (quant/matmul_nbits.py says why).
NBITS_ACCURACY_INT8 = 4
#: The smallest block MatMulNBits accepts.
NBITS_MIN_BLOCK = 16


def is_nbits_block(block: int) -> bool:
    """A block MatMulNBits takes: a power of two, at least ``NBITS_MIN_BLOCK``."""
    return block >= NBITS_MIN_BLOCK and block & (block - 1) == 0


def per_channel_block(k: int) -> int:
    """The smallest power-of-two block (>= 16) covering all of K: one scale per output channel,
    K zero-padded up to the block (the layout written before ``default_block``)."""
    return max(NBITS_MIN_BLOCK, 1 << (k - 1).bit_length())


def padded_k(k: int, block: int) -> int:
    """K rounded up to whole blocks: the values per output channel a W8 matrix stores."""
    return -(-k // block) * block


def default_block(k: int) -> int:
    """The block that pads K least, the largest such (fewest scales). MatMulNBits takes
    power-of-two blocks only, so "one scale per output channel" padded K (Qwen2-VL-2B: 1536 ->
    2048, 8960 -> 16384); this is K itself when K is a power of two, else the largest power-of-two
    divisor of K (1536 -> 512, 8960 -> 256); a K with no power-of-two divisor >= 16 (the vision
    patch embedding's 1176 = 8 x 147) takes the block that pads it least (1176 -> 32, to 1184)."""
    best = block = NBITS_MIN_BLOCK
    while block <= per_channel_block(k):
        if padded_k(k, block) <= padded_k(k, best):
            best = block
        block *= 2
    return best


def pack_int8_rows(w_nk: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of the rows of ``w_nk`` [N, K] (one row per output channel) per block of K,
    K zero-padded to whole blocks: (B [N, blocks, block] uint8 = int8 + 128, scales [N, blocks]
    float32; an all-zero block's scale is 1)."""
    n, k = w_nk.shape
    blocks = -(-k // block)
    if blocks * block == k:  # no padding: group the rows in place (no padded copy)
        grouped = np.asarray(w_nk, np.float32).reshape(n, blocks, block)
    else:
        padded = np.zeros((n, blocks * block), np.float32)
        padded[:, :k] = w_nk
        grouped = padded.reshape(n, blocks, block)
    scale = np.abs(grouped).max(axis=2) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(grouped / scale[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8), scale
