"""Parity of an exported model with torch: the same inputs through torch and through the ONNX file
on ONNX Runtime (its optimisations off: we test the file, not ORT's rewrites), one ``TensorDiff``
per output and batch size."""

from __future__ import annotations

from typing import Any

from modelkiln.numerics import TensorDiff, Tolerance, tensor_diff
from modelkiln.runtime.backends.base import ModelSource
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend
from modelkiln.zoo.base import Part, ZooModel

#: batch 3 proves the batch axis is really dynamic
PARITY_BATCHES = (1, 3)

__all__ = ["PARITY_BATCHES", "Tolerance", "check_parity"]


def check_parity(
    torch: Any,
    entry: ZooModel,
    part: Part,
    module: Any,
    exported: ModelSource,
    tolerance: Tolerance,
    batches: tuple[int, ...] = PARITY_BATCHES,
) -> list[TensorDiff]:
    """Every output of ``part`` at every batch size in ``batches``, judged under ``tolerance``."""
    backend = cpu_backend(exported, optimization=GraphOptimization.DISABLE)
    checks = []
    for batch in batches:
        feed = entry.example_inputs(part.name, batch=batch, seed=batch)
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feed[s.name]) for s in part.inputs))
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = backend.infer(feed)
        for spec, r in zip(part.outputs, refs, strict=True):
            checks.append(
                tensor_diff(spec.name, got.get(spec.name), r.numpy(), tolerance, part=part.name, batch=batch)
            )
    return checks
