"""``kiln predict``: run a model on images and print (and draw) what it sees."""

from __future__ import annotations

from pathlib import Path

import cv2
import typer

from modelkiln.data.samples import sample_images
from modelkiln.delivery.crypto import resolve_model_key
from modelkiln.log import console, err_console
from modelkiln.predict import Prediction, Predictor
from modelkiln.runtime.backends import BackendKind
from modelkiln.zoo import Task
from modelkiln.zoo.draw import draw_detections
from modelkiln.zoo.images import read_image


def predict(
    model: str = typer.Argument(..., help="An exported .onnx file, a folder of parts (CLIP) or a zoo name."),
    images: list[Path] = typer.Argument(None, help="Image files (default: the built-in sample image)."),
    zoo_name: str = typer.Option(
        None, "--zoo", help="Zoo family of an ONNX file without modelkiln metadata."
    ),
    weights: str = typer.Option(
        None, "--weights", "-w", help="Weights when MODEL is a zoo name (or for --backend torch)."
    ),
    labels: str = typer.Option(None, "--labels", help="CLIP: comma-separated labels for zero-shot."),
    out_dir: Path = typer.Option(
        None, "--out-dir", help="Where drawn detections go (default: beside each image)."
    ),
    backend: BackendKind = typer.Option(
        BackendKind.ONNXRUNTIME,
        "--backend",
        help="Runtime: onnxruntime (CPU), tensorrt, or torch (the zoo's torch reference).",
    ),
    model_key: Path = typer.Option(
        None,
        "--model-key",
        help="Key file for an encrypted model (default: KILN_MODEL_KEY_FILE or KILN_MODEL_KEY).",
    ),
) -> None:
    """Top-5 labels for classifiers; boxes listed and drawn into a PNG for detectors."""
    key = resolve_model_key(model_key)
    predictor = Predictor.open(model, zoo_name=zoo_name, weights=weights, backend=backend, key=key)
    if not images:
        images = sample_images()
        err_console.print(f"no images given: using the built-in sample {', '.join(p.name for p in images)}")
    label_list = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    for pred in predictor.predict(list(images), labels=label_list):
        console.print(f"[bold]{pred.image}[/]")
        console.print(str(pred.result), highlight=False)
        if predictor.entry.task is Task.DETECTION:
            console.print(f"  drawn: {_save_drawing(pred, out_dir)}")


def _save_drawing(pred: Prediction, out_dir: Path | None) -> Path:
    """Write ``<stem>.pred.png`` beside the image, or into out_dir / the current folder if read-only."""
    image_path = pred.image
    drawn = draw_detections(read_image(image_path), pred.result)
    for folder in [out_dir] if out_dir else [image_path.parent, Path.cwd()]:
        target = folder / f"{image_path.stem}.pred.png"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if cv2.imwrite(str(target), drawn):
                return target
        except OSError:
            continue
    raise OSError(
        f"cannot write the drawing of {image_path} to {out_dir or image_path.parent} or {Path.cwd()}"
    )
