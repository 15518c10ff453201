"""One decode step for several sequences at once (continuous batching).

Shared-layout decoder (``Engine.shared``): the sequences' slots are rows of one cache buffer per
cache tensor; the run binds the rows from the lowest to the highest of their slots, each row
with its own length (``seqlens_k``), and GroupQueryAttention appends each new key/value in place:
nothing is copied, whatever the context. Only the token embeddings and positions (one row per
sequence) and the logits move.

Concat-layout decoder (traced graphs, other runtimes): sequences past their prefill each wait with one token to decode. Their caches (of different
lengths) are copied left-padded into one [K, kv_heads, longest, head_dim] batch per cache tensor,
the attention mask hides the padding, each keeps its own M-RoPE position, and one run of the
decoder step computes all K tokens: the weights are read once for K tokens, which is what a
memory-bound decoder needs. The new keys/values are copied back into each sequence's own static
cache, and each sequence samples its token with its own settings. Batch buffers come from the
engine's memory pool and go back after the step.
"""

from __future__ import annotations

import numpy as np

from modelkiln.genai.engine import Engine, Generation, _bind, pair_of, slot_of


def decode_batch(engine: Engine, gens: list[Generation]) -> list[int]:
    """Advance every sequence in ``gens`` (all prefilled, none done) by one token; returns them.
    No sequence changes before the batched run succeeded (a failing run can be retried)."""
    if len(gens) == 1:
        return [gens[0].step()]
    if engine.shared:
        return _decode_shared(engine, gens)
    longest = max(g.cache.length for g in gens)
    pads = [longest - g.cache.length for g in gens]
    k, heads, dim = len(gens), engine.kv_heads, engine.head_dim
    mask = np.ones((k, longest + 1), np.int64)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    pool = engine.pool
    pasts = [pool.acquire((k, heads, longest, dim)) for _ in engine.past_names]
    presents = [pool.acquire((k, heads, longest + 1, dim)) for _ in engine.present_names]
    logits = pool.acquire((k, 1, engine.vocab))
    try:
        for i, name in enumerate(engine.past_names):
            for row, (g, pad) in enumerate(zip(gens, pads, strict=True)):
                pasts[i][row, :, :pad] = 0.0  # masked, but must be finite: 0 x NaN is NaN
                pasts[i][row, :, pad:] = pair_of(g).past()[name][0]
        binding = engine.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.concatenate([g._embeds for g in gens], axis=0))
        binding.bind_cpu_input("position_ids", np.concatenate([g._positions for g in gens], axis=1))
        binding.bind_cpu_input("attention_mask", mask)
        for name, past in zip(engine.past_names, pasts, strict=True):
            _bind(binding.bind_input, name, past)
        for name, present in zip(engine.present_names, presents, strict=True):
            _bind(binding.bind_output, name, present)
        _bind(binding.bind_output, "logits", logits)
        engine.session.run_with_iobinding(binding)
        tokens = []
        for row, (g, pad) in enumerate(zip(gens, pads, strict=True)):
            for target, present in zip(pair_of(g).present(1), presents, strict=True):
                target[0] = present[row, :, pad:]
            g.cache.advance(1)
            tokens.append(g.accept(logits[row, -1]))
        return tokens
    finally:
        for buf in (*pasts, *presents, logits):
            buf.release()


def _decode_shared(engine: Engine, gens: list[Generation]) -> list[int]:
    slots = [slot_of(g).slot for g in gens]
    rows = max(slots) - min(slots) + 1
    with engine.pool.acquire((rows, 1, engine.vocab)) as logits:
        first = engine.run_shared(gens, 1, logits)
        return [g.accept(logits[slot - first, -1]) for g, slot in zip(gens, slots, strict=True)]
