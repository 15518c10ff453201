"""The generation engine over the exported decoder step: prefill the prompt (text, or text with
image embeddings and M-RoPE positions), then one token per step with the KV cache fed back.

One ONNX Runtime session serves every sequence; a sequence (``Generation``) owns a static KV cache
and a logits buffer from the memory pool, bound with I/O binding, so a step allocates nothing.
Two cache layouts, told apart by the decoder's inputs: ``concat`` (the traced graph's: past and
present are separate tensors, two ping-pong buffers per sequence, ``KVCache``) and ``shared``
(a ``seqlens_k`` input: GroupQueryAttention updates one buffer in place; a sequence holds a slot
of the engine's ``SharedKV`` and batched steps bind the slots' rows, no copies).
``Generation.step()`` is the unit a scheduler interleaves; ``Engine.generate_from_embeds`` runs
one sequence to the end. Greedy or seeded temperature/top-p sampling, stop tokens, streaming.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelkiln.errors import BadInput
from modelkiln.genai.kv_cache import PAGE, KVCache, SharedKV
from modelkiln.runtime.backends.base import ModelSource
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.runtime.memory_pool import MemoryPool, PooledArray, size_class

Embed = Callable[[np.ndarray], np.ndarray]  # token ids [n] -> embeddings [n, hidden]
#: ``IOBinding.bind_input`` / ``bind_output``: (name, device, device id, dtype, shape, pointer).
BindFn = Callable[[str, str, int, Any, list[int], int], None]
#: The input that marks a shared-buffer decoder step (export/builder/attention.py).
SEQLENS = "seqlens_k"
TOTAL = "total_sequence_length"
#: Slots and positions per slot of a shared cache until ``Engine.configure`` says otherwise (its
#: buffers are virtual memory: only the pages sequences write cost memory).
DEFAULT_SLOTS = 8
DEFAULT_CAPACITY = 1024


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
        self,
        step: ModelSource,
        embed: Embed,
        pool: MemoryPool | None = None,
        threads: int | None = None,
        slots: int | None = None,
        capacity: int | None = None,
    ) -> None:
        """``slots`` / ``capacity``: sequences and positions per sequence of the shared cache
        (shared-layout graphs only; ``configure`` can change them while no sequence runs)."""
        self.backend = cpu_backend(step, threads=threads)
        #: The raw ONNX Runtime session: the KV cache is bound into it (I/O binding) in place.
        self.session: Any = self.backend.session
        self.embed = embed
        self.pool = pool or MemoryPool()
        inputs = self.backend.input_metadata
        names = [i.name for i in inputs]
        #: The graph updates one cache buffer in place (GroupQueryAttention) instead of Concat.
        self.shared = SEQLENS in names
        past = [i for i in inputs if i.name.startswith("past_")]
        self.past_names = [i.name for i in past]
        self.present_names = [n.replace("past", "present", 1) for n in self.past_names]
        name = self.backend.model_name
        if not past:
            raise BadInput(f"{name}: a decoder step needs past_key/value inputs, got {names}")
        self.kv_heads, self.head_dim = _static(past[0].shape[1], name), _static(past[0].shape[3], name)
        self.hidden = _static(inputs[0].shape[-1], name)
        self.vocab = _static(self.backend.output_metadata[0].shape[-1], name)
        self.slots = slots or DEFAULT_SLOTS
        self.capacity = capacity
        #: The shared cache (made at the first sequence); runs that bind it hold ``lock``.
        self.kv: SharedKV | None = None
        self.lock = threading.RLock()

    def configure(self, slots: int | None = None, capacity: int | None = None) -> None:
        """Slots (sequences at once) and positions per slot of the shared cache; takes effect now
        when no sequence holds a slot, else when the cache is next remade."""
        with self.lock:
            self.slots = slots or self.slots
            self.capacity = capacity or self.capacity
            if self.kv is not None and self.kv.in_use == 0:
                self.kv.close()
                self.kv = None

    def shared_cache(self, need: int) -> SharedKV:
        """The shared cache, made (or remade larger while no sequence holds a slot) to hold
        ``need`` positions per slot."""
        with self.lock:
            kv = self.kv
            if kv is not None and kv.in_use == 0 and (need > kv.capacity or kv.slots != self.slots):
                kv.close()
                kv = None
            if kv is None:
                capacity = max(need, self.capacity or DEFAULT_CAPACITY)
                kv = self.kv = SharedKV(self.past_names, self.kv_heads, self.head_dim, self.slots, capacity)
            return kv

    def sequence_bytes(self, capacity: int) -> int:
        """What a sequence of ``capacity`` positions (prompt + new tokens) holds for its whole
        life, as ``Generation`` allocates it, so a memory budget reserves exactly this before it
        starts. Concat layout: two full-capacity float32 buffers per cache tensor from the pool
        (KVCache's ping-pong), each rounded up to the pool's size class. Shared layout: the pages
        its positions fill in its slot, once (written in place). Both: the logits buffer. (A
        batched decode round also borrows a logits buffer for its step and gives it back.)"""
        itemsize = np.dtype(np.float32).itemsize
        logits = size_class(self.vocab * itemsize)
        if self.shared:
            row = self.head_dim * itemsize
            return len(self.past_names) * self.kv_heads * (-(-capacity * row // PAGE) * PAGE) + logits
        per_buffer = size_class(self.kv_heads * capacity * self.head_dim * itemsize)
        return 2 * len(self.past_names) * per_buffer + logits

    def run_shared(self, gens: list[Generation], new: int, logits: np.ndarray) -> int:
        """One run of a shared-layout step for ``gens`` (each with ``new`` positions to add; more
        than one position only for a sequence alone): binds the rows of the slots from the lowest
        to the highest of theirs, in place; returns that lowest slot (row r of ``logits``
        [rows, 1, vocab] is slot lowest + r). Rows between that hold no sequence of ``gens`` run
        one dummy position written where their own next step writes (or into a free slot), so they
        are left as they were. On success each sequence's slot has advanced by ``new`` (under the
        lock, so a concurrent step never reads a stale length); on failure nothing changed but
        positions past every sequence's length."""
        kv = self.kv
        if kv is None:
            raise RuntimeError("shared KV cache: no sequence holds a slot")
        slots = [slot_of(g).slot for g in gens]
        first, last = min(slots), max(slots)
        rows = last - first + 1
        if new > 1 and len(gens) > 1:
            raise BadInput(f"shared KV cache: {new} new positions for {len(gens)} sequences at once")
        for g in gens:
            if g.cache.length + new > g.cache.capacity:
                raise BadInput(
                    f"KV cache: {g.cache.length + new} positions exceed the capacity of {g.cache.capacity}"
                )
        with self.lock:
            if len(gens) == 1:
                g = gens[0]
                embeds, positions = g._embeds, g._positions
                seqlens = np.array([g.cache.length + new - 1], np.int32)
            else:
                embeds = np.zeros((rows, 1, self.hidden), np.float32)
                positions = np.zeros((3, rows, 1), np.int64)
                seqlens = np.array(
                    [min(kv.lengths[s], kv.capacity - 1) for s in range(first, last + 1)], np.int32
                )
                for g in gens:
                    r = slot_of(g).slot - first
                    embeds[r] = g._embeds[0]
                    positions[:, r] = g._positions[:, 0]
                    seqlens[r] = g.cache.length
            total = int(seqlens.max()) + 1
            if total > kv.capacity:
                raise BadInput(f"KV cache: {total} positions exceed the capacity of {kv.capacity}")
            binding = self.session.io_binding()
            binding.bind_cpu_input("inputs_embeds", embeds)
            binding.bind_cpu_input("position_ids", positions)
            binding.bind_cpu_input(SEQLENS, seqlens)
            binding.bind_cpu_input(TOTAL, np.array(total, np.int32))
            for past, present, buf in zip(
                self.past_names, self.present_names, kv.rows(first, last), strict=True
            ):
                _bind(binding.bind_input, past, buf)
                _bind(binding.bind_output, present, buf)
            _bind(binding.bind_output, "logits", logits)
            self.session.run_with_iobinding(binding)
            for g in gens:
                g.cache.advance(new)
        return first

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
        self.cache: KVCache | Slot
        if engine.shared:
            self.cache = Slot(engine.shared_cache(capacity), capacity)
        else:
            self.cache = KVCache(engine.pool, engine.past_names, engine.kv_heads, engine.head_dim, capacity)
        try:
            self.logits: PooledArray = engine.pool.acquire((1, 1, engine.vocab))
        except BaseException:
            self.cache.release()
            raise
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
        if isinstance(cache, Slot):
            engine.run_shared([self], new, self.logits)
            return
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


