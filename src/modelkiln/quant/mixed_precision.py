"""Mixed precision: how much each quantized layer costs on its own (sensitivity), and the automatic
fallback that returns the most sensitive layers to float until an accuracy budget holds.

The fallback searches the number ``k`` of layers (most sensitive first) kept in float: it doubles
``k`` until the budget holds, then bisects between the last miss and the first hit, so a model
with hundreds of layers needs about 2·log2(n) evaluations instead of n. Each evaluation builds
the model from the same calibration; nothing is recalibrated.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from modelkiln.data.feeds import Feed
from modelkiln.errors import QuantizationError
from modelkiln.quant.build import Built, build, quantized_layers
from modelkiln.quant.config import QuantConfig
from modelkiln.quant.prepare import Calibrated
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend

log = logging.getLogger(__name__)


@dataclass
class LayerSensitivity:
    """Model-output error with only this layer quantized (everything else float)."""

    name: str
    op: str
    snr_db: float  # outputs vs float, all outputs pooled
    cosine: float  # mean per-sample cosine of the outputs to float


def run_outputs(proto: onnx.ModelProto, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """Every output of ``proto`` per feed, in graph output order."""
    backend = cpu_backend(proto, optimization=GraphOptimization.BASIC)
    return [list(backend.infer(feed).values()) for feed in feeds]


def output_error(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> tuple[float, float]:
    """(SNR in dB, mean per-sample cosine) of candidate outputs against reference outputs; each
    output counts equally, whatever its scale (YOLO's pixel boxes beside 0-1 scores)."""
    snrs: list[float] = []
    cosines: list[float] = []
    for ref_batch, cand_batch in zip(reference, candidate, strict=True):
        for r, c in zip(ref_batch, cand_batch, strict=True):
            if not np.issubdtype(r.dtype, np.floating) or r.shape != c.shape:
                continue
            r64, c64 = r.astype(np.float64), c.astype(np.float64)
            noise = float(((r64 - c64) ** 2).sum())
            snrs.append(float((r64**2).sum()) / noise if noise else np.inf)
            rows_r, rows_c = r64.reshape(len(r64), -1), c64.reshape(len(c64), -1)
            norms = np.linalg.norm(rows_r, axis=1) * np.linalg.norm(rows_c, axis=1)
            cosines.extend(np.where(norms > 0, (rows_r * rows_c).sum(1) / np.where(norms > 0, norms, 1), 1.0))
    finite = [s for s in snrs if np.isfinite(s)]
    snr = 10 * np.log10(1 / np.mean([1 / s for s in finite])) if finite else np.inf
    return float(snr), float(np.mean(cosines)) if cosines else 1.0


def sensitivity(
    cal: Calibrated,
    config: QuantConfig,
    feeds: Sequence[Feed],
    progress: Callable[[int], None] | None = None,
) -> list[LayerSensitivity]:
    """Every layer the full model quantizes, alone, ranked worst (lowest SNR) first."""
    reference = run_outputs(cal.proto, feeds)
    ops = {n.name: n.op_type for n in cal.proto.graph.node}
    found = []
    for name in quantized_layers(cal, config):
        proto = build(cal, config, only=name, check=False).model
        snr, cos = output_error(reference, run_outputs(proto, feeds))
        found.append(LayerSensitivity(name, ops.get(name, "?"), snr, cos))
        if progress:
            progress(1)
    return sorted(found, key=lambda s: (s.snr_db, s.cosine))


@dataclass
class FallbackStep:
    float_layers: int
    metric: float
    drop: float
    within_budget: bool


@dataclass
class FallbackResult:
    metric_name: str
    baseline: float  # the float model's score
    metric: float  # the chosen model's score
    max_drop: float
    quantizable: int  # layers the full INT8 model quantizes
    kept_float: list[str] = field(default_factory=list)
    steps: list[FallbackStep] = field(default_factory=list)

    @property
    def drop(self) -> float:
        return self.baseline - self.metric

    @property
    def int8_fraction(self) -> float:
        return 1 - len(self.kept_float) / self.quantizable if self.quantizable else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(drop=self.drop, int8_fraction=self.int8_fraction)
        return d


def fallback(
    cal: Calibrated,
    config: QuantConfig,
    ranking: Sequence[str] | Callable[[], Sequence[str]],
    score: Callable[[onnx.ModelProto], float],
    baseline: float,
    max_drop: float,
    metric_name: str = "metric",
    min_int8: int = 1,
) -> tuple[FallbackResult, Built]:
    """The INT8 model with the fewest of ``ranking``'s leading layers in float whose score is
    within ``max_drop`` of ``baseline``; QuantizationError when even keeping all but ``min_int8``
    layers in float misses the budget. ``ranking`` may be a callable: it is then computed only
    if the full INT8 model misses the budget (sensitivity analysis is the expensive part)."""
    order: list[str] = []
    result = FallbackResult(metric_name, baseline, baseline, max_drop, len(quantized_layers(cal, config)))
    built: dict[int, Built] = {}
    seen: dict[int, bool] = {}

    def within(k: int) -> bool:
        if k in seen:
            return seen[k]
        cfg = dataclasses.replace(config, exclude=(*config.exclude, *order[:k]))
        built[k] = build(cal, cfg)
        value = score(built[k].model)
        ok = baseline - value <= max_drop
        result.steps.append(FallbackStep(k, value, baseline - value, ok))
        if not ok:
            del built[k]  # only models that meet the budget are kept
        log.info(
            "fallback: %d layer(s) float -> %s %.4f (drop %.4f, budget %.4f)",
            k,
            metric_name,
            value,
            baseline - value,
            max_drop,
        )
        seen[k] = ok
        return ok

    if not within(0):
        order.extend(ranking() if callable(ranking) else ranking)
    limit = max(len(order) - min_int8, 0)
    best = _search(within, limit)
    if best is None:
        worst = result.steps[-1]
        raise QuantizationError(
            f"accuracy budget not met: even with {worst.float_layers} of {len(order)} layers back in float "
            f"(all but {min_int8}), {metric_name} drops {worst.drop:.4f} from {baseline:.4f}, "
            f"more than --max-drop {max_drop:g}"
        )
    result.kept_float = order[:best]
    result.metric = next(s.metric for s in reversed(result.steps) if s.float_layers == best)
    return result, built[best]


def _search(within: Callable[[int], bool], limit: int) -> int | None:
    """Smallest k in [0, limit] with within(k), assuming more float layers never hurt."""
    if within(0):
        return 0
    miss, k = 0, 1
    while True:
        k = min(k, limit)
        if k == miss:
            return None
        if within(k):
            break
        if k == limit:
            return None
        miss, k = k, 2 * k
    hit = k
    while hit - miss > 1:
        mid = (hit + miss) // 2
        if within(mid):
            hit = mid
        else:
            miss = mid
    return hit
