"""What deploy measures per precision: agreement with FP32, task metrics, latency and throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.zoo import ZooModel


def _feeds(
    path: Path, data: Path, entry: ZooModel | None, limit: int, batch: int
) -> list[dict[str, np.ndarray]]:
    from modelkiln.onnx_io import load_model
    from modelkiln.quant.data import batches, list_samples
    from modelkiln.quant.quantize import input_names

    return list(batches(list_samples(data, limit), input_names(load_model(path)), entry, batch))


def calibration_feed(model: Path, data: Path, entry: ZooModel | None, batch: int) -> dict[str, np.ndarray]:
    """One feed of ``batch`` samples from ``data`` (repeated when there are fewer)."""
    feed = _feeds(model, data, entry, batch, batch)[0]
    if next(iter(feed.values())).shape[0] < batch:
        feed = {k: np.resize(v, (batch, *v.shape[1:])) for k, v in feed.items()}
    return feed


def agreement(
    fp32: Path, candidate: Path, data: Path, entry: ZooModel | None, out: Path, name: str
) -> dict[str, Any]:
    """Per-output cosine/SNR/top-k agreement vs FP32; for INT8 also per-layer SNR (plotted)."""
    from modelkiln.accuracy.compare import compare, plot_layers

    per_layer = name == "int8"
    result = compare(
        fp32,
        candidate,
        _feeds(fp32, data, entry, 32, 8),
        per_layer=per_layer,
        classifier=entry is not None and entry.task == "classification",
    )
    found: dict[str, Any] = {
        "samples": result.samples,
        "outputs": [
            {
                "name": o.name,
                "cosine": o.cosine,
                "snr_db": o.snr_db,
                "max_abs": o.max_abs,
                "topk_agreement": o.topk_agreement,
            }
            for o in result.outputs
        ],
    }
    if per_layer:
        (out / "plots").mkdir(exist_ok=True)
        found["layer_plot"] = str(plot_layers(result, out / "plots" / "int8_layer_snr.png"))
        found["first_collapse"] = result.first_collapse
        worst = sorted(result.layers, key=lambda x: x.snr_db)[:10]
        found["worst_layers"] = [{"name": x.name, "snr_db": x.snr_db} for x in worst]
    return found


def task_metrics(
    model: Path, entry: ZooModel, data: Path, labels: Path | None, limit: int | None
) -> dict[str, float]:
    from modelkiln.accuracy.evaluate import evaluate

    if labels is None and (data / "labels.csv").is_file():
        labels = data / "labels.csv"
    return evaluate(model, entry.name, data, labels, limit=limit).metrics


def bench(model: Path, data: Path, entry: ZooModel | None, seconds: float) -> dict[str, Any]:
    """p50/p99 latency and throughput at batch 1 and 8, on real (calibration/eval) inputs."""
    from modelkiln.bench.runner import LoopSpec, benchmark
    from modelkiln.runtime.backends.onnxruntime import OrtBackend

    backend = OrtBackend.load(model)
    found = {}
    for batch in (1, 8):
        feed = calibration_feed(model, data, entry, batch)
        r = benchmark(backend, feed, batch, 1, LoopSpec(warmup=3, iterations=None, duration=seconds))
        found[f"batch{batch}"] = {
            "p50_ms": r.latency_ms["median"],
            "p99_ms": r.latency_ms["p99"],
            "min_ms": r.latency_ms["min"],
            "throughput": r.throughput,
            "iterations": r.iterations,
        }
    return found
