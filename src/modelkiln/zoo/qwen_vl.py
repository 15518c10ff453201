"""Qwen2-VL (transformers' implementation): real weights from a local folder or hub id, a tiny
random configuration built entirely locally (tokenizer, processor, chat template) for tests on
machines that cannot download weights, and ``qwen2-vl-2b-random``: Qwen2-VL-2B-Instruct's
published architecture with seeded random weights written as bfloat16 safetensors shards, one
tensor at a time, so the real size can be exported and run without the real weights.

The zoo family exports three parts: the token embedding, one decoder step (prefill and decode in
one graph, KV cache in and out), and the vision encoder (one graph for any image size); beside
them the processor files and ``genai.json``, which is everything the generation engine needs to
run without torch. ``QwenVLFamily.checkpoint`` says where the weights are for export/qwen_vl.py,
which builds every part from them (export/builder); ``build`` gives torch modules for tracing the
embedding and decoder (the fallback; the vision encoder is always built).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln._deps import require
from modelkiln.errors import ModelNotFound, WeightsError
from modelkiln.zoo.base import Part, Task, TensorSpec, ZooModel

log = logging.getLogger(__name__)

#: Qwen2-VL's special tokens, in the order the tiny tokenizer appends them after its BPE vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: The ChatML layout Qwen2-VL's processors use: a default system turn, images as
#: <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad to one token per
#: merged patch), and an open assistant turn for generation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = Path(__file__).resolve().parent.parent / "data" / "tiny_corpus.txt"


def tiny_tokenizer(vocab_size: int = 600) -> Any:
    """A byte-level BPE trained here on a small built-in English corpus, as a Qwen2 tokenizer with
    Qwen2-VL's special tokens: real tokenization (any text encodes and decodes back), tiny vocab."""
    tokenizers = require("tokenizers", "the tiny Qwen2-VL tokenizer")
    transformers = require("transformers", "the tiny Qwen2-VL tokenizer")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    fast = transformers.Qwen2TokenizerFast(vocab=model["vocab"], merges=merges)
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    fast.chat_template = CHAT_TEMPLATE
    return fast


#: The two generations we export: (config class, model class, processor class) names in transformers.
FAMILIES = {
    "qwen2-vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2.5-vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
}


def image_processor(**kwargs: int) -> Any:
    """Qwen2-VL's image processor, its PIL backend where transformers has one: the backend whose
    pixels our numpy processor (genai/images.py) reproduces exactly (the torchvision backend
    rounds some pixels one uint8 level apart), so the reference and the engine see one image."""
    transformers = require("transformers", "the Qwen2-VL image processor")
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        return transformers.Qwen2VLImageProcessor(**kwargs)
    return Qwen2VLImageProcessorPil(**kwargs)  # type: ignore[arg-type]


