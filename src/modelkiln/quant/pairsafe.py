"""Pair-safe int8 weights: full-range int8 that the saturating u8 x s8 kernels cannot overflow.

Without VNNI, x86 kernels multiply uint8 activations by int8 weights with VPMADDUBSW, which adds
two neighbouring products along the reduction axis K into an int16 with saturation. Activations
reach 255, so a pair overflows only when both weights have the same sign and
``|q[k] + q[k+1]| > 128`` (255 x 128 = 32640 still fits; opposite signs cannot exceed
255 x 127). Clamping every weight to 7 bits (ONNX Runtime's ``reduce_range``) removes the overflow
by halving the resolution of every weight; here only the few neighbouring pairs that could overflow
are pulled in, and the per-channel scale is chosen to minimise the weight's total squared error
(rounding plus those pulls). The weights stay int8, so ONNX Runtime keeps its fast u8 x s8 kernels
on every CPU (VPDPBUSD / AMX where they exist, where pairs never mattered).

Neighbours are taken in both orders a kernel may reduce a convolution in: input channel fastest
(ONNX Runtime's NHWC QLinearConv and its direct "ConvSym" kernels) and kernel width fastest (ONNX's
own [M, C, kH, kW] layout). Depthwise convolutions use a kernel that widens to int32 and need no
constraint.
"""

from __future__ import annotations

import numpy as np

#: Largest same-sign neighbour sum a pair may have: 255 x 128 = 32640 <= 32767.
PAIR_LIMIT = 128
#: Scale multipliers tried per channel (1.0 is the plain absmax / 127 scale).
_MULTIPLIERS = np.linspace(1.0, 2.0, 41)  # at 2.0 every |q| <= 64: no pair can overflow


def _orders(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Axis orders of a [C_out, ...] weight whose last axis is the fastest-varying K (reduction)
    index: as stored, and for convolutions with input channel fastest."""
    if len(shape) <= 2:
        return [tuple(range(len(shape)))]
    nchw = tuple(range(len(shape)))  # [M, C, kH, kW]: kW fastest
    nhwc = (0, *range(2, len(shape)), 1)  # [M, kH, kW, C]: C fastest
    return [nhwc, nchw] if shape[1] > 1 else [nchw]


def _fix_pairs(q: np.ndarray) -> np.ndarray:
    """Pull neighbouring same-sign pairs along the last axis back to |sum| <= PAIR_LIMIT, taking the
    excess from the larger magnitude first (rows are [channels, K])."""
    q = q.astype(np.int32)
    while True:
        a, b = q[:, :-1], q[:, 1:]
        same = np.sign(a) * np.sign(b) > 0
        excess = np.where(same, np.abs(a + b) - PAIR_LIMIT, 0)
        if not np.any(excess > 0):
            return q
        first = np.where(np.abs(a) >= np.abs(b), (excess + 1) // 2, excess // 2)
        cut = np.zeros_like(q)
        over = excess > 0
        cut[:, :-1] += np.where(over, first, 0)
        cut[:, 1:] += np.where(over, excess - first, 0)
        q = np.sign(q) * np.maximum(np.abs(q) - cut, 0)


def _pair_safe(q: np.ndarray, orders: list[tuple[int, ...]]) -> np.ndarray:
    """Apply the pair constraint in every order until all hold (cuts only shrink magnitudes, so
    fixing one order never breaks another for good)."""
    for _ in range(8):
        changed = False
        for order in orders:
            moved = np.transpose(q, order)
            flat = moved.reshape(moved.shape[0], -1)
            fixed = _fix_pairs(flat)
            if not np.array_equal(fixed, flat):
                changed = True
                q = np.transpose(fixed.reshape(moved.shape), np.argsort(order))
        if not changed:
            return q
    raise AssertionError("pair constraint did not converge")  # cannot happen: magnitudes only shrink


def violations(q: np.ndarray) -> int:
    """Neighbouring same-sign pairs (in every K order) whose sum could overflow int16 at 255."""
    total = 0
    for order in _orders(q.shape):
        moved = np.transpose(q.astype(np.int32), order)
        flat = moved.reshape(moved.shape[0], -1)
        a, b = flat[:, :-1], flat[:, 1:]
        total += int(np.sum((np.sign(a) * np.sign(b) > 0) & (np.abs(a + b) > PAIR_LIMIT)))
    return total


def quantize_pair_safe(
    w: np.ndarray, axis: int, min_scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8 of ``w`` (channels along ``axis``) with no overflowing pair:
    returns (int8 weights in w's layout, float32 scales). The scale of each channel is the one of
    ``_MULTIPLIERS x absmax / 127`` (at least ``min_scale``) with the least squared error after the
    pairs are fixed."""
    moved = np.moveaxis(w.astype(np.float32), axis, 0)  # [C_out, ...]; a MatMul's [K, N] -> [N, K]
    channels = moved.shape[0]
    absmax = np.abs(moved.reshape(channels, -1)).max(axis=1)
    base = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    if min_scale is not None:
        base = np.maximum(base, min_scale.reshape(-1)).astype(np.float32)
    orders = _orders(moved.shape)
    best_q = np.zeros(moved.shape, np.int32)
    best_scale = base.copy()
    best_err = np.full(channels, np.inf)
    shape = (channels,) + (1,) * (moved.ndim - 1)
    for m in _MULTIPLIERS:
        scale = (base * m).astype(np.float32)
        q = np.clip(np.rint(moved / scale.reshape(shape)), -127, 127).astype(np.int32)
        q = _pair_safe(q, orders)
        err = ((q * scale.reshape(shape) - moved) ** 2).reshape(channels, -1).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_q[better] = q[better]
    return np.moveaxis(best_q.astype(np.int8), 0, axis), best_scale.astype(np.float32)
