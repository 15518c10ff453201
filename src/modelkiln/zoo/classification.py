"""ImageNet classifiers: resize, centre crop, normalise; softmax top-k with class names."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import cv2
import numpy as np

from modelkiln.zoo.base import ImageTask, Part, Prepared, Task, TensorSpec
from modelkiln.zoo.images import center_crop, resize_shorter


@cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in class-index order (shipped as package data)."""
    text = resources.files("modelkiln.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(labels) == 1000, "imagenet_classes.txt must list 1000 names"
    return labels


@dataclass(frozen=True)
class Classification:
    """Top-k answer for one image."""

    top: list[tuple[int, str, float]]  # (class index, name, probability)

    def __str__(self) -> str:
        return ", ".join(f"{name} ({p:.1%})" for _, name, p in self.top)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    probs: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return probs


def crop_and_normalize(
    images: list[np.ndarray],
    resize: int,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    interpolation: int,
) -> np.ndarray:
    """BGR uint8 images -> float32 NCHW RGB batch: shorter side to ``resize``, centre ``size`` crop,
    ``(x - mean) / std`` with mean and std in 0-255 units."""
    mean_arr = np.asarray(mean, np.float32)
    inv_std = 1.0 / np.asarray(std, np.float32)
    batch = np.empty((len(images), 3, size, size), np.float32)
    for i, image in enumerate(images):
        crop = center_crop(resize_shorter(image, resize, interpolation), size)
        rgb = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32)
        batch[i] = ((rgb - mean_arr) * inv_std).transpose(2, 0, 1)
    return batch


class ImageClassifier(ImageTask):
    """Base of ImageNet classifiers; subclasses set the preprocessing constants and build()."""

    task = Task.CLASSIFICATION
    resize: int = 256
    mean: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    interpolation: int = cv2.INTER_LINEAR
    top_k: int = 5

    def __init__(self, image_size: int | None = None) -> None:
        self.image_size = image_size or 224

    @property
    def parts(self) -> tuple[Part, ...]:
        s = self.image_size
        return (
            Part(
                "model",
                inputs=(TensorSpec("input", "float32", ("batch", 3, s, s)),),
                outputs=(TensorSpec("logits", "float32", ("batch", 1000)),),
            ),
        )

    def preprocess(self, images: list[np.ndarray]) -> Prepared:
        """Resize the shorter side (scaled with image_size), centre crop, RGB, normalise, NCHW."""
        resize = round(self.resize * self.image_size / 224)
        batch = crop_and_normalize(images, resize, self.image_size, self.mean, self.std, self.interpolation)
        return Prepared({"input": batch})

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> list[Classification]:
        probs = softmax(np.asarray(outputs["logits"], np.float64))
        labels = imagenet_labels()
        results = []
        for row in probs:
            idx = np.argsort(-row)[: self.top_k]
            results.append(Classification([(int(i), labels[i], float(row[i])) for i in idx]))
        return results
