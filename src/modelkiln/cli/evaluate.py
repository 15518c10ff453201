"""``kiln evaluate``: task metrics through the zoo's pre/post-processing (``--task retrieval`` for
a dual encoder's folder of towers)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from modelkiln.accuracy.evaluate import evaluate
from modelkiln.log import console, err_console
from modelkiln.runtime.backends import BackendKind


def evaluate_cmd(
    model: Path = typer.Argument(..., help="ONNX model (FP32 or INT8), or a folder of parts (CLIP)."),
    data: Path = typer.Option(
        ..., "--data", help="Image folder (retrieval: or a caption set: COCO folder, JSON, CSV, JSONL)."
    ),
    zoo_name: str = typer.Option(
        None, "--zoo", help="Zoo family (read from the model's metadata if absent)."
    ),
    labels: Path = typer.Option(
        None,
        "--labels",
        help="Classifier: CSV file,class_index; detector: COCO JSON; retrieval: captions "
        "(COCO captions JSON, image,caption CSV or JSONL).",
    ),
    task: str = typer.Option(
        None, "--task", help="Score on this task instead of the model's own: retrieval (dual encoders)."
    ),
    predictions: Path = typer.Option(
        None,
        "--predictions",
        help="Write top-5 CSV, COCO results JSON or (retrieval) an .npz of the embeddings.",
    ),
    limit: int = typer.Option(None, "--limit", help="Only the first N images."),
    json_out: Path = typer.Option(None, "--json", help="Write the metrics as JSON."),
    backend: BackendKind = typer.Option(
        BackendKind.ONNXRUNTIME,
        "--backend",
        help="Runtime: onnxruntime (CPU), tensorrt, or torch (the zoo's torch reference).",
    ),
) -> None:
    """Top-1/top-5 for classifiers, COCO mAP50-95/mAP50 for detectors, recall@1/5/10 both ways
    for dual encoders with --task retrieval."""
    with err_console.status(f"evaluating {model.name}…"):
        result = evaluate(model, zoo_name, data, labels, predictions, limit, backend=backend, task=task)
    figures = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    console.print(f"{model.name}: {figures} on {result.images} images")
    if result.predictions:
        console.print(f"predictions: {result.predictions}")
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=1))
