"""Images for the vision encoder: resized to the exported bucket nearest their aspect ratio.

Reading and decoding (with the pixel guard that refuses an oversized image from its header,
before any decode) is zoo/images.py's, shared with every image model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def resize_to_bucket(image: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    h, w = nearest_bucket(image.shape[0], image.shape[1], buckets)
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
