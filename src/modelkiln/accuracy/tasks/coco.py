"""COCO detection scoring through pycocotools: our detections -> results JSON -> mAP50-95/mAP50."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from modelkiln._deps import require
from modelkiln.errors import BadInput
from modelkiln.zoo.coco import COCO80_TO_91
from modelkiln.zoo.yolov5 import Detections


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


def to_coco_results(image_id: int, detections: Detections, coco80: bool = True) -> list[dict]:
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


def coco_map(annotation_file: str | Path, results: list[dict], image_ids: list[int]) -> CocoScore:
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
