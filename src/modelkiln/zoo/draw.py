"""Draw detections onto an image for people to look at (OpenCV's built-in Hershey font)."""

from __future__ import annotations

import cv2
import numpy as np

from modelkiln.zoo.yolov5 import Detections


def _color(class_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(class_id)
    return tuple(int(c) for c in rng.integers(64, 256, 3))  # type: ignore[return-value]


def draw_detections(image: np.ndarray, detections: Detections) -> np.ndarray:
    """A copy of the BGR ``image`` with each box and its ``label score`` drawn on it."""
    out = image.copy()
    thickness = max(1, round(sum(out.shape[:2]) / 600))
    for box in detections.boxes:
        color = _color(box.class_id)
        p1, p2 = (int(box.x1), int(box.y1)), (int(box.x2), int(box.y2))
        cv2.rectangle(out, p1, p2, color, thickness, cv2.LINE_AA)
        text = f"{box.label} {box.score:.2f}"
        scale = thickness / 3
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = p1[1] - th - 4 if p1[1] - th - 4 > 0 else p1[1]
        cv2.rectangle(out, (p1[0], top), (p1[0] + tw + 2, top + th + 4), color, -1)
        cv2.putText(
            out, text, (p1[0] + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA
        )
    return out
