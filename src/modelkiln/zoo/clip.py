"""Dual encoders (CLIP-like): an image tower and a text tower into one embedding space, exported
as two models.

``DualEncoder`` is what every such family shares: the towers return unnormalised embeddings,
postprocessing normalises them and computes zero-shot logits with the model's learnt scale, and
``text_feed`` turns sentences into the text tower's inputs with the family's own tokenizer. For
``kiln finetune`` a family also builds a ``TrainableDual``: each side as a pretrained *body*
(lockable, in layer groups for partial unfreezing) followed by a *head* (always trained; empty
for open_clip, whose projections are part of its towers), so a locked body's features can be
computed once and cached. ``CLIPFamily`` is any open_clip architecture.
"""

from __future__ import annotations

import abc
import functools
import json
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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


@functools.cache
def _tokenizer(arch: str) -> Any:
    """open_clip's tokenizer of ``arch``, loaded once (its vocabulary file takes a while to read,
    and fine-tuning tokenizes every step)."""
    open_clip = require("open_clip", "CLIP tokenization")
    return open_clip.get_tokenizer(arch)


#: The two sides of a dual encoder, in the order of its parts.
SIDES = ("image", "text")


class TrainableDual(Protocol):
    """The torch side of a ``DualEncoder`` as ``kiln finetune`` trains it (an ``nn.Module``).

    Each side is a pretrained body then a head: ``encode_image`` is the mean over
    ``image_views`` (test-time views such as a flip, inside the exported graph) of
    ``image_head(image_features(view))``; ``encode_text`` is ``text_head(text_features(feed))``.
    Features are one tensor [batch, F] per item, so the features of a locked body can be cached."""

    @property
    def log_scale(self) -> torch.nn.Parameter:
        """Log of the logit scale (the learnt temperature's inverse), as CLIP keeps it."""

    def image_views(self, image: torch.Tensor) -> list[torch.Tensor]: ...
    def image_features(self, image: torch.Tensor) -> torch.Tensor: ...
    def image_head(self, features: torch.Tensor) -> torch.Tensor: ...
    def text_features(self, feed: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def text_head(self, features: torch.Tensor) -> torch.Tensor: ...
    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...
    def encode_text(self, feed: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def layer_groups(self, side: str) -> list[list[torch.nn.Parameter]]:
        """The body of ``side`` in layer groups, input first (partial unfreezing trains the last)."""

    def head_parameters(self, side: str) -> list[torch.nn.Parameter]:
        """The head of ``side`` (always trained; may be empty)."""

    def checkpoint_state(self, bodies: Collection[str]) -> dict[str, torch.Tensor]:
        """What a fine-tuning checkpoint holds: heads, logit scale, and the bodies in ``bodies``
        (the ones that trained) or more, as ``build(checkpoint)`` reads it back."""

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what ``checkpoint_state`` gave (a resumed run)."""

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...


class DualEncoder(ImageTask):
    """An image tower and a text tower into one embedding space (CLIP-like).

    Parts: ``image`` (``image`` -> ``image_embeds``) and ``text`` (the tokenizer's feeds ->
    ``text_embeds``); both give UNnormalised embeddings [batch, embed_dim] that consumers
    L2-normalise. ``logit_scale`` (exp of the learnt temperature) scales cosine similarities."""

    task = Task.EMBEDDING
    logit_scale: float
    embed_dim: int

    @abc.abstractmethod
    def text_feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Feeds of the ``text`` part for ``texts`` with the family's own tokenizer (int64,
        [len(texts), L]): e.g. ``{"input_ids"}`` for open_clip."""

    @abc.abstractmethod
    def trainable(self, weights: str | None) -> TrainableDual:
        """The torch model ``kiln finetune`` trains, with ``weights`` loaded (as ``build``)."""

    def checkpoint_metadata(self) -> dict[str, str]:
        """String metadata a fine-tuning checkpoint carries beside its tensors."""
        return {"modelkiln.zoo": self.name}

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


def tower_modules(model: TrainableDual, text_inputs: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The exported parts of a trainable dual encoder: ``image`` runs ``encode_image``, ``text``
    runs ``encode_text`` on its inputs in ``text_inputs`` order (as the ONNX inputs are named)."""
    from torch import nn

    class ImageTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dual = model

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.dual.encode_image(image)

    class TextTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dual = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.dual.encode_text(dict(zip(text_inputs, inputs, strict=True)))

    model.eval()
    return {"image": ImageTower().eval(), "text": TextTower().eval()}


class CLIPFamily(DualEncoder):
    """An open_clip architecture as two parts: the image tower (the ImageTask side: images in,
    embeddings or zero-shot label probabilities out) and the text tower, fed by ``tokenize``."""

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
        return tower_modules(self.trainable(weights), ("input_ids",))

    def trainable(self, weights: str | None) -> TrainableDual:
        """The open_clip model with ``weights`` (a local file, e.g. a ``kiln finetune`` checkpoint,
        which is the whole model's state dict; an open_clip release tag; or random): no heads,
        its projections belong to its towers, as in open_clip's own tower locking."""
        return _open_clip_dual(self, self._create(weights))

    def _create(self, weights: str | None) -> Any:
        open_clip = require("open_clip", f"building {self.name}")
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
        return model

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """Token ids [len(texts), context_length] with the architecture's own tokenizer."""
        ids: np.ndarray = _tokenizer(self.arch)(texts).numpy().astype(np.int64)
        return ids

    def text_feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"input_ids": self.tokenize(texts)}

    def preprocess(self, images: list[np.ndarray]) -> Prepared:
        """open_clip's eval transform: shorter side bicubic to size, centre crop, CLIP mean/std."""
        s = self.image_size
        return Prepared({"image": crop_and_normalize(images, s, s, CLIP_MEAN, CLIP_STD, cv2.INTER_CUBIC)})


def _open_clip_dual(entry: CLIPFamily, clip: Any) -> TrainableDual:
    """An open_clip CLIP as a TrainableDual: bodies are its whole towers (projections included),
    heads are empty; layer groups are the transformer blocks with what comes before and after."""
    from torch import nn

    class OpenClipDual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = clip

        @property
        def log_scale(self) -> nn.Parameter:
            scale: nn.Parameter = self.clip.logit_scale
            return scale

        def image_views(self, image: torch.Tensor) -> list[torch.Tensor]:
            return [image]

        def image_features(self, image: torch.Tensor) -> torch.Tensor:
            embeds: torch.Tensor = self.clip.encode_image(image)
            return embeds

        def image_head(self, features: torch.Tensor) -> torch.Tensor:
            return features

        def text_features(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
            embeds: torch.Tensor = self.clip.encode_text(feed["input_ids"])
            return embeds

        def text_head(self, features: torch.Tensor) -> torch.Tensor:
            return features

        def encode_image(self, image: torch.Tensor) -> torch.Tensor:
            return self.image_head(self.image_features(image))

        def encode_text(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.text_head(self.text_features(feed))

        def layer_groups(self, side: str) -> list[list[nn.Parameter]]:
            named = [
                (n.removeprefix("visual."), p)
                for n, p in self.clip.named_parameters()
                if n.startswith("visual.") == (side == "image") and n not in ("logit_scale", "logit_bias")
            ]
            return layer_groups(named, _OPEN_CLIP_BLOCK, _OPEN_CLIP_POST)

        def head_parameters(self, side: str) -> list[nn.Parameter]:
            return []

        def checkpoint_state(self, bodies: Collection[str]) -> dict[str, torch.Tensor]:
            # the whole model, in open_clip's own names: open_clip.create_model loads it as is
            return {k: v.detach().contiguous() for k, v in self.clip.state_dict().items()}

        def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
            self.clip.load_state_dict(state)

    return OpenClipDual()


#: open_clip parameter names: a transformer block (group by its index) and what follows the blocks.
_OPEN_CLIP_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|layer)\.?(\d+)\.")
_OPEN_CLIP_POST = re.compile(r"^(ln_post|proj|attn_pool|attnpool|head|ln_final|text_projection|text\.proj)")


def layer_groups(
    named: Sequence[tuple[str, torch.nn.Parameter]], block: re.Pattern[str], post: re.Pattern[str]
) -> list[list[torch.nn.Parameter]]:
    """Parameters in groups, input first: what precedes the blocks, one group per block index
    (``block`` captures it), then what follows them (names matching ``post``)."""
    pre: list[torch.nn.Parameter] = []
    after: list[torch.nn.Parameter] = []
    blocks: dict[int, list[torch.nn.Parameter]] = {}
    for name, param in named:
        found = block.search(name)
        if found:
            blocks.setdefault(int(found.group(1)), []).append(param)
        elif post.search(name):
            after.append(param)
        else:
            pre.append(param)
    groups = [pre, *(blocks[i] for i in sorted(blocks)), after]
    return [g for g in groups if g]


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
