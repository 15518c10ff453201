"""Qwen-VL prompt processing from an exported folder with the tokenizer and image processor only.

transformers' Qwen2VLProcessor also insists on a video processor, which needs torchvision; a
server has no business importing torch for text and images. This does what the processor does for
images: chat template -> text, each ``<|image_pad|>`` expanded to one token per merged patch of its
image, tokenized; images through the model's own image processor rules in numpy
(``genai.images.ImageProcessor``, from the folder's preprocessor_config.json: smart resize within
min/max pixels, normalise, flatten patches). transformers is used for the tokenizer only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln._deps import require
from modelkiln.errors import BadInput
from modelkiln.genai.images import ImageProcessor

IMAGE_PAD = "<|image_pad|>"


class QwenVLProcessor:
    def __init__(self, tokenizer: Any, image_processor: ImageProcessor, chat_template: str) -> None:
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, chat_template
        self.patch_size = image_processor.patch_size
        self.merge = image_processor.merge_size
        #: Most prompt tokens accepted (the model's context; None: no check). Checked right after
        #: tokenising, before anything sized by the token count (embeddings) is allocated.
        self.max_tokens: int | None = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> QwenVLProcessor:
        transformers = require("transformers", "the Qwen-VL tokenizer and image processor")
        folder = Path(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        image_processor = ImageProcessor.from_folder(folder)
        return cls(tokenizer, image_processor, _chat_template(folder, tokenizer))

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt text with an open assistant turn, images as vision_start/pad/end."""
        return str(
            self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        )

    def __call__(self, text: str, images: Sequence[np.ndarray] = ()) -> dict[str, np.ndarray]:
        """input_ids [seq], and with images pixel_values [patches, C*T*P*P] and image_grid_thw [n, 3]."""
        out: dict[str, np.ndarray] = {}
        if images:
            pieces = text.split(IMAGE_PAD)
            if len(pieces) - 1 != len(images):
                raise ValueError(
                    f"{len(pieces) - 1} image placeholders in the prompt for {len(images)} images"
                )
            # token counts from the sizes alone: the pixels are processed after the length check
            grids = [self.image_processor.grid(img.shape[0], img.shape[1]) for img in images]
            counts = [int(np.prod(g)) // self.merge**2 for g in grids]
            text = pieces[0] + "".join(
                IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:], strict=True)
            )
        out["input_ids"] = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
        if self.max_tokens is not None and len(out["input_ids"]) > self.max_tokens:
            raise BadInput(
                f"chat: prompt of {len(out['input_ids'])} tokens exceeds the context of {self.max_tokens} tokens"
            )
        if images:
            out.update(self.image_processor(images))
        return out


def _chat_template(folder: Path, tokenizer: Any) -> str:
    """The processor's template (chat_template.jinja / .json) or else the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return str(json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"])
    if tokenizer.chat_template:
        return str(tokenizer.chat_template)
    raise FileNotFoundError(f"{folder}: no chat template (chat_template.jinja/.json or in the tokenizer)")
