"""Reading images and the geometric transforms shared by the zoo's preprocessing (OpenCV, numpy)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from modelkiln.errors import BadInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_image(path: str | Path) -> np.ndarray:
    """BGR uint8 HxWx3, as OpenCV reads it; a clear BadInput for missing or undecodable files."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise BadInput(f"cannot decode image {path}: not a supported image format or corrupt")
    return image


def list_images(folder: str | Path) -> list[Path]:
    """Image files in ``folder`` (not recursive), sorted for reproducible order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def resize_shorter(image: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Resize so the shorter side is ``size``, keeping the aspect ratio."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` window (the image must be at least that big)."""
    h, w = image.shape[:2]
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return image[top : top + size, left : left + size]
