"""Memory pool: steady-state inference loop (fixed shapes) with I/O binding into pool buffers.

Reports pool misses after warm-up (target 0), peak RSS growth over the loop (target none), and
acquire+release cost beside np.empty. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import numpy as np

from modelkiln.bench.runner import synthesize_feed
from modelkiln.runtime.backends import load_backend
from modelkiln.runtime.backends.onnxruntime import OrtOptions
from modelkiln.runtime.memory_pool import MemoryPool


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_loop(model: str, iterations: int, batch: int) -> dict:
    pool = MemoryPool()
    backend = load_backend(model, options=OrtOptions(intra_op_threads=2, io_binding=True, memory_pool=pool))
    feed = synthesize_feed(backend.input_metadata, batch)
    for _ in range(20):  # warm-up
        for out in backend.infer(feed).values():
            out.release()
    warm = pool.stats()
    rss0 = peak_rss_mb()
    rss_marks = []
    for i in range(iterations):
        for out in backend.infer(feed).values():
            out.release()
        if i % (iterations // 10 or 1) == 0:
            rss_marks.append(peak_rss_mb())
    end = pool.stats()
    return {
        "bench": "memory_pool_steady_state",
        "model": model,
        "batch": batch,
        "iterations": iterations,
        "misses_after_warmup": end.misses - warm.misses,
        "hits_after_warmup": end.hits - warm.hits,
        "peak_rss_mb_after_warmup": rss0,
        "peak_rss_mb_end": peak_rss_mb(),
        "peak_rss_growth_mb": peak_rss_mb() - rss0,
        "rss_marks_mb": rss_marks,
        "pool_peak_bytes": end.peak_bytes,
    }


def _per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def acquire_cost(shape: tuple[int, ...], n: int, repeats: int) -> dict:
    """Bare acquire+release vs np.empty, and the same with the buffer written once (page touch)."""
    pool = MemoryPool()
    pool.acquire(shape).release()

    def pooled() -> None:
        pool.acquire(shape).release()

    def pooled_touch() -> None:
        a = pool.acquire(shape)
        a.fill(1)
        a.release()

    def empty_touch() -> None:
        np.empty(shape, np.float32).fill(1)

    variants = {
        "pool": pooled,
        "np_empty": lambda: np.empty(shape, np.float32),
        "pool_touch": pooled_touch,
        "np_empty_touch": empty_touch,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    calls = max(200, n // max(1, int(np.prod(shape)) // 100_000))
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_per_call_us(fn, calls))
    out = {"bench": "memory_pool_acquire_release", "shape": list(shape), "calls": calls}
    for name, ts in times.items():
        out[f"{name}_us_median"], out[f"{name}_us_min"] = statistics.median(ts), min(ts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", help="model for the steady-state loop (skipped if absent)")
    ap.add_argument("--iterations", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    machine = {"machine": platform.machine(), "python": platform.python_version()}
    for shape in [(1, 1000), (1, 3, 224, 224), (8, 3, 224, 224)]:
        print(json.dumps(acquire_cost(shape, 20_000, 5) | machine), flush=True)
    if a.onnx:
        print(json.dumps(steady_loop(a.onnx, a.iterations, a.batch) | machine), flush=True)


if __name__ == "__main__":
    main()
