"""Detection post-processing in numpy: confidence filter and class-aware non-maximum suppression."""

from __future__ import annotations

import numpy as np


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    out = np.empty_like(boxes)
    half = boxes[:, 2:4] / 2
    out[:, :2] = boxes[:, :2] - half
    out[:, 2:] = boxes[:, :2] + half
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS over xyxy ``boxes``, highest score first."""
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


def yolo_nms(
    pred: np.ndarray,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_det: int = 300,
    multi_label: bool = False,
    max_wh: float = 7680.0,
    max_candidates: int = 30000,
) -> np.ndarray:
    """One image's YOLO rows ``[xywh, obj, cls...]`` -> ``[k, 6]`` rows of xyxy, score, class.

    Class-aware: boxes are offset by class so only same-class boxes suppress each other.
    ``multi_label`` keeps every class above threshold per box (used for mAP evaluation).
    """
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
    keep = nms(det[:, :4] + det[:, 5:6] * max_wh, det[:, 4], iou_threshold)[:max_det]
    kept: np.ndarray = det[keep].astype(np.float32)
    return kept
