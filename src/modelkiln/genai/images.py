"""Images for the vision encoder: decoded from files or bytes with clear errors, resized to the
exported bucket nearest their aspect ratio."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from modelkiln._deps import require
from modelkiln.errors import BadInput, PayloadTooLarge

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
#: Pillow's names of the formats above (MPO: a camera JPEG with a second picture in it).
PIL_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "WEBP", "TIFF"})


def image_size(data: bytes, source: str) -> tuple[int, int]:
    """(width, height) from the image's header, read by Pillow without decoding the pixels.

    BadInput when the header is unreadable, the format is not one we serve, or Pillow's own
    decompression-bomb limit trips: OpenCV never sees bytes whose size we do not know."""
    import io

    pil = require("PIL.Image", "reading image headers")
    try:
        with pil.open(io.BytesIO(data)) as img:
            width, height, kind = *img.size, img.format
    except pil.DecompressionBombError:
        raise PayloadTooLarge(
            f"chat: image {source} declares more than {2 * (pil.MAX_IMAGE_PIXELS or 0)} pixels, "
            "over Pillow's decompression-bomb limit"
        ) from None
    except Exception:  # noqa: BLE001 - any header Pillow cannot read is refused, never passed on
        raise BadInput(f"chat: cannot decode image {source} (corrupt or not an image)") from None
    if width < 1 or height < 1:
        raise BadInput(f"chat: image {source} declares {width}x{height} pixels")
    if kind not in PIL_FORMATS:
        raise BadInput(f"chat: image {source} is {kind}; use one of {sorted(set(FORMATS.values()))}")
    return width, height


def decode_rgb(data: bytes, source: str, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes as RGB uint8; BadInput naming ``source`` when they do not decode or
    their header declares more than ``max_pixels`` (default MAX_IMAGE_PIXELS)."""
    import cv2

    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    width, height = image_size(data, source)
    if width * height > limit:
        raise BadInput(f"chat: image {source} is {width}x{height} pixels; the limit is {limit} pixels")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # OpenCV's own limits (CV_IO_MAX_IMAGE_PIXELS) or a truncated body
        image = None
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
