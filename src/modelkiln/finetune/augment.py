"""Augmented views of a training image, before the family's own preprocessing.

A view is a crop of the decoded image (and maybe its mirror image); the family's ``preprocess``
then resizes and normalises it exactly as at inference, so any dual encoder gets augmentation
without knowing its input conventions. View 0 is the whole image and view 1 its mirror: what the
exported towers see (and, for ``clip-lite0-minilm``, their test-time flip).
"""

from __future__ import annotations

import math

import numpy as np

#: Random crops cover this fraction of the image area, at aspect ratios (w/h) in ASPECT.
AREA = (0.35, 1.0)
ASPECT = (3 / 4, 4 / 3)


def random_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop (area in ``AREA``, aspect in ``ASPECT``), mirrored half the time."""
    h, w = image.shape[:2]
    area = rng.uniform(*AREA) * h * w
    aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
    cw = max(1, min(w, round(math.sqrt(area * aspect))))
    ch = max(1, min(h, round(math.sqrt(area / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    crop = image[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def views(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` views: the image, its mirror, then random views."""
    out = [image, np.ascontiguousarray(image[:, ::-1])][:count]
    out.extend(random_view(image, rng) for _ in range(count - len(out)))
    return out
