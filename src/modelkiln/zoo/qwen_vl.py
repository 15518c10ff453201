"""Qwen2-VL (transformers' implementation): real weights from a local folder or hub id, and a tiny
random configuration built entirely locally (tokenizer, processor, chat template) for tests on
machines that cannot download weights.

Groundwork for the Qwen-VL issue: the models, tokenizer and processor exist and generate with
transformers; ONNX export of the vision encoder / embedding / decoder step, the generation
engine and the zoo registration come next.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelkiln._deps import require
from modelkiln.errors import ModelNotFound, WeightsError

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


def tiny_processor(tokenizer: Any = None, max_pixels: int = 112 * 112) -> Any:
    """Qwen2-VL's own image processor (dynamic resolution, 14 px patches, 2x2 merge) with the tiny
    tokenizer; small max_pixels keeps test images to a few dozen patches."""
    transformers = require("transformers", "the tiny Qwen2-VL processor")
    tokenizer = tokenizer or tiny_tokenizer()
    return transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tokenizer: Any, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> Any:
    """Same architecture as Qwen2-VL (GQA decoder with M-RoPE, ViT with 2x2 patch merger), tiny sizes."""
    transformers = require("transformers", "the tiny Qwen2-VL config")
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return transformers.Qwen2VLConfig(
        text_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def build_tiny(seed: int = 0, **sizes: int) -> tuple[Any, Any]:
    """(model in eval mode, processor) of a random tiny Qwen2-VL."""
    torch = require("torch", "building qwen2-vl-tiny")
    transformers = require("transformers", "building qwen2-vl-tiny")
    processor = tiny_processor()
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(tiny_config(processor.tokenizer, **sizes)).eval()
    return model, processor


def load_pretrained(source: str) -> tuple[Any, Any]:
    """(model, processor) from a local Qwen2-VL folder or a hub id (hub ids download)."""
    transformers = require("transformers", "loading qwen2-vl")
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise ModelNotFound(f"qwen2-vl: {source} is not a model folder (no config.json)")
    try:
        model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(source).eval()
        processor = transformers.AutoProcessor.from_pretrained(source)
    except OSError as exc:
        raise WeightsError(f"qwen2-vl: cannot load {source!r}: {exc}") from exc
    return model, processor
