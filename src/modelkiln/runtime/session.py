"""TEMPORARY shim during the issue-21 migration: everything here now lives behind
``runtime.backends.onnxruntime.OrtBackend``. Do not import this module in new code; it is deleted
once the last caller has moved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelkiln.errors import BadInput
from modelkiln.runtime.backends.base import IN_MEMORY  # noqa: F401
from modelkiln.runtime.backends.onnxruntime import (  # noqa: F401
    GraphOptimization,
    OrtBackend,
    OrtOptions,
    _session,
    warn_cpu_mismatch,
)


def ort_session(
    model: str | Path | bytes,
    threads: int | None = None,
    optimization: str = "all",
    providers: list[str] | None = None,
    inter_op_threads: int | None = None,
    memory_arena: bool = True,
) -> Any:
    return _session(
        model,
        OrtOptions(
            providers=tuple(providers or ["CPUExecutionProvider"]),
            intra_op_threads=threads,
            inter_op_threads=inter_op_threads,
            optimization=GraphOptimization(optimization),
            memory_arena=memory_arena,
        ),
    )


def run(session: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    expected = {i.name for i in session.get_inputs()}
    if set(feed) != expected:
        raise BadInput(f"model expects inputs {sorted(expected)}, got {sorted(feed)}")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def model_metadata(session: Any) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


def interleaved_latency_ms(
    models: dict[str, bytes | str | Path],
    feed: dict[str, np.ndarray],
    rounds: int = 5,
    iterations: int = 10,
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    from modelkiln.runtime.backends.onnxruntime import cpu_backend
    from modelkiln.runtime.timing import interleaved_latency_ms as timed

    return timed({n: cpu_backend(m, threads=threads) for n, m in models.items()}, feed, rounds, iterations)


_ = (onnx, OrtBackend)
