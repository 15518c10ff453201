"""numpy models of the two ways x86 CPUs multiply-accumulate 8-bit integers in ONNX Runtime's
kernels, so a test can show on any CPU what an AVX2-only CPU computes.

- u8 x s8 without VNNI (AVX2, AVX-512BW): VPMADDUBSW multiplies uint8 by int8 and adds each
  adjacent pair of products into an int16 with saturation; VPMADDWD then sums the int16 pairs in int32.
- u8 x u8 (any x86): both operands are widened to int16 first, VPMADDWD multiplies and adds pairs
  in int32: exact.
- VNNI / AMX (VPDPBUSD) and ARM64 dot products sum four products in int32: exact.
"""

from __future__ import annotations

import numpy as np

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


def dot_u8s8_pair_saturating(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """a [M, K] uint8 @ w [K, N] int8 as VPMADDUBSW + VPMADDWD compute it (K padded to even)."""
    a64, w64 = a.astype(np.int64), w.astype(np.int64)
    if a64.shape[1] % 2:
        a64, w64 = np.pad(a64, ((0, 0), (0, 1))), np.pad(w64, ((0, 1), (0, 0)))
    prod = a64[:, :, None] * w64[None, :, :]  # [M, K, N]
    pairs = prod[:, 0::2, :] + prod[:, 1::2, :]
    return np.clip(pairs, INT16_MIN, INT16_MAX).sum(axis=1)


def dot_u8u8_widened(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """a [M, K] uint8 @ w [K, N] uint8 as the widening u8 x u8 kernels compute it: int16 operands,
    products of pairs summed in int32 (largest pair 2 * 255 * 255 fits easily)."""
    a64, w64 = a.astype(np.int64), w.astype(np.int64)
    assert a64.max(initial=0) <= 255 and w64.max(initial=0) <= 255
    pairs = a64[:, :, None] * w64[None, :, :]
    assert np.abs(pairs).max(initial=0) * 2 < 2**31  # the int32 pair sum cannot overflow
    return pairs.sum(axis=1)


def exact_dot(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) @ w.astype(np.int64)


def worst_case_activations(w: np.ndarray) -> np.ndarray:
    """uint8 activations [2N, K] that push each output column's pair sums to both int16 limits:
    255 where the weight is positive (0 elsewhere), then 255 where it is negative."""
    return np.concatenate([np.where(w.T > 0, 255, 0), np.where(w.T < 0, 255, 0)]).astype(np.uint8)
