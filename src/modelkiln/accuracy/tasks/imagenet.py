"""ImageNet-style classification: labels (CSV ``file,class_index`` or class sub-folders), top-k
accuracy, and the classification scorer of the task registry."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from modelkiln.accuracy.tasks.base import EvalRequest, Scored
from modelkiln.errors import BadInput
from modelkiln.predict import Predictor
from modelkiln.zoo.images import list_images

#: What --labels is for a classifier (optional: class sub-folders of the data folder do too).
LABELS = "a CSV of file,class_index (or put the images in class-index sub-folders of --data)"


def read_labels_csv(path: str | Path) -> dict[str, int]:
    """file name -> class index from a CSV with ``file`` and ``class_index`` columns."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"labels file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "class_index"} <= set(reader.fieldnames):
            raise BadInput(f"{path}: expected CSV columns 'file,class_index', got {reader.fieldnames}")
        return {row["file"]: int(row["class_index"]) for row in reader}


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


def topk_correct(probabilities_or_logits: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Boolean per row: is the target among the k highest scores."""
    top = np.argsort(-probabilities_or_logits, axis=1)[:, :k]
    correct: np.ndarray = (top == targets[:, None]).any(axis=1)
    return correct


def score_classification(predictor: Predictor, request: EvalRequest) -> Scored:
    """Top-1 and top-5 accuracy; with ``request.predictions``, a CSV of every image's top 5."""
    truth = classification_labels(request.data, request.labels)
    files = sorted(truth)[: request.limit] if request.limit else sorted(truth)
    preds = predictor.predict(list(files))
    top1 = float(np.mean([r.result.top[0][0] == truth[r.image] for r in preds]))
    top5 = float(np.mean([truth[r.image] in [t[0] for t in r.result.top[:5]] for r in preds]))
    if request.predictions:
        with open(request.predictions, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", *(f"top{k}" for k in range(1, 6)), *(f"p{k}" for k in range(1, 6))])
            for r in preds:
                top = r.result.top[:5]
                w.writerow([r.image.name, *(t[0] for t in top), *(f"{t[2]:.6f}" for t in top)])
    return Scored(len(files), {"top1": top1, "top5": top5})
