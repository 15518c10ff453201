"""Run a model on calibration batches with chosen intermediate tensors exposed as outputs.

Tensors are split into groups whose activations fit a memory budget; each group is one ONNX
Runtime session over all batches, so peak memory stays bounded however large the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import shape_inference

from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend

log = logging.getLogger(__name__)
DEFAULT_BUDGET_BYTES = 256 << 20


def tensor_elements(model: onnx.ModelProto, names: Sequence[str], batch: int) -> dict[str, int]:
    """Elements per tensor at ``batch`` (symbolic dims counted as ``batch``; unknown rank -> 1M)."""
    inferred = shape_inference.infer_shapes(model)
    info = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    sizes = {}
    for name in names:
        v = info.get(name)
        if v is None or not v.type.tensor_type.HasField("shape"):
            sizes[name] = 1 << 20
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in v.type.tensor_type.shape.dim]
        sizes[name] = int(np.prod(dims, dtype=np.int64))
    return sizes


def groups_within_budget(sizes: dict[str, int], budget_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if groups[-1] and used + 4 * n > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += 4 * n
    return [g for g in groups if g]


def collect(
    model: onnx.ModelProto,
    names: Sequence[str],
    batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    observe: Callable[[dict[str, np.ndarray]], None],
    batch_size: int = 8,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Feed every batch from ``batches()`` and pass the exposed tensors to ``observe``."""
    groups = groups_within_budget(tensor_elements(model, names, batch_size), budget_bytes)
    log.info("calibrating %d tensors in %d group(s)", len(names), len(groups))
    for group in groups:
        backend = cpu_backend(
            model, optimization=GraphOptimization.BASIC, expose=tuple(group), memory_arena=False
        )  # no arena: memory returns to the system per batch
        backend.model_name = f"{model.graph.name or 'model'} (calibration)"  # how bad feeds are named
        for feed in batches():
            observe(backend.infer(feed))
            if progress:
                progress(1)
