"""YOLOv5 architecture sizes, letterbox geometry and detection post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from modelkiln.zoo import Prepared, get
from modelkiln.zoo.nms import nms, yolo_nms
from modelkiln.zoo.yolov5 import letterbox

# Parameter counts of the official v7.0 models (yolov5n 1.9M … yolov5x 86.7M).
OFFICIAL_PARAMS = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557}


@pytest.mark.parametrize("size", sorted(OFFICIAL_PARAMS))
def test_architecture_matches_official_parameter_count(size: str) -> None:
    model = get(f"yolov5{size}").build("random")["model"]
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[size]


def test_letterbox_pads_with_114_and_keeps_aspect() -> None:
    image = np.full((200, 400, 3), 7, np.uint8)
    boxed, gain, (left, top) = letterbox(image, 640)
    assert boxed.shape == (640, 640, 3)
    assert gain == pytest.approx(1.6)
    assert (left, top) == (0, 160)
    assert (boxed[:160] == 114).all() and (boxed[-160:] == 114).all()
    assert (boxed[160:480] == 7).all()


def test_boxes_map_back_to_original_pixels() -> None:
    entry = get("yolov5n")
    prepared = entry.preprocess([np.zeros((200, 400, 3), np.uint8)])
    # one anchor row: a 64x32 px box centred at (320, 320) in letterboxed space, score 0.9 class 2
    row = np.zeros((1, 85), np.float32)
    row[0, :5] = [320, 320, 64, 32, 1.0]
    row[0, 5 + 2] = 0.9
    (det,) = entry.postprocess({"output0": row[None]}, prepared)
    (box,) = det.boxes
    assert box.label == "car" and box.score == pytest.approx(0.9)
    # letterbox: gain 1.6, top pad 160 -> x1 = (320-32)/1.6, y1 = (320-16-160)/1.6
    assert [box.x1, box.y1, box.x2, box.y2] == pytest.approx([180, 90, 220, 110], abs=1e-4)


def test_nms_suppresses_overlaps_only_within_a_class() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    pred = np.zeros((3, 7), np.float32)  # xywh, obj, 2 classes
    pred[:, :4] = [[5, 5, 10, 10], [6, 6, 10, 10], [6, 6, 10, 10]]
    pred[:, 4] = 1
    pred[:, 5:] = [[0.9, 0], [0.8, 0], [0, 0.7]]
    det = yolo_nms(pred, conf_threshold=0.25, iou_threshold=0.45)
    assert sorted(det[:, 5].tolist()) == [0.0, 1.0]  # class 1 box survives beside class 0


def test_nms_respects_thresholds_and_max_det() -> None:
    rng = np.random.default_rng(0)
    pred = np.zeros((500, 85), np.float32)
    pred[:, :2] = rng.uniform(0, 640, (500, 2))
    pred[:, 2:4] = 5
    pred[:, 4] = rng.uniform(0, 1, 500)
    pred[:, 5] = 1
    det = yolo_nms(pred, conf_threshold=0.5, iou_threshold=0.45, max_det=10)
    assert len(det) == 10 and (det[:, 4] > 0.5).all()
    assert (np.diff(det[:, 4]) <= 0).all()


def test_image_size_must_be_stride_multiple() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        get("yolov5n", image_size=100)


def test_in_graph_nms_rows_are_read() -> None:
    entry = get("yolov5n")
    prepared: Prepared = entry.preprocess([np.zeros((640, 640, 3), np.uint8)] * 2)
    rows = np.array([[1, 10, 20, 30, 40, 0.8, 0]], np.float32)
    first, second = entry.postprocess({"detections": rows}, prepared)
    assert first.boxes == [] and second.boxes[0].label == "person"
