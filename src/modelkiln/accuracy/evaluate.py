"""``evaluate``: task metrics through the zoo's own pre/post-processing, with predictions written
out so anyone can re-score them (top-5 CSV for classifiers, COCO results JSON for detectors)."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.accuracy.tasks.coco import coco_map, load_image_ids, to_coco_results
from modelkiln.accuracy.tasks.imagenet import read_labels_csv
from modelkiln.errors import BadInput
from modelkiln.predict import Predictor
from modelkiln.zoo.images import list_images

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    model: str
    task: str
    images: int
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def classification_labels(data: Path, labels: Path | None) -> dict[Path, int]:
    """Image -> class index from a ``file,class_index`` CSV, or from numbered class sub-folders."""
    if labels is not None:
        by_name = read_labels_csv(labels)
        found = {p: by_name[p.name] for p in list_images(data) if p.name in by_name}
    else:
        found = {}
        for sub in sorted(p for p in data.iterdir() if p.is_dir()):
            if not sub.name.isdigit():
                raise BadInput(f"class sub-folders must be named by class index (0-999), got {sub.name!r}")
            found.update({p: int(sub.name) for p in list_images(sub)})
    if not found:
        raise BadInput(f"no labelled images in {data}" + (f" matching {labels}" if labels else ""))
    return found


def evaluate(
    model: str | Path,
    zoo_name: str | None,
    data: str | Path,
    labels: str | Path | None = None,
    predictions: str | Path | None = None,
    limit: int | None = None,
) -> EvalResult:
    """Top-1/top-5 (classifiers) or COCO mAP50-95/mAP50 (detectors) of ``model`` on ``data``."""
    predictor = Predictor.open(model, zoo_name=zoo_name)
    data = Path(data)
    if predictor.entry.task == "classification":
        return _classification(
            predictor, str(model), data, Path(labels) if labels else None, predictions, limit
        )
    if predictor.entry.task == "detection":
        if labels is None:
            raise BadInput("detectors need --labels: a COCO annotation JSON (instances_*.json)")
        return _detection(predictor, str(model), data, Path(labels), predictions, limit)
    raise BadInput(f"evaluate has no task metric for {predictor.entry.name} ({predictor.entry.task})")


def _classification(
    p: Predictor, name: str, data: Path, labels: Path | None, out: Any, limit: int | None
) -> EvalResult:
    truth = classification_labels(data, labels)
    files = sorted(truth)[:limit] if limit else sorted(truth)
    preds = p.predict(files)
    top1 = float(np.mean([r.result.top[0][0] == truth[r.image] for r in preds]))
    top5 = float(np.mean([truth[r.image] in [t[0] for t in r.result.top[:5]] for r in preds]))
    if out:
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", *(f"top{k}" for k in range(1, 6)), *(f"p{k}" for k in range(1, 6))])
            for r in preds:
                w.writerow(
                    [
                        r.image.name,
                        *(t[0] for t in r.result.top[:5]),
                        *(f"{t[2]:.6f}" for t in r.result.top[:5]),
                    ]
                )
    return EvalResult(
        name, "classification", len(files), {"top1": top1, "top5": top5}, str(out) if out else None
    )


def _detection(p: Predictor, name: str, data: Path, labels: Path, out: Any, limit: int | None) -> EvalResult:
    ids = load_image_ids(labels)
    files = [f for f in list_images(data) if f.name in ids]
    files = files[:limit] if limit else files
    if not files:
        raise BadInput(f"no images in {data} are listed in {labels}")
    p.entry.for_evaluation()  # type: ignore[attr-defined]
    rows = [r for pred in p.predict(files) for r in to_coco_results(ids[pred.image.name], pred.result)]
    if out:
        Path(out).write_text(json.dumps(rows))
    score = coco_map(labels, rows, [ids[f.name] for f in files])
    return EvalResult(
        name,
        "detection",
        len(files),
        {"map50_95": score.map50_95, "map50": score.map50},
        str(out) if out else None,
    )
