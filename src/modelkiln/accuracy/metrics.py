"""Pure numeric comparisons of two tensors; a leaf module any stage may use (numpy only)."""

from __future__ import annotations

import numpy as np


def _pair(actual: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(actual, np.float64)
    r = np.asarray(reference, np.float64)
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs reference {r.shape}")
    return a, r


def max_abs_error(actual: np.ndarray, reference: np.ndarray) -> float:
    a, r = _pair(actual, reference)
    return float(np.max(np.abs(a - r))) if a.size else 0.0


def max_rel_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """Largest error relative to the reference's largest magnitude (stable where values are ~0)."""
    a, r = _pair(actual, reference)
    if not a.size:
        return 0.0
    scale = float(np.max(np.abs(r)))
    return float(np.max(np.abs(a - r))) / scale if scale > 0 else float(np.max(np.abs(a)))


def cosine(actual: np.ndarray, reference: np.ndarray) -> float:
    """Cosine similarity of the flattened tensors; 1.0 when both are all zero."""
    a, r = _pair(actual, reference)
    na, nr = np.linalg.norm(a), np.linalg.norm(r)
    if na == 0 and nr == 0:
        return 1.0
    if na == 0 or nr == 0:
        return 0.0
    return float(np.dot(a.ravel(), r.ravel()) / (na * nr))


def snr_db(actual: np.ndarray, reference: np.ndarray) -> float:
    """Signal-to-noise ratio of ``actual`` against ``reference`` in dB (inf when identical)."""
    a, r = _pair(actual, reference)
    noise = float(np.sum((a - r) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
