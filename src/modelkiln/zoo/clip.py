"""CLIP (open_clip architectures): image and text towers exported as two models.

The towers return unnormalised projections, as open_clip's ``encode_image``/``encode_text`` do;
postprocessing normalises them and computes zero-shot logits with the model's learnt scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from modelkiln._deps import require
from modelkiln.errors import ModelNotFound, WeightsError
from modelkiln.zoo.base import ImageTask, Part, Prepared, Task, TensorSpec
from modelkiln.zoo.classification import crop_and_normalize, softmax
from modelkiln.zoo.weights import is_path, is_random, warn_random

if TYPE_CHECKING:
    import torch

CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


@dataclass(frozen=True)
class Embedding:
    """An L2-normalised embedding, with zero-shot label probabilities when labels were given."""

    vector: np.ndarray
    labels: list[tuple[str, float]] | None = None

    def __str__(self) -> str:
        if self.labels:
            return ", ".join(f"{name} ({p:.1%})" for name, p in self.labels[:5])
        return f"embedding[{self.vector.shape[0]}] norm={np.linalg.norm(self.vector):.3f}"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    normalized: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return normalized


def zero_shot_logits(image_embeds: np.ndarray, text_embeds: np.ndarray, logit_scale: float) -> np.ndarray:
    """Scaled cosine similarity of every image to every text: [images, texts]."""
    logits: np.ndarray = logit_scale * l2_normalize(image_embeds) @ l2_normalize(text_embeds).T
    return logits


class CLIPFamily(ImageTask):
    """An open_clip architecture as two parts: the image tower (the ImageTask side: images in,
    embeddings or zero-shot label probabilities out) and the text tower, fed by ``tokenize``."""

    task = Task.EMBEDDING

    def __init__(self, arch: str, image_size: int | None = None) -> None:
        self.arch = arch  # open_clip model name, e.g. "ViT-B-32"
        self.name = f"clip-{arch.lower()}"
        self.image_size = image_size or 224
        self.embed_dim = 512
        self.context_length = 77
        self.logit_scale = 100.0

    @property
    def parts(self) -> tuple[Part, ...]:
        s, d = self.image_size, self.embed_dim
        return (
            Part(
                "image",
                (TensorSpec("image", "float32", ("batch", 3, s, s)),),
                (TensorSpec("image_embeds", "float32", ("batch", d)),),
            ),
            Part(
                "text",
                (TensorSpec("input_ids", "int64", ("batch", self.context_length)),),
                (TensorSpec("text_embeds", "float32", ("batch", d)),),
            ),
        )

    def example_inputs(self, part: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        if part == "text":  # token ids with an end-of-text token (the largest id) at a random place
            rng = np.random.default_rng(seed)
            ids = np.zeros((batch, self.context_length), np.int64)
            for row in ids:
                n = int(rng.integers(2, self.context_length))
                row[:n] = rng.integers(1, 49000, n)
                row[0], row[n - 1] = 49406, 49407
            return {"input_ids": ids}
        return super().example_inputs(part, batch, seed)

    def metadata(self) -> dict[str, str]:
        return {"clip_arch": self.arch, "logit_scale": json.dumps(self.logit_scale)}

    def configure(self, metadata: dict[str, str]) -> None:
        self.logit_scale = float(json.loads(metadata.get("logit_scale", "100.0")))

    def build(self, weights: str | None) -> dict[str, torch.nn.Module]:
        open_clip = require("open_clip", f"building {self.name}")
        from torch import nn

        if weights is None or is_random(weights):
            warn_random(self.name)
            pretrained = None
        elif is_path(weights):
            if not Path(weights).is_file():
                raise ModelNotFound(f"{self.name}: weights file not found: {weights}")
            pretrained = weights
        else:
            pretrained = weights  # an open_clip release tag such as "laion2b_s34b_b79k" (hub download)
        try:
            model = open_clip.create_model(self.arch, pretrained=pretrained, force_image_size=self.image_size)
        except Exception as exc:
            raise WeightsError(
                f"{self.name}: cannot load weights {weights!r}: {type(exc).__name__}: {exc}"
            ) from exc
        model.eval()
        self.embed_dim = int(model.text_projection.shape[1])
        self.context_length = int(model.context_length)
        self.logit_scale = float(model.logit_scale.detach().exp())

        class ImageTower(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.clip = model

            def forward(self, image: torch.Tensor) -> torch.Tensor:
                embeds: torch.Tensor = self.clip.encode_image(image)
                return embeds

        class TextTower(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.clip = model

            def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
                embeds: torch.Tensor = self.clip.encode_text(input_ids)
                return embeds

        return {"image": ImageTower().eval(), "text": TextTower().eval()}

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """Token ids [len(texts), context_length] with the architecture's own tokenizer."""
        open_clip = require("open_clip", "CLIP tokenization")
        ids: np.ndarray = open_clip.get_tokenizer(self.arch)(texts).numpy().astype(np.int64)
        return ids

    def preprocess(self, images: list[np.ndarray]) -> Prepared:
        """open_clip's eval transform: shorter side bicubic to size, centre crop, CLIP mean/std."""
        s = self.image_size
        return Prepared({"image": crop_and_normalize(images, s, s, CLIP_MEAN, CLIP_STD, cv2.INTER_CUBIC)})

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> list[Embedding]:
        """Normalised embeddings; with ``text_embeds`` and ``labels`` in outputs, zero-shot probabilities."""
        image = l2_normalize(np.asarray(outputs["image_embeds"], np.float64))
        labels = prepared.meta[0].get("labels") if prepared.meta else None
        if labels is None or "text_embeds" not in outputs:
            return [Embedding(v) for v in image]
        probs = softmax(
            zero_shot_logits(image, np.asarray(outputs["text_embeds"], np.float64), self.logit_scale)
        )
        return [
            Embedding(v, sorted(zip(labels, map(float, p), strict=True), key=lambda t: -t[1]))
            for v, p in zip(image, probs, strict=True)
        ]


#: Architectures resolved without importing open_clip (which imports torch).
KNOWN_ARCHS = {"vit-b-32": "ViT-B-32", "vit-b-16": "ViT-B-16", "vit-l-14": "ViT-L-14"}


def resolve_arch(name: str) -> str:
    """open_clip architecture for a zoo name like ``clip-vit-b-32`` (case-insensitive)."""
    wanted = name.lower().removeprefix("clip-")
    if wanted in KNOWN_ARCHS:
        return KNOWN_ARCHS[wanted]
    open_clip = require("open_clip", "CLIP models")
    for arch in open_clip.list_models():
        if arch.lower() == wanted:
            return str(arch)
    raise ModelNotFound(f"unknown CLIP architecture {name!r}: open_clip has no model {wanted!r}")
