"""Element-wise activations between two quantized tensors as one 256-entry lookup.

After QDQ, a SiLU between two integer convolutions runs as DequantizeLinear -> Sigmoid -> Mul ->
QuantizeLinear on float tensors, which ONNX Runtime does not fuse: in YOLOv5n that float detour is
about 40 % of the INT8 model's time. Its input is one byte and so is its output, so the whole
detour is a table of 256 bytes: ``table[q] = Q_out(f(DQ_in(q)))``, exact to the float activation
followed by the output quantization (it is that computation, done once per possible input).

``fuse_lookups`` finds every such detour (any chain of the single-input element-wise ops below,
from one dequantized tensor to one QuantizeLinear) and replaces it by our ``LookupTable`` kernel
(runtime/kernels). The quantization scales are the ones calibration chose, so accuracy is the
unfused model's, up to ONNX Runtime's own float rounding in the path it replaces.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from modelkiln.ir_utils import attr_float, attr_int, const, new_initializer
from modelkiln.quantmath import QParams, dequantize, quantize
from modelkiln.runtime.kernels import DOMAIN, DOMAIN_VERSION, LOOKUP_OP

Array = np.ndarray
#: One op over float64 values: (node, its input arrays, in order) -> output.
Evaluator = Callable[[ir.Node, list[Array]], Array]

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x: Array) -> Array:
    out: Array = 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow
    return out


def _clip(node: ir.Node, a: list[Array]) -> Array:
    lo = a[1] if len(a) > 1 and a[1] is not None else -np.inf
    hi = a[2] if len(a) > 2 and a[2] is not None else np.inf
    if "min" in node.attributes or "max" in node.attributes:  # opset < 11
        lo, hi = attr_float(node, "min", -np.inf), attr_float(node, "max", np.inf)
    out: Array = np.clip(a[0], lo, hi)
    return out


def _gelu(node: ir.Node, a: list[Array]) -> Array:
    x = a[0]
    approx = node.attributes.get("approximate")
    if approx is not None and approx.as_string() == "tanh":
        out: Array = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return out
    out = 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    return out


def _hard_sigmoid(node: ir.Node, x: Array) -> Array:
    out: Array = np.clip(attr_float(node, "alpha", 0.2) * x + attr_float(node, "beta", 0.5), 0, 1)
    return out


#: The element-wise ops a lookup can absorb, evaluated in float64.
EVALUATORS: dict[str, Evaluator] = {
    "Sigmoid": lambda n, a: _sigmoid(a[0]),
    "Tanh": lambda n, a: np.tanh(a[0]),
    "Relu": lambda n, a: np.maximum(a[0], 0.0),
    "LeakyRelu": lambda n, a: np.where(a[0] >= 0, a[0], attr_float(n, "alpha", 0.01) * a[0]),
    "Elu": lambda n, a: np.where(a[0] >= 0, a[0], attr_float(n, "alpha", 1.0) * np.expm1(a[0])),
    "Clip": _clip,
    "HardSigmoid": lambda n, a: _hard_sigmoid(n, a[0]),
    "HardSwish": lambda n, a: a[0] * np.clip(a[0] / 6 + 0.5, 0, 1),
    "Erf": lambda n, a: _erf(a[0]),
    "Gelu": _gelu,
    "Exp": lambda n, a: np.exp(a[0]),
    "Neg": lambda n, a: -a[0],
    "Abs": lambda n, a: np.abs(a[0]),
    "Softplus": lambda n, a: np.logaddexp(0.0, a[0]),
    "Mul": lambda n, a: a[0] * a[1],
    "Add": lambda n, a: a[0] + a[1],
    "Sub": lambda n, a: a[0] - a[1],
    "Div": lambda n, a: a[0] / a[1],
}

#: What a fused chain is called in summaries, by the op types it is made of.
_NAMES = {
    frozenset({"Sigmoid", "Mul"}): "SiLU",
    frozenset({"Sigmoid"}): "Sigmoid",
    frozenset({"HardSwish"}): "HardSwish",
    frozenset({"Gelu"}): "GELU",
    frozenset({"Erf", "Mul", "Add", "Div"}): "GELU",
    frozenset({"Tanh"}): "Tanh",
}


def _scalar(value: ir.Value | None) -> float | None:
    """A constant that is one number (however it is shaped), else None."""
    data = const(value)
    if data is None or data.size == 0 or data.dtype.kind not in "fiu":
        return None
    flat = data.reshape(-1)
    return float(flat[0]) if np.all(flat == flat[0]) else None


def _qparams(node: ir.Node) -> QParams | None:
    """Per-tensor scale and zero point of a QuantizeLinear/DequantizeLinear, else None."""
    scale = const(node.inputs[1])
    zero = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if scale is None or scale.size != 1 or zero is None or zero.size != 1:
        return None
    if zero.dtype not in (np.uint8, np.int8) or attr_int(node, "saturate", 1) != 1:
        return None
    return QParams(scale.reshape(()).astype(np.float32), zero.reshape(()))


class Chain:
    """A quantized tensor's dequantized copies (ONNX Runtime's optimizer gives each reader its own
    DequantizeLinear), the element-wise ops after them, and the QuantizeLinear that ends them."""

    def __init__(self, dqs: list[ir.Node], nodes: list[ir.Node], q: ir.Node) -> None:
        self.dqs, self.nodes, self.q = dqs, nodes, q

    @property
    def clips_only(self) -> bool:
        """Only Relu/Clip: ONNX Runtime folds these into the quantize before them itself (the
        output's range does the clipping), so they are not worth a lookup in the stored model."""
        return all(n.op_type in ("Relu", "Clip") for n in self.nodes)

    @property
    def name(self) -> str:
        ops = frozenset(n.op_type for n in self.nodes)
        return _NAMES.get(ops, "+".join(sorted(ops)))

    def table(self) -> np.ndarray:
        """``Q_out(f(DQ_in(q)))`` for every input byte, indexed by the byte (int8 -1 -> 255)."""
        in_qp, out_qp = _qparams(self.dqs[0]), _qparams(self.q)
        assert in_qp is not None and out_qp is not None, "find_chains checked both"
        codes = np.arange(256, dtype=np.uint8).view(in_qp.zero_point.dtype)  # byte order
        x = dequantize(codes, in_qp).astype(np.float64)
        values: dict[int, Array] = {id(dq.outputs[0]): x for dq in self.dqs}
        for node in self.nodes:
            args = [
                values[id(v)] if id(v) in values else np.asarray(_scalar(v), np.float64) for v in node.inputs
            ]
            values[id(node.outputs[0])] = EVALUATORS[node.op_type](node, args)
        y = values[id(self.q.inputs[0])]
        return quantize(np.asarray(y, np.float64), out_qp)


def find_chains(graph: ir.Graph) -> list[Chain]:
    """Every element-wise chain between a per-tensor DequantizeLinear and one QuantizeLinear whose
    intermediate tensors nothing else reads (so the lookup replaces it exactly)."""
    chains, seen = [], set()
    for dq in graph:
        if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or _qparams(dq) is None:
            continue
        source = dq.inputs[0]
        if source is None or id(source) in seen:
            continue
        seen.add(id(source))
        chain = _chain_from(_copies(dq))
        if chain is not None:
            chains.append(chain)
    return chains


def _copies(dq: ir.Node) -> list[ir.Node]:
    """``dq`` and every other DequantizeLinear of the same tensor with the same scale and zero point."""
    qp = _qparams(dq)
    assert qp is not None and dq.inputs[0] is not None
    found = []
    for use in dq.inputs[0].uses():
        other = use.node
        if other.op_type != "DequantizeLinear" or other.domain not in ("", "ai.onnx") or use.idx != 0:
            continue
        oq = _qparams(other)
        if oq is not None and oq.scale == qp.scale and oq.zero_point == qp.zero_point:
            found.append(other)
    return found


def _chain_from(dqs: list[ir.Node]) -> Chain | None:
    xs = [dq.outputs[0] for dq in dqs]
    if any(x.is_graph_output() for x in xs):
        return None
    inside: dict[int, ir.Node] = {}
    frontier = [u.node for x in xs for u in x.uses()]
    q: ir.Node | None = None
    while frontier:
        node = frontier.pop()
        if id(node) in inside or node is q:
            continue
        if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx"):
            if (q is not None and q is not node) or _qparams(node) is None:
                return None
            q = node
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in EVALUATORS or len(node.outputs) != 1:
            return None
        inside[id(node)] = node
        out = node.outputs[0]
        if out.is_graph_output() or not out.uses():
            return None
        frontier.extend(u.node for u in out.uses())
    if q is None or not inside or q.outputs[0].is_graph_output():
        return None
    made = {id(x) for x in xs} | {id(n.outputs[0]) for n in inside.values()}
    for node in inside.values():  # every input is the chain's own tensor or a one-number constant
        if any(v is None or (id(v) not in made and _scalar(v) is None) for v in node.inputs):
            return None
    if id(q.inputs[0]) not in made or any(q.inputs[0] is x for x in xs):
        return None
    for node in inside.values():  # nothing outside reads an intermediate tensor
        if any(id(u.node) not in inside and u.node is not q for u in node.outputs[0].uses()):
            return None
    return Chain(dqs, _in_order(xs, inside), q)


def _in_order(xs: list[ir.Value], inside: dict[int, ir.Node]) -> list[ir.Node]:
    """The chain's nodes in an order where each comes after what it reads."""
    done, order = {id(x) for x in xs}, []
    pending = list(inside.values())
    while pending:
        ready = [n for n in pending if all(id(v) in done or const(v) is not None for v in n.inputs)]
        assert ready, "element-wise chains have no cycles"
        for n in ready:
            order.append(n)
            done.add(id(n.outputs[0]))
            pending.remove(n)
    return order


def fuse_lookups(model: ir.Model) -> Counter[str]:
    """Replace every chain by ``LookupTable(q_in, table) -> q_out``; returns counts per chain name
    (e.g. ``{"SiLU": 57}``). The dequantize stays where other ops still read its output."""
    graph = model.graph
    fused: Counter[str] = Counter()
    for chain in find_chains(graph):
        table = chain.table()
        q_in, q_out = chain.dqs[0].inputs[0], chain.q.outputs[0]
        assert q_in is not None, "a DequantizeLinear has an input"
        lut = new_initializer(graph, table, f"{q_out.name}_table")
        node = ir.Node(
            DOMAIN,
            LOOKUP_OP,
            [q_in, lut],
            num_outputs=1,
            name=f"{chain.q.name or q_out.name}_lookup",
        )
        out, name = node.outputs[0], q_out.name
        q_out.name = f"{name}_replaced"
        out.name, out.type, out.shape = name, q_out.type, q_out.shape
        graph.insert_before(chain.q, node)
        for use in list(q_out.uses()):
            use.node.replace_input_with(use.idx, out)
        for dead in [chain.q, *reversed(chain.nodes)]:
            graph.remove(dead, safe=True)
        for dq in chain.dqs:
            if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
                graph.remove(dq, safe=True)
        fused[chain.name] += 1
    if fused:
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
    return fused
