"""Class-aware NMS: the fast paths keep exactly the boxes (same indices, same order) that the greedy
NMS YOLOv5 and this project used before keep, on random boxes with ties, zero-area boxes, empty
input and max_det cuts, on batches, and on YOLOv5n's real outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modelkiln.zoo import nms as nms_module
from modelkiln.zoo.nms import batched_yolo_nms, class_nms, nms, rank_order, xywh_to_xyxy, yolo_nms

# ---- the reference: the NMS of the previous release, verbatim (numpy greedy, one pass per kept box)


def greedy_reference(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def yolo_nms_reference(
    pred: np.ndarray,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    max_wh: float = 7680.0,
    max_candidates: int = 30000,
) -> np.ndarray:
    pred = pred[pred[:, 4] > conf_threshold]
    if not len(pred):
        return np.zeros((0, 6), np.float32)
    scores = pred[:, 5:] * pred[:, 4:5]
    boxes = xywh_to_xyxy(pred[:, :4])
    if multi_label:
        i, j = np.nonzero(scores > conf_threshold)
        det = np.concatenate([boxes[i], scores[i, j, None], j[:, None].astype(np.float32)], 1)
    else:
        j = scores.argmax(1)
        conf = scores[np.arange(len(j)), j]
        det = np.concatenate([boxes, conf[:, None], j[:, None].astype(np.float32)], 1)[conf > conf_threshold]
    if len(det) > max_candidates:
        det = det[np.argsort(-det[:, 4], kind="stable")[:max_candidates]]
    keep = greedy_reference(det[:, :4] + det[:, 5:6] * max_wh, det[:, 4], iou_threshold)[:max_det]
    kept: np.ndarray = det[keep].astype(np.float32)
    return kept


# ---- every path of class_nms, forced by its size thresholds

PATHS = {
    "loop": {"_FEW": 10**9},
    "steps": {"_FEW": 0, "_PER_CLASS": 10**9},
    "steps-of-3": {"_FEW": 0, "_PER_CLASS": 10**9, "_HEADS": 3},
    "per-class": {"_FEW": 0, "_PER_CLASS": 0},
    "per-class-small-2": {"_FEW": 0, "_PER_CLASS": 0, "_SMALL": 2, "_HEADS": 2},
    "per-class-all-large": {"_FEW": 0, "_PER_CLASS": 0, "_SMALL": 1, "_HEADS": 5},
}


@contextlib.contextmanager
def path(name: str) -> Iterator[None]:
    with mock.patch.multiple(nms_module, **PATHS[name]):
        yield


@st.composite
def detections(draw: st.DrawFn, max_n: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes on a coarse grid (many overlaps, exact ties of IoU), zero-area and inverted boxes,
    scores with ties, a handful of classes."""
    n = draw(st.integers(0, max_n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, 40, (n, 2)).astype(np.float32) * draw(st.sampled_from([1.0, 0.5, 7.3, 1e-5]))
    wh = rng.integers(0, 12, (n, 2)).astype(np.float32) * draw(st.sampled_from([1.0, 2.5, 16.0, 1e-5]))
    if draw(st.booleans()):
        wh[rng.random(n) < 0.1] *= -1  # inverted boxes: zero area after the clip
    boxes = np.concatenate([xy, xy + wh], 1)
    levels = draw(st.sampled_from([3, 10, 1000]))
    scores = (rng.integers(1, levels + 1, n) / levels).astype(np.float32)  # few levels: many ties
    classes = rng.integers(0, draw(st.integers(1, 6)), n).astype(np.float32)
    return boxes, scores, classes


@pytest.mark.parametrize("name", sorted(PATHS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    det=detections(),
    iou=st.sampled_from([0.0, 0.1, 0.3, 0.45, 0.5, 0.6, 0.9, 1.0]),
    max_det=st.one_of(st.none(), st.integers(0, 40)),
)
def test_class_nms_keeps_what_greedy_nms_keeps(
    name: str, det: tuple[np.ndarray, np.ndarray, np.ndarray], iou: float, max_det: int | None
) -> None:
    boxes, scores, classes = det
    want = greedy_reference(boxes + classes[:, None] * 7680.0, scores, iou)[:max_det]
    with path(name):
        got = class_nms(boxes, scores, classes, iou, max_det)
    assert got.dtype == np.int64
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("name", sorted(PATHS))
def test_classes_that_could_touch_fall_back_to_all_boxes_together(name: str) -> None:
    # boxes wider than the class offset: class 0 and class 1 overlap after the shift, and the
    # reference lets them suppress each other; so must we
    boxes = np.array([[0, 0, 9000, 10], [100, 0, 9100, 10], [7700, 0, 8000, 10]] * 20, np.float32)
    scores = np.linspace(1, 0.1, len(boxes)).astype(np.float32)
    classes = np.array([0, 0, 1] * 20, np.float32)
    want = greedy_reference(boxes + classes[:, None] * 7680.0, scores, 0.1)
    with path(name):
        assert class_nms(boxes, scores, classes, 0.1).tolist() == want.tolist()


@pytest.mark.parametrize("name", sorted(PATHS))
@pytest.mark.parametrize("nan", ["none", "box", "score", "both"])
def test_nan_and_negative_threshold_behave_as_the_reference(name: str, nan: str) -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 50, (80, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (80, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 80).astype(np.float32)
    classes = rng.integers(0, 3, 80).astype(np.float32)
    if nan in ("box", "both"):
        boxes[7, 2] = np.nan
    if nan in ("score", "both"):
        scores[11] = np.nan
    for iou in (0.5, -0.1):
        want = greedy_reference(boxes + classes[:, None] * 7680.0, scores, iou)
        with path(name):
            assert class_nms(boxes, scores, classes, iou).tolist() == want.tolist()


@pytest.mark.parametrize("name", sorted(PATHS))
def test_tiny_boxes_feel_the_unions_epsilon_as_in_the_reference(name: str) -> None:
    # 1e-4 px squares: IoU 1e-8 / (1e-8 + 1e-9) = 0.91 with the reference's epsilon, so the
    # copies of a box suppress each other, and boxes a little apart do not
    xy = np.repeat(np.arange(20, dtype=np.float32) * 5e-5, 3)[:, None] * np.ones((1, 2), np.float32)
    boxes = np.concatenate([xy, xy + np.float32(1e-4)], 1)
    scores = np.linspace(1, 0.5, len(boxes)).astype(np.float32)
    classes = np.zeros(len(boxes), np.float32)
    want = greedy_reference(boxes, scores, 0.5)
    assert 1 < len(want) < len(boxes)
    with path(name):
        assert class_nms(boxes, scores, classes, 0.5).tolist() == want.tolist()


@pytest.mark.parametrize("name", sorted(PATHS))
def test_integer_boxes_are_suppressed_as_the_reference_does(name: str) -> None:
    rng = np.random.default_rng(5)
    xy = rng.integers(0, 60, (70, 2))
    boxes = np.concatenate([xy, xy + rng.integers(1, 20, (70, 2))], 1)
    scores = rng.integers(1, 5, 70).astype(np.float32) / 4
    classes = rng.integers(0, 3, 70).astype(np.float32)
    want = greedy_reference(boxes + classes[:, None] * 7680.0, scores, 0.45)
    with path(name):
        assert class_nms(boxes, scores, classes, 0.45).tolist() == want.tolist()


def test_empty_and_zero_max_det() -> None:
    empty = np.zeros((0, 4), np.float32)
    assert class_nms(empty, np.zeros(0, np.float32), np.zeros(0, np.float32), 0.5).shape == (0,)
    boxes = np.array([[0, 0, 1, 1]], np.float32)
    assert class_nms(boxes, np.ones(1, np.float32), np.zeros(1, np.float32), 0.5, max_det=0).shape == (0,)
    assert nms(empty, np.zeros(0, np.float32), 0.5).shape == (0,)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(width=32, allow_nan=False),
            st.sampled_from([0.0, -0.0, 1.0, 0.5, float("inf"), float("-inf"), 1e-45, -1e-45]),
        ),
        min_size=0,
        max_size=300,
    )
)
def test_rank_order_is_the_stable_descending_argsort(values: list[float]) -> None:
    scores = np.asarray(values, np.float32)
    assert rank_order(scores).tolist() == np.argsort(-scores, kind="stable").tolist()


