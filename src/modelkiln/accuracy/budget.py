"""Accuracy budgets, the scoring side: what a model is scored on (top-1, mAP or output cosine
to FP32) and how a budgeted quantization is reported, with the speed the choice keeps, measured
side by side with FP32 and full INT8. The search itself (sensitivity ranking, returning layers
to float) is ``Quantizer.within_budget``: quant is given a scorer and knows nothing of metrics.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelkiln._deps import require
from modelkiln.accuracy.evaluate import evaluate
from modelkiln.accuracy.metrics import cosine
from modelkiln.accuracy.tasks import task_spec
from modelkiln.data.feeds import Feed, model_feeds
from modelkiln.errors import BadInput
from modelkiln.onnx_io import load_model, save_model
from modelkiln.quant.build import QuantizeResult
from modelkiln.quant.mixed_precision import FallbackResult, LayerSensitivity
from modelkiln.quant.quantizer import Quantizer, Scorer
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.runtime.timing import interleaved_latency_ms
from modelkiln.zoo import Task

log = logging.getLogger(__name__)
#: --metric -> the task whose headline metric it is (top-1, mAP50-95); cosine (to FP32) needs none.
METRICS: dict[str, Task | None] = {"top1": Task.CLASSIFICATION, "map": Task.DETECTION, "cosine": None}

__all__ = [
    "METRICS",
    "AccuracyBudget",
    "BudgetResult",
    "Scorer",
    "cosine_scorer",
    "plot_sensitivity",
    "task_scorer",
    "within_budget",
]


def cosine_scorer(reference: onnx.ModelProto, feeds: Sequence[Feed]) -> Scorer:
    """Mean per-sample cosine of the first output to the reference's (1.0 for the reference)."""
    ref = cpu_backend(reference)
    name = ref.output_metadata[0].name
    expected = [ref.infer(f)[name] for f in feeds]

    def score(candidate: onnx.ModelProto) -> float:
        backend = cpu_backend(candidate)
        got = [backend.infer(f)[name] for f in feeds]
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
    task = METRICS[metric]
    key = task_spec(task).metric if task is not None else None
    if key is None:
        raise BadInput(f"--metric {metric} is not a task metric; task metrics: top1, map")

    def score(candidate: onnx.ModelProto) -> float:
        with tempfile.TemporaryDirectory(prefix="kiln-budget-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            save_model(candidate, path)
            return float(evaluate(path, zoo_name, data, labels, limit=limit).metrics[key])

    return score


@dataclass(frozen=True)
class AccuracyBudget:
    """How much accuracy INT8 may cost: ``metric`` on ``eval_data`` may drop by at most
    ``max_drop`` from FP32 (in the metric's own units: fractions for top-1 and mAP). ``labels``
    for task metrics; fail if the budget needs fewer than ``min_int8`` int8 layers; sensitivity
    is ranked on the first ``sensitivity_samples`` calibration samples."""

    eval_data: str | Path
    max_drop: float
    metric: str = "cosine"
    labels: str | Path | None = None
    min_int8: int = 1
    sensitivity_samples: int = 32

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise BadInput(f"--metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.max_drop < 0:
            raise BadInput(f"--max-drop must be >= 0, got {self.max_drop}")


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


def within_budget(quantizer: Quantizer, budget: AccuracyBudget, output: str | Path) -> BudgetResult:
    """Run ``quantizer``'s budget search with ``budget``'s scorer, write the chosen model to
    ``output`` and report it, with its latency beside FP32 and full INT8."""
    score, baseline = scorer_for(quantizer, budget)
    log.info("FP32 %s on %s: %.4f", budget.metric, budget.eval_data, baseline)
    search = quantizer.within_budget(
        score, budget.max_drop, baseline, budget.metric, budget.min_int8, budget.sensitivity_samples
    )
    summary = quantizer.save(output, search.built)
    for name in search.fallback.kept_float:
        summary.kept_float[name] = (
            f"accuracy budget: sensitive layer returned to float ({budget.metric} <= {budget.max_drop:g} drop)"
        )
    feed = quantizer.sample_feeds(budget.sensitivity_samples)[0]
    full = search.model if not search.fallback.kept_float else quantizer.build()  # built when k = 0 won
    backends = {"fp32": quantizer.source, "int8": full, "chosen": search.model}
    latency = interleaved_latency_ms({k: cpu_backend(m) for k, m in backends.items()}, feed)
    batch = int(next(iter(feed.values())).shape[0])
    return BudgetResult(summary, search.fallback, search.sensitivity, latency, batch)


def scorer_for(quantizer: Quantizer, budget: AccuracyBudget) -> tuple[Scorer, float]:
    """The scorer of ``budget.metric`` for ``quantizer``'s model, and the FP32 model's score."""
    task = METRICS[budget.metric]
    zoo_name = quantizer.data.zoo
    if budget.metric == "cosine":
        reference = load_model(quantizer.source)
        feeds = model_feeds(reference, budget.eval_data, quantizer.entry, quantizer.data.batch_size)
        return cosine_scorer(reference, list(feeds)), 1.0
    if zoo_name is None:
        raise BadInput(f"--metric {budget.metric} scores through the zoo's pre/post-processing: give --zoo")
    entry = quantizer.entry
    if entry is None or entry.task != task:
        found = entry.task if entry is not None else "not a zoo model"
        raise BadInput(f"--metric {budget.metric} needs a {task} model; {zoo_name} is {found}")
    score = task_scorer(budget.metric, zoo_name, budget.eval_data, budget.labels)
    return score, score(load_model(quantizer.source))


def plot_sensitivity(ranking: Sequence[LayerSensitivity], path: str | Path, top: int = 40) -> Path:
    """Horizontal bars: output SNR with only that layer quantized, worst ``top`` layers."""
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
