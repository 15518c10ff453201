"""Timing in turns: every job once per round, so machine noise falls on all of them alike; and
side-by-side latency of several loaded models, the quick speed check of a model choice."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import numpy as np

from modelkiln.runtime.backends.base import Backend

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def interleaved(jobs: Mapping[K, Callable[[], T]], rounds: int, settle_s: float = 0.0) -> dict[K, list[T]]:
    """Run every job once per round, in turns, ``rounds`` times: machine noise (a busy neighbour,
    a clock change) then falls on all of them alike instead of on whichever ran last. ``settle_s``
    pauses before each run (ONNX Runtime's worker threads spin for a while after their last job,
    and a spinning neighbour slows the next run's start)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    found: dict[K, list[T]] = {key: [] for key in jobs}
    for _ in range(rounds):
        for key, job in jobs.items():
            if settle_s > 0:
                time.sleep(settle_s)
            found[key].append(job())
    return found


def _timed_ms(backend: Backend, feed: dict[str, np.ndarray], iterations: int) -> list[float]:
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        backend.infer(feed)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def interleaved_latency_ms(
    backends: Mapping[str, Backend],
    feed: dict[str, np.ndarray],
    rounds: int = 5,
    iterations: int = 10,
) -> dict[str, dict[str, float]]:
    """Median and min latency (ms) per backend, ``iterations`` calls per turn, timed in turns.
    One warm-up call each first."""
    for b in backends.values():
        b.infer(feed)
    runs = interleaved(
        {n: functools.partial(_timed_ms, b, feed, iterations) for n, b in backends.items()}, rounds
    )
    times = {n: [t for run in r for t in run] for n, r in runs.items()}
    return {n: {"median": float(np.median(t)), "min": float(np.min(t))} for n, t in times.items()}