# ---- decode + NMS on YOLO outputs, one image and batches


def yolo_rows(rng: np.random.Generator, images: int, anchors: int, classes: int) -> np.ndarray:
    """Raw YOLO rows: pixel xywh in a 640 square (some off the edge), objectness and class scores
    in [0, 1] with ties."""
    pred = np.empty((images, anchors, 5 + classes), np.float32)
    pred[..., :2] = rng.uniform(-20, 660, (images, anchors, 2))
    pred[..., 2:4] = rng.choice([0.0, 8, 16.5, 40, 90, 300], (images, anchors, 2))
    pred[..., 4] = rng.choice([0.0, 0.0005, 0.2, 0.3, 0.5, 0.9, 1.0], (images, anchors))
    pred[..., 5:] = rng.choice([0.0, 0.001, 0.3, 0.6, 0.6, 0.95], (images, anchors, classes))
    return pred


@pytest.mark.parametrize("name", sorted(PATHS))
@pytest.mark.parametrize(
    ("conf", "iou", "multi_label"), [(0.25, 0.45, False), (0.001, 0.6, True), (0.001, 0.6, False)]
)
def test_batched_yolo_nms_equals_the_reference_per_image(
    name: str, conf: float, iou: float, multi_label: bool
) -> None:
    rng = np.random.default_rng(0)
    pred = yolo_rows(rng, 4, 600, 6)
    pred[2, :, 4] = 0  # an image without candidates
    with path(name):
        got = batched_yolo_nms(pred, conf, iou, 50, multi_label)
        alone = [yolo_nms(p, conf, iou, 50, multi_label) for p in pred]
    want = [yolo_nms_reference(p, conf, iou, 50, multi_label) for p in pred]
    assert len(got) == 4 and got[2].shape == (0, 6)
    for g, a, w in zip(got, alone, want, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(a, w)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    max_det=st.integers(1, 400),
    max_candidates=st.integers(1, 3000),
    multi_label=st.booleans(),
)
def test_yolo_nms_cuts_like_the_reference(
    seed: int, max_det: int, max_candidates: int, multi_label: bool
) -> None:
    pred = yolo_rows(np.random.default_rng(seed), 1, 800, 4)[0]
    want = yolo_nms_reference(pred, 0.001, 0.6, max_det, multi_label, max_candidates=max_candidates)
    assume(len(want) or max_det > 0)
    got = yolo_nms(pred, 0.001, 0.6, max_det, multi_label, max_candidates=max_candidates)
    np.testing.assert_array_equal(got, want)


