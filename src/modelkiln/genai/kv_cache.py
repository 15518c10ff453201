"""A static KV cache for one sequence: every cache tensor gets two buffers of full capacity
(prompt + max new tokens) from our memory pool when the sequence starts, and nothing is allocated
per token. Step k reads the past from one buffer and ONNX Runtime writes the present (past + new)
into the other through I/O binding; then they swap. (The decoder graph concatenates past and new,
so it cannot write in place; ping-pong buffers keep that graph portable.)"""

from __future__ import annotations

import numpy as np

from modelkiln.errors import BadInput
from modelkiln.runtime.memory_pool import MemoryPool, PooledArray


class KVCache:
    def __init__(
        self, pool: MemoryPool, names: list[str], kv_heads: int, head_dim: int, capacity: int
    ) -> None:
        self.names, self.kv_heads, self.head_dim, self.capacity = names, kv_heads, head_dim, capacity
        self.pool = pool
        shape = (kv_heads * capacity * head_dim,)
        self._buffers: list[list[PooledArray]] = [[pool.acquire(shape), pool.acquire(shape)] for _ in names]
        self._current = 0  # index of the buffer holding the past
        self.length = 0

    def _view(self, which: int, i: int, length: int) -> np.ndarray:
        flat = self._buffers[i][which].view(np.ndarray)
        return flat[: self.kv_heads * length * self.head_dim].reshape(1, self.kv_heads, length, self.head_dim)

    def past(self) -> dict[str, np.ndarray]:
        """The cached keys/values [1, kv_heads, length, head_dim], one view per cache tensor."""
        return {n: self._view(self._current, i, self.length) for i, n in enumerate(self.names)}

    def present(self, new: int) -> list[np.ndarray]:
        """Where the next step writes past + ``new`` positions (the other buffer of each pair)."""
        total = self.length + new
        if total > self.capacity:
            raise BadInput(f"KV cache: {total} positions exceed the capacity of {self.capacity}")
        return [self._view(1 - self._current, i, total) for i in range(len(self.names))]

    def advance(self, new: int) -> None:
        """The step that wrote ``present(new)`` ran: its buffers now hold the past."""
        self._current = 1 - self._current
        self.length += new

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for pair in self._buffers for b in pair)

    def release(self) -> None:
        for pair in self._buffers:
            for b in pair:
                b.release()
        self._buffers = []
