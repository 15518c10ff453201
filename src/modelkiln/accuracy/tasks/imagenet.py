"""ImageNet-style labels (CSV ``file,class_index`` or class sub-folders) and top-k accuracy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from modelkiln.errors import BadInput


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


def topk_correct(probabilities_or_logits: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Boolean per row: is the target among the k highest scores."""
    top = np.argsort(-probabilities_or_logits, axis=1)[:, :k]
    return (top == targets[:, None]).any(axis=1)
