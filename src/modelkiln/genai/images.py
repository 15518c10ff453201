"""Images for the vision encoder: decoded from files or bytes with clear errors, resized to the
exported bucket nearest their aspect ratio."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modelkiln.errors import BadInput

#: Formats OpenCV decodes that we accept (by file suffix or by the data URL's media type).
FORMATS = {
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "png": "png",
    "bmp": "bmp",
    "webp": "webp",
    "tif": "tiff",
    "tiff": "tiff",
}


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"chat: image not found: {path}")
    if path.suffix.lower().lstrip(".") not in FORMATS:
        raise BadInput(
            f"chat: unsupported image format {path.suffix!r} ({path.name}); use one of {sorted(set(FORMATS))}"
        )
    return decode_rgb(path.read_bytes(), str(path))


#: Largest image we decode (pixels). A few KB of PNG can declare 50 000 x 50 000 pixels; the
#: header is read first so such a file is refused before anything is allocated for it.
MAX_IMAGE_PIXELS = 40_000_000


def decode_rgb(data: bytes, source: str) -> np.ndarray:
    """Encoded image bytes as RGB uint8; BadInput naming ``source`` when they do not decode or
    declare more than MAX_IMAGE_PIXELS."""
    import cv2

    _check_size(data, source)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise BadInput(f"chat: cannot decode image {source} (corrupt or not an image)")
    return np.ascontiguousarray(image[:, :, ::-1])


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def resize_to_bucket(image: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    import cv2

    h, w = nearest_bucket(image.shape[0], image.shape[1], buckets)
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def _check_size(data: bytes, source: str) -> None:
    """Refuse images whose header declares too many pixels (read by Pillow without decoding)."""
    try:
        from PIL import Image
    except ImportError:  # without Pillow, OpenCV's own limit (2^30 pixels) is the only bound
        return
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - not an image Pillow knows: OpenCV decides below
        return
    if width * height > MAX_IMAGE_PIXELS:
        raise BadInput(
            f"chat: image {source} is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS} pixels"
        )
