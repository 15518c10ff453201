"""COCO detection scoring through pycocotools: our detections -> results JSON -> mAP50-95/mAP50,
and the detection scorer of the task registry."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln._deps import require
from modelkiln.accuracy.tasks.base import EvalRequest, Scored
from modelkiln.errors import BadInput
from modelkiln.predict import Predictor
from modelkiln.zoo.coco import COCO80_TO_91
from modelkiln.zoo.images import list_images
from modelkiln.zoo.yolov5 import Detections

#: What --labels is for a detector.
LABELS = "a COCO annotation JSON (instances_*.json)"


@dataclass(frozen=True)
class CocoScore:
    map50_95: float
    map50: float
    images: int
    detections: int


def load_image_ids(annotation_file: str | Path) -> dict[str, int]:
    """file_name -> image id from a COCO annotation JSON."""
    path = Path(annotation_file)
    if not path.is_file():
        raise BadInput(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
        return {img["file_name"]: int(img["id"]) for img in data["images"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(
            f"{path} is not a COCO annotation file (needs 'images' with file_name and id)"
        ) from exc


def to_coco_results(image_id: int, detections: Detections, coco80: bool = True) -> list[dict[str, Any]]:
    """COCO results rows (xywh boxes, category ids 1-90 when the model has the 80 COCO classes)."""
    rows = []
    for b in detections.boxes:
        category = COCO80_TO_91[b.class_id] if coco80 else b.class_id
        rows.append(
            {
                "image_id": image_id,
                "category_id": category,
                "score": round(b.score, 5),
                "bbox": [round(b.x1, 3), round(b.y1, 3), round(b.x2 - b.x1, 3), round(b.y2 - b.y1, 3)],
            }
        )
    return rows


def coco_map(annotation_file: str | Path, results: list[dict[str, Any]], image_ids: list[int]) -> CocoScore:
    """mAP50-95 and mAP50 of ``results`` on ``image_ids`` (pycocotools' own evaluation)."""
    pycocotools = require("pycocotools.coco", "COCO mAP")
    cocoeval = require("pycocotools.cocoeval", "COCO mAP")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = pycocotools.COCO(str(annotation_file))
        if not results:
            return CocoScore(0.0, 0.0, len(image_ids), 0)
        dt = gt.loadRes(results)
        ev = cocoeval.COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return CocoScore(float(ev.stats[0]), float(ev.stats[1]), len(image_ids), len(results))


def score_detection(predictor: Predictor, request: EvalRequest) -> Scored:
    """COCO mAP50-95 and mAP50 at YOLOv5 val.py's thresholds, on the images the annotation file
    lists; with ``request.predictions``, the COCO results JSON scored."""
    if request.labels is None:
        raise BadInput(f"detectors need --labels: {LABELS}")
    ids = load_image_ids(request.labels)
    files = [f for f in list_images(request.data) if f.name in ids]
    files = files[: request.limit] if request.limit else files
    if not files:
        raise BadInput(f"no images in {request.data} are listed in {request.labels}")
    predictor.entry.for_evaluation()
    preds = predictor.predict(list(files))
    rows = [r for pred in preds for r in to_coco_results(ids[pred.image.name], pred.result)]
    if request.predictions:
        Path(request.predictions).write_text(json.dumps(rows))
    score = coco_map(request.labels, rows, [ids[f.name] for f in files])
    return Scored(len(files), {"map50_95": score.map50_95, "map50": score.map50})
