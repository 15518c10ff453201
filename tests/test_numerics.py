"""The one per-output diff record (numerics.TensorDiff) and its tolerance, against numpy and hand
values: what export, optimize and compare all report.

Which wrong code each test catches: a cosine or SNR computed from the wrong sums, a limit that
ignores rtol/min_scale, a verdict that ignores the cosine, a NaN lost by the streaming maximum,
statistics over several batches that differ from the same figures over the concatenated tensor.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelkiln.errors import ConfigError
from modelkiln.numerics import (
    DiffAccumulator,
    TensorDiff,
    Tolerance,
    cosine,
    max_abs_error,
    max_rel_error,
    snr_db,
    tensor_diff,
    worst,
)


def test_record_figures_match_numpy() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 50)).astype(np.float32)
    got = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    d = tensor_diff("y", got, ref)
    r, a = ref.astype(np.float64), got.astype(np.float64)
    assert d.name == "y"
    assert d.max_abs == pytest.approx(np.abs(a - r).max(), rel=1e-12)
    assert d.mean_abs == pytest.approx(np.abs(a - r).mean(), rel=1e-12)
    assert d.max_rel == pytest.approx(np.abs(a - r).max() / np.abs(r).max(), rel=1e-12)
    want_cos = float(a.ravel() @ r.ravel() / (np.linalg.norm(a) * np.linalg.norm(r)))
    assert d.cosine == pytest.approx(want_cos, abs=1e-12)
    assert d.snr_db == pytest.approx(10 * math.log10((r**2).sum() / ((a - r) ** 2).sum()), abs=1e-9)
    # the record and the single-figure functions agree
    assert d.cosine == pytest.approx(cosine(got, ref), abs=1e-12)
    assert d.snr_db == pytest.approx(snr_db(got, ref), abs=1e-9)
    assert d.max_abs == max_abs_error(got, ref) and d.max_rel == pytest.approx(max_rel_error(got, ref))
    # no tolerance: not judged
    assert d.limit is None and d.passed


def test_limit_is_atol_plus_rtol_times_the_reference_scale() -> None:
    ref = np.array([0.0, -4.0, 2.0])
    got = ref + np.array([0.0, 0.00049, 0.0])  # max abs 4.9e-4
    tol = Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.9)
    d = tensor_diff("y", got, ref, tol)
    assert d.limit == pytest.approx(1e-4 + 1e-4 * 4.0)  # 5e-4 (atol alone would fail this)
    assert d.passed
    assert not tensor_diff("y", ref + np.array([0.0, 0.00051, 0.0]), ref, tol).passed
    # min_scale: a tiny reference does not shrink the limit below rtol * min_scale
    floor = Tolerance(atol=0.0, rtol=1e-4, min_cosine=None, min_scale=1.0)
    small = np.array([1e-3, -2e-3])
    assert tensor_diff("y", small, small, floor).limit == pytest.approx(1e-4)
    assert tensor_diff("y", small * 1000, small * 1000, floor).limit == pytest.approx(2e-4)


def test_cosine_is_judged_as_well_as_the_limit() -> None:
    ref = np.array([1.0, 0.0])
    got = np.array([0.0, 1.0])  # max abs 1, cosine 0
    d = tensor_diff("y", got, ref, Tolerance(atol=10.0, rtol=0.0, min_cosine=0.5))
    assert d.cosine == 0.0 and d.max_abs == 1.0 and d.limit == 10.0 and not d.passed
    on_cosine_only = tensor_diff("y", ref * 1000, ref, Tolerance(atol=None, rtol=0.0, min_cosine=0.99))
    assert on_cosine_only.limit is None and on_cosine_only.cosine == pytest.approx(1.0)
    assert on_cosine_only.passed  # scaled by 1000, but judged on direction only


def test_missing_or_misshapen_outputs_fail() -> None:
    tol = Tolerance()
    for d in (tensor_diff("y", None, np.ones(3), tol), tensor_diff("y", np.ones(4), np.ones(3), tol)):
        assert not d.passed and d.max_abs == math.inf and d.cosine == 0.0
    # without a tolerance too: a record that compared nothing must not look perfect
    assert not tensor_diff("y", None, np.ones(3)).passed


def test_nan_in_the_candidate_fails_and_stays_visible() -> None:
    ref = np.ones(4, np.float32)
    got = np.array([1.0, np.nan, 1.0, 1.0], np.float32)
    d = tensor_diff("y", got, ref, Tolerance())
    assert math.isnan(d.max_abs) and not d.passed
    acc = DiffAccumulator("y").add(got, ref).add(ref, ref)  # a later clean batch does not hide it
    assert math.isnan(acc.result().max_abs)


def test_bools_compare_as_numbers_strings_by_equality() -> None:
    flags = np.array([True, False, True])
    assert tensor_diff("m", flags, flags, Tolerance()).passed
    flipped = tensor_diff("m", ~flags, flags, Tolerance(atol=0.0, rtol=1e-4, min_cosine=None, min_scale=1.0))
    assert flipped.max_abs == 1.0 and not flipped.passed
    words = np.array(["a", "b"])
    assert tensor_diff("w", words, words, Tolerance()).passed
    changed = tensor_diff("w", np.array(["a", "c"]), words, Tolerance())
    assert not changed.passed and changed.max_abs == 1.0 and changed.mean_abs == 0.5


def test_streaming_over_batches_equals_the_concatenated_tensor() -> None:
    rng = np.random.default_rng(1)
    refs = [rng.standard_normal((2, 8)) for _ in range(3)]
    gots = [r + rng.normal(0, 0.1 * (i + 1), r.shape) for i, r in enumerate(refs)]
    acc = DiffAccumulator("y")
    for g, r in zip(gots, refs, strict=True):
        acc.add(g, r)
    streamed = acc.result(Tolerance(atol=0.1, rtol=0.0, min_cosine=0.9))
    whole = tensor_diff(
        "y", np.concatenate(gots), np.concatenate(refs), Tolerance(atol=0.1, rtol=0.0, min_cosine=0.9)
    )
    for field in ("max_abs", "mean_abs", "max_rel", "cosine", "snr_db", "limit"):
        assert getattr(streamed, field) == pytest.approx(getattr(whole, field), rel=1e-12), field
    assert streamed.passed == whole.passed


def test_labels_and_dict_keys() -> None:
    d = tensor_diff("logits", np.ones(2), np.ones(2), Tolerance(), part="model", batch=3)
    assert (d.part, d.batch) == ("model", 3)
    keys = set(d.to_dict())
    assert {"name", "max_abs", "mean_abs", "max_rel", "cosine", "snr_db", "limit", "passed"} <= keys
    assert {"part", "batch", "topk_agreement"} <= keys


def test_worst_is_the_failure_furthest_over_its_limit() -> None:
    ok = TensorDiff("a", 5.0, 1.0, 0.1, 1.0, 40.0, limit=10.0, passed=True)
    bit_over = TensorDiff("b", 2.0, 1.0, 0.1, 1.0, 40.0, limit=1.0, passed=False)
    far_over = TensorDiff("c", 1.0, 1.0, 0.1, 1.0, 40.0, limit=0.01, passed=False)
    assert worst([ok, bit_over, far_over]).name == "c"
    zero_limit = TensorDiff("d", math.inf, math.inf, math.inf, 0.0, -math.inf, limit=0.0, passed=False)
    assert worst([far_over, zero_limit]).name == "d"  # no division by a zero limit


@pytest.mark.parametrize(
    "kwargs", [{"atol": -1.0}, {"rtol": -1e-3}, {"min_cosine": 1.5}, {"min_scale": -1.0}]
)
def test_invalid_tolerance(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="invalid tolerance"):
        Tolerance(**kwargs)
