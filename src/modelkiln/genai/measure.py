"""Measurements of generation: time to first token and decode rate of an engine, and how close a
candidate decoder (weight-only INT8) stays to a reference one when both are fed the same tokens.
Used by ``kiln deploy`` for chat models and by benchmarks/qwen_generate.py."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence

import numpy as np

from modelkiln.genai.engine import Engine
from modelkiln.runtime.timing import interleaved

#: Pause before each timed run: ONNX Runtime's (and torch's) worker threads spin for a while after
#: their last job, and on a small machine a spinning neighbour slows the next run's first token.
SETTLE_S = 0.5


def timed_greedy(
    engine: Engine, embeds: np.ndarray, positions: np.ndarray, delta: int, new: int
) -> tuple[float, float, list[int]]:
    """(ms to the first token, decode tokens/s after it, tokens) of ``new`` greedy tokens, stop
    tokens ignored so every run decodes the same count."""
    start = time.perf_counter()
    gen = engine.start(embeds, positions, delta, new)
    gen.stop = set()
    times = gen.run()
    return (times[0] - start) * 1e3, decode_rate(times), gen.tokens


def decode_rate(times: Sequence[float]) -> float:
    """Tokens per second after the first, from the instants each token was chosen."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def speed(
    engines: dict[str, Engine], embeds: np.ndarray, positions: np.ndarray, delta: int, new: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Each engine in interleaved rounds (after one warm-up each): TTFT and decode rate, median and best."""
    for engine in engines.values():
        timed_greedy(engine, embeds, positions, delta, 4)
    jobs = {
        name: functools.partial(timed_greedy, e, embeds, positions, delta, new) for name, e in engines.items()
    }
    runs = interleaved(jobs, rounds, settle_s=SETTLE_S)
    return {
        name: {
            "ttft_ms_median": round(statistics.median(r[0] for r in rs), 2),
            "ttft_ms_min": round(min(r[0] for r in rs), 2),
            "decode_tok_s_median": round(statistics.median(r[1] for r in rs), 1),
            "decode_tok_s_max": round(max(r[1] for r in rs), 1),
        }
        for name, rs in runs.items()
    }


def teacher_forced(
    reference: Engine,
    candidate: Engine,
    prompts: Sequence[tuple[np.ndarray, np.ndarray, int]],
    steps: int,
) -> dict[str, float]:
    """Along the reference's own greedy continuation of each prompt (embeds, positions, delta), both
    decoders fed the same tokens: logit cosine per step (mean, min) and how often their top-1 agree."""
    cosines, agree = [], 0
    for embeds, positions, delta in prompts:
        path = timed_greedy(reference, embeds, positions, delta, steps)[2]
        gens = [e.start(embeds, positions, delta, steps) for e in (reference, candidate)]
        try:
            for token in path:
                rows = []
                for g in gens:
                    g.step(force=token)
                    rows.append(g.logits[0, -1].astype(np.float64))
                a, b = rows
                cosines.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
                agree += int(a.argmax() == b.argmax())
        finally:
            for g in gens:
                g.close()
    return {
        "logit_cosine_mean": round(float(np.mean(cosines)), 6),
        "logit_cosine_min": round(float(np.min(cosines)), 6),
        "top1_agreement": round(agree / len(cosines), 4),
        "steps": len(cosines),
    }
