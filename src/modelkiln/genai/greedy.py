"""A first text-only greedy loop over the exported decoder step: prefill the prompt, then one token
per step with the KV cache fed back. The reference the full engine (preallocated KV cache from
the memory pool, I/O binding, sampling, streaming, images) will be checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modelkiln.runtime.session import ort_session


class GreedyDecoder:
    def __init__(self, step: str | Path, embeddings: np.ndarray) -> None:
        self.session = ort_session(step)
        self.embeddings = embeddings  # [vocab, hidden] token embedding table
        names = [i.name for i in self.session.get_inputs()]
        self.past_names = names[3:]
        meta = self.session.get_inputs()[3]
        self.kv_heads, self.head_dim = meta.shape[1], meta.shape[3]

    def generate(self, input_ids: list[int], max_new_tokens: int, stop: set[int] | None = None) -> list[int]:
        """Greedy continuation of a text prompt (M-RoPE positions of text: the same index on all 3 axes)."""
        past = {n: np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}
        tokens = list(input_ids)
        new: list[int] = []
        feed_ids = tokens
        for _ in range(max_new_tokens):
            start = len(tokens) - len(feed_ids)
            positions = np.arange(start, len(tokens), dtype=np.int64)
            feed = {
                "inputs_embeds": self.embeddings[np.asarray(feed_ids)][None].astype(np.float32),
                "position_ids": np.broadcast_to(positions, (3, 1, positions.size)).copy(),
                "attention_mask": np.ones((1, len(tokens)), np.int64),
                **past,
            }
            logits, *present = self.session.run(None, feed)
            past = dict(zip(self.past_names, present, strict=True))
            token = int(logits[0, -1].argmax())
            new.append(token)
            tokens.append(token)
            feed_ids = [token]
            if stop and token in stop:
                break
        return new