class Slot:
    """A sequence's slot (one row of every buffer) of an engine's ``SharedKV``."""

    def __init__(self, kv: SharedKV, capacity: int) -> None:
        self.kv, self.capacity = kv, capacity
        self.slot = kv.acquire(capacity)
        self._held = True

    @property
    def length(self) -> int:
        return self.kv.lengths[self.slot]

    def advance(self, new: int) -> None:
        """A step wrote ``new`` positions into this slot (``Engine.run_shared``, under its lock)."""
        self.kv.lengths[self.slot] += new

    def release(self) -> None:
        if self._held:
            self._held = False
            self.kv.release(self.slot)


def slot_of(gen: Generation) -> Slot:
    """The slot of a sequence of a shared-layout engine."""
    if not isinstance(gen.cache, Slot):
        raise TypeError("this sequence's cache is a ping-pong pair (concat-layout decoder), not a slot")
    return gen.cache


def pair_of(gen: Generation) -> KVCache:
    """The ping-pong cache of a sequence of a concat-layout engine."""
    if not isinstance(gen.cache, KVCache):
        raise TypeError("this sequence's cache is a slot of a shared buffer, not a ping-pong pair")
    return gen.cache


def _bind(bind: BindFn, name: str, array: np.ndarray) -> None:
    """Bind a float32 CPU buffer by pointer: ONNX Runtime reads or writes it in place."""
    bind(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)


def _static(dim: int | str | None, step: str) -> int:
    """A dimension the decoder graph must fix (KV heads, head size, vocabulary)."""
    if not isinstance(dim, int):
        raise BadInput(f"{step}: expected a fixed KV-cache/vocabulary dimension, got {dim!r}")
    return dim
