"""Qwen2-VL decoder step to ONNX: one graph for prefill and decode.

    inputs_embeds [batch, seq, hidden], position_ids [3, batch, seq] (M-RoPE: temporal, height,
    width), attention_mask [batch, past + seq] (int64), past_key_i / past_value_i
    [batch, kv_heads, past, head_dim]  ->  logits [batch, 1, vocab] (of the last position only: a
    prefill of a long prompt never computes seq x vocab logits it would throw away),
    present_key_i / present_value_i [batch, kv_heads, past + seq, head_dim]

Also the token embedding (input_ids -> inputs_embeds, a Gather). ``kiln export qwen2-vl-tiny``
writes these and the vision encoder per image bucket through the zoo family (with the parity
check); the two functions here export the text graphs of any (e.g. resized) model alone, for
benchmarks and tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln._deps import require
from modelkiln.zoo.qwen_vl import decoder_step_module


@dataclass(frozen=True)
class StepSpec:
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def input_names(self) -> list[str]:
        past = [f"past_{kv}_{i}" for i in range(self.layers) for kv in ("key", "value")]
        return ["inputs_embeds", "position_ids", "attention_mask", *past]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *[f"present_{kv}_{i}" for i in range(self.layers) for kv in ("key", "value")]]


def step_spec(model: Any) -> StepSpec:
    cfg = model.model.language_model.config
    return StepSpec(
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_key_value_heads,
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        cfg.vocab_size,
    )


def example_step_inputs(
    spec: StepSpec, batch: int = 1, seq: int = 5, past: int = 3, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (3, batch, seq)).copy()
    feed = {
        "inputs_embeds": rng.standard_normal((batch, seq, spec.hidden)).astype(np.float32),
        "position_ids": pos,
        "attention_mask": np.ones((batch, past + seq), np.int64),
    }
    for name in spec.input_names[3:]:
        feed[name] = rng.standard_normal((batch, spec.kv_heads, past, spec.head_dim)).astype(np.float32)
    return feed


def export_decoder_step(model: Any, path: str | Path, opset: int = 17) -> StepSpec:
    """Write the decoder step of a transformers Qwen2-VL model to ``path``."""
    torch = require("torch", "exporting the Qwen2-VL decoder step")
    spec = step_spec(model)
    example = example_step_inputs(spec)
    dynamic: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "seq"},
        "position_ids": {1: "batch", 2: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "logits": {0: "batch"},
    }
    dynamic.update({n: {0: "batch", 2: "past"} for n in spec.input_names[3:]})
    dynamic.update({n: {0: "batch", 2: "total"} for n in spec.output_names[1:]})
    with torch.no_grad():
        torch.onnx.export(
            decoder_step_module(model),
            tuple(torch.from_numpy(example[n]) for n in spec.input_names),
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    return spec


def export_embed(model: Any, path: str | Path, opset: int = 17) -> int:
    """The token embedding: input_ids [batch, seq] int64 -> inputs_embeds [batch, seq, hidden].
    Returns the vocabulary size."""
    torch = require("torch", "exporting the Qwen2-VL token embedding")
    table = model.model.language_model.embed_tokens
    with torch.no_grad():
        torch.onnx.export(
            table,
            (torch.zeros((1, 4), dtype=torch.int64),),
            str(path),
            input_names=["input_ids"],
            output_names=["inputs_embeds"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}},
            opset_version=opset,
            dynamo=False,
        )
    return int(table.num_embeddings)
