"""The KV-cache layouts a built decoder step can have, and what each asks of its caller.

``concat`` (the traced graph's): ``present = Concat(past, new)``; the caller keeps two buffers
per cache tensor and swaps them (or copies), and batches by left padding with an
``attention_mask``. Any runtime runs it.

``shared``: ONNX Runtime's ``com.microsoft.GroupQueryAttention`` (CPU kernel, float32) reads the
past and writes the new keys/values into the SAME buffer ``[rows, kv, capacity, d]`` when past
and present are bound to one pointer (the kernel's share-buffer mode: it compares the two
pointers). Each row is one sequence, right-padded: ``seqlens_k[b]`` is its total length - 1
after this step, so the step writes its ``S`` new positions at ``seqlens_k[b] + 1 - S`` and
attends causally to ``[0, seqlens_k[b] + 1)``; ``total_sequence_length`` is the longest total
(``S`` = total is a first prompt; ``S`` > 1 on a cache is a chunk). Rows of different lengths
need no padding or copies, so many sequences decode in one run from one buffer. M-RoPE is applied
to q/k before the op (``do_rotary=0``): GQA's own rotary is 1-D.

The engine tells the layouts apart by the graph's inputs (``seqlens_k`` present or not).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from modelkiln.errors import ConfigError
from modelkiln.export.builder.writer import GraphWriter

CONCAT = "concat"
SHARED = "shared"
LAYOUTS = (CONCAT, SHARED)
#: The input that marks a shared-buffer decoder step.
SEQLENS = "seqlens_k"
TOTAL = "total_sequence_length"


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ConfigError(f"KV-cache layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return layout


def cache_names(layers: int) -> list[str]:
    return [f"{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def shared_io(g: GraphWriter, hidden: int, layers: int, kv_heads: int, head_dim: int, vocab: int) -> None:
    """Inputs and outputs of a shared-buffer decoder step (past and present have one shape: the
    caller binds both to one buffer)."""
    g.input("inputs_embeds", TensorProto.FLOAT, ("batch", "seq", hidden))
    g.input("position_ids", TensorProto.INT64, (3, "batch", "seq"))
    g.input(SEQLENS, TensorProto.INT32, ("batch",))
    g.input(TOTAL, TensorProto.INT32, ())
    cache = ("batch", kv_heads, "capacity", head_dim)
    names = cache_names(layers)
    for n in names:
        g.input(f"past_{n}", TensorProto.FLOAT, cache)
    g.output("logits", TensorProto.FLOAT, ("batch", 1, vocab))
    for n in names:
        g.output(f"present_{n}", TensorProto.FLOAT, cache)


def grouped_query_attention(
    g: GraphWriter, q: str, k: str, v: str, layer: int, heads: int, kv_heads: int, head_dim: int
) -> str:
    """q [B, S, heads*D], k/v [B, S, kv*D] (rotary already applied) -> [B, S, heads*D]; the
    layer's cache is read and written in place."""
    out, _, _ = g.op(
        "GroupQueryAttention",
        [q, k, v, f"past_key_{layer}", f"past_value_{layer}", SEQLENS, TOTAL],
        [g.fresh("attention"), f"present_key_{layer}", f"present_value_{layer}"],
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv_heads,
        scale=float(np.float32(head_dim**-0.5)),
        do_rotary=0,
    )
    # ONNX's shape inference does not know com.microsoft ops: a no-op Reshape gives the rest of
    # the layer its rank and width back (graph passes and quantization check shapes downstream)
    # (the output has q's shape)
    return g.op1("Reshape", [out, g.op1("Shape", [q])])


def shared_feed(feed: dict[str, np.ndarray], capacity: int | None = None) -> dict[str, np.ndarray]:
    """A concat-layout feed (past [B, kv, P, d], ``attention_mask`` of ones) as the shared
    layout's: each past copied into a [B, kv, capacity, d] buffer, ``seqlens_k`` = P + S - 1.
    For parity checks of a shared graph against references fed the concat way (no padding)."""
    mask = feed["attention_mask"]
    if not np.all(mask == 1):
        raise ConfigError("shared_feed: left-padded concat feeds have no shared-layout equivalent")
    batch, seq = feed["inputs_embeds"].shape[:2]
    total = mask.shape[1]
    capacity = capacity or total
    out = {"inputs_embeds": feed["inputs_embeds"], "position_ids": feed["position_ids"]}
    out[SEQLENS] = np.full((batch,), total - 1, np.int32)
    out[TOTAL] = np.array(total, np.int32)
    for name, past in feed.items():
        if name.startswith("past_"):
            buf = np.zeros((*past.shape[:2], capacity, past.shape[3]), np.float32)
            buf[:, :, : past.shape[2]] = past
            out[name] = buf
    del seq
    return out
