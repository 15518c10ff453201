"""Calibrators on known distributions: clipping behaviour and incremental merging."""

from __future__ import annotations

import numpy as np
import pytest

from modelkiln.quant.calibrators import (
    EntropyCalibrator,
    MinMaxCalibrator,
    MSECalibrator,
    PercentileCalibrator,
)
from modelkiln.quant.calibrators.histogram import SymmetricHistogram


def heavy_tail(seed: int = 0, n: int = 200_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    x[:20] = 60.0  # a few huge outliers
    return x


def _range(cal, batches: list[np.ndarray]):
    for b in batches:
        cal.observe({"t": b})
    return cal.compute()["t"]


def test_minmax_keeps_outliers() -> None:
    r = _range(MinMaxCalibrator(), [heavy_tail()])
    assert r.rmax == pytest.approx(60.0)


@pytest.mark.parametrize("cal", [EntropyCalibrator, lambda: PercentileCalibrator(99.9)])
def test_histogram_calibrators_clip_a_heavy_tail(cal) -> None:
    r = _range(cal(), [heavy_tail()])
    assert 2.5 < r.rmax < 15.0, r  # far below the outliers, well above the Gaussian bulk
    assert -15.0 < r.rmin < -2.5, r


def test_mse_clips_a_long_tail_but_keeps_heavy_outlier_mass() -> None:
    laplace = np.random.default_rng(3).laplace(0, 1, 200_000).astype(np.float32)
    r = _range(MSECalibrator(), [laplace])
    assert 4.0 < r.rmax < laplace.max() - 1.0
    # 20 values at 60 cost more clipped (20 * 56^2) than the coarser step costs the bulk: keep them
    assert _range(MSECalibrator(), [heavy_tail()]).rmax > 50


def test_relu_like_data_gets_non_negative_range() -> None:
    x = np.abs(np.random.default_rng(1).standard_normal(100_000)).astype(np.float32)
    for cal in (MinMaxCalibrator(), PercentileCalibrator(99.9), EntropyCalibrator(), MSECalibrator()):
        r = _range(cal, [x])
        assert r.rmin >= 0 and r.rmax > 1.0


def test_histogram_merges_batches_with_growing_range() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.uniform(-1, 1, 10_000), rng.uniform(-7, 7, 10_000)
    h = SymmetricHistogram(1024)
    h.add(a)
    h.add(b)
    assert h.counts.sum() == 20_000 and h.limit >= 7
    direct, _ = np.histogram(np.concatenate([a, b]), bins=1024, range=(-h.limit, h.limit))
    # doubling merges bins exactly, except values that sat on merged edges; totals per wide bin agree
    np.testing.assert_array_equal(h.counts.reshape(-1, 16).sum(1), direct.reshape(-1, 16).sum(1))


def test_percentile_order_and_validation() -> None:
    x = heavy_tail()
    loose = _range(PercentileCalibrator(99.0), [x])
    tight = _range(PercentileCalibrator(99.999), [x])
    assert loose.rmax < tight.rmax
    with pytest.raises(ValueError):
        PercentileCalibrator(40)
