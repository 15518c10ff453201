"""Generation over the exported decoder step: prefill the prompt (text, or text and image
embeddings with M-RoPE positions), then one token per step with the KV cache fed back; greedy or
seeded top-p sampling, stop tokens, streaming callback; with a MemoryPool, cache buffers come from
the pool through I/O binding. (A static preallocated cache is still to come.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.runtime.backends.onnxruntime import OrtBackend, OrtOptions
from modelkiln.runtime.memory_pool import MemoryPool, PooledArray
from modelkiln.runtime.session import ort_session


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when ``temperature`` is 0; else sample from the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling)."""
    if temperature <= 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(keep[rng.choice(len(keep), p=q)])


class GreedyDecoder:
    """``pool``: run with I/O binding, logits and present keys/values written into memory-pool
    buffers; the previous step's cache goes back to the pool after each step, so a generation
    reuses a handful of buffers instead of allocating per token."""

    def __init__(self, step: str | Path, embeddings: np.ndarray, pool: MemoryPool | None = None) -> None:
        self.embeddings = embeddings  # [vocab, hidden] token embedding table
        self.pool = pool
        self.backend = (
            OrtBackend.load(step, OrtOptions(io_binding=True, memory_pool=pool)) if pool is not None else None
        )
        self.session = self.backend.session if self.backend is not None else ort_session(step)
        names = [i.name for i in self.session.get_inputs()]
        self.past_names = names[3:]
        meta = self.session.get_inputs()[3]
        self.kv_heads, self.head_dim = meta.shape[1], meta.shape[3]

    def generate(
        self, input_ids: list[int], max_new_tokens: int, stop: set[int] | None = None, **sampling: Any
    ) -> list[int]:
        """Continuation of a text prompt (text M-RoPE: the same index on all 3 axes)."""
        positions = np.broadcast_to(np.arange(len(input_ids), dtype=np.int64), (3, len(input_ids)))
        return self.generate_from_embeds(
            self.embeddings[np.asarray(input_ids)], positions, 0, max_new_tokens, stop, **sampling
        )

    def generate_from_embeds(
        self,
        embeds: np.ndarray,
        positions: np.ndarray,
        delta: int,
        max_new_tokens: int,
        stop: set[int] | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Continuation of a prompt given as embeddings [seq, hidden] with M-RoPE positions
        [3, seq] (images already merged in); decode positions are sequence index + ``delta``.
        ``temperature`` 0 is greedy; otherwise top-p sampling with ``seed``. ``on_token`` streams
        each token as it is chosen; a stop token ends generation and is returned last."""
        rng = np.random.default_rng(seed)
        past = {n: np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}
        length = embeds.shape[0]
        feed_embeds, feed_pos = embeds[None].astype(np.float32), positions[:, None, :].astype(np.int64)
        new: list[int] = []
        for _ in range(max_new_tokens):
            feed = {
                "inputs_embeds": feed_embeds,
                "position_ids": np.ascontiguousarray(feed_pos),
                "attention_mask": np.ones((1, length), np.int64),
                **past,
            }
            logits, present = self._run(feed)
            self._release(past.values())
            past = dict(zip(self.past_names, present, strict=True))
            token = pick(logits[0, -1], temperature, top_p, rng)
            self._release([logits])
            new.append(token)
            if on_token is not None:
                on_token(token)
            if stop and token in stop:
                break
            feed_embeds = self.embeddings[[token]][None].astype(np.float32)
            feed_pos = np.full((3, 1, 1), length + delta, np.int64)
            length += 1
        self._release(past.values())
        return new

    def _run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        if self.backend is None:
            logits, *present = self.session.run(None, feed)
            return logits, present
        out = self.backend.infer(feed)
        return out["logits"], [out[n.replace("past", "present", 1)] for n in self.past_names]

    @staticmethod
    def _release(arrays) -> None:
        for a in arrays:
            if isinstance(a, PooledArray):
                a.release()
