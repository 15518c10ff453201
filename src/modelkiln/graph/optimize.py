"""``optimize``: load, run the pass pipeline, prove parity on ONNX Runtime, plan memory, save."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from modelkiln.errors import ParityFailed
from modelkiln.graph.manager import PassManager
from modelkiln.graph.memory_plan import MemoryPlan, plan_memory
from modelkiln.graph.pipeline import build_pipeline
from modelkiln.numerics import TensorDiff, Tolerance, tensor_diff, worst
from modelkiln.onnx_io import load_model, save_model
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend
from modelkiln.runtime.feeds import synthesize_feed

log = logging.getLogger(__name__)
TOLERANCE = 1e-4  # max abs error allowed, relative to max(1, max |original output|)
#: Rewrites must not change outputs beyond float reassociation: judged on max abs error alone.
PARITY = Tolerance(atol=0.0, rtol=TOLERANCE, min_cosine=None, min_scale=1.0)


@dataclass
class GraphStats:
    nodes: int
    ops: dict[str, int]
    param_bytes: int


@dataclass
class OptimizeResult:
    source: str
    output: str | None
    target: str
    rewrites: dict[str, int]
    steps: int
    before: GraphStats
    after: GraphStats
    parity: list[TensorDiff] = field(default_factory=list)
    memory: MemoryPlan | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.parity)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if k not in ("memory", "before", "after", "parity")}
        d.update(
            before=vars(self.before),
            after=vars(self.after),
            # "output": the key these records had before TensorDiff
            parity=[{**c.to_dict(), "output": c.name} for c in self.parity],
            memory=self.memory.to_dict() if self.memory else None,
            passed=self.passed,
        )
        return d


def graph_stats(model: onnx.ModelProto) -> GraphStats:
    ops = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node
    )
    params = sum(_tensor_nbytes(t) for t in model.graph.initializer)
    return GraphStats(len(model.graph.node), dict(ops.most_common()), params)


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def optimize(
    source: str | Path,
    output: str | Path | None,
    target: str = "portable",
    passes: list[str] | None = None,
    disable: tuple[str, ...] = (),
    shapes: dict[str, tuple[int, ...]] | None = None,
    check: bool = True,
    max_steps: int = 8,
    plan: bool = True,
) -> OptimizeResult:
    """Optimise ``source`` into ``output``; ParityFailed (and no file) if outputs drift."""
    proto = load_model(source)
    before = graph_stats(proto)
    model = ir.from_proto(proto)
    report = PassManager(build_pipeline(target, passes, disable), max_steps=max_steps).run(model)
    optimized = ir.to_proto(model)
    result = OptimizeResult(
        str(source),
        str(output) if output else None,
        target,
        report.rewrites,
        report.steps,
        before,
        graph_stats(optimized),
    )
    if check:
        result.parity = check_parity(proto, optimized, shapes or {})
        if not result.passed:
            bad = worst(result.parity)
            raise ParityFailed(
                f"{source}: optimised output {bad.name!r} differs by {bad.max_abs:.3g} "
                f"(limit {bad.limit or 0.0:.3g}); nothing written"
            )
    if plan:
        result.memory = plan_memory(optimized, shapes)
    if output:
        save_model(optimized, Path(output))
    return result


def check_parity(
    original: onnx.ModelProto, optimized: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> list[TensorDiff]:
    """Both models on ONNX Runtime with its own optimisations off, same random inputs: the check is
    of our rewrites, not ORT's."""
    reference = cpu_backend(original, optimization=GraphOptimization.DISABLE)
    candidate = cpu_backend(optimized, optimization=GraphOptimization.DISABLE)
    filled = {
        m.name: shapes.get(m.name) or tuple(d if isinstance(d, int) else 1 for d in m.shape)
        for m in reference.input_metadata
    }
    feed = synthesize_feed(reference.input_metadata, 1, filled, seed=seed)
    ref, got = reference.infer(feed), candidate.infer(feed)
    return [tensor_diff(name, got.get(name), r, PARITY) for name, r in ref.items()]
