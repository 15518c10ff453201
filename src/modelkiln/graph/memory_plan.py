"""Static memory planning: tensor lifetimes in execution order, packed into one arena.

Greedy best-fit by size (as TensorFlow Lite's arena planner): take tensors largest first and put
each at the lowest offset where it overlaps no already placed tensor that is alive at the same
time. Reports naive (sum of all activations), planned arena, the lower bound (peak of live
bytes), and the five steps with the largest live sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, shape_inference

ALIGN = 64


@dataclass(frozen=True)
class TensorLife:
    name: str
    nbytes: int
    first: int  # step that produces it
    last: int  # last step that reads it (graph outputs live to the end)


@dataclass
class LiveSet:
    step: int
    node: str
    bytes: int
    largest: list[tuple[str, int]]


@dataclass
class MemoryPlan:
    naive_bytes: int
    planned_bytes: int
    peak_live_bytes: int
    offsets: dict[str, int] = field(default_factory=dict)
    largest_live_sets: list[LiveSet] = field(default_factory=list)
    unknown_tensors: list[str] = field(default_factory=list)

    @property
    def saving(self) -> float:
        return 1 - self.planned_bytes / self.naive_bytes if self.naive_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "naive_bytes": self.naive_bytes,
            "planned_bytes": self.planned_bytes,
            "peak_live_bytes": self.peak_live_bytes,
            "saving": self.saving,
            "largest_live_sets": [vars(s) for s in self.largest_live_sets],
            "unknown_tensors": self.unknown_tensors,
        }


def _fix_inputs(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], default_dim: int
) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    init = {i.name for i in fixed.graph.initializer}
    for inp in fixed.graph.input:
        if inp.name in init:
            continue
        dims = inp.type.tensor_type.shape.dim
        want = shapes.get(inp.name)
        for k, d in enumerate(dims):
            value = want[k] if want is not None else (d.dim_value if d.HasField("dim_value") else default_dim)
            d.Clear()
            d.dim_value = value
    return fixed


def tensor_lives(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None, default_dim: int = 1
) -> tuple[list[TensorLife], list[str], list[str]]:
    """Lifetimes of every intermediate tensor (not inputs or weights), node names, and unknowns."""
    inferred = shape_inference.infer_shapes(_fix_inputs(model, shapes or {}, default_dim), data_prop=True)
    g = inferred.graph
    info = {v.name: v for v in [*g.value_info, *g.output]}
    outputs = {o.name for o in g.output}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for step, node in enumerate(g.node):
        for name in node.input:
            if name in first:
                last[name] = step
        for name in node.output:
            if name:
                first[name] = step
                last[name] = step
    end = len(g.node)
    lives, unknown = [], []
    for name, start in first.items():
        size = _nbytes(info.get(name))
        if size is None:
            unknown.append(name)
            continue
        lives.append(TensorLife(name, size, start, end if name in outputs else last[name]))
    return lives, [n.name or n.op_type for n in g.node], unknown


def _nbytes(value: onnx.ValueInfoProto | None) -> int | None:
    if value is None or not value.type.HasField("tensor_type"):
        return None
    t = value.type.tensor_type
    if not t.HasField("shape") or t.elem_type == 0:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    if any(d < 0 for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize


def pack(lives: list[TensorLife]) -> dict[str, int]:
    """Greedy best-fit by size: offsets per tensor so tensors alive together never overlap."""
    placed: list[tuple[int, int, TensorLife]] = []  # (offset, aligned size, life)
    offsets = {}
    for life in sorted(lives, key=lambda t: (-t.nbytes, t.first)):
        size = -(-max(life.nbytes, 1) // ALIGN) * ALIGN
        busy = sorted(
            (o, o + s) for o, s, other in placed if other.first <= life.last and life.first <= other.last
        )
        offset, best = 0, None
        for lo, hi in busy:  # gaps between busy ranges: best fit = the smallest gap that fits
            if lo - offset >= size and (best is None or lo - offset < best[1]):
                best = (offset, lo - offset)
            offset = max(offset, hi)
        chosen = best[0] if best is not None else offset
        placed.append((chosen, size, life))
        offsets[life.name] = chosen
    return offsets


def plan_memory(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None, default_dim: int = 1
) -> MemoryPlan:
    """Plan activation memory for ``model`` with the given input shapes (symbolic dims -> default_dim)."""
    lives, names, unknown = tensor_lives(model, shapes, default_dim)
    offsets = pack(lives)
    sizes = {t.name: -(-max(t.nbytes, 1) // ALIGN) * ALIGN for t in lives}
    planned = max((offsets[t.name] + sizes[t.name] for t in lives), default=0)
    steps = len(names) + 1
    live_bytes = np.zeros(steps, np.int64)
    for t in lives:
        live_bytes[t.first : t.last + 1] += t.nbytes
    top_steps = np.argsort(-live_bytes)[:5]
    sets = []
    for step in top_steps:
        alive = sorted(((t.name, t.nbytes) for t in lives if t.first <= step <= t.last), key=lambda x: -x[1])
        sets.append(
            LiveSet(
                int(step), names[step] if step < len(names) else "<outputs>", int(live_bytes[step]), alive[:3]
            )
        )
    return MemoryPlan(
        sum(t.nbytes for t in lives), int(planned), int(live_bytes.max(initial=0)), offsets, sets, unknown
    )
