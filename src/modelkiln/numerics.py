"""How far one tensor is from another: the pure metrics and the one per-output diff record.

Export parity (ONNX vs torch), optimize parity (optimised vs original) and ``compare`` (candidate
vs reference over many feeds) all describe an output with the same ``TensorDiff``, computed by the
same code (``DiffAccumulator``; ``tensor_diff`` for a single pair), so a cosine or a limit means
the same thing in every report. A leaf module: numpy and errors only, so every stage may use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from modelkiln.errors import ConfigError

Array = npt.NDArray[Any]


def _pair(actual: npt.ArrayLike, reference: npt.ArrayLike) -> tuple[Array, Array]:
    a = np.asarray(actual, np.float64)
    r = np.asarray(reference, np.float64)
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs reference {r.shape}")
    return a, r


def _cosine(dot: float, actual_sq: float, reference_sq: float) -> float:
    """Cosine from sums; 1.0 when both tensors are all zero, 0.0 when only one is."""
    if actual_sq == 0 and reference_sq == 0:
        return 1.0
    if actual_sq == 0 or reference_sq == 0:
        return 0.0
    return float(dot / math.sqrt(actual_sq * reference_sq))


def _snr_db(signal_sq: float, noise_sq: float) -> float:
    """10 log10(signal / noise); inf when there is no noise, -inf when there is no signal."""
    if noise_sq == 0:
        return math.inf
    return 10.0 * math.log10(signal_sq / noise_sq) if signal_sq > 0 else -math.inf


def _relative(max_abs: float, reference_max: float, actual_max: float) -> float:
    """Largest error over the reference's largest magnitude (the actual's when the reference is 0)."""
    return max_abs / reference_max if reference_max > 0 else actual_max


def max_abs_error(actual: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    a, r = _pair(actual, reference)
    return float(np.max(np.abs(a - r))) if a.size else 0.0


def max_rel_error(actual: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    """Largest error relative to the reference's largest magnitude (stable where values are ~0)."""
    a, r = _pair(actual, reference)
    if not a.size:
        return 0.0
    return _relative(float(np.max(np.abs(a - r))), float(np.max(np.abs(r))), float(np.max(np.abs(a))))