def test_yolo_output_of_the_wrong_rank_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[batch, anchors, 5 \+ classes\]"):
        batched_yolo_nms(np.zeros((10, 85), np.float32))


@pytest.mark.assets
def test_real_yolov5n_outputs_keep_the_same_boxes(assets: Path, tmp_path: Path) -> None:
    """YOLOv5n on COCO val images, prediction and evaluation thresholds: thousands of candidates
    per image at conf 0.001 go through the per-class path."""
    pytest.importorskip("torch")
    from modelkiln.export import export
    from modelkiln.runtime.backends.onnxruntime import cpu_backend
    from modelkiln.zoo import get
    from modelkiln.zoo.images import read_image

    model = tmp_path / "yolov5n.onnx"
    export("yolov5n", model, weights=str(assets / "yolov5n.pt"))
    entry = get("yolov5n")
    files = sorted((assets / "coco-tiny" / "val2017").glob("*.jpg"))[:6]
    out = cpu_backend(model).infer(entry.preprocess([read_image(f) for f in files]).feed)["output0"]
    candidates = int((out[..., 4] > 0.001).sum(1).max())
    assert candidates > nms_module._PER_CLASS  # the per-class path is exercised
    for conf, iou, multi_label in ((0.25, 0.45, False), (0.001, 0.6, True)):
        got = batched_yolo_nms(out, conf, iou, 300, multi_label)
        for g, p in zip(got, out, strict=True):
            np.testing.assert_array_equal(g, yolo_nms_reference(p, conf, iou, 300, multi_label))
