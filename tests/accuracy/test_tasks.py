"""The task registry: every zoo Task has an entry, scored tasks have a scorer that really scores
(checked against a stand-in backend with known answers), unscored tasks say what to use instead."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from modelkiln.accuracy.tasks import TASKS, EvalRequest, task_spec
from modelkiln.errors import BadInput
from modelkiln.predict import Predictor
from modelkiln.runtime.backends.base import Backend, TensorMeta
from modelkiln.zoo import Task, as_image_task, get


class Fixed(Backend):
    """A backend that answers every row with the same output row."""

    def __init__(self, inputs: list[TensorMeta], name: str, row: np.ndarray) -> None:
        super().__init__("fixed", inputs, [TensorMeta(name, "float32", ("batch", *row.shape))])
        self.row = row

    @classmethod
    def load(cls, model: object, options: object = None) -> Fixed:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = next(iter(feed.values())).shape[0]
        return {self._outputs[0].name: np.repeat(self.row[None], batch, axis=0)}


def test_every_task_has_an_entry_and_scored_tasks_a_scorer() -> None:
    assert set(TASKS) == set(Task)
    for task, spec in TASKS.items():
        assert spec.task is task
        if spec.scorer is None:
            assert spec.metric is None and spec.unscored, task
        else:
            assert callable(spec.scorer) and spec.metric in spec.metrics and spec.labels, task
    assert TASKS[Task.CLASSIFICATION].metric == "top1"
    assert TASKS[Task.DETECTION].metric == "map50_95"


def test_task_spec_takes_members_and_values() -> None:
    assert task_spec("detection") is TASKS[Task.DETECTION] is task_spec(Task.DETECTION)
    with pytest.raises(BadInput, match="unknown task 'segmentation'"):
        task_spec("segmentation")


def _classifier(tmp_path: Path) -> tuple[Predictor, Path]:
    """Images in class folders 3/ and 7/; a stand-in that always ranks 3 first and 7 second."""
    entry = as_image_task(get("efficientnet_lite0", 32))
    logits = np.zeros(1000, np.float32)
    logits[3], logits[7] = 9.0, 8.0
    inputs = [TensorMeta("input", "float32", ("batch", 3, 32, 32))]
    for cls in ("3", "7"):
        (tmp_path / cls).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(tmp_path / cls / f"{cls}_{i}.png"), np.full((40, 50, 3), 60 * i, np.uint8))
    return Predictor(entry, {"model": Fixed(inputs, "logits", logits)}), tmp_path


def test_classification_scorer_counts_top1_and_top5_and_writes_predictions(tmp_path: Path) -> None:
    predictor, data = _classifier(tmp_path / "data")
    out = tmp_path / "top5.csv"
    scored = TASKS[Task.CLASSIFICATION].scorer(predictor, EvalRequest(data, predictions=out))  # type: ignore[misc]
    assert scored.images == 4
    assert scored.metrics == {"top1": 0.5, "top5": 1.0}
    rows = list(csv.DictReader(out.open()))
    assert [r["top1"] for r in rows] == ["3"] * 4 and {r["top2"] for r in rows} == {"7"}


def test_classification_scorer_honours_limit(tmp_path: Path) -> None:
    predictor, data = _classifier(tmp_path)
    scored = TASKS[Task.CLASSIFICATION].scorer(predictor, EvalRequest(data, limit=2))  # type: ignore[misc]
    assert scored.images == 2 and scored.metrics["top1"] == 1.0  # sorted: the two class-3 images


def test_detection_scorer_gives_full_map_for_exact_boxes(tmp_path: Path) -> None:
    pytest.importorskip("pycocotools")
    entry = as_image_task(get("yolov5n", 64))
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((64, 64, 3), np.uint8))
    labels = tmp_path / "instances.json"
    labels.write_text(
        json.dumps(
            {
                "images": [{"id": 5, "file_name": "a.png", "width": 64, "height": 64}],
                "annotations": [
                    {
                        "id": 1,
                        "image_id": 5,
                        "category_id": 1,
                        "bbox": [10, 12, 20, 24],
                        "area": 480,
                        "iscrowd": 0,
                    }
                ],
                "categories": [{"id": 1, "name": "person"}],
            }
        )
    )
    # end-to-end (in-graph NMS) rows: [batch index, x1, y1, x2, y2, score, class]; 64 px: no letterbox
    row = np.array([0, 10, 12, 30, 36, 0.9, 0], np.float32)
    inputs = [TensorMeta("images", "float32", ("batch", 3, 64, 64))]
    predictor = Predictor(entry, {"model": Fixed(inputs, "detections", row)})
    out = tmp_path / "results.json"
    scored = TASKS[Task.DETECTION].scorer(predictor, EvalRequest(tmp_path, labels, out))  # type: ignore[misc]
    assert scored.images == 1
    assert scored.metrics == pytest.approx({"map50_95": 1.0, "map50": 1.0})
    (result,) = json.loads(out.read_text())
    assert result["image_id"] == 5 and result["category_id"] == 1 and result["bbox"] == [10, 12, 20, 24]
    assert entry.conf_threshold == 0.001  # type: ignore[attr-defined]  # scored at val.py's thresholds


def test_detection_scorer_needs_labels(tmp_path: Path) -> None:
    predictor = Predictor(as_image_task(get("yolov5n", 64)), {})
    with pytest.raises(BadInput, match="detectors need --labels: a COCO annotation JSON"):
        TASKS[Task.DETECTION].scorer(predictor, EvalRequest(tmp_path))  # type: ignore[misc]