def cosine(actual: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    """Cosine similarity of the flattened tensors; 1.0 when both are all zero."""
    a, r = _pair(actual, reference)
    return _cosine(float(np.dot(a.ravel(), r.ravel())), float(np.sum(a * a)), float(np.sum(r * r)))


def snr_db(actual: npt.ArrayLike, reference: npt.ArrayLike) -> float:
    """Signal-to-noise ratio of ``actual`` against ``reference`` in dB (inf when identical)."""
    a, r = _pair(actual, reference)
    return _snr_db(float(np.sum(r**2)), float(np.sum((a - r) ** 2)))


@dataclass(frozen=True)
class Tolerance:
    """When an output passes: ``max_abs <= limit`` and ``cosine >= min_cosine``, where
    ``limit = atol + rtol * max(min_scale, max|reference|)``.

    ``atol=None`` judges on cosine alone (no limit); ``min_cosine=None`` on the limit alone.
    ``min_scale`` keeps the limit from shrinking to ``atol`` on outputs that are ~0.
    """

    atol: float | None = 1e-4
    rtol: float = 1e-4
    min_cosine: float | None = 0.99999
    min_scale: float = 0.0

    def __post_init__(self) -> None:
        if (
            (self.atol is not None and not self.atol >= 0)
            or not self.rtol >= 0
            or not self.min_scale >= 0
            or (self.min_cosine is not None and not 0 <= self.min_cosine <= 1)
        ):
            raise ConfigError(f"invalid tolerance {self}")

    def limit(self, reference_max: float) -> float | None:
        """The largest abs error allowed for a reference whose largest magnitude is ``reference_max``."""
        if self.atol is None:
            return None
        return self.atol + self.rtol * max(self.min_scale, reference_max)

    def judge(self, max_abs: float, cos: float, limit: float | None) -> bool:
        within = limit is None or max_abs <= limit
        return bool(within and (self.min_cosine is None or cos >= self.min_cosine))


@dataclass(frozen=True)
class TensorDiff:
    """One output (or intermediate tensor) of a candidate against its reference.

    ``limit`` is the max-abs error allowed (None: not judged on it, or not judged at all);
    ``passed`` is the verdict under the tolerance it was computed with (True when none was given).
    ``part``/``batch`` say which export part and batch size it comes from; ``topk_agreement`` is
    filled for classifier outputs by ``compare``.
    """

    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    snr_db: float
    limit: float | None = None
    passed: bool = True
    part: str | None = None
    batch: int | None = None
    topk_agreement: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DiffAccumulator:
    """Streaming error statistics of one tensor over many (actual, reference) pairs, in bounded
    memory: the sums behind cosine and SNR, the largest errors and magnitudes.

    Numbers (bools included) are compared as float64; other dtypes (strings) only for equality.
    A pair of different shapes makes the whole record a failure (inf errors, cosine 0).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0  # elements compared
        self.max_abs = self.abs_sum = 0.0
        self.reference_max = self.actual_max = 0.0
        self.dot = self.actual_sq = self.reference_sq = self.noise_sq = 0.0
        self.shape_mismatch = False  # then nothing is comparable: the record fails with inf errors
        self.unequal = 0  # non-numeric elements that differ (each counts as an error of 1)

    def add(self, actual: npt.ArrayLike, reference: npt.ArrayLike) -> DiffAccumulator:
        a_raw, r_raw = np.asarray(actual), np.asarray(reference)
        if a_raw.shape != r_raw.shape:
            self.shape_mismatch = True
            return self
        if not (_numeric(a_raw) and _numeric(r_raw)):
            unequal = int(np.count_nonzero(a_raw != r_raw))
            self.unequal += unequal
            self.abs_sum += unequal
            self.max_abs = max(self.max_abs, float(unequal > 0))
            self.count += r_raw.size
            return self
        a, r = a_raw.astype(np.float64), r_raw.astype(np.float64)
        self.count += r.size
        if not r.size:
            return self
        diff = a - r
        abs_diff = np.abs(diff)
        # np.maximum, not max(): a NaN anywhere must stay in the record (and fail it)
        self.max_abs = float(np.maximum(self.max_abs, abs_diff.max()))
        self.abs_sum += float(abs_diff.sum())
        self.reference_max = float(np.maximum(self.reference_max, np.abs(r).max()))
        self.actual_max = float(np.maximum(self.actual_max, np.abs(a).max()))
        self.dot += float(np.dot(a.ravel(), r.ravel()))
        self.actual_sq += float(np.dot(a.ravel(), a.ravel()))
        self.reference_sq += float(np.dot(r.ravel(), r.ravel()))
        self.noise_sq += float(np.dot(diff.ravel(), diff.ravel()))
        return self

    def result(self, tolerance: Tolerance | None = None, **labels: Any) -> TensorDiff:
        """The record so far; judged under ``tolerance`` when one is given. ``labels`` fill the
        record's optional fields (part, batch, topk_agreement)."""
        limit = tolerance.limit(self.reference_max) if tolerance is not None else None
        if self.shape_mismatch:
            failed = TensorDiff(self.name, math.inf, math.inf, math.inf, 0.0, -math.inf, limit, False)
            return replace(failed, **labels)
        if self.unequal:  # non-numeric values that differ: no cosine or SNR to speak of
            mean = self.abs_sum / max(self.count, 1)
            failed = TensorDiff(self.name, 1.0, mean, 1.0, 0.0, -math.inf, limit, False)
            return replace(failed, **labels)
        cos = _cosine(self.dot, self.actual_sq, self.reference_sq)
        return TensorDiff(
            self.name,
            self.max_abs,
            self.abs_sum / max(self.count, 1),
            _relative(self.max_abs, self.reference_max, self.actual_max),
            cos,
            _snr_db(self.reference_sq, self.noise_sq),
            limit,
            tolerance.judge(self.max_abs, cos, limit) if tolerance is not None else True,
            **labels,
        )


def _numeric(x: Array) -> bool:
    return bool(np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_)


def tensor_diff(
    name: str,
    actual: npt.ArrayLike | None,
    reference: npt.ArrayLike,
    tolerance: Tolerance | None = None,
    **labels: Any,
) -> TensorDiff:
    """The diff record of one output; ``actual=None`` (the candidate lacks the output) fails."""
    acc = DiffAccumulator(name)
    if actual is None:
        acc.shape_mismatch = True
    else:
        acc.add(actual, reference)
    return acc.result(tolerance, **labels)


def worst(diffs: list[TensorDiff]) -> TensorDiff:
    """The failed record furthest over its limit (the first failure when none has a limit)."""
    failed = [d for d in diffs if not d.passed] or diffs

    def overshoot(d: TensorDiff) -> float:
        if d.limit is None:
            return -math.inf
        return d.max_abs / d.limit if d.limit > 0 else math.inf

    return max(failed, key=overshoot)