def tiny_processor(tokenizer: Any = None, max_pixels: int = 112 * 112, family: str = "qwen2-vl") -> Any:
    """Qwen2-VL's own image processor (dynamic resolution, 14 px patches, 2x2 merge; Qwen2.5-VL
    uses the same) with the tiny tokenizer; small max_pixels keeps test images to a few dozen
    patches."""
    transformers = require("transformers", "the tiny Qwen2-VL processor")
    tokenizer = tokenizer or tiny_tokenizer()
    return getattr(transformers, FAMILIES[family][2])(
        image_processor=image_processor(min_pixels=56 * 56, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(
    tokenizer: Any,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    family: str = "qwen2-vl",
) -> Any:
    """Same architecture as Qwen2-VL (GQA decoder with M-RoPE, ViT with 2x2 patch merger) or
    Qwen2.5-VL (the same decoder; a ViT with windowed attention and a few full-attention blocks),
    tiny sizes."""
    transformers = require("transformers", "the tiny Qwen2-VL config")
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vision: dict[str, Any] = {  # Qwen2-VL's ViT
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": hidden,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    if family == "qwen2.5-vl":  # windowed ViT: block 0 in 56 px windows, block 1 full attention
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    return getattr(transformers, FAMILIES[family][0])(
        text_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            **_text_token_ids(ids),
        },
        vision_config=vision,
        **_token_ids(ids),
    )


def build_tiny(seed: int = 0, family: str = "qwen2-vl", **sizes: int) -> tuple[Any, Any]:
    """(model in eval mode, processor) of a random tiny Qwen2-VL or Qwen2.5-VL."""
    torch = require("torch", "building a tiny Qwen-VL")
    transformers = require("transformers", "building a tiny Qwen-VL")
    processor = tiny_processor(family=family)
    torch.manual_seed(seed)
    config = tiny_config(processor.tokenizer, family=family, **sizes)
    model = getattr(transformers, FAMILIES[family][1])(config).eval()
    return model, processor


def load_pretrained(source: str, family: str = "qwen2-vl") -> tuple[Any, Any]:
    """(model, processor) from a local Qwen2-VL / Qwen2.5-VL folder or a hub id (hub ids download)."""
    transformers = require("transformers", f"loading {family}")
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise ModelNotFound(f"{family}: {source} is not a model folder (no config.json)")
    try:
        model = getattr(transformers, FAMILIES[family][1]).from_pretrained(source).eval()
        processor = transformers.AutoProcessor.from_pretrained(source)
    except OSError as exc:
        raise WeightsError(f"{family}: cannot load {source!r}: {exc}") from exc
    return model, processor


#: Patch grids (t, rows, columns) of the vision examples by seed % 4: square, wide, tall, odd-sized
#: (every side a whole number of 2x2 merge blocks, as the processor makes them).
VISION_GRIDS = ((1, 8, 8), (1, 4, 12), (1, 12, 4), (1, 6, 10))


GROUPED_ATTENTION = "kiln_grouped"


def grouped_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Grouped-query attention without repeating K/V: the query heads that share a KV head are
    stacked along the sequence axis ([B, kv, groups*S, D]) and meet the cache once. The same math
    as transformers' eager attention; the exported graph has no Expand copying the whole cache
    to every query head at each step (measured: ~12 % of a decode step before)."""
    import torch

    b, h, s, d = query.shape
    kv, t = key.shape[1], key.shape[2]
    groups = h // kv
    scores = torch.matmul(query.reshape(b, kv, groups * s, d), key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :t].unsqueeze(2)  # [B, 1, 1, S, T] additive
        scores = (scores.view(b, kv, groups, s, t) + mask).view(b, kv, groups * s, t)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).reshape(b, h, s, d).transpose(1, 2).contiguous()
    return out, None


def use_grouped_attention(language_model: Any) -> None:
    """Switch a transformers text model to ``grouped_attention`` (with an additive eager mask)."""
    transformers = require("transformers", "the Qwen2-VL decoder step")
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    transformers.AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)
    language_model.set_attn_implementation(GROUPED_ATTENTION)


def decoder_step_module(model: Any) -> Any:
    """The decoder as one step: (inputs_embeds, position_ids [3, B, S], attention_mask, *past) ->
    (last-position logits, *present), the cache passed as plain tensors. The text model is switched
    to grouped attention (same numbers, a leaner graph)."""
    require("torch", "the Qwen2-VL decoder step")
    transformers = require("transformers", "the Qwen2-VL decoder step")
    import torch

    lm, head = model.model.language_model, model.lm_head
    use_grouped_attention(lm)
    layers = lm.config.num_hidden_layers

    class DecoderStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm, self.head = lm, head

        def forward(
            self,
            inputs_embeds: torch.Tensor,
            position_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            cache = transformers.DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=lm.config
            )
            out = self.lm(
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                attention_mask=attention_mask,
                cache=cache,
                use_cache=True,
            )
            present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            return (self.head(out.last_hidden_state[:, -1:]), *present)

    return DecoderStep().eval()


def vision_reference(visual: Any, pixel_values: np.ndarray, grid_thw: tuple[int, int, int]) -> np.ndarray:
    """transformers' vision encoder + merger (``model.model.visual``) on one image's patches:
    image_embeds [t*h*w / merge^2, hidden] (the reference the built graph is checked against)."""
    torch = require("torch", "the Qwen2-VL vision encoder")
    with torch.no_grad():
        out = visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor([list(grid_thw)])).pooler_output
    embeds: np.ndarray = out.float().numpy()
    return embeds


def vision_config_entry(config: Any, family: str) -> dict[str, Any]:
    """genai.json's ``vision_config``: what the engine computes the encoder's extra inputs from
    (export/builder/vision.py ``vision_feed``)."""
    v = config.vision_config
    window = int(getattr(v, "window_size", 0) or 0) if family == "qwen2.5-vl" else 0
    return {
        "family": family,
        "patch": int(v.patch_size),
        "merge": int(v.spatial_merge_size),
        "window": window,
    }


def decoder_part(text: Any) -> Part:
    """The decoder step's inputs and outputs for a transformers text config: inputs_embeds,
    M-RoPE position_ids [3, B, S], attention_mask [B, past+S], past_key/value_i -> last-position
    logits, present_key/value_i."""
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = ("batch", text.num_key_value_heads, "past", head_dim)
    present = ("batch", text.num_key_value_heads, "total", head_dim)
    names = [f"{kind}_{i}" for i in range(text.num_hidden_layers) for kind in ("key", "value")]
    return Part(
        "decoder",
        (
            TensorSpec("inputs_embeds", "float32", ("batch", "seq", text.hidden_size)),
            TensorSpec("position_ids", "int64", (3, "batch", "seq")),
            TensorSpec("attention_mask", "int64", ("batch", "total")),
            *(TensorSpec(f"past_{n}", "float32", kv) for n in names),
        ),
        (
            TensorSpec("logits", "float32", ("batch", 1, text.vocab_size)),
            *(TensorSpec(f"present_{n}", "float32", present) for n in names),
        ),
    )


def decoder_example(part: Part, batch: int, seq: int, past: int, seed: int) -> dict[str, np.ndarray]:
    """Random decoder-step inputs: ``seq`` new positions on a ``past``-long cache."""
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
    feed: dict[str, np.ndarray] = {}
    for spec in part.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
        feed[spec.name] = rng.standard_normal(shape).astype(np.float32)
    feed["position_ids"] = np.broadcast_to(np.arange(past, past + seq), (3, batch, seq)).astype(np.int64)
    feed["attention_mask"] = np.ones((batch, past + seq), np.int64)
    return feed


#: (seq, past) of the decoder examples by seed % 4: a chunk on a cache (the trace example), a decode
#: step, a chunk on a short cache, a prefill from an empty cache.
DECODER_EXAMPLES = ((5, 3), (1, 6), (4, 2), (9, 0))


@dataclass
class Checkpoint:
    """What the graph builder reads a Qwen-VL model from: its config and processor, and its weights
    either as safetensors shards in ``folder`` or as a transformers ``model`` in memory."""

    config: Any
    processor: Any
    folder: Path | None = None
    model: Any = None
    #: ``folder`` was written for one export (the random 2B weights): remove it afterwards
    temporary: bool = False

    def cleanup(self) -> None:
        if self.temporary and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


#: Qwen2-VL-2B-Instruct's config.json as published (huggingface.co/Qwen/Qwen2-VL-2B-Instruct): the
#: architecture numbers the ``2b-random`` preset copies. Where a value equals transformers 5's
#: Qwen2VLConfig default it is still written here, so a change of default cannot change the model.
QWEN2_VL_2B: dict[str, Any] = {
    "text_config": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28,
        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    },
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 1536,  # the merger's output: the language model's width
        "hidden_act": "quick_gelu",
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "tie_word_embeddings": True,
}

#: (family, preset) -> the published configuration it copies.
PRESETS: dict[tuple[str, str], dict[str, Any]] = {("qwen2-vl", "2b-random"): QWEN2_VL_2B}

#: Written beside random shards: the seed and dtype they were drawn with (a folder is reused only
#: when this matches).
RANDOM_MARKER = "kiln_random.json"


def preset_config(tokenizer: Any, family: str = "qwen2-vl", preset: str = "2b-random") -> Any:
    """The preset's transformers config. The architecture is the published one; the token ids
    (image, video, vision start/end, end of turn, padding) are ``tokenizer``'s, since the random
    model is paired with the tiny tokenizer (its ids are a valid subset of the 151 936-token vocab)."""
    transformers = require("transformers", f"the {family}-{preset} config")
    values = PRESETS[(family, preset)]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return getattr(transformers, FAMILIES[family][0])(
        text_config={**values["text_config"], **_text_token_ids(ids)},
        vision_config=dict(values["vision_config"]),
        tie_word_embeddings=values["tie_word_embeddings"],
        **_token_ids(ids),
    )


def _text_token_ids(ids: dict[str, int]) -> dict[str, Any]:
    """The text config's special ids, from the tokenizer's (``SPECIAL_TOKENS``)."""
    return {"bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}


def _token_ids(ids: dict[str, int]) -> dict[str, Any]:
    """The model config's special ids (image, video, vision span, end of turn, padding)."""
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        **_text_token_ids(ids),
    }


def real_size_processor(family: str = "qwen2-vl") -> Any:
    """Qwen2-VL's image processor at its published defaults with the tiny tokenizer."""
    transformers = require("transformers", "the Qwen2-VL processor")
    return getattr(transformers, FAMILIES[family][2])(
        image_processor=image_processor(),
        tokenizer=tiny_tokenizer(),
        video_processor=transformers.Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def ensure_random_checkpoint(folder: Path, family: str = "qwen2-vl", seed: int = 0) -> tuple[Any, Any]:
    """(config, processor) of the random preset checkpoint in ``folder``, written there first unless
    a previous run left the same one (same seed, same marker)."""
    processor = real_size_processor(family)
    config = preset_config(processor.tokenizer, family)
    marker = {"family": family, "preset": "2b-random", "seed": seed, "dtype": RANDOM_DTYPE}
    found = folder / RANDOM_MARKER
    if found.is_file() and json.loads(found.read_text(encoding="utf-8")) == marker:
        log.info("reusing the random checkpoint in %s", folder)
        return config, processor
    if folder.exists() and any(folder.iterdir()) and not found.is_file():
        raise WeightsError(
            f"{folder} holds other files; give an empty (or new) folder for the random weights"
        )
    write_random_checkpoint(config, folder, family, seed)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    found.write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return config, processor


#: The dtype random shards are stored in: Qwen2-VL-2B-Instruct's own (its shards are bfloat16).
RANDOM_DTYPE = "BF16"
#: Largest random shard (the hub's 2B checkpoint has two of up to ~4 GB).
SHARD_BYTES = 2 << 30
#: Elements drawn per piece of a large tensor (bounds the generator's scratch memory).
DRAW_ELEMENTS = 1 << 24
#: Standard deviation of random weights: transformers' initializer_range for Qwen2-VL.
INIT_STD = 0.02


def checkpoint_tensors(config: Any, family: str = "qwen2-vl") -> dict[str, tuple[int, ...]]:
    """Every weight of the model for ``config`` as (hub name -> shape), from the model built on
    torch's meta device (no memory); a tied LM head is left out, as published checkpoints do."""
    require("torch", "listing checkpoint tensors")
    transformers = require("transformers", "listing checkpoint tensors")
    import torch

    with torch.device("meta"):
        model = getattr(transformers, FAMILIES[family][1])(config)
    shapes = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shapes[hub_name(name)] = tuple(int(d) for d in tensor.shape)
    return shapes


def hub_name(name: str) -> str:
    """A transformers 5 parameter name as the hub's checkpoints spell it."""
    for v5, hub in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(v5):
            return hub + name[len(v5) :]
    return name


def write_random_checkpoint(config: Any, folder: Path, family: str = "qwen2-vl", seed: int = 0) -> list[Path]:
    """Random weights for ``config`` as bfloat16 safetensors shards plus their index, each tensor
    drawn (seeded by its name, so any subset is reproducible) and written piece by piece: memory
    stays at one piece, never a model. Norm weights are 1; everything else, biases included, is
    N(0, 0.02) so every path of the graph carries signal."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_tensors(config, family)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        file = folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(file, {n: shapes[n] for n in names}, seed)
        files.append(file)
        weight_map.update(dict.fromkeys(names, file.name))
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files


def _write_shard(file: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """One safetensors file written as a stream: the header (offsets known from the shapes), then
    each tensor's pieces in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        header[name] = {
            "dtype": RANDOM_DTYPE,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with file.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            for piece in random_tensor(name, shape, seed):
                f.write(bfloat16_bits(piece).tobytes())


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> Iterator[np.ndarray]:
    """The float32 values of one random weight, flat, in pieces of at most DRAW_ELEMENTS."""
    count = int(np.prod(shape))
    is_norm = name.endswith(".weight") and len(shape) == 1 and ("norm" in name or ".ln_" in name)
    if is_norm:
        yield np.ones(count, np.float32)
        return
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    for start in range(0, count, DRAW_ELEMENTS):
        piece = rng.standard_normal(min(DRAW_ELEMENTS, count - start), dtype=np.float32)
        piece *= np.float32(INIT_STD)
        yield piece


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16
    return rounded.astype(np.uint16)


def local_folder(source: str, family: str) -> Path:
    """A weights folder on this machine: ``source`` itself, or a hub id fetched into the local
    Hugging Face cache (safetensors, config and processor files only)."""
    path = Path(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{family}: {source} is not a model folder (no config.json)")
        return path
    hub = require("huggingface_hub", f"downloading {family} weights")
    try:
        return Path(
            hub.snapshot_download(
                source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]
            )
        )
    except Exception as exc:
        raise WeightsError(f"{family}: cannot fetch {source!r}: {exc}") from exc


def load_config_and_processor(folder: Path, family: str) -> tuple[Any, Any]:
    """(config, processor) of a local weights folder, without loading any weight."""
    transformers = require("transformers", f"reading {family} config")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        processor = transformers.AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{family}: cannot read the config or processor of {folder}: {exc}") from exc
    return config, processor


class QwenVLFamily(ZooModel):
    """``qwen2-vl`` / ``qwen2.5-vl`` (weights: a local folder or hub id), their ``-tiny`` random
    configurations built here, and ``qwen2-vl-2b-random`` (Qwen2-VL-2B-Instruct's architecture with
    random weights, written as safetensors shards). Not an ImageTask: images reach it through the
    generation engine (``kiln chat``, the server's chat endpoint), never through predict's
    pre/post-processing.

    Two ways out: ``checkpoint(weights)`` for the graph builder (export/qwen_vl.py: the embedding
    and decoder built from the weights, the vision encoder traced), ``build(weights)`` for tracing
    every part from a transformers model in memory (the fallback, and the reference)."""

    task = Task.GENERATION
    instead_of_images = "is a generative model: use `kiln chat` (or the server's /v1/chat/completions)"

    def __init__(self, tiny: bool, family: str = "qwen2-vl", preset: str | None = None, **sizes: int) -> None:
        """``sizes`` (tiny only): hidden, layers, heads, kv_heads of a bigger random config;
        ``preset``: ``"2b-random"`` (qwen2-vl only)."""
        if family not in FAMILIES:
            raise ModelNotFound(f"unknown Qwen-VL family {family!r}; known: {sorted(FAMILIES)}")
        if sizes and not tiny:
            raise WeightsError(f"{family} takes its sizes from its weights; sizes apply to {family}-tiny")
        if preset is not None and (tiny or (family, preset) not in PRESETS):
            raise ModelNotFound(
                f"no {family} preset {preset!r}; presets: {sorted(f'{f}-{p}' for f, p in PRESETS)}"
            )
        self.tiny, self.sizes, self.family, self.preset = tiny, sizes, family, preset
        self.name = f"{family}-tiny" if tiny else f"{family}-{preset}" if preset else family
        #: the vision encoder among ``parts`` (export/qwen_vl.py leaves it out while it traces the
        #: other parts: the encoder is always built from the weights)
        self.with_vision = True
        self._model: Any = None
        self._processor: Any = None
        self._config: Any = None

    def _require_config(self) -> Any:
        if self._config is None:
            raise RuntimeError(
                f"{self.name}: build() or checkpoint() first (the part shapes come from the config)"
            )
        return self._config

    @property
    def config(self) -> Any:
        """The transformers config (after ``build`` or ``checkpoint``)."""
        return self._require_config()

    @property
    def _text(self) -> Any:
        return self._require_config().text_config

    @property
    def _vision(self) -> Any:
        return self._require_config().vision_config

    @property
    def parts(self) -> tuple[Part, ...]:
        t = self._text
        embed = Part(
            "embed",
            (TensorSpec("input_ids", "int64", ("batch", "seq")),),
            (TensorSpec("inputs_embeds", "float32", ("batch", "seq", t.hidden_size)),),
        )
        return (embed, decoder_part(t), self.vision_part()) if self.with_vision else (embed, decoder_part(t))

    def vision_part(self) -> Part:
        """The vision encoder for any image: patches and their grid tables -> one row per merged
        patch (export/builder/vision.py says what each input holds)."""
        v = self._vision
        width = v.in_channels * v.temporal_patch_size * v.patch_size**2
        out = int(getattr(v, "out_hidden_size", 0) or v.hidden_size)
        windows = (
            (TensorSpec("window_index", "int64", ("tokens",)), TensorSpec("window_ids", "int64", ("tokens",)))
            if self.family == "qwen2.5-vl"
            else ()
        )
        return Part(
            "vision",
            (
                TensorSpec("pixel_values", "float32", ("patches", width)),
                TensorSpec("position_ids", "int64", ("patches", 2)),
                *windows,
            ),
            (TensorSpec("image_embeds", "float32", ("tokens", out)),),
        )

    def checkpoint(self, weights: str | None) -> Checkpoint:
        """Where the graph builder reads this model from: the tiny model in memory, the random 2B
        checkpoint written to ``weights`` (a folder, reused when it already holds one; a temporary
        folder when None), or a weights folder (hub ids are downloaded to the local cache first)."""
        if self.tiny:
            self.build(weights)
            return Checkpoint(self._config, self._processor, model=self._model)
        if self.preset is not None:
            if weights in (None, "random"):
                folder, temporary = Path(tempfile.mkdtemp(prefix=f"kiln-{self.name}-")), True
            else:
                folder, temporary = Path(str(weights)), False
            self._config, self._processor = ensure_random_checkpoint(folder, self.family)
            return Checkpoint(self._config, self._processor, folder=folder, temporary=temporary)
        if weights in (None, "random"):
            raise WeightsError(f"{self.family} needs --weights: a local folder or hub id")
        folder = local_folder(weights, self.family)
        self._config, self._processor = load_config_and_processor(folder, self.family)
        return Checkpoint(self._config, self._processor, folder=folder)

    def build(self, weights: str | None) -> dict[str, Any]:
        if self.tiny:
            if weights not in (None, "random"):
                raise WeightsError(
                    f"{self.name} is random by definition; use {self.family} --weights DIR for real weights"
                )
            self._model, self._processor = build_tiny(family=self.family, **self.sizes)
        elif self.preset is not None:
            folder = self.checkpoint(weights).folder
            self._model, self._processor = load_pretrained(str(folder), self.family)
        else:
            if weights in (None, "random"):
                raise WeightsError(f"{self.family} needs --weights: a local folder or hub id")
            self._model, self._processor = load_pretrained(weights, self.family)
        model = self._model
        self._config = model.config
        return {"embed": model.model.language_model.embed_tokens, "decoder": decoder_step_module(model)}

    def example_inputs(self, part: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Decoder examples vary (seq, past) by seed: the trace example (seed 0) is a chunk on a
        cache, the parity batches (seeds 1 and 3) a decode step and a prefill from an empty cache,
        so one check covers all three uses; ids stay inside the vocabulary."""
        rng = np.random.default_rng(seed)
        if part == "embed":
            return {"input_ids": rng.integers(0, self._text.vocab_size, (batch, 7)).astype(np.int64)}
        if part == "vision":
            grid = VISION_GRIDS[seed % len(VISION_GRIDS)]
            v = self._vision
            width = v.in_channels * v.temporal_patch_size * v.patch_size**2
            return {"pixel_values": rng.standard_normal((int(np.prod(grid)), width)).astype(np.float32)}
        if part != "decoder":
            return super().example_inputs(part, batch, seed)
        seq, past = DECODER_EXAMPLES[seed % 4]
        return decoder_example(self.part("decoder"), batch, seq, past, seed)

    def write_assets(self, folder: Path) -> None:
        """The processor (tokenizer, chat template, image processor) and genai.json beside the parts."""
        self._processor.save_pretrained(folder)
        config, tok = self._require_config(), self._processor.tokenizer
        t, v = config.text_config, config.vision_config
        spec = {
            "model": self.name,
            "context": int(t.max_position_embeddings),
            "merge": int(v.spatial_merge_size),
            "image_token": int(config.image_token_id),
            "stop": sorted({tok.convert_tokens_to_ids(s) for s in ("<|im_end|>", "<|endoftext|>")}),
            "embed": "embed.onnx",
            "decoder": "decoder.onnx",
            "vision": "vision.onnx",
            "vision_config": vision_config_entry(config, self.family),
        }
        (Path(folder) / "genai.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


def qwen2_vl_2b_random() -> QwenVLFamily:
    """``qwen2-vl-2b-random``: Qwen2-VL-2B-Instruct's architecture, random weights (registry row)."""
    return QwenVLFamily(tiny=False, family="qwen2-vl", preset="2b-random")
