"""Small helpers over onnx-ir shared by the passes: constants, new initializers, safe replacement."""

from __future__ import annotations

import itertools
from typing import TypeGuard, overload

import numpy as np
import onnx_ir as ir

_names = itertools.count()

#: Ops whose result must never be folded or merged: nondeterministic.
NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def const(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is a true constant (an initializer that is not a graph input, or a
    Constant node's output); None otherwise."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def is_const(value: ir.Value | None) -> bool:
    return const(value) is not None


def new_initializer(graph: ir.Graph, array: np.ndarray, hint: str = "c") -> ir.Value:
    """Register ``array`` as a fresh initializer with a unique name derived from ``hint``."""
    array = np.asarray(array)
    name = f"{hint}__kiln{next(_names)}"
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The one node using ``value``, when exactly one node does and it is not a graph output."""
    if value.is_graph_output():
        return None
    users = {id(u.node): u.node for u in value.uses()}
    return next(iter(users.values())) if len(users) == 1 else None


def replace_value(old: ir.Value, new: ir.Value) -> bool:
    """Point every use of ``old`` at ``new``. A graph output keeps its name: ``new`` is renamed,
    which is refused (False) when ``new`` is itself a graph input, output or initializer. The
    output's declared type and shape are the graph's contract: ``new`` takes them where it has none
    (e.g. it comes from an op shape inference does not know)."""
    if old.is_graph_output():
        if new.is_graph_input() or new.is_graph_output() or new.is_initializer() or new.producer() is None:
            return False
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape
        graph = old.graph
        name = old.name
        old.name = f"{name}__replaced{next(_names)}"
        new.name = name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        assert graph is not None
        return True
    ir.convenience.replace_all_uses_with(old, new)
    return True


def bypass(node: ir.Node, keep: ir.Value) -> bool:
    """Remove ``node`` by routing its (single) output's uses to ``keep``."""
    if not replace_value(node.outputs[0], keep):
        return False
    graph = node.graph
    if graph is not None and all(not o.uses() and not o.is_graph_output() for o in node.outputs):
        graph.remove(node, safe=True)
    return True


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """Fully static shape of a value, if known."""
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    return dims if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


@overload
def attr_ints(node: ir.Node, name: str, default: tuple[int, ...]) -> tuple[int, ...]: ...
@overload
def attr_ints(node: ir.Node, name: str, default: None = None) -> tuple[int, ...] | None: ...
def attr_ints(node: ir.Node, name: str, default: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    attr = node.attributes.get(name)
    return tuple(attr.as_ints()) if attr is not None else default


def copy_type(src: ir.Value, dst: ir.Value) -> None:
    """Give a new node's output the shape and dtype of the value it replaces (a dtype only when
    known: setting None would make a typeless TensorType)."""
    dst.shape = src.shape
    if src.dtype is not None:
        dst.dtype = src.dtype


def producer(value: ir.Value | None) -> ir.Node | None:
    """The node computing ``value``; None for graph inputs, initializers and absent optional inputs."""
    return value.producer() if value is not None else None


def remove(node: ir.Node) -> None:
    """Take ``node`` out of the graph it is in (a no-op for a node already detached)."""
    if node.graph is not None:
        node.graph.remove(node, safe=True)


def is_op(node: ir.Node | None, op_type: str) -> TypeGuard[ir.Node]:
    """``node`` exists and is the standard-domain ``op_type`` (narrows away None for callers)."""
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
