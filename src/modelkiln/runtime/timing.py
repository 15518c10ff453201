"""Side-by-side latency of several loaded models: the quick speed check of a model choice."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from modelkiln.runtime.backends.base import Backend


def interleaved_latency_ms(
    backends: Mapping[str, Backend],
    feed: dict[str, np.ndarray],
    rounds: int = 5,
    iterations: int = 10,
) -> dict[str, dict[str, float]]:
    """Median and min latency (ms) per backend, timed in turns so that machine noise falls on
    all of them alike. One warm-up call each first."""
    times: dict[str, list[float]] = {name: [] for name in backends}
    for b in backends.values():
        b.infer(feed)
    for _ in range(rounds):
        for name, b in backends.items():
            for _ in range(iterations):
                t = time.perf_counter()
                b.infer(feed)
                times[name].append((time.perf_counter() - t) * 1e3)
    return {n: {"median": float(np.median(t)), "min": float(np.min(t))} for n, t in times.items()}
