"""``kiln chat``: a Qwen2-VL model answering one prompt (optionally about an image) on our stack:
decoder step and vision encoder in ONNX Runtime, the model's own processor and chat template,
tokens streamed as they are generated."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import BadInput

#: Images are resized to this square so one exported vision graph (one grid bucket) serves all.
IMAGE_SIDE = 112


class ChatModel:
    def __init__(self, model: Any, processor: Any, workdir: Path) -> None:
        from modelkiln.export.qwen_vl import export_decoder_step, export_vision
        from modelkiln.genai.greedy import GreedyDecoder
        from modelkiln.runtime.memory_pool import MemoryPool
        from modelkiln.runtime.session import ort_session

        self.processor, self.tokenizer = processor, processor.tokenizer
        self.merge = model.config.vision_config.spatial_merge_size
        patch = model.config.vision_config.patch_size
        self.grid = (1, IMAGE_SIDE // patch, IMAGE_SIDE // patch)
        export_decoder_step(model, workdir / "step.onnx")
        export_vision(model, self.grid, workdir / "vision.onnx")
        self.vision = ort_session(workdir / "vision.onnx")
        self.context = int(model.config.text_config.max_position_embeddings)
        table = model.model.language_model.embed_tokens.weight.detach().numpy()
        self.decoder = GreedyDecoder(workdir / "step.onnx", table, pool=MemoryPool())
        self.stop = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        self.image_pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    @classmethod
    def open(cls, name: str) -> ChatModel:
        """``qwen2-vl-tiny`` (random, built locally) or a local Qwen2-VL folder / hub id."""
        from modelkiln.zoo.qwen_vl import build_tiny, load_pretrained

        model, processor = build_tiny() if name == "qwen2-vl-tiny" else load_pretrained(name)
        workdir = Path(tempfile.mkdtemp(prefix="kiln-chat-"))
        return cls(model, processor, workdir)

    def reply(
        self,
        prompt: str,
        image: str | Path | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The model's answer; ``on_text`` receives each new piece of text as it is generated."""
        if not prompt or not prompt.strip():
            raise BadInput("chat: the prompt is empty")
        content: list[dict[str, str]] = [{"type": "text", "text": prompt}]
        pixels = None
        if image is not None:
            pixels = read_rgb(image)
            content.insert(0, {"type": "image"})
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = self.processor(
            text=[text], images=[pixels] if pixels is not None else None, return_tensors="np"
        )
        ids = np.asarray(inputs["input_ids"][0])
        if len(ids) + max_new_tokens > self.context:
            raise BadInput(
                f"chat: prompt of {len(ids)} tokens + {max_new_tokens} new exceeds the model's context of {self.context}"
            )
        embeds, positions, delta = self._prompt(ids, inputs)
        new: list[int] = []
        shown = [""]

        def stream(token: int) -> None:
            new.append(token)
            if on_text is not None and token not in self.stop:
                text_now = self.tokenizer.decode(new, skip_special_tokens=True)
                on_text(text_now[len(shown[0]) :])
                shown[0] = text_now

        self.decoder.generate_from_embeds(
            embeds, positions, delta, max_new_tokens, self.stop, temperature, top_p, seed, stream
        )
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def _prompt(self, ids: np.ndarray, inputs: Any) -> tuple[np.ndarray, np.ndarray, int]:
        from modelkiln.genai.mrope import mrope_positions

        embeds = self.decoder.embeddings[ids].copy()
        is_image = ids == self.image_pad
        grids = []
        if is_image.any():
            grids = [tuple(int(v) for v in inputs["image_grid_thw"][0])]
            if grids[0] != self.grid:
                raise BadInput(f"chat: image grid {grids[0]} differs from the exported bucket {self.grid}")
            embeds[is_image] = self.vision.run(
                None, {"pixel_values": np.asarray(inputs["pixel_values"], np.float32)}
            )[0]
        positions, delta = mrope_positions(is_image.astype(int).tolist(), grids, self.merge)
        return embeds, positions, delta


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 resized to the vision bucket; clear errors for bad files."""
    import cv2

    from modelkiln.zoo.images import IMAGE_SUFFIXES

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"chat: image not found: {path}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadInput(
            f"chat: unsupported image format {path.suffix!r} ({path.name}); use one of {sorted(IMAGE_SUFFIXES)}"
        )
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise BadInput(f"chat: cannot decode image {path} (corrupt or not an image)")
    image = cv2.resize(image, (IMAGE_SIDE, IMAGE_SIDE), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image[:, :, ::-1])
