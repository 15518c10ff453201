"""Images for the Qwen-VL vision encoder, in numpy (no torch at chat time): the image processor's
own rules, read from the exported folder's processor settings.

- ``smart_resize``: both sides to multiples of ``patch * merge`` (28), the aspect ratio kept as
  closely as that allows, the pixel count inside [min_pixels, max_pixels]. ``max_pixels`` is what
  bounds an untrusted image's cost: the encoder's attention is quadratic in patches.
- bicubic resize with Pillow (the processor's PIL backend does exactly this, so pixel values
  match transformers' to float rounding; its torchvision backend differs by one uint8 level at
  some pixels), rescale, normalise, and the patch order: merge x merge blocks row-major, patches
  row-major inside a block, each patch C x T x P x P (the frame repeated T times).

Reading and decoding (with the pixel guard that refuses an oversized image from its header, before
any decode) is zoo/images.py's, shared with every image model. ``resize_to_bucket`` serves folders
exported before the encoder took any size (one vision graph per fixed bucket).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from modelkiln._deps import require
from modelkiln.errors import BadInput, ConfigError

#: The image processor's settings file in an exported folder.
PROCESSOR_FILE = "preprocessor_config.json"
#: Where transformers 5 saves it instead, as the ``image_processor`` section.
COMBINED_FILE = "processor_config.json"
#: Largest aspect ratio the processor accepts (transformers' smart_resize refuses beyond it).
MAX_ASPECT = 200
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: PIL's resampling filters by the number transformers stores ("resample": 3 is bicubic).
_PIL_FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """The size Qwen2-VL's processor resizes an image to (transformers' ``smart_resize``)."""
    if min(height, width) < 1:
        raise BadInput(f"image of {height}x{width} pixels is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise BadInput(
            f"image of {height}x{width} pixels: aspect ratio over {MAX_ASPECT} (the image processor's limit)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageProcessor:
    """Qwen2-VL's image processor (Qwen2.5-VL uses the same) in numpy + Pillow."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = _CLIP_MEAN
    image_std: tuple[float, ...] = _CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = PROCESSOR_FILE) -> ImageProcessor:
        """From the processor's JSON: ``min_pixels``/``max_pixels`` at the top (older files) win
        over ``size`` {shortest_edge, longest_edge} (newer), as in transformers."""
        size = dict(data.get("size") or {})
        try:
            min_pixels = data.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
            max_pixels = data.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
            found = cls(
                min_pixels=int(min_pixels or cls.min_pixels),
                max_pixels=int(max_pixels or cls.max_pixels),
                patch_size=int(data.get("patch_size", cls.patch_size)),
                temporal_patch_size=int(data.get("temporal_patch_size", cls.temporal_patch_size)),
                merge_size=int(data.get("merge_size", cls.merge_size)),
                image_mean=tuple(float(v) for v in data.get("image_mean", _CLIP_MEAN)),
                image_std=tuple(float(v) for v in data.get("image_std", _CLIP_STD)),
                rescale_factor=float(data.get("rescale_factor", 1 / 255)),
                resample=int(data.get("resample", 3)),
                do_resize=bool(data.get("do_resize", True)),
                do_rescale=bool(data.get("do_rescale", True)),
                do_normalize=bool(data.get("do_normalize", True)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: unreadable image processor settings ({exc})") from exc
        if found.min_pixels < 1 or found.max_pixels < found.min_pixels or found.resample not in _PIL_FILTERS:
            raise ConfigError(
                f"{source}: min_pixels {found.min_pixels}, max_pixels {found.max_pixels}, resample "
                f"{found.resample}: expected 1 <= min <= max and a PIL filter number"
            )
        return found

    @classmethod
    def from_folder(cls, folder: str | Path) -> ImageProcessor:
        """From ``preprocessor_config.json`` (hub folders) or the ``image_processor`` section of
        ``processor_config.json`` (what transformers 5 saves)."""
        folder = Path(folder)
        file = folder / PROCESSOR_FILE
        if file.is_file():
            return cls.from_dict(json.loads(file.read_text(encoding="utf-8")), str(file))
        combined = folder / COMBINED_FILE
        if combined.is_file():
            section = json.loads(combined.read_text(encoding="utf-8")).get("image_processor")
            if isinstance(section, dict):
                return cls.from_dict(section, f"{combined}: 'image_processor'")
        raise ConfigError(
            f"{folder}: no image processor settings ({PROCESSOR_FILE}, or 'image_processor' in {COMBINED_FILE})"
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise BadInput(
                    f"image of {height}x{width}: not multiples of {self.factor} and resizing is off"
                )
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, rows, columns) of patches for an image of this size."""
        h, w = self.target_size(height, width)
        return 1, h // self.patch_size, w // self.patch_size

    def resize(self, image: np.ndarray) -> np.ndarray:
        """An RGB uint8 [H, W, 3] image (grey or RGBA converted) at its ``target_size``."""
        pil = require("PIL.Image", "resizing images for Qwen-VL")
        image = _rgb(image)
        h, w = self.target_size(image.shape[0], image.shape[1])
        if (h, w) == image.shape[:2]:
            return image
        resampling = getattr(pil.Resampling, _PIL_FILTERS[self.resample])
        resized: np.ndarray = np.asarray(pil.fromarray(image).resize((w, h), resample=resampling))
        return resized

    def patches(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (pixel_values [t*h*w, C*T*P*P] float32, grid (t, h, w))."""
        resized = self.resize(image)
        x = resized.astype(np.float64) * self.rescale_factor if self.do_rescale else resized
        x = x.astype(np.float32).transpose(2, 0, 1)  # CHW
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)[:, None, None]
            std = np.asarray(self.image_std, np.float32)[:, None, None]
            x = (x - mean) / std
        c, height, width = x.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        blocks = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        return np.ascontiguousarray(frames.reshape(gh * gw, c * t * p * p), np.float32), (1, gh, gw)

    def __call__(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """pixel_values [patches, C*T*P*P] (all images, in order) and image_grid_thw [n, 3]."""
        done = [self.patches(img) for img in images]
        return {
            "pixel_values": np.concatenate([p for p, _ in done]),
            "image_grid_thw": np.asarray([g for _, g in done], np.int64).reshape(-1, 3),
        }


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: grey [H, W] / [H, W, 1] repeated, RGBA's alpha dropped (as PIL's convert)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise BadInput(f"image: expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise BadInput(f"image: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's (older folders)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def resize_to_bucket(image: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """An image at the nearest bucket's size (folders exported with one vision graph per bucket)."""
    h, w = nearest_bucket(image.shape[0], image.shape[1], buckets)
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
