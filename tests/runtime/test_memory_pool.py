"""Memory pool: alignment, reuse, limits, misuse detection, concurrency."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from modelkiln.errors import BadRelease, PoolExhausted
from modelkiln.runtime.memory_pool import MemoryPool, size_class


def test_arrays_are_aligned_and_shaped() -> None:
    pool = MemoryPool()
    for shape, dtype in [((3, 224, 224), np.float32), ((7,), np.int64), ((1, 1000), np.float16)]:
        with pool.acquire(shape, dtype) as a:
            assert a.shape == shape and a.dtype == dtype
            assert a.ctypes.data % 64 == 0
            a[...] = 1
            assert float(a.sum()) == a.size


def test_reuse_is_a_hit_after_release() -> None:
    pool = MemoryPool()
    a = pool.acquire((1000,), np.float32)
    address = a.ctypes.data
    a.release()
    b = pool.acquire((1000,), np.float32)
    assert b.ctypes.data == address
    stats = pool.stats()
    assert (stats.hits, stats.misses) == (1, 1)
    b.release()


def test_size_classes_bound_waste() -> None:
    for n in [1, 255, 257, 4095, 4097, 10_000, 1 << 20, (1 << 20) + 1, 3_000_000]:
        c = size_class(n)
        assert c >= n and (n <= 4096 or c <= n * 1.25)


def test_limit_raises_pool_exhausted_and_trim_frees() -> None:
    pool = MemoryPool(limit_bytes=1 << 20)
    a = pool.acquire((200_000,), np.float32)  # 800 kB -> 896 KiB class
    with pytest.raises(PoolExhausted, match="limit"):
        pool.acquire((100_000,), np.float32)
    a.release()
    assert pool.stats().cached_bytes > 0
    b = pool.acquire((100_000,), np.float32)  # evicts the cached block of another class to fit
    assert pool.stats().in_use_bytes <= 1 << 20
    b.release()
    assert pool.trim() > 0 and pool.stats().cached_bytes == 0


def test_double_release_and_foreign_arrays_are_caught() -> None:
    pool, other = MemoryPool(), MemoryPool()
    a = pool.acquire((10,))
    a.release()
    with pytest.raises(BadRelease, match="twice"):
        a.release()
    with pytest.raises(BadRelease, match="not handed out"):
        pool.release(np.zeros(10, np.float32))
    b = pool.acquire((10,))
    with pytest.raises(BadRelease, match="not handed out"):
        other.release(b)
    with pytest.raises(BadRelease):
        b[2:5].release()  # a view cannot be released
    b.release()
    assert pool.stats().outstanding == 0


def test_derived_arrays_are_plain() -> None:
    pool = MemoryPool()
    with pool.acquire((4,)) as a:
        a[:] = 2
        assert type(a * 2) is np.ndarray and type(a[1:]) is not np.ndarray


def test_concurrent_acquire_release_never_hands_out_a_buffer_twice() -> None:
    pool = MemoryPool()
    live: set[int] = set()
    guard = threading.Lock()
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(2000):
            a = pool.acquire((int(rng.integers(1, 5000)),), np.float32)
            with guard:
                if a.ctypes.data in live:
                    errors.append("buffer handed out twice")
                live.add(a.ctypes.data)
            a[:] = seed
            if not (a == seed).all():
                errors.append("buffer shared between threads")
            with guard:
                live.discard(a.ctypes.data)
            a.release()

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = pool.stats()
    assert stats.outstanding == 0 and stats.in_use_bytes == 0 and stats.hits > stats.misses
