"""Calibration images when the user gives none: random crops, flips and scales of matplotlib's
public-domain sample photo (grace_hopper.jpg, a U.S. Navy portrait; no image data shipped by us).
Shared by the image-model and the dual-encoder (CLIP) deployments."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from modelkiln.data.samples import sample_images
from modelkiln.errors import BadInput
from modelkiln.zoo import Task, ZooModel

#: Zoo tasks deploy can calibrate on its built-in sample photo.
IMAGE_TASKS = (Task.CLASSIFICATION, Task.DETECTION, Task.EMBEDDING)


def builtin_calibration(folder: Path, entry: ZooModel | None, count: int = 16) -> Path:
    """``count`` augmented crops of the sample photo written to ``folder`` (returned)."""
    if entry is None or entry.task not in IMAGE_TASKS:
        raise BadInput(
            "without --calib, deploy needs an image model from the zoo (or give --calib .npz feeds)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    images = [_read(p) for p in sample_images()]
    rng = np.random.default_rng(0)
    for i in range(count):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        s = rng.uniform(0.5, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        cv2.imwrite(str(folder / f"sample_{i:02d}.png"), np.ascontiguousarray(crop))
    return folder


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise BadInput(f"cannot read the built-in sample image {path}")
    return np.asarray(image)
