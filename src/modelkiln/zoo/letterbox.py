"""YOLO letterbox: fit the long side, pad to a square with grey 114, and (for a model batch) write
RGB planes scaled by 1/255 straight into the batch.

The batch path makes one small uint8 pass per image instead of four float passes: resize (when
needed), one ``mixChannels`` that swaps BGR to RGB and splits HWC into planes inside a grey canvas,
then one ``LUT`` that maps every uint8 to its float32 value (``u * float32(1/255)``, exactly what
the numpy ``x * np.float32(1 / 255)`` gives) directly into the batch's memory. No buffer is pooled:
a Prepared feed may be held by a batcher or another thread after preprocess returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from modelkiln.errors import BadInput

PAD_VALUE = 114
#: uint8 -> float32 of ``u * float32(1/255)``: the LUT that makes normalising one table lookup.
UNIT_SCALE = np.arange(256, dtype=np.float32) * np.float32(1 / 255)
_BGR_TO_RGB_PLANES = [0, 2, 1, 1, 2, 0]  # mixChannels pairs: source channel -> destination plane


@dataclass(frozen=True)
class Fit:
    """Where an image lands in the letterboxed square: the scale, the resized size, the padding."""

    gain: float
    width: int
    height: int
    left: int
    top: int

    @property
    def resized(self) -> tuple[int, int]:
        return self.width, self.height


def fit(height: int, width: int, size: int) -> Fit:
    """The letterbox geometry of YOLOv5's own ``letterbox`` (auto=False): long side to ``size``,
    padding split with the same rounding (``round(d -/+ 0.1)``). A side that would round to 0
    pixels (a 1 x 2000 strip) keeps 1."""
    r = min(size / height, size / width)
    new_w, new_h = max(1, min(size, round(width * r))), max(1, min(size, round(height * r)))
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    return Fit(r, new_w, new_h, round(dw - 0.1), round(dh - 0.1))


def _resized(image: np.ndarray, f: Fit) -> np.ndarray:
    """Area filter when shrinking (no aliasing), bilinear when enlarging; untouched at scale 1."""
    if f.resized == (image.shape[1], image.shape[0]):
        return image
    interpolation = cv2.INTER_AREA if f.gain < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, f.resized, interpolation=interpolation)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Fit the long side to ``size`` (area filter when shrinking), pad to a square with grey 114.

    Returns the padded image, the scale applied and the (left, top) padding, so boxes can be mapped
    back to the original.
    """
    f = fit(image.shape[0], image.shape[1], size)
    bottom, right = size - f.height - f.top, size - f.width - f.left
    boxed = cv2.copyMakeBorder(
        _resized(image, f), f.top, bottom, f.left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
    )
    return boxed, f.gain, (f.left, f.top)


def _check(image: np.ndarray, index: int, model: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4) or not image.size:
        raise BadInput(
            f"{model}: image {index} must be a non-empty uint8 HxWx3 BGR array (as OpenCV reads it); "
            f"got {image.dtype} of shape {image.shape}"
        )


def letterbox_batch(
    images: list[np.ndarray], size: int, model: str = "model"
) -> tuple[np.ndarray, list[Fit]]:
    """``[N, 3, size, size]`` float32 RGB / 255 of BGR uint8 ``images`` letterboxed, and each one's
    fit; equal, bit for bit, to ``letterbox`` -> BGR2RGB -> HWC2CHW -> ``* float32(1/255)``.

    A 4-channel BGRA image loses its alpha, as ``cvtColor(BGR2RGB)`` drops it. BadInput naming
    ``model`` and the image for anything but uint8 BGR(A)."""
    batch = np.empty((len(images), 3, size, size), np.float32)
    planes = np.empty((3, size, size), np.uint8)  # the grey canvas, one plane per colour
    fits = []
    for i, image in enumerate(images):
        _check(image, i, model)
        f = fit(image.shape[0], image.shape[1], size)
        planes.fill(PAD_VALUE)
        window = (slice(f.top, f.top + f.height), slice(f.left, f.left + f.width))
        cv2.mixChannels([_resized(image, f)], [planes[c][window] for c in range(3)], _BGR_TO_RGB_PLANES)
        cv2.LUT(planes.reshape(3 * size, size), UNIT_SCALE, dst=batch[i].reshape(3 * size, size))
        fits.append(f)
    return batch, fits
