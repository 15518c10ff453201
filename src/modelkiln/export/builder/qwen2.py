"""The Qwen2-VL / Qwen2.5-VL language model as ONNX graphs built from its weights: the token
embedding, and the decoder step the generation engine runs (``zoo.qwen_vl.decoder_part``: the
same input/output names, dtypes, dynamic axes and KV-cache layout as the traced graph).

Both generations share this decoder (GQA with Q/K/V biases, M-RoPE, SwiGLU MLP, RMSNorm); only
their vision encoders differ, and those are still traced.

The step, per layer, in plain ONNX ops:
- RMSNorm; Q, K and V as one packed MatMul (+bias), split; heads to [B, heads, S, D];
- M-RoPE: the three position rows (temporal, height, width) pick their frequency bands once per
  step (a 0/1 band table times the inverse frequencies, summed over the three rows: exact), so
  every layer shares one cos/sin;
- the cache, in one of two layouts (``attention.py``): ``concat`` (default, the traced graph's
  interface): present = Concat(past, new) on the sequence axis, then attention without repeating
  K/V: the query heads sharing a KV head are stacked along the sequence axis ([B, kv, groups*S, D])
  and meet the cache once, as ``zoo.qwen_vl.grouped_attention`` does; the causal + padding mask
  (from ``attention_mask``, left padding allowed) is additive with float32's lowest value, as
  transformers' eager mask. ``shared``: ONNX Runtime's GroupQueryAttention reads and writes one
  buffer per cache tensor in place (rows = sequences, right-padded, ``seqlens_k``), so batched
  decode needs no copies;
- the output projection, residual; RMSNorm, gate and up as one packed MatMul, SiLU, down, residual.
Only the last position goes through the final norm and the LM head (logits [B, 1, vocab]).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto

from modelkiln.errors import ConfigError
from modelkiln.export.builder.attention import (
    CONCAT,
    SHARED,
    check_layout,
    grouped_query_attention,
    shared_io,
)
from modelkiln.export.builder.layers import Precision, linear, rms_norm, rotate
from modelkiln.export.builder.tensors import Tensors
from modelkiln.export.builder.writer import GraphWriter
from modelkiln.zoo.base import Part
from modelkiln.zoo.qwen_vl import decoder_part

log = logging.getLogger(__name__)

_DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class TextShape:
    """The decoder's sizes and rotary settings, read (and checked) from a transformers text config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    theta: float
    section: tuple[int, int, int]

    @classmethod
    def of(cls, text: Any) -> TextShape:
        """From ``config.text_config``; ConfigError for what this builder does not lay out."""
        heads = int(text.num_attention_heads)
        head_dim = int(text.hidden_size) // heads
        rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
        theta: Any = rope.get("rope_theta", getattr(text, "rope_theta", None))
        section: Any = rope.get("mrope_section")
        problems = []
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            problems.append(f"rope type {rope.get('rope_type')!r} (only the default M-RoPE is built)")
        if theta is None or section is None or len(section) != 3 or sum(section) * 2 != head_dim:
            problems.append(f"M-RoPE sections {section} for head size {head_dim} (theta {theta})")
        if getattr(text, "hidden_act", "silu") != "silu":
            problems.append(f"activation {text.hidden_act!r} (SiLU expected)")
        if any(t != "full_attention" for t in getattr(text, "layer_types", None) or ()):
            problems.append("sliding-window layers")
        if getattr(text, "head_dim", None) not in (None, head_dim):
            problems.append(f"head_dim {text.head_dim} != hidden / heads = {head_dim}")
        if problems:
            raise ConfigError(f"Qwen-VL graph builder: unsupported text config: {'; '.join(problems)}")
        return cls(
            hidden=int(text.hidden_size),
            layers=int(text.num_hidden_layers),
            heads=heads,
            kv_heads=int(text.num_key_value_heads),
            head_dim=head_dim,
            intermediate=int(text.intermediate_size),
            vocab=int(text.vocab_size),
            eps=float(text.rms_norm_eps),
            theta=float(theta),
            section=(int(section[0]), int(section[1]), int(section[2])),
        )

    def inv_freq(self) -> np.ndarray:
        """1 / theta^(2i/D) with transformers' own float32 arithmetic (torch's pow differs from
        numpy's by an ulp on some bands, and an ulp here is pos x ulp on every angle); numpy's
        float32 where torch is absent."""
        try:
            import torch
        except ImportError:
            exponent = np.arange(0, self.head_dim, 2).astype(np.float32) / np.float32(self.head_dim)
            return np.float32(1.0) / (np.float32(self.theta) ** exponent)
        ramp = torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim
        inv: np.ndarray = (1.0 / (self.theta**ramp)).numpy()
        return inv

    def band_table(self) -> np.ndarray:
        """[3, 1, 1, D/2]: inverse frequency j on the row (temporal, height, width) whose M-RoPE
        section holds j, 0 on the other two."""
        table = np.zeros((3, 1, 1, self.head_dim // 2), np.float32)
        start = 0
        for row, width in enumerate(self.section):
            table[row, 0, 0, start : start + width] = 1.0
            start += width
        banded: np.ndarray = table * self.inv_freq()
        return banded


def _io(g: GraphWriter, part: Part) -> None:
    for spec in part.inputs:
        g.input(spec.name, _DTYPES[spec.dtype], spec.shape)
    for spec in part.outputs:
        g.output(spec.name, _DTYPES[spec.dtype], spec.shape)


def build_embedding(
    text: Any,
    tensors: Tensors,
    folder: Path,
    file_name: str = "embed.onnx",
    precision: Precision = Precision.FP32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """input_ids [batch, seq] -> inputs_embeds [batch, seq, hidden]: one Gather (FP16: gathered
    from a float16 table, then widened; W8 keeps the table in float32, as the weight-only path)."""
    shape = TextShape.of(text)
    with GraphWriter("embed", folder, file_name) as g:
        g.input("input_ids", TensorProto.INT64, ("batch", "seq"))
        g.output("inputs_embeds", TensorProto.FLOAT, ("batch", "seq", shape.hidden))
        table = tensors.get("model.embed_tokens.weight")
        _check(table, (shape.vocab, shape.hidden), "model.embed_tokens.weight")
        if precision is Precision.FP16:
            stored = g.weight(table.astype(np.float16), "embed_tokens.weight")
            del table
            rows = g.op1("Gather", [stored, "input_ids"], axis=0)
            g.op1("Cast", [rows], "inputs_embeds", to=TensorProto.FLOAT)
        else:
            stored = g.weight(table, "embed_tokens.weight")
            del table
            g.op1("Gather", [stored, "input_ids"], "inputs_embeds", axis=0)
        return g.save(metadata)


def build_decoder(
    text: Any,
    tensors: Tensors,
    folder: Path,
    file_name: str = "decoder.onnx",
    precision: Precision = Precision.FP32,
    metadata: dict[str, str] | None = None,
    layers: int | None = None,
    block_size: int = 0,
    tie_word_embeddings: bool = False,
    kv_layout: str = CONCAT,
) -> Path:
    """The decoder step (``decoder_part``) of ``text``'s language model, weights from ``tensors``,
    into ``folder/file_name``. ``layers`` builds only the first few layers (a cheap check of a
    large checkpoint against a truncated reference). ``kv_layout``: ``concat`` (the traced
    graph's interface, any runtime) or ``shared`` (one in-place buffer per cache tensor through
    ONNX Runtime's GroupQueryAttention; see ``attention.py``)."""
    check_layout(kv_layout)
    shape = TextShape.of(text)
    n_layers = shape.layers if layers is None else min(layers, shape.layers)
    if n_layers != shape.layers:
        text = _with_layers(text, n_layers)
    with GraphWriter("decoder", folder, file_name) as g:
        if kv_layout == SHARED:
            shared_io(g, shape.hidden, n_layers, shape.kv_heads, shape.head_dim, shape.vocab)
        else:
            _io(g, decoder_part(text))
        step = _Step(g, shape, kv_layout == SHARED)
        x = "inputs_embeds"
        for i in range(n_layers):
            x = step.layer(x, i, tensors, precision, block_size)
            log.debug("decoder layer %d written (%.0f MB so far)", i, g.weight_bytes / 1e6)
        last = g.op1(
            "Slice",
            [
                x,
                g.const(np.array([-1], np.int64)),
                g.const(np.array([_INT64_MAX], np.int64)),
                g.const(np.array([1], np.int64)),
            ],
        )
        normed = rms_norm(g, last, tensors.get("model.norm.weight"), shape.eps, "norm")
        head_name = "lm_head.weight"
        if head_name not in tensors:
            if not tie_word_embeddings:
                raise ConfigError(
                    f"{tensors.source}: no lm_head.weight and the config does not tie it to the embedding"
                )
            head_name = "model.embed_tokens.weight"
        head = tensors.get(head_name)
        _check(head, (shape.vocab, shape.hidden), head_name)
        logits = linear(g, normed, "lm_head", [head], None, precision, block_size)
        del head
        g.op1("Identity", [logits], "logits")
        return g.save(metadata)


def _with_layers(text: Any, layers: int) -> Any:
    """A copy of the text config with fewer layers (the I/O of a truncated decoder)."""
    text = copy.copy(text)
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:layers]
    return text


def _check(w: np.ndarray, want: tuple[int, ...], name: str) -> None:
    if tuple(w.shape) != want:
        raise ConfigError(f"weight {name}: shape {tuple(w.shape)}, the config implies {want}")


class _Step:
    """The graph of one decoder step: per-step values (sizes, rotary, mask) built once, then layers."""

    def __init__(self, g: GraphWriter, s: TextShape, shared: bool = False) -> None:
        self.g, self.s, self.shared = g, s, shared
        self.groups = s.heads // s.kv_heads
        i64 = np.int64
        # M-RoPE: one angle per (batch, position, frequency); cos/sin [B, 1, S, D] (concat: heads
        # first) or [B, S, 1, D] (shared: GroupQueryAttention takes [B, S, heads*D])
        pos = g.op1(
            "Unsqueeze", [g.op1("Cast", ["position_ids"], to=TensorProto.FLOAT), g.const(np.array([-1], i64))]
        )
        angles = g.op1(
            "ReduceSum",
            [g.op1("Mul", [pos, g.const(s.band_table(), "mrope_bands")]), g.const(np.array([0], i64))],
            keepdims=0,
        )
        emb = g.op1("Concat", [angles, angles], axis=-1)
        axis1 = g.const(np.array([1], i64))
        heads_axis = g.const(np.array([2], i64)) if shared else axis1
        self.cos = g.op1("Unsqueeze", [g.op1("Cos", [emb]), heads_axis])
        half = s.head_dim // 2
        sign = np.concatenate([-np.ones(half, np.float32), np.ones(half, np.float32)])
        self.sin = g.op1(
            "Unsqueeze", [g.op1("Mul", [g.op1("Sin", [emb]), g.const(sign, "rotate_sign")]), heads_axis]
        )
        self.scaling = g.const(np.float32(s.head_dim**-0.5))
        if shared:
            return  # GroupQueryAttention masks by seqlens_k (causal, right padding)
        seq = g.op1("Shape", ["inputs_embeds"], start=1, end=2)  # [1]
        past = g.op1("Shape", ["past_key_0"], start=2, end=3)  # [1]
        total = g.op1("Add", [past, seq])
        # additive mask [B, 1, groups*S, T]: key t visible to query s when t <= past + s and unmasked
        scalar = g.const(np.array([0], i64))
        past0, total0 = g.op1("Squeeze", [past, scalar]), g.op1("Squeeze", [total, scalar])
        one = g.const(np.array(1, i64))
        keys = g.op1(
            "Unsqueeze", [g.op1("Range", [g.const(np.array(0, i64)), total0, one]), scalar]
        )  # [1, T]
        queries = g.op1("Unsqueeze", [g.op1("Range", [past0, total0, one]), axis1])  # [S, 1]
        causal = g.op1("LessOrEqual", [keys, queries])  # [S, T]
        given = g.op1("Slice", ["attention_mask", g.const(np.array([0], i64)), total, axis1])
        padding = g.op1("Unsqueeze", [g.op1("Cast", [given], to=TensorProto.BOOL), axis1])  # [B, 1, T]
        allowed = g.op1("And", [causal, padding])  # [B, S, T]
        lowest = np.float32(np.finfo(np.float32).min)
        additive = g.op1("Where", [allowed, g.const(np.float32(0.0)), g.const(lowest)])
        self.mask = g.op1(
            "Tile", [g.op1("Unsqueeze", [additive, axis1]), g.const(np.array([1, 1, self.groups, 1], i64))]
        )

    def _heads(self, x: str, heads: int) -> str:
        """[B, S, heads*D] -> [B, heads, S, D]."""
        g = self.g
        split = g.op1("Reshape", [x, g.const(np.array([0, 0, heads, self.s.head_dim], np.int64))])
        return g.op1("Transpose", [split], perm=[0, 2, 1, 3])

    def layer(self, x: str, i: int, t: Tensors, precision: Precision, block: int) -> str:
        g, s = self.g, self.s
        p = f"model.layers.{i}."
        d, kv = s.head_dim, s.kv_heads
        i64 = np.int64
        h = rms_norm(g, x, t.get(p + "input_layernorm.weight"), s.eps, f"layers.{i}.input_layernorm")
        qkv_w = [t.get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        qkv_b = np.concatenate([t.get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        for w, rows, n in zip(qkv_w, (s.heads * d, kv * d, kv * d), "qkv", strict=True):
            _check(w, (rows, s.hidden), p + f"self_attn.{n}_proj.weight")
        qkv = linear(g, h, f"layers.{i}.qkv", qkv_w, qkv_b, precision, block)
        del qkv_w
        q, k, v = g.op("Split", [qkv, g.const(np.array([s.heads * d, kv * d, kv * d], i64))], 3, axis=-1)
        if self.shared:
            merged = grouped_query_attention(
                g, self._rotated(q, s.heads), self._rotated(k, kv), v, i, s.heads, kv, d
            )
        else:
            merged = self._concat_attention(q, k, v, i)
        return self._rest(x, merged, i, t, precision, block)

    def _rotated(self, x: str, heads: int) -> str:
        """[B, S, heads*D] rotated in place of its heads ([B, S, heads, D] against cos [B, S, 1, D])."""
        g, d = self.g, self.s.head_dim
        split = g.op1("Reshape", [x, g.const(np.array([0, 0, heads, d], np.int64))])
        rotated = rotate(g, split, self.cos, self.sin, d // 2)
        return g.op1("Reshape", [rotated, g.const(np.array([0, 0, heads * d], np.int64))])

    def _concat_attention(self, q: str, k: str, v: str, i: int) -> str:
        g, s = self.g, self.s
        d, kv = s.head_dim, s.kv_heads
        i64 = np.int64
        q = rotate(g, self._heads(q, s.heads), self.cos, self.sin, d // 2)
        k = rotate(g, self._heads(k, kv), self.cos, self.sin, d // 2)
        keys = g.op1("Concat", [f"past_key_{i}", k], f"present_key_{i}", axis=2)
        values = g.op1("Concat", [f"past_value_{i}", self._heads(v, kv)], f"present_value_{i}", axis=2)
        stacked = g.op1("Reshape", [q, g.const(np.array([0, kv, -1, d], i64))])  # [B, kv, groups*S, D]
        scores = g.op1(
            "Mul", [g.op1("MatMul", [stacked, g.op1("Transpose", [keys], perm=[0, 1, 3, 2])]), self.scaling]
        )
        probs = g.op1("Softmax", [g.op1("Add", [scores, self.mask])], axis=-1)
        attn = g.op1(
            "Reshape", [g.op1("MatMul", [probs, values]), g.const(np.array([0, s.heads, -1, d], i64))]
        )
        merged = g.op1(
            "Reshape",
            [g.op1("Transpose", [attn], perm=[0, 2, 1, 3]), g.const(np.array([0, 0, s.heads * d], i64))],
        )
        return merged

    def _rest(self, x: str, merged: str, i: int, t: Tensors, precision: Precision, block: int) -> str:
        """The output projection, residual, and the MLP block."""
        g, s = self.g, self.s
        p = f"model.layers.{i}."
        i64 = np.int64
        o_w = t.get(p + "self_attn.o_proj.weight")
        x = g.op1("Add", [x, linear(g, merged, f"layers.{i}.o_proj", [o_w], None, precision, block)])
        del o_w
        h = rms_norm(
            g, x, t.get(p + "post_attention_layernorm.weight"), s.eps, f"layers.{i}.post_attention_layernorm"
        )
        gu_w = [t.get(p + "mlp.gate_proj.weight"), t.get(p + "mlp.up_proj.weight")]
        gate_up = linear(g, h, f"layers.{i}.gate_up", gu_w, None, precision, block)
        del gu_w
        gate, up = g.op(
            "Split", [gate_up, g.const(np.array([s.intermediate, s.intermediate], i64))], 2, axis=-1
        )
        act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
        down_w = [t.get(p + "mlp.down_proj.weight")]
        down = linear(g, act, f"layers.{i}.down_proj", down_w, None, precision.heavy_tailed_input(), block)
        return g.op1("Add", [x, down])
