"""YOLOv5 architecture sizes, letterbox geometry, one-pass preprocessing and detection post-processing."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from modelkiln.errors import BadInput
from modelkiln.zoo import Prepared, get
from modelkiln.zoo.letterbox import fit, letterbox, letterbox_batch
from modelkiln.zoo.nms import nms, yolo_nms

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


# ---- one-pass preprocessing against the previous release's, verbatim


def letterbox_reference(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = min(size, round(w * r)), min(size, round(h * r))
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114,) * 3)
    return image, r, (left, top)


def preprocess_reference(images: list[np.ndarray], size: int) -> tuple[np.ndarray, list[dict[str, object]]]:
    batch = np.empty((len(images), 3, size, size), np.float32)
    meta: list[dict[str, object]] = []
    for i, image in enumerate(images):
        boxed, gain, pad = letterbox_reference(image, size)
        batch[i] = cv2.cvtColor(boxed, cv2.COLOR_BGR2RGB).transpose(2, 0, 1) * np.float32(1 / 255)
        meta.append({"gain": gain, "pad": pad, "shape": image.shape[:2]})
    return batch, meta


@settings(max_examples=150, deadline=None)
@given(height=st.integers(1, 5000), width=st.integers(1, 5000), size=st.sampled_from([32, 320, 640, 1280]))
def test_fit_is_the_letterbox_geometry(height: int, width: int, size: int) -> None:
    r = min(size / height, size / width)
    assume(round(height * r) and round(width * r))  # the old code failed on a side of 0 pixels
    boxed, gain, (left, top) = letterbox_reference(np.zeros((height, width, 3), np.uint8), size)
    f = fit(height, width, size)
    assert (f.gain, f.left, f.top) == (gain, left, top)
    assert boxed[top : top + f.height, left : left + f.width].shape[:2] == (f.height, f.width)
    assert 0 <= f.left and f.left + f.width <= size and 0 <= f.top and f.top + f.height <= size


@settings(max_examples=80, deadline=None)
@given(
    height=st.integers(1, 400),
    width=st.integers(1, 400),
    size=st.sampled_from([32, 64, 96, 160]),
    channels=st.sampled_from([3, 4]),
    seed=st.integers(0, 2**32 - 1),
    strided=st.booleans(),
)
def test_one_pass_preprocess_equals_the_previous_bit_for_bit(
    height: int, width: int, size: int, channels: int, seed: int, strided: bool
) -> None:
    """Shrinking (area), enlarging (bilinear), exact fits, odd paddings, BGRA and non-contiguous
    views: the same float32 values as letterbox -> cvtColor -> transpose -> * float32(1/255)."""
    r = min(size / height, size / width)
    assume(round(height * r) and round(width * r))  # the old code failed on a side of 0 pixels
    image = np.random.default_rng(seed).integers(
        0, 256, (height, width * (2 if strided else 1), channels), np.uint8
    )
    if strided:
        image = image[:, ::2]
    entry = get("yolov5n", image_size=size)
    want, meta = preprocess_reference([image], size)
    prepared = entry.preprocess([image])
    np.testing.assert_array_equal(prepared.feed["images"], want)
    assert prepared.meta == meta


@pytest.mark.parametrize("shape", [(480, 640), (640, 427), (375, 500), (1080, 1920), (640, 640), (33, 1000)])
def test_preprocess_at_640_equals_the_previous_on_photo_sizes(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    images = [rng.integers(0, 256, (*shape, 3), np.uint8), rng.integers(0, 256, (*shape[::-1], 3), np.uint8)]
    want, meta = preprocess_reference(images, 640)
    prepared = get("yolov5n").preprocess(images)
    np.testing.assert_array_equal(prepared.feed["images"], want)
    assert prepared.meta == meta


@pytest.mark.assets
def test_preprocess_equals_the_previous_on_coco_images(assets: Path) -> None:
    images = [cv2.imread(str(f)) for f in sorted((assets / "coco-tiny" / "val2017").glob("*.jpg"))[:12]]
    want, meta = preprocess_reference(images, 640)
    prepared = get("yolov5n").preprocess(images)
    np.testing.assert_array_equal(prepared.feed["images"], want)
    assert prepared.meta == meta


def test_each_call_gets_its_own_batch() -> None:
    """No pooled buffers: a feed held by a batcher is never overwritten by the next preprocess."""
    entry = get("yolov5n", image_size=64)
    first = entry.preprocess([np.full((10, 10, 3), 200, np.uint8)]).feed["images"]
    held = first.copy()
    second = entry.preprocess([np.zeros((10, 10, 3), np.uint8)]).feed["images"]
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, held)


@pytest.mark.parametrize(
    ("image", "found"),
    [
        (np.zeros((20, 20), np.uint8), r"uint8 of shape \(20, 20\)"),
        (np.zeros((20, 20, 3), np.float32), r"float32 of shape \(20, 20, 3\)"),
        (np.zeros((20, 20, 2), np.uint8), r"uint8 of shape \(20, 20, 2\)"),
        (np.zeros((0, 20, 3), np.uint8), r"uint8 of shape \(0, 20, 3\)"),
    ],
)
def test_images_that_are_not_bgr_uint8_are_refused_by_name(image: np.ndarray, found: str) -> None:
    ok = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(BadInput, match=rf"yolov5n: image 1 must be a non-empty uint8 HxWx3 BGR.*got {found}"):
        get("yolov5n").preprocess([ok, image])


def test_a_strip_keeps_one_pixel_instead_of_failing() -> None:
    strip = np.full((1, 64, 3), 255, np.uint8)
    (planes,), (f,) = letterbox_batch([strip], 32)[0], letterbox_batch([strip], 32)[1]
    assert (f.width, f.height, f.left, f.top) == (32, 1, 0, 15)
    assert (planes[:, 15] == 1).all() and (planes[:, 14] == np.float32(114) * np.float32(1 / 255)).all()
    assert letterbox(strip, 32)[0].shape == (32, 32, 3)


def test_letterbox_batch_reports_each_fit() -> None:
    batch, fits = letterbox_batch([np.zeros((200, 400, 3), np.uint8), np.zeros((64, 32, 3), np.uint8)], 64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32
    assert [(f.width, f.height, f.left, f.top) for f in fits] == [(64, 32, 0, 16), (32, 64, 16, 0)]


def test_batched_postprocess_equals_per_image() -> None:
    entry = get("yolov5n").for_evaluation()
    rng = np.random.default_rng(1)
    shapes = [(200, 400), (640, 480), (50, 50)]
    prepared = entry.preprocess([np.zeros((*s, 3), np.uint8) for s in shapes])
    out = np.zeros((3, 25200, 85), np.float32)
    out[..., :2] = rng.uniform(0, 640, (3, 25200, 2))
    out[..., 2:4] = rng.uniform(4, 200, (3, 25200, 2))
    out[..., 4] = rng.uniform(0, 0.05, (3, 25200)) ** 2 * 400  # a few thousand candidates each
    out[..., 5:] = rng.uniform(0, 1, (3, 25200, 80)) ** 8
    batched = entry.postprocess({"output0": out}, prepared)
    for i in range(3):
        alone = entry.postprocess({"output0": out[i : i + 1]}, Prepared(prepared.feed, [prepared.meta[i]]))
        assert batched[i] == alone[0]
    assert sum(len(d.boxes) for d in batched) > 100
