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


def bench(
    models: dict[str, Path], data: Path, entry: ZooModel | None, seconds: float, rounds: int = 3
) -> dict[str, dict[str, Any]]:
    """p50/p99 latency and throughput at batch 1 and 8 on real (calibration/eval) inputs, every
    precision timed in turns over ``rounds`` so machine noise falls on all of them alike."""
    from modelkiln.bench.runner import LoopSpec, benchmark, summarize
    from modelkiln.runtime.backends.onnxruntime import OrtBackend

    backends = {name: OrtBackend.load(path) for name, path in models.items()}
    feeds = {
        (name, batch): calibration_feed(path, data, entry, batch)
        for name, path in models.items()
        for batch in (1, 8)
    }
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in feeds}
    walls: dict[tuple[str, int], float] = dict.fromkeys(feeds, 0.0)
    loop = LoopSpec(warmup=2, iterations=None, duration=seconds / rounds)
    for _ in range(rounds):
        for (name, batch), feed in feeds.items():
            r = benchmark(backends[name], feed, batch, 1, loop)
            samples[(name, batch)].extend(x / 1e3 for x in r.latencies_ms)
            walls[(name, batch)] += r.wall_s
    found: dict[str, dict[str, Any]] = {name: {} for name in models}
    for (name, batch), lat in samples.items():
        stats = summarize(lat)
        found[name][f"batch{batch}"] = {
            "p50_ms": stats["median"],
            "p99_ms": stats["p99"],
            "min_ms": stats["min"],
            "throughput": batch * len(lat) / walls[(name, batch)],
            "iterations": len(lat),
        }
    return found
