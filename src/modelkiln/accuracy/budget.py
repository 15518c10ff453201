"""Quantize within an accuracy budget: rank layers by sensitivity, then return the most sensitive
to float until the metric (top-1, mAP or output cosine) drops by at most ``max_drop`` from FP32.

This composes quant (calibration, sensitivity, fallback search) with accuracy (the metrics) and
reports the speed the choice keeps, measured side by side with FP32 and full INT8.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelkiln.accuracy.evaluate import evaluate
from modelkiln.accuracy.metrics import cosine
from modelkiln.errors import BadInput
from modelkiln.onnx_io import load_model, save_model
from modelkiln.quant.config import QuantConfig
from modelkiln.quant.data import batches, list_samples
from modelkiln.quant.mixed_precision import FallbackResult, LayerSensitivity, fallback, sensitivity
from modelkiln.quant.quantize import QuantizeResult, build, input_names, prepare, quantized_layers, summarize
from modelkiln.runtime.session import interleaved_latency_ms, ort_session

log = logging.getLogger(__name__)
METRICS = {"top1": ("classification", "top1"), "map": ("detection", "map50_95"), "cosine": (None, None)}
Scorer = Callable[[onnx.ModelProto], float]


def cosine_scorer(reference: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> Scorer:
    """Mean per-sample cosine of the first output to the reference's (1.0 for the reference)."""
    ref_session = ort_session(reference.SerializeToString())
    name = ref_session.get_outputs()[0].name
    expected = [ref_session.run([name], f)[0] for f in feeds]

    def score(candidate: onnx.ModelProto) -> float:
        session = ort_session(candidate.SerializeToString())
        got = [session.run([name], f)[0] for f in feeds]
        return float(
            np.mean(
                [cosine(c, r) for e, g in zip(expected, got, strict=True) for r, c in zip(e, g, strict=True)]
            )
        )

    return score


def task_scorer(
    metric: str, zoo_name: str, data: str | Path, labels: str | Path | None, limit: int | None = None
) -> Scorer:
    """top-1 or COCO mAP50-95 of a model through ``evaluate`` (the model goes through a temp file)."""
    key = METRICS[metric][1]

    def score(candidate: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="kiln-budget-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            save_model(candidate, path)
            return evaluate(path, zoo_name, data, labels, limit=limit).metrics[key]

    return score


@dataclass
class BudgetResult:
    quantize: QuantizeResult
    fallback: FallbackResult
    sensitivity: list[LayerSensitivity] = field(default_factory=list)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # fp32 / int8 / chosen
    latency_batch: int = 0  # batch size of the feed the latencies were measured on

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantize": self.quantize.to_dict(),
            "fallback": self.fallback.to_dict(),
            "sensitivity": [vars(s) for s in self.sensitivity],
            "latency_ms": self.latency_ms,
            "latency_batch": self.latency_batch,
        }


def quantize_within_budget(
    source: str | Path,
    output: str | Path,
    calib: str | Path,
    eval_data: str | Path,
    max_drop: float,
    metric: str = "cosine",
    zoo_name: str | None = None,
    labels: str | Path | None = None,
    config: QuantConfig | None = None,
    calib_size: int = 100,
    batch_size: int = 8,
    sensitivity_samples: int = 32,
    min_int8: int = 1,
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None,
) -> BudgetResult:
    """Quantize ``source``; keep the fewest most-sensitive layers in float that bring the metric
    drop within ``max_drop`` (in the metric's own units: fractions for top-1 and mAP)."""
    if metric not in METRICS:
        raise BadInput(f"--metric must be one of {sorted(METRICS)}, got {metric!r}")
    if max_drop < 0:
        raise BadInput(f"--max-drop must be >= 0, got {max_drop}")
    config = config or QuantConfig()
    cal = prepare(
        source, calib, zoo_name, config, calib_size, batch_size, _step(progress, "calibrating", None)
    )
    names = input_names(cal.proto)
    sens_feeds = list(batches(cal.files[:sensitivity_samples], names, cal.entry, batch_size))
    ranking: list[LayerSensitivity] = []

    def rank() -> list[str]:  # only when the full INT8 model misses the budget
        total = len(quantized_layers(cal, config))
        ranking.extend(sensitivity(cal, config, sens_feeds, _step(progress, "sensitivity", total)))
        return [s.name for s in ranking]

    score, baseline = _scorer(metric, source, cal, zoo_name, eval_data, labels, batch_size)
    log.info("FP32 %s on %s: %.4f", metric, eval_data, baseline)
    result, proto, plan, counts = fallback(cal, config, rank, score, baseline, max_drop, metric, min_int8)
    save_model(proto, Path(output))
    feed = sens_feeds[0]
    full = proto if not result.kept_float else build(cal, config)[0]  # built already when k = 0 won
    latency = interleaved_latency_ms(
        {
            "fp32": load_model(source).SerializeToString(),
            "int8": full.SerializeToString(),
            "chosen": proto.SerializeToString(),
        },
        feed,
    )
    summary = summarize(cal, config, proto, plan, counts, str(output))
    for name in result.kept_float:
        summary.kept_float[name] = (
            f"accuracy budget: sensitive layer returned to float ({metric} <= {max_drop:g} drop)"
        )
    return BudgetResult(summary, result, ranking, latency, int(next(iter(feed.values())).shape[0]))


def _scorer(
    metric: str,
    source: str | Path,
    cal: Any,
    zoo_name: str | None,
    eval_data: str | Path,
    labels: str | Path | None,
    batch_size: int,
) -> tuple[Scorer, float]:
    task, _ = METRICS[metric]
    reference = load_model(source)
    if metric == "cosine":
        feeds = list(batches(list_samples(eval_data), input_names(reference), cal.entry, batch_size))
        return cosine_scorer(reference, feeds), 1.0
    if zoo_name is None:
        raise BadInput(f"--metric {metric} scores through the zoo's pre/post-processing: give --zoo")
    if cal.entry.task != task:
        raise BadInput(f"--metric {metric} needs a {task} model; {zoo_name} is {cal.entry.task}")
    score = task_scorer(metric, zoo_name, eval_data, labels)
    return score, score(reference)


def _step(progress: Any, label: str, total: int | None) -> Callable[[int], None] | None:
    return progress(label, total) if progress else None


def plot_sensitivity(ranking: Sequence[LayerSensitivity], path: str | Path, top: int = 40) -> Path:
    """Horizontal bars: output SNR with only that layer quantized, worst ``top`` layers."""
    from modelkiln._deps import require

    mpl = require("matplotlib", "sensitivity plots")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "sensitivity plots")
    shown = list(ranking[:top])[::-1]
    fig, ax = plt.subplots(figsize=(9, max(3, 0.22 * len(shown) + 1)))
    ax.barh(
        [f"{s.name[-48:]} ({s.op})" for s in shown], [min(s.snr_db, 80.0) for s in shown], color="tab:blue"
    )
    ax.set_xlabel("model-output SNR with only this layer in INT8 (dB, lower = more sensitive)")
    ax.set_title(f"Layer sensitivity, worst {len(shown)} of {len(ranking)}")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
