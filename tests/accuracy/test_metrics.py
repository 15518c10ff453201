"""The tensor comparison metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelkiln.accuracy.metrics import cosine, max_abs_error, max_rel_error, snr_db


def _ones_plus_noise(amplitude: float, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Reference all ones (power 1 per element) and reference + alternating +-amplitude noise
    (power amplitude**2 per element): SNR = 10 log10(1 / amplitude**2) exactly."""
    reference = np.ones(n, np.float32)
    noise = amplitude * np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    return (reference + noise).astype(np.float32), reference


def test_snr_db_is_ten_log10_of_the_power_ratio() -> None:
    actual, reference = _ones_plus_noise(0.1)  # signal power 1, noise power 0.01: ratio 100
    assert snr_db(actual, reference) == pytest.approx(20.0, abs=1e-4)
    actual, reference = _ones_plus_noise(0.5)  # noise power 0.25: ratio 4 -> 6.0206 dB
    assert snr_db(actual, reference) == pytest.approx(10 * math.log10(4.0), abs=1e-4)
    # Uneven values: signal 3^2 + 4^2 = 25, noise 1^2 + 2^2 = 5 -> 10 log10(5).
    got = snr_db(np.array([4.0, 6.0]), np.array([3.0, 4.0]))
    assert got == pytest.approx(10 * math.log10(5.0), abs=1e-12)


def test_snr_db_drops_20_db_for_ten_times_the_noise_amplitude() -> None:
    quiet = snr_db(*_ones_plus_noise(0.01))
    loud = snr_db(*_ones_plus_noise(0.1))  # 10x the amplitude = 100x the power
    assert quiet - loud == pytest.approx(20.0, abs=1e-3)
    assert quiet == pytest.approx(40.0, abs=1e-3)


def test_snr_db_edge_cases() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert snr_db(x, x) == math.inf
    assert snr_db(np.ones(3), np.zeros(3)) == -math.inf
    with pytest.raises(ValueError, match="shape mismatch"):
        snr_db(np.ones(3), np.ones(4))


def test_cosine_and_errors_by_hand() -> None:
    a, r = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    assert cosine(a, r) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert cosine(-r, r) == pytest.approx(-1.0, abs=1e-12)
    assert cosine(np.zeros(2), np.zeros(2)) == 1.0 and cosine(np.zeros(2), r) == 0.0
    actual, reference = np.array([1.0, -2.5, 4.0]), np.array([1.5, -2.0, 5.0])
    assert max_abs_error(actual, reference) == pytest.approx(1.0)
    assert max_rel_error(actual, reference) == pytest.approx(1.0 / 5.0)
