"""Timed inference loops over (batch, concurrency) configurations.

Each of ``concurrency`` threads runs infer back to back on its own copy of the inputs; a latency
is one infer call; throughput is items finished per second of wall time of the timed phase.
"""

from __future__ import annotations

import functools
import itertools
import os
import platform
import threading
import time
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

from modelkiln.runtime.backends.base import Backend
from modelkiln.runtime.cpu import cpu_info
from modelkiln.runtime.feeds import synthesize_feed
from modelkiln.runtime.timing import interleaved

__all__ = [
    "BenchCase",
    "BenchResult",
    "LoopSpec",
    "benchmark",
    "benchmark_interleaved",
    "interleaved",
    "machine_info",
    "summarize",
    "synthesize_feed",  # re-exported: the bench API has always offered it
]

PERCENTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99}
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class LoopSpec:
    """How long to measure: fixed ``iterations`` per thread, or ``duration`` seconds."""

    warmup: int = 10
    iterations: int | None = 100
    duration: float | None = None

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if (self.iterations is None) == (self.duration is None):
            raise ValueError("give exactly one of iterations or duration")
        if (self.iterations is not None and self.iterations < 1) or (
            self.duration is not None and self.duration <= 0
        ):
            raise ValueError("iterations must be >= 1 and duration > 0")


@dataclass
class BenchResult:
    model: str
    backend: str
    batch: int
    concurrency: int
    iterations: int  # timed infer calls, all threads together
    wall_s: float
    latency_ms: dict[str, float]  # min, mean, median, p90, p95, p99, max
    throughput: float  # items per second
    machine: dict[str, Any] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def to_dict(self, with_samples: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            d.pop("latencies_ms")
        return d


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """The machine a figure was measured on, with its INT8 instruction sets (INT8 speed and
    numerics depend on them: VNNI or not)."""
    import onnxruntime

    info = cpu_info()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "intra_op_threads": threads,
        **info.to_dict(),
        "cpu_description": info.describe(),
    }


def summarize(latencies_s: list[float]) -> dict[str, float]:
    """min, mean, median, p90, p95, p99 and max in ms of latencies in seconds."""
    ms = np.asarray(latencies_s, np.float64) * 1e3
    stats = {"min": float(ms.min()), "mean": float(ms.mean()), "median": float(np.median(ms))}
    stats.update({k: float(np.percentile(ms, q)) for k, q in PERCENTILES.items() if k != "p50"})
    stats["max"] = float(ms.max())
    return stats


def benchmark(
    backend: Backend, feed: dict[str, np.ndarray], batch: int, concurrency: int, loop: LoopSpec
) -> BenchResult:
    """Warm up, then time ``concurrency`` threads each calling ``backend.infer`` back to back."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    feeds = [{k: v.copy() for k, v in feed.items()} for _ in range(concurrency)]
    for _ in range(loop.warmup):
        _release(backend.infer(feeds[0]))
    per_thread: list[list[float]] = [[] for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    # iterations are shared, so callers finish together instead of the slowest running on alone
    budget = itertools.count() if loop.iterations is not None else None
    total = (loop.iterations or 0) * concurrency
    threads = [
        threading.Thread(
            target=_loop, args=(backend, feeds[i], loop, per_thread[i], start, budget, total), daemon=True
        )
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [x for xs in per_thread for x in xs]
    return BenchResult(
        model=backend.model_name,
        backend=backend.name,
        batch=batch,
        concurrency=concurrency,
        iterations=len(lat),
        wall_s=wall,
        latency_ms=summarize(lat),
        throughput=batch * len(lat) / wall,
        latencies_ms=[x * 1e3 for x in lat],
    )


@dataclass(frozen=True)
class BenchCase:
    """One thing to time: a loaded model, its inputs, and how it is called."""

    backend: Backend
    feed: dict[str, np.ndarray]
    batch: int = 1
    concurrency: int = 1


def benchmark_interleaved(cases: Mapping[K, BenchCase], loop: LoopSpec, rounds: int) -> dict[K, BenchResult]:
    """:func:`benchmark` of every case in turns over ``rounds`` (each round runs ``loop``), the
    rounds of a case merged into one result: its calls, their wall time and throughput."""
    jobs = {
        key: functools.partial(benchmark, c.backend, c.feed, c.batch, c.concurrency, loop)
        for key, c in cases.items()
    }
    runs = interleaved(jobs, rounds)
    return {key: _merged(results) for key, results in runs.items()}


def _merged(results: list[BenchResult]) -> BenchResult:
    first = results[0]
    latencies_ms = [x for r in results for x in r.latencies_ms]
    wall = sum(r.wall_s for r in results)
    return BenchResult(
        model=first.model,
        backend=first.backend,
        batch=first.batch,
        concurrency=first.concurrency,
        iterations=len(latencies_ms),
        wall_s=wall,
        latency_ms=summarize([x / 1e3 for x in latencies_ms]),
        throughput=first.batch * len(latencies_ms) / wall,
        latencies_ms=latencies_ms,
    )


def _loop(
    backend: Backend,
    feed: dict[str, np.ndarray],
    loop: LoopSpec,
    out: list[float],
    start: threading.Barrier,
    budget: itertools.count[int] | None,
    total: int,
) -> None:
    clock, infer = time.perf_counter, backend.infer
    start.wait()
    stop = clock() + loop.duration if loop.duration is not None else None
    while (budget is not None and next(budget) < total) or (stop is not None and clock() < stop):
        t = clock()
        outputs = infer(feed)
        out.append(clock() - t)
        _release(outputs)


def _release(outputs: dict[str, Any]) -> None:
    """Give pooled output buffers (I/O binding) back so a steady loop allocates nothing."""
    for v in outputs.values():
        release = getattr(v, "release", None)
        if release is not None and getattr(v, "_kiln_pool", None) is not None:
            release()
