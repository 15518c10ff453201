"""Chat with a Qwen2-VL model on our stack: an exported folder (``kiln export qwen2-vl…``: token
embedding, decoder step, vision encoder, processor files, genai.json) run by the generation engine
on ONNX Runtime. Torch is not needed once the folder exists.

Images keep their own size, as Qwen2-VL's processor sizes them (``genai.images``: multiples of
28 px, within the processor's min/max pixels), and go through the one vision encoder with their
grid's tables (``export.builder.vision.vision_feed``). Folders exported before that (one vision
graph per fixed bucket, ``buckets`` in genai.json) still load: their images are resized to the
nearest bucket first.

Messages follow the chat-completions shape: ``{"role", "content"}`` with content a string or a
list of ``{"type": "text", "text"}`` / ``{"type": "image"}`` parts, images given alongside as RGB
arrays in order.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.delivery.crypto import ModelKey, model_source
from modelkiln.errors import BadInput, ModelNotFound
from modelkiln.export import export
from modelkiln.export.builder.vision import vision_feed
from modelkiln.genai.engine import Engine, Generation, Sampling
from modelkiln.genai.images import resize_to_bucket
from modelkiln.genai.measure import decode_rate
from modelkiln.genai.mrope import mrope_positions
from modelkiln.genai.processor import QwenVLProcessor
from modelkiln.genai.spec import SPEC_FILE, Bucket, GenaiSpec
from modelkiln.runtime.backends.base import Backend
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.runtime.memory_pool import MemoryPool
from modelkiln.zoo.images import read_image

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """A chat turned into what the decoder eats: embeddings [seq, hidden] with the images merged
    in, M-RoPE positions [3, seq] and the delta decode positions add."""

    embeds: np.ndarray
    positions: np.ndarray
    delta: int

    @property
    def tokens(self) -> int:
        return int(self.embeds.shape[0])


class ChatModel:
    def __init__(
        self,
        folder: str | Path,
        decoder: str | None = None,
        threads: int | None = None,
        pool: MemoryPool | None = None,
        vision_int8: bool = False,
        key: ModelKey | None = None,
    ) -> None:
        """``vision_int8``: run the weight-only INT8 vision graph (``vision.int8.onnx``, written by
        ``kiln deploy`` or ``kiln quantize --weight-only --kernel matmulnbits``). ``key`` opens
        graphs encrypted with ``kiln encrypt`` (``*.onnx.enc``), in memory only."""
        folder = Path(folder)
        self.spec = spec = GenaiSpec.load(folder)
        self.name = spec.model
        self.processor = QwenVLProcessor.from_folder(folder)
        self.tokenizer = self.processor.tokenizer
        self.context, self.merge = spec.context, spec.merge
        self.stop, self.image_token = set(spec.stop), spec.image_token
        #: older folders: the image buckets and their vision graphs (empty for any-size folders)
        self.buckets: list[Bucket] = list(spec.buckets)
        self.vision: dict[Bucket, Backend] = {
            bucket: cpu_backend(model_source(_vision_file(folder, f, vision_int8), key), threads=threads)
            for bucket, f in spec.vision.items()
        }
        #: the one vision encoder for any image size, and what it is fed with
        self.encoder: Backend | None = None
        self.vision_config = dict(spec.vision_config or {})
        if spec.encoder is not None:
            source = model_source(_vision_file(folder, spec.encoder, vision_int8), key)
            self.encoder = cpu_backend(source, threads=threads)
        self._embed = cpu_backend(model_source(folder / spec.embed, key), threads=1)
        self.engine = Engine(model_source(folder / (decoder or spec.decoder), key), self.embed, pool, threads)
        self.last_stats: ReplyStats | None = None  # of the last reply()

    @classmethod
    def open(
        cls,
        name: str,
        decoder: str | None = None,
        threads: int | None = None,
        vision_int8: bool = False,
        model_key: ModelKey | None = None,
    ) -> ChatModel:
        """An exported folder, or ``qwen2-vl-tiny`` / a Qwen2-VL weights folder or hub id, exported
        here first (into a temporary folder, parity-checked)."""
        path = Path(name)
        if (path / SPEC_FILE).is_file():
            return cls(path, decoder, threads, vision_int8=vision_int8, key=model_key)
        if path.exists() and not (path / "config.json").is_file():
            raise ModelNotFound(
                f"chat: {name} is neither an exported folder ({SPEC_FILE}) nor a Qwen2-VL folder"
            )
        out = Path(tempfile.mkdtemp(prefix="kiln-chat-"))
        atexit.register(shutil.rmtree, out, True)  # sessions hold the graphs; the folder is scratch
        key = name.lower().replace("_", "-")
        log.info("exporting %s to %s", name, out)
        if key in ("qwen2-vl-tiny", "qwen2.5-vl-tiny"):
            export(key, out)
        else:
            export(_family_of(path), out, weights=name)
        return cls(out, decoder, threads, vision_int8=vision_int8)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [n] -> embeddings [n, hidden] through the exported embedding graph."""
        out: np.ndarray = _only(self._embed.infer({"input_ids": np.asarray(ids, np.int64)[None]}))[0]
        return out

    def prompt(self, messages: Sequence[dict[str, Any]], images: Sequence[np.ndarray] = ()) -> Prompt:
        """Apply the chat template, preprocess images (each at its own size, or into its bucket for
        older folders), run the vision encoder and merge its embeddings at the image tokens."""
        count = sum(1 for m in messages for c in _parts(m) if c.get("type") == "image")
        if count != len(images):
            raise BadInput(f"chat: the messages have {count} image parts but {len(images)} images came")
        if not any(c.get("text", "").strip() for m in messages for c in _parts(m)) and not images:
            raise BadInput("chat: the prompt is empty")
        text = self.processor.apply_chat_template(messages)
        sized = [resize_to_bucket(img, self.buckets) for img in images] if self.buckets else list(images)
        inputs = self.processor(text, sized)
        ids = inputs["input_ids"]
        embeds = self.embed(ids).copy()
        is_image = ids == self.image_token
        slots = np.flatnonzero(is_image)  # image k fills the k-th run of image tokens
        grids = [_grid(g) for g in inputs.get("image_grid_thw", [])]
        pixel_row = token = 0
        patch = self.processor.patch_size
        for img, grid in zip(sized, grids, strict=True):
            patches = int(np.prod(grid))
            pixels = np.asarray(inputs["pixel_values"][pixel_row : pixel_row + patches], np.float32)
            if self.encoder is not None:
                out = _only(self.encoder.infer(vision_feed(pixels, grid, self.vision_config)))
            else:
                if grid != (1, img.shape[0] // patch, img.shape[1] // patch):
                    raise BadInput(
                        f"chat: the processor made a {grid} patch grid of a {img.shape[:2]} bucket image"
                    )
                out = _only(self.vision[(img.shape[0], img.shape[1])].infer({"pixel_values": pixels}))
            embeds[slots[token : token + len(out)]] = out
            pixel_row, token = pixel_row + patches, token + len(out)
        positions, delta = mrope_positions(is_image.astype(int).tolist(), grids, self.merge)
        return Prompt(embeds, positions, delta)

    def start(self, prompt: Prompt, max_new_tokens: int, sampling: Sampling | None = None) -> Generation:
        """A generation the caller steps (a scheduler interleaves several)."""
        if max_new_tokens < 1:
            raise BadInput(f"chat: max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt.tokens + max_new_tokens > self.context:
            raise BadInput(
                f"chat: prompt of {prompt.tokens} tokens + {max_new_tokens} new exceeds the context of "
                f"{self.context} tokens of {self.name}"
            )
        return self.engine.start(
            prompt.embeds, prompt.positions, prompt.delta, max_new_tokens, self.stop, sampling
        )

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
        """One user turn (optionally about an image file); ``on_text`` gets each new piece of text."""
        if not prompt or not prompt.strip():
            raise BadInput("chat: the prompt is empty")
        messages: list[dict[str, Any]] = []
        images: list[np.ndarray] = []
        add_turn(messages, images, prompt, image)
        return self.answer(messages, images, max_new_tokens, Sampling(temperature, top_p, seed), on_text)

    def answer(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[np.ndarray] = (),
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The assistant's next turn after ``messages`` (a whole conversation: the prompt is
        rebuilt from all of it), streamed to ``on_text``; stats in ``last_stats``."""
        began = time.perf_counter()
        prompt_in = self.prompt(messages, images)
        gen = self.start(prompt_in, max_new_tokens, sampling)
        stream = TextStream(self.tokenizer, self.stop)

        def show(piece: str) -> None:
            if piece and on_text is not None:
                on_text(piece)

        times = gen.run(lambda token: show(stream.push(token)))
        show(stream.flush())
        self.last_stats = ReplyStats(prompt_in.tokens, len(times), times[0] - began, decode_rate(times))
        return stream.text


def add_turn(
    messages: list[dict[str, Any]], images: list[np.ndarray], text: str, image: str | Path | None = None
) -> None:
    """Append a user turn (text, optionally about an image file) to a conversation."""
    content: list[dict[str, str]] = [{"type": "text", "text": text}]
    if image is not None:
        images.append(read_image(image, rgb=True))
        content.insert(0, {"type": "image"})
    messages.append({"role": "user", "content": content})


@dataclass(frozen=True)
class ReplyStats:
    """How the last reply went: prompt and answer tokens, time to the first token (prompt
    processing, vision and prefill included), decode tokens/s after it."""

    prompt_tokens: int
    new_tokens: int
    first_token_s: float
    decode_tok_s: float

    def __str__(self) -> str:
        return (
            f"{self.new_tokens} tokens after a {self.prompt_tokens}-token prompt; first token "
            f"{self.first_token_s * 1e3:.0f} ms, then {self.decode_tok_s:.1f} tokens/s"
        )


class TextStream:
    """Tokens in, new text out: decodes the whole answer each time and hands on what is new, holding
    back a trailing partial UTF-8 character (byte-level BPE splits characters across tokens)."""

    def __init__(self, tokenizer: Any, stop: set[int]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        if token in self.stop:
            return ""
        self.tokens.append(token)
        now = str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        if now.endswith("\ufffd"):
            return ""
        piece, self.text = now[len(self.text) :], now
        return piece

    def flush(self) -> str:
        """At the end: whatever was held back (an incomplete character decodes as U+FFFD)."""
        now = str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
        piece, self.text = now[len(self.text) :], now
        return piece


def _vision_file(folder: Path, name: str, int8: bool) -> Path:
    if not int8:
        return folder / name
    path = folder / name.replace(".onnx", ".int8.onnx")
    if not (path.is_file() or path.with_name(path.name + ".enc").is_file()):
        raise ModelNotFound(
            f"chat: {path.name} not found in {folder}; write it with `kiln quantize {folder / name} -o {path} "
            "--weight-only --kernel matmulnbits` (kiln deploy does it)"
        )
    return path


def _family_of(folder: Path) -> str:
    """qwen2.5-vl or qwen2-vl, from a weights folder's config.json (hub ids: qwen2-vl unless the
    id says 2.5)."""
    config = folder / "config.json"
    if config.is_file():
        kind = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
        return "qwen2.5-vl" if "2_5" in kind else "qwen2-vl"
    return "qwen2.5-vl" if "2.5" in str(folder) else "qwen2-vl"


def _grid(g: Sequence[int]) -> tuple[int, int, int]:
    """An image's (temporal, rows, columns) patch grid from the processor."""
    t, h, w = (int(v) for v in g)
    return t, h, w


def _only(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The output of a one-output graph (embedding, vision encoder)."""
    return next(iter(outputs.values()))


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])
