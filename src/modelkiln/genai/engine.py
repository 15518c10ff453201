"""The generation engine over the exported decoder step: prefill the prompt (text, or text with
image embeddings and M-RoPE positions), then one token per step with the KV cache fed back.

One ONNX Runtime session serves every sequence; a sequence (``Generation``) owns a static KV cache
and a logits buffer from the memory pool, bound with I/O binding, so a step allocates nothing.
``Generation.step()`` is the unit a scheduler interleaves; ``Engine.generate_from_embeds`` runs
one sequence to the end. Greedy or seeded temperature/top-p sampling, stop tokens, streaming.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelkiln.errors import BadInput
from modelkiln.genai.kv_cache import KVCache
from modelkiln.runtime.backends.base import ModelSource
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.runtime.memory_pool import MemoryPool, PooledArray, size_class

Embed = Callable[[np.ndarray], np.ndarray]  # token ids [n] -> embeddings [n, hidden]
#: ``IOBinding.bind_input`` / ``bind_output``: (name, device, device id, dtype, shape, pointer).
BindFn = Callable[[str, str, int, Any, list[int], int], None]


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise nucleus (top-p) sampling with a seeded generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise BadInput(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadInput(f"top_p must be in (0, 1], got {self.top_p}")


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


class Engine:
    """The decoder step session, the token embedding and the pool sequences take caches from."""

    def __init__(
        self, step: ModelSource, embed: Embed, pool: MemoryPool | None = None, threads: int | None = None
    ) -> None:
        self.backend = cpu_backend(step, threads=threads)
        #: The raw ONNX Runtime session: the KV cache is bound into it (I/O binding) in place.
        self.session: Any = self.backend.session
        self.embed = embed
        self.pool = pool or MemoryPool()
        inputs = self.backend.input_metadata
        self.past_names = [i.name for i in inputs[3:]]
        self.present_names = [n.replace("past", "present", 1) for n in self.past_names]
        name = self.backend.model_name
        self.kv_heads, self.head_dim = _static(inputs[3].shape[1], name), _static(inputs[3].shape[3], name)
        self.vocab = _static(self.backend.output_metadata[0].shape[-1], name)

    def sequence_bytes(self, capacity: int) -> int:
        """What a sequence of ``capacity`` positions (prompt + new tokens) takes from the pool
        for its whole life, as ``Generation`` allocates it: two full-capacity float32 buffers per
        cache tensor (KVCache's ping-pong) and the logits, each rounded up to the pool's size
        class. A memory budget reserves this much before the sequence starts. (A batched decode
        round also borrows buffers for its step, and gives them back when the step ends.)"""
        itemsize = np.dtype(np.float32).itemsize
        per_buffer = size_class(self.kv_heads * capacity * self.head_dim * itemsize)
        return 2 * len(self.past_names) * per_buffer + size_class(self.vocab * itemsize)

    def start(
        self,
        embeds: np.ndarray,
        positions: np.ndarray,
        delta: int,
        max_new_tokens: int,
        stop: set[int] | None = None,
        sampling: Sampling | None = None,
    ) -> Generation:
        """A sequence ready to run: prompt embeddings [seq, hidden], M-RoPE positions [3, seq]."""
        return Generation(
            self, embeds, positions, delta, max_new_tokens, stop or set(), sampling or Sampling()
        )

    def generate(
        self, input_ids: list[int], max_new_tokens: int, stop: set[int] | None = None, **kw: Any
    ) -> list[int]:
        """Continuation of a text prompt (text M-RoPE: the same index on all 3 axes)."""
        positions = np.broadcast_to(np.arange(len(input_ids), dtype=np.int64), (3, len(input_ids)))
        embeds = self.embed(np.asarray(input_ids, np.int64))
        return self.generate_from_embeds(embeds, positions, 0, max_new_tokens, stop, **kw)

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
        """Run one sequence to the end; ``on_token`` streams each token as it is chosen; a stop
        token ends generation and is returned last."""
        gen = self.start(embeds, positions, delta, max_new_tokens, stop, Sampling(temperature, top_p, seed))
        gen.run(on_token)
        return gen.tokens


class Generation:
    """One sequence in flight: its cache, its sampler, the tokens so far. Not thread-safe; a
    scheduler runs one ``step()`` of it at a time."""

    def __init__(
        self,
        engine: Engine,
        embeds: np.ndarray,
        positions: np.ndarray,
        delta: int,
        max_new_tokens: int,
        stop: set[int],
        sampling: Sampling,
    ) -> None:
        if max_new_tokens < 1:
            raise BadInput(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.engine, self.delta, self.stop, self.sampling = engine, delta, stop, sampling
        self.max_new_tokens = max_new_tokens
        self.rng = np.random.default_rng(sampling.seed)
        self.tokens: list[int] = []
        self.done = False
        self._closed = False
        capacity = embeds.shape[0] + max_new_tokens
        self.cache = KVCache(engine.pool, engine.past_names, engine.kv_heads, engine.head_dim, capacity)
        self.logits: PooledArray = engine.pool.acquire((1, 1, engine.vocab))
        self.mask = np.ones((1, capacity), np.int64)
        self._embeds = np.ascontiguousarray(embeds[None], np.float32)
        self._positions = np.ascontiguousarray(positions[:, None, :], np.int64)

    def step(self, force: int | None = None) -> int:
        """Prefill (first call) or decode one token; returns the token chosen, or ``force``
        (teacher forcing: the logits of this step stay readable in ``self.logits``)."""
        if self.done:
            raise RuntimeError("generation already finished")
        self._run(self._embeds.shape[1])
        return self.accept(self.logits[0, -1], force)

    def run(self, on_token: Callable[[int], None] | None = None) -> list[float]:
        """Step to the end, handing each token to ``on_token``, then give the buffers back;
        returns when each token was chosen (``time.perf_counter``), for TTFT and decode rates."""
        times: list[float] = []
        try:
            while not self.done:
                token = self.step()
                times.append(time.perf_counter())
                if on_token is not None:
                    on_token(token)
        finally:
            self.close()
        return times

    def accept(self, logits: np.ndarray, force: int | None = None) -> int:
        """Choose the next token from this step's ``logits`` [vocab] (or take ``force``) and get
        the next input ready; the cache must already hold this step's keys/values."""
        if force is None:
            token = pick(logits, self.sampling.temperature, self.sampling.top_p, self.rng)
        else:
            token = int(force)
        self.tokens.append(token)
        if token in self.stop or len(self.tokens) >= self.max_new_tokens:
            self.done = True
        else:
            self._embeds = np.ascontiguousarray(
                self.engine.embed(np.asarray([token], np.int64))[None], np.float32
            )
            self._positions = np.full((3, 1, 1), self.cache.length + self.delta, np.int64)
        return token

    def _run(self, new: int) -> None:
        engine, cache = self.engine, self.cache
        binding = engine.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", self._embeds)
        binding.bind_cpu_input("position_ids", self._positions)
        binding.bind_cpu_input("attention_mask", self.mask[:, : cache.length + new])
        for name, past in cache.past().items():
            _bind(binding.bind_input, name, past)
        for name, present in zip(engine.present_names, cache.present(new), strict=True):
            _bind(binding.bind_output, name, present)
        _bind(binding.bind_output, "logits", self.logits)
        engine.session.run_with_iobinding(binding)
        cache.advance(new)

    def close(self) -> None:
        """Give the cache and logits buffers back to the pool (idempotent)."""
        if not self._closed:
            self._closed = True
            self.cache.release()
            self.logits.release()
            self.done = True


def _bind(bind: BindFn, name: str, array: np.ndarray) -> None:
    """Bind a float32 CPU buffer by pointer: ONNX Runtime reads or writes it in place."""
    bind(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)


def _static(dim: int | str | None, step: str) -> int:
    """A dimension the decoder graph must fix (KV heads, head size, vocabulary)."""
    if not isinstance(dim, int):
        raise BadInput(f"{step}: expected a fixed KV-cache/vocabulary dimension, got {dim!r}")
    return dim
