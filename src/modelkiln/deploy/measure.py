"""What deploy measures per precision: agreement with FP32, task metrics, latency and throughput."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from modelkiln.accuracy.compare import compare_models, plot_layers
from modelkiln.accuracy.evaluate import evaluate
from modelkiln.bench.runner import BenchCase, BenchResult, LoopSpec, benchmark_interleaved
from modelkiln.data.feeds import model_feeds
from modelkiln.deploy.summary import Agreement, BatchFigures, LayerAgreement, LayerSnr, OutputAgreement
from modelkiln.runtime.backends.onnxruntime import OrtBackend
from modelkiln.zoo import Task, ZooModel

#: Batch sizes deploy times every precision at.
BENCH_BATCHES = (1, 8)


def _feeds(
    path: Path, data: Path, entry: ZooModel | None, limit: int, batch: int
) -> list[dict[str, np.ndarray]]:
    return list(model_feeds(path, data, entry, batch, limit))


def calibration_feed(model: Path, data: Path, entry: ZooModel | None, batch: int) -> dict[str, np.ndarray]:
    """One feed of ``batch`` samples from ``data`` (repeated when there are fewer)."""
    feed = _feeds(model, data, entry, batch, batch)[0]
    if next(iter(feed.values())).shape[0] < batch:
        feed = {k: np.resize(v, (batch, *v.shape[1:])) for k, v in feed.items()}
    return feed


def agreement(
    fp32: Path, candidate: Path, data: Path, entry: ZooModel | None, out: Path, name: str
) -> Agreement:
    """Per-output cosine/SNR/top-k agreement vs FP32; for INT8 also per-layer SNR (plotted)."""
    per_layer = name == "int8"
    result = compare_models(
        fp32,
        candidate,
        _feeds(fp32, data, entry, 32, 8),
        per_layer=per_layer,
        classifier=entry is not None and entry.task == Task.CLASSIFICATION,
    )
    outputs = tuple(
        OutputAgreement(o.name, o.cosine, o.snr_db, o.max_abs, o.topk_agreement) for o in result.outputs
    )
    layers = None
    if per_layer:
        (out / "plots").mkdir(exist_ok=True)
        plot = str(plot_layers(result, out / "plots" / "int8_layer_snr.png"))
        worst = sorted(result.layers, key=lambda x: x.snr_db)[:10]
        layers = LayerAgreement(plot, result.first_collapse, tuple(LayerSnr(x.name, x.snr_db) for x in worst))
    return Agreement(result.samples, outputs, layers)


def task_metrics(
    model: Path, entry: ZooModel, data: Path, labels: Path | None, limit: int | None
) -> dict[str, float]:
    """The zoo task's metrics (top-1/top-5, mAP) of ``model`` on labelled ``data``."""
    return dict(evaluate(model, entry.name, data, labels, limit=limit).metrics)


def bench(
    models: Mapping[str, Path], data: Path, entry: ZooModel | None, seconds: float, rounds: int = 3
) -> dict[str, dict[int, BatchFigures]]:
    """p50/p99 latency and throughput at batch 1 and 8 on real (calibration/eval) inputs, every
    precision timed in turns over ``rounds`` so machine noise falls on all of them alike."""
    backends = {name: OrtBackend.load(path) for name, path in models.items()}
    cases = {
        (name, batch): BenchCase(backends[name], calibration_feed(path, data, entry, batch), batch)
        for name, path in models.items()
        for batch in BENCH_BATCHES
    }
    loop = LoopSpec(warmup=2, iterations=None, duration=seconds / rounds)
    found: dict[str, dict[int, BatchFigures]] = {name: {} for name in models}
    for (name, batch), r in benchmark_interleaved(cases, loop, rounds).items():
        found[name][batch] = batch_figures(r)
    return found


def batch_figures(r: BenchResult) -> BatchFigures:
    """The summary's record of one timed case."""
    return BatchFigures(
        p50_ms=r.latency_ms["median"],
        p99_ms=r.latency_ms["p99"],
        min_ms=r.latency_ms["min"],
        throughput=r.throughput,
        iterations=r.iterations,
    )
