"""What every zoo family provides: how to build it, feed it, and read its answers.

A family knows its model only as torch code (for export) and as numpy pre/post-processing (for
everything after export, so that predict, evaluate, quantize and serve never import torch).
Families come in kinds: ``ImageTask`` (images in, one readable answer per image out),
``TextTask`` (sentences in) and plain ``ZooModel`` for generation families, which the generation
engine drives itself; a command that needs images asks for an ImageTask with ``as_image_task``.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from modelkiln.errors import BadInput

if TYPE_CHECKING:  # torch is an export-time dependency only
    import torch


class Task(enum.StrEnum):
    """What a family is for, and so how it is scored (``accuracy.tasks`` maps each to its metric).

    A str enum: the value is what exported files record under ``modelkiln.task``."""

    CLASSIFICATION = "classification"
    DETECTION = "detection"
    EMBEDDING = "embedding"
    GENERATION = "generation"
    RETRIEVAL = "retrieval"  # image-text retrieval (recall@k): a task metric for dual encoders, not a family's own task


@dataclass(frozen=True)
class TensorSpec:
    """One model input: its name, dtype and shape, with strings for dynamic dimensions."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class Part:
    """One exportable graph of a family (CLIP has two: image and text)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The torch.onnx dynamic_axes mapping for every string dimension of inputs and outputs."""
        axes: dict[str, dict[int, str]] = {}
        for spec in self.inputs + self.outputs:
            dyn = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if dyn:
                axes[spec.name] = dyn
        return axes


@dataclass
class Prepared:
    """A preprocessed batch plus what postprocess needs to map answers back to the originals."""

    feed: dict[str, np.ndarray]
    meta: list[dict[str, Any]] = field(default_factory=list)


class ZooModel(abc.ABC):
    """A model family entry. Subclasses set the class attributes and implement the methods."""

    name: str
    task: Task
    default_weights: str | None = None
    #: Follows the family's name when a command that needs images gets it (never an ImageTask).
    instead_of_images: str = "does not take images"

    @property
    @abc.abstractmethod
    def parts(self) -> tuple[Part, ...]:
        """The graphs this family exports, in order; single-graph families have one."""

    @abc.abstractmethod
    def build(self, weights: str | None) -> dict[str, torch.nn.Module]:
        """Torch modules per part name, in eval mode, with ``weights`` loaded."""

    def example_inputs(self, part: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the right dtype and shape, dynamic dims resolved to ``batch``."""
        rng = np.random.default_rng(seed)
        feed = {}
        for spec in self.part(part).inputs:
            shape = tuple(batch if isinstance(d, str) else d for d in spec.shape)
            if np.dtype(spec.dtype).kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feed[spec.name] = rng.integers(0, 1000, shape).astype(spec.dtype)
        return feed

    def metadata(self) -> dict[str, str]:
        """Extra key/values written into the exported ONNX file's metadata_props."""
        return {}

    def write_assets(self, folder: Path) -> None:
        """Files a multi-part export writes beside its graphs (tokenizer, processor, manifest);
        called after every part passed its parity check. Most families have none."""

    def configure(self, metadata: dict[str, str]) -> None:
        """Adopt settings recorded at export (class names, scales) from an ONNX file's metadata."""

    def part(self, name: str) -> Part:
        """The part called ``name``; a KeyError here is a programming error."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} has no part {name!r}; parts: {[p.name for p in self.parts]}")


class ImageTask(ZooModel):
    """A family that answers about images: numpy pre/post-processing around its first part."""

    @abc.abstractmethod
    def preprocess(self, images: list[np.ndarray]) -> Prepared:
        """Turn BGR uint8 images (as OpenCV reads them) into the model's input batch."""

    @abc.abstractmethod
    def postprocess(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> list[Any]:
        """Turn raw outputs into one human-meaningful result per input image."""

    def for_evaluation(self) -> Self:
        """Switch to the settings a task metric is measured with (detectors: low thresholds)."""
        return self


class TextTask(ZooModel):
    """A family that answers about sentences: tokenization before, numpy post-processing after."""

    instead_of_images = "takes text, not images; give sentences (kiln feeds) instead"

    @abc.abstractmethod
    def preprocess_texts(self, texts: list[str]) -> Prepared:
        """Tokenize ``texts`` into the model's input batch."""

    @abc.abstractmethod
    def postprocess(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> list[Any]:
        """One result per input sentence."""


def as_image_task(entry: ZooModel) -> ImageTask:
    """``entry`` as an image model; BadInput saying what the family takes instead otherwise."""
    if isinstance(entry, ImageTask):
        return entry
    raise BadInput(f"{entry.name} {entry.instead_of_images}")
