"""Reading images and the geometric transforms shared by the zoo's preprocessing (OpenCV, numpy).

Every image this project decodes goes through ``decode_image``: the header is read first
(``image_header``) and an image declaring more than ``max_pixels`` is refused before anything
is allocated for it.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from modelkiln.errors import BadInput, PayloadTooLarge
from modelkiln.zoo.image_header import ImageHeader, read_header

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "ImageHeader",
    "center_crop",
    "decode_image",
    "list_images",
    "read_header",
    "read_image",
    "resize_shorter",
]

#: Encoded formats we decode, by file suffix (or a data URL's media subtype) -> header format.
FORMATS = {
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "png": "png",
    "bmp": "bmp",
    "webp": "webp",
    "tif": "tiff",
    "tiff": "tiff",
}
IMAGE_SUFFIXES = tuple(f".{s}" for s in FORMATS)
#: Largest image decoded by default (pixels): 40 MP, a large camera photo.
MAX_IMAGE_PIXELS = 40_000_000


def decode_image(data: bytes, source: str, max_pixels: int | None = None, rgb: bool = False) -> np.ndarray:
    """Encoded image bytes as uint8 HxWx3 (BGR as OpenCV reads it, or RGB with ``rgb``).

    BadInput naming ``source`` when the bytes are not a supported image or do not decode;
    PayloadTooLarge (a BadInput) when the header declares more than ``max_pixels``
    (default MAX_IMAGE_PIXELS) -- refused before decoding."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    header = read_header(data, source)
    if header.pixels > limit:
        raise PayloadTooLarge(
            f"image {source} is {header.width}x{header.height} pixels; the limit is {limit} pixels"
        )
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # OpenCV's own limits or a truncated body
        image = None
    if image is None:
        raise BadInput(f"cannot decode image {source}: not a supported image format or corrupt")
    return np.ascontiguousarray(image[:, :, ::-1]) if rgb else image


def read_image(path: str | Path, max_pixels: int | None = None, rgb: bool = False) -> np.ndarray:
    """An image file as uint8 HxWx3 (BGR unless ``rgb``), through ``decode_image``'s guard;
    a clear BadInput for missing, unsupported, oversized or undecodable files."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"image not found: {path}")
    if path.suffix.lower().lstrip(".") not in FORMATS:
        raise BadInput(
            f"unsupported image format {path.suffix!r} ({path.name}); use one of {sorted(set(FORMATS))}"
        )
    return decode_image(path.read_bytes(), str(path), max_pixels, rgb)


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
