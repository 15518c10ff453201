"""A static KV cache for one sequence: every cache tensor gets two buffers of full capacity
(prompt + max new tokens) from our memory pool when the sequence starts, and nothing is allocated
per token. Step k reads the past from one buffer and ONNX Runtime writes the present (past + new)
into the other through I/O binding; then they swap. (The decoder graph concatenates past and new,
so it cannot write in place; ping-pong buffers keep that graph portable.)

A shared-buffer decoder step (GroupQueryAttention, ``kv_layout="shared"``) writes in place: its
sequences hold slots of one ``SharedKV`` instead, one buffer, and batch without copies."""

from __future__ import annotations

import math
import mmap
import threading

import numpy as np

from modelkiln.errors import BadInput, PoolExhausted
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


#: Linux's page: a slot's rows start on a page so that its pages are its own (given back on release).
PAGE = mmap.PAGESIZE


def slot_capacity(capacity: int, head_dim: int) -> int:
    """``capacity`` rounded up so that one head's rows of one slot fill whole pages."""
    row = head_dim * np.dtype(np.float32).itemsize
    per_page = PAGE // math.gcd(PAGE, row)  # positions whose rows end on a page boundary
    return -(-capacity // per_page) * per_page


class SharedKV:
    """The batched cache of a shared-buffer decoder step (``export/builder/attention.py``): one
    buffer ``[slots, kv_heads, capacity, head_dim]`` per cache tensor, read and written in place by
    ONNX Runtime. A sequence holds one slot (one row of every buffer) for its life; a batched step
    binds the rows of its sequences' slots (a contiguous range), so no cache is ever copied.

    The buffers are anonymous memory maps: a page costs memory only once a step writes into it, and
    a released slot's pages go back to the system (``madvise(MADV_DONTNEED)``), so what a sequence
    holds is exactly the pages its positions fill (``slot_bytes``), never the whole buffer."""

    def __init__(self, names: list[str], kv_heads: int, head_dim: int, slots: int, capacity: int) -> None:
        if slots < 1 or capacity < 1:
            raise BadInput(f"shared KV cache: slots and capacity must be >= 1, got {slots}, {capacity}")
        self.names, self.kv_heads, self.head_dim = names, kv_heads, head_dim
        self.slots, self.capacity = slots, slot_capacity(capacity, head_dim)
        self.slot_stride = kv_heads * self.capacity * head_dim * np.dtype(np.float32).itemsize
        self._maps = [mmap.mmap(-1, slots * self.slot_stride) for _ in names]
        self.buffers = [
            np.frombuffer(m, np.float32).reshape(slots, kv_heads, self.capacity, head_dim) for m in self._maps
        ]
        self.lengths = [0] * slots
        self._free = list(range(slots))
        self._lock = threading.Lock()

    def slot_bytes(self, capacity: int) -> int:
        """The most a sequence of ``capacity`` positions holds: the pages its positions fill, in
        every head of every cache tensor (no second buffer: the step writes in place)."""
        row = self.head_dim * np.dtype(np.float32).itemsize
        return len(self.names) * self.kv_heads * (-(-capacity * row // PAGE) * PAGE)

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def acquire(self, capacity: int) -> int:
        """The lowest free slot (keeps busy slots packed, so batches are short contiguous ranges)."""
        if capacity > self.capacity:
            raise BadInput(
                f"KV cache: {capacity} positions exceed the shared cache's capacity of {self.capacity}"
            )
        with self._lock:
            if not self._free:
                raise PoolExhausted(f"KV cache: all {self.slots} slots hold a sequence")
            slot = min(self._free)
            self._free.remove(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        """Give ``slot`` back, its pages to the system."""
        offset = slot * self.slot_stride
        for m in self._maps:
            m.madvise(mmap.MADV_DONTNEED, offset, self.slot_stride)
        with self._lock:
            self.lengths[slot] = 0
            if slot not in self._free:
                self._free.append(slot)

    def rows(self, first: int, last: int) -> list[np.ndarray]:
        """Slots ``first..last`` of every cache tensor: contiguous [rows, kv, capacity, d] views."""
        return [b[first : last + 1] for b in self.buffers]

    def close(self) -> None:
        """Unmap the buffers (left to the garbage collector while a view of them lives)."""
        self.buffers = []
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass
        self._maps = []
