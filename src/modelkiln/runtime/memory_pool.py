"""Our memory pool: reusable 64-byte-aligned numpy buffers in size classes, with a byte limit.

Steady-state inference acquires the same shapes again and again; handing back a cached buffer
avoids page faults and allocator churn. Size classes (powers of two from 256 B, then 1/4 steps
between powers) bound waste at 25 %. Every buffer handed out is recorded, so releasing one twice,
or releasing an array the pool never gave, is an error rather than silent corruption.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from modelkiln.errors import BadRelease, PoolExhausted

ALIGNMENT = 64
_MIN_CLASS = 256


def size_class(nbytes: int) -> int:
    """Smallest class >= nbytes: powers of two up to 4 KiB, then quarter steps between powers."""
    if nbytes <= _MIN_CLASS:
        return _MIN_CLASS
    power = 1 << (nbytes - 1).bit_length()
    if power <= 4096:
        return power
    step = power // 8  # classes: 5/8, 6/8, 7/8, 8/8 of the next power
    return -(-nbytes // step) * step


class PooledArray(np.ndarray):
    """An ndarray handed out by a MemoryPool; ``with`` (or ``release()``) gives it back.

    Views and ufunc results are plain ndarrays, so only the array the pool handed out can be
    released.
    """

    _kiln_pool: MemoryPool | None
    _kiln_block: np.ndarray | None
    _kiln_released: bool

    def __array_finalize__(self, obj: Any) -> None:
        self._kiln_pool = None
        self._kiln_block = None
        self._kiln_released = False

    def __array_wrap__(self, obj: np.ndarray, context: Any = None, return_scalar: bool = False) -> Any:
        if return_scalar:
            return obj[()]
        return obj.view(np.ndarray) if isinstance(obj, np.ndarray) else obj

    def release(self) -> None:
        if self._kiln_released:
            raise BadRelease("array released twice")
        if self._kiln_pool is None:
            raise BadRelease("this array was not handed out by a memory pool (or is a view of one)")
        self._kiln_pool.release(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class MemoryStats:
    hits: int
    misses: int
    in_use_bytes: int
    cached_bytes: int
    peak_bytes: int  # peak of in-use + cached: what the pool held from the system
    limit_bytes: int | None
    outstanding: int


class MemoryPool:
    """Thread-safe pool of aligned buffers; ``limit_bytes`` caps what it holds (in use + cached)."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[np.ndarray]] = {}
        self._out: dict[int, tuple[np.ndarray, int]] = {}  # id(block) -> (block, class size)
        self._hits = self._misses = self._in_use = self._cached = self._peak = 0

    def acquire(self, shape: tuple[int, ...] | int, dtype: Any = np.float32) -> PooledArray:
        """An uninitialised array of ``shape``/``dtype`` on a 64-byte boundary."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        cls = size_class(max(nbytes, 1))
        with self._lock:
            free = self._free.get(cls)
            if free:
                block = free.pop()
                self._hits += 1
                self._cached -= cls
            else:
                block = self._allocate(cls)
                self._misses += 1
            self._in_use += cls
            self._peak = max(self._peak, self._in_use + self._cached)
            self._out[id(block)] = (block, cls)  # holding the block keeps its id unique while out
        array = PooledArray(shape, dtype, buffer=block)  # one array object, no intermediate views
        array._kiln_pool, array._kiln_block = self, block
        return array

    def _allocate(self, cls: int) -> np.ndarray:
        """A new block (lock held); evicts cached blocks of other sizes before giving up."""
        if self.limit_bytes is not None and self._in_use + self._cached + cls > self.limit_bytes:
            self._trim_locked(self.limit_bytes - cls - self._in_use)
            if self._in_use + self._cached + cls > self.limit_bytes:
                raise PoolExhausted(
                    f"memory pool limit {self.limit_bytes} B reached: {self._in_use} B in use, "
                    f"{cls} B more requested"
                )
        raw = np.empty(cls + ALIGNMENT, np.uint8)
        offset = -raw.ctypes.data % ALIGNMENT
        return raw[offset : offset + cls]

    def release(self, array: np.ndarray) -> None:
        """Give a buffer back; BadRelease if released twice or never handed out by this pool."""
        if getattr(array, "_kiln_released", False):
            raise BadRelease("array released twice")
        block = getattr(array, "_kiln_block", None)
        with self._lock:
            entry = self._out.pop(id(block), None) if getattr(array, "_kiln_pool", None) is self else None
            if entry is None:
                raise BadRelease("array was not handed out by this memory pool (or is a view of one)")
            cls = entry[1]
            assert block is not None  # a handed-out array always carries its block
            self._free.setdefault(cls, []).append(block)
            self._in_use -= cls
            self._cached += cls
        array._kiln_pool, array._kiln_block, array._kiln_released = None, None, True  # type: ignore[attr-defined]

    def trim(self, keep_bytes: int = 0) -> int:
        """Drop cached (free) buffers until at most ``keep_bytes`` are cached; returns bytes freed."""
        with self._lock:
            return self._trim_locked(keep_bytes)

    def _trim_locked(self, keep_bytes: int) -> int:
        freed = 0
        for cls in sorted(self._free, reverse=True):
            blocks = self._free[cls]
            while blocks and self._cached > max(keep_bytes, 0):
                blocks.pop()
                self._cached -= cls
                freed += cls
        self._free = {c: b for c, b in self._free.items() if b}
        return freed

    def stats(self) -> MemoryStats:
        with self._lock:
            return MemoryStats(
                self._hits,
                self._misses,
                self._in_use,
                self._cached,
                self._peak,
                self.limit_bytes,
                len(self._out),
            )
