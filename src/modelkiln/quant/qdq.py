"""QDQ insertion in two steps: mark tensors (which activations, weights and biases get quantized,
and which tensors share a scale), then emit QuantizeLinear/DequantizeLinear pairs.

Marking follows the per-op rules in ``rules.py``. Graph outputs are never quantized, and a
Concat whose calibrated input ranges differ by more than ``max_range_ratio`` stays float:
that is what keeps YOLOv5's decoded output (pixel boxes beside 0-1 scores) in float without
anyone naming it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TypeGuard

import numpy as np
import onnx_ir as ir

from modelkiln.ir_utils import attr_int, const, new_initializer
from modelkiln.quant.calibrators.base import Range
from modelkiln.quant.config import Int8Cpu, PerChannel, QuantConfig, Target
from modelkiln.quant.formats import PLAIN_INT8, WeightStorage, store_weight, weight_storage
from modelkiln.quant.rules import (
    ACTIVATIONS,
    DATA_MOVEMENT,
    OpRule,
    is_attention_matmul,
    is_ffn_down,
    rule_for,
    transformer_defaults,
)
from modelkiln.quant.trt import trt_rule
from modelkiln.quantmath import QParams, bias_qparams, compute_qparams

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What to quantize: activation tensors (by name) grouped by shared scale, weights, biases."""

    groups: dict[str, str] = field(default_factory=dict)  # tensor -> group root
    weights: list[tuple[ir.Node, int, int | None]] = field(default_factory=list)
    biases: list[tuple[ir.Node, int]] = field(default_factory=list)
    nodes: list[ir.Node] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)  # node name -> reason
    range_of: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose range it uses

    @property
    def activations(self) -> list[str]:
        return list(self.groups)

    def root(self, name: str) -> str:
        while self.groups[name] != name:
            self.groups[name] = self.groups[self.groups[name]]
            name = self.groups[name]
        return name

    def add(self, name: str) -> None:
        self.groups.setdefault(name, name)

    def union(self, a: str, b: str) -> None:
        self.add(a)
        self.add(b)
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.groups[rb] = ra


def isolate(plan: Plan, node_name: str, ranges: dict[str, Range]) -> tuple[Plan, dict[str, Range]]:
    """The part of ``plan`` that quantizes one node alone (its inputs, weights, bias and output,
    with the ranges and scale sharing they have in the full plan): what that node costs by itself."""
    node = next((n for n in plan.nodes if n.name == node_name), None)
    if node is None:
        raise KeyError(f"{node_name} is not quantized in this plan")
    full = _group_ranges(plan, ranges)
    names = [v.name for v in node.inputs if v is not None and v.name in plan.groups]
    out = node.outputs[0].name
    if out in plan.groups:
        names += [t for t in plan.groups if plan.root(t) == plan.root(out)]
    alone = Plan(
        groups={n: n for n in names},
        weights=[w for w in plan.weights if w[0] is node],
        biases=[b for b in plan.biases if b[0] is node],
        nodes=[node],
    )
    return alone, {n: full[plan.root(n)] for n in names if plan.root(n) in full}


def layers(plan: Plan) -> list[str]:
    """Names of the ops the plan runs in int8 (not the Relu/Clip absorbed into a quantize)."""
    return [_name(n) for n in plan.nodes if n.op_type not in ("Relu", "Clip")]


def _name(item: ir.Node | ir.Value | None) -> str:
    """Name of a node or tensor of the graph (onnx-ir names every node and value a graph holds)."""
    assert item is not None and item.name is not None, "a graph node or tensor has a name"
    return item.name


def _constant_input(node: ir.Node, idx: int) -> tuple[ir.Value, np.ndarray]:
    """Input ``idx`` of ``node`` and its data, for an input the rules found constant."""
    value = node.inputs[idx]
    data = const(value)
    assert value is not None and data is not None, "an input the rules found constant is constant"
    return value, data


def _is_float(value: ir.Value | None) -> TypeGuard[ir.Value]:
    return value is not None and value.dtype in (ir.DataType.FLOAT, None)


def _float_inputs(node: ir.Node, indices: tuple[int, ...]) -> list[ir.Value] | None:
    """The inputs at ``indices`` when each is a float tensor (or one of unknown type); else None."""
    values = []
    for i in indices:
        value = node.inputs[i]
        if not _is_float(value):
            return None
        values.append(value)
    return values


def _mismatched(values: list[ir.Value], ranges: dict[str, Range] | None, ratio: float) -> bool:
    if ranges is None:
        return False
    widths = [ranges[v.name].width for v in values if v.name in ranges]
    return len(widths) > 1 and min(widths) > 0 and max(widths) / min(widths) > ratio


def mark(
    model: ir.Model,
    config: QuantConfig,
    ranges: dict[str, Range] | None = None,
    spread: dict[str, float] | None = None,
) -> Plan:
    """Decide what to quantize; ``ranges=None`` gives the calibration candidates. ``spread`` is the
    largest-to-median channel ratio of FFN down-projection inputs (transformers; see ffn_spread).

    An op runs in int8 only if its output is wanted in int8: some quantized consumer reads it
    (looking through data-movement ops, and for Conv/Gemm/MatMul through a float activation).
    Ops are dropped until that holds everywhere, so nothing is quantized for no kernel to use it.
    """
    if config.target is Target.TRT:
        return _mark_trt(model, config, spread)
    plan = Plan()
    rules: dict[int, tuple[ir.Node, OpRule]] = {}
    transformer = transformer_defaults(model, config.transformer)
    for node in model.graph:
        if node.name in config.exclude:
            plan.kept_float[node.name] = "excluded by user"
            continue
        rule = rule_for(node, config.int8_silu)
        if rule is None:
            continue
        acts = _float_inputs(node, rule.activations)
        if acts is None:
            continue
        reason = _transformer_float(node, rule, config, spread) if transformer else None
        if reason:
            plan.kept_float[_name(node)] = reason
            continue
        if node.op_type == "Concat" and _mismatched([*acts, node.outputs[0]], ranges, config.max_range_ratio):
            plan.kept_float[_name(node)] = f"input ranges differ by more than {config.max_range_ratio:g}x"
            continue
        rules[id(node)] = (node, rule)
    changed = True
    while changed:  # drop data-movement/pooling ops whose output no quantized op reads
        changed = False
        for key, (node, rule) in list(rules.items()):
            if rule.output != "via_activation" and _wanted(node, rule, rules) is None:
                del rules[key]
                changed = True
    for node, rule in rules.values():
        path = _wanted(node, rule, rules)
        if path is None and node.op_type in ("Conv", "ConvTranspose", "Add"):
            # no integer Conv or Add kernel has a float output: int8 would only add error here
            plan.kept_float[_name(node)] = "output feeds float ops only (no int8 kernel for it)"
            continue
        if node.op_type == "Concat":
            rule = OpRule(rule.activations)  # ORT's QLinearConcat requantizes: each input keeps its scale
        _apply(plan, node, rule, path)
    return plan


def _mark_trt(model: ir.Model, config: QuantConfig, spread: dict[str, float] | None) -> Plan:
    """TensorRT's placement (``quant/trt.py``): the activation inputs and weights of weighted ops
    and the residual input of Adds; no outputs, no biases, no shared scales (TensorRT moves Q/DQ
    across pooling, Concat and data movement itself)."""
    plan = Plan()
    transformer = transformer_defaults(model, config.transformer)
    for node in model.graph:
        if node.name in config.exclude:
            plan.kept_float[_name(node)] = "excluded by user"
            continue
        rule = trt_rule(node)
        acts = _float_inputs(node, rule.activations) if rule is not None else None
        if rule is None or acts is None:
            continue
        reason = _transformer_float(node, rule, config, spread) if transformer else None
        if reason:
            plan.kept_float[_name(node)] = reason
            continue
        for v in acts:
            plan.add(_name(v))
        if rule.weight is not None:
            plan.weights.append((node, *rule.weight))
        plan.nodes.append(node)
    return plan


def _transformer_float(
    node: ir.Node, rule: OpRule, config: QuantConfig, spread: dict[str, float] | None = None
) -> str | None:
    """Why a transformer keeps this op in float (None: quantize it)."""
    if node.op_type == "Add" and rule.weight is None:
        return "residual Add (transformer default: the residual stream stays float)"
    if is_attention_matmul(node) and not config.int8_attention:
        return "attention MatMul (transformer default; int8_attention quantizes it)"
    if is_ffn_down(node) and not config.int8_ffn_down:
        ratio = (spread or {}).get(_name(node.inputs[0]))  # is_ffn_down: input 0 is there
        if ratio is None or ratio > config.ffn_spread:
            seen = "not measured" if ratio is None else f"{ratio:.1f}x"
            return (
                f"FFN down-projection whose GELU input has outlier channels (largest / median channel "
                f"{seen} > {config.ffn_spread:g}x; transformer default, int8_ffn_down quantizes it)"
            )
    return None


def _readers(value: ir.Value) -> list[tuple[ir.Node, ir.Value, list[ir.Value]]]:
    """(consumer, the tensor it reads, data-movement tensors passed through) for every real consumer."""
    found = []
    for use in value.uses():
        node = use.node
        if node.op_type in DATA_MOVEMENT and use.idx == 0 and not node.outputs[0].is_graph_output():
            for reader, read, path in _readers(node.outputs[0]):
                found.append((reader, read, [node.outputs[0], *path]))
        else:
            found.append((node, value, []))
    return found


def _reads_as_activation(reader: ir.Node, value: ir.Value, rules: dict[int, tuple[ir.Node, OpRule]]) -> bool:
    entry = rules.get(id(reader))
    return entry is not None and any(reader.inputs[i] is value for i in entry[1].activations)


def _wanted(node: ir.Node, rule: OpRule, rules: dict[int, tuple[ir.Node, OpRule]]) -> list[ir.Value] | None:
    """Tensors between this op's output and quantized readers (to share its scale), or None when the
    output should stay float: no quantized op reads it, directly, through data movement, or (for
    Conv/Gemm/MatMul) through a float activation such as SiLU or ReLU."""
    out = node.outputs[0]
    if out.is_graph_output():
        return None
    for reader, read, path in _readers(out):
        if _reads_as_activation(reader, read, rules):
            return path
    if rule.output == "via_activation":
        users = [u.node for u in out.uses()]
        if users and all(u.op_type in ACTIVATIONS for u in users):
            finals = [u.outputs[0] for u in users if u.op_type != "Sigmoid"] or [users[0].outputs[0]]
            if all(any(_reads_as_activation(r, v, rules) for r, v, _ in _readers(f)) for f in finals):
                return []
    return None


def _apply(plan: Plan, node: ir.Node, rule: OpRule, path: list[ir.Value] | None) -> None:
    """Mark inputs, weights and bias; the output too unless ``path`` is None (it stays float:
    Conv/Gemm/MatMul then still read int8 inputs and weights, in a float kernel)."""
    acts = _float_inputs(node, rule.activations)
    assert acts is not None, "mark() applies only rules whose activations are float tensors"
    for v in acts:
        plan.add(_name(v))
    out = node.outputs[0]
    if path is None:
        plan.kept_float[_name(node)] = (
            "output feeds float ops only: int8 inputs and weights, float output kernel"
        )
    else:
        plan.add(_name(out))
        for v in path:  # data movement after the output: same values, same scale
            plan.union(_name(out), _name(v))
    if rule.output == "same" and path is not None:
        for v in acts:
            plan.union(_name(v), _name(out))
    if rule.output == "via_activation" and path is not None:
        clip = _clipping_activation(out)
        if clip is not None:
            plan.nodes.append(clip)  # absorbed: the quantize to its range does its work
            clipped = _name(clip.outputs[0])
            plan.union(clipped, _name(out))  # Relu/Clip: quantizing to its output range saturates alike
            plan.range_of[_name(out)] = clipped
    if rule.weight is not None:
        idx, axis = rule.weight
        plan.weights.append((node, idx, axis))
        if rule.bias is not None:
            plan.biases.append((node, rule.bias))
    plan.nodes.append(node)


def _clipping_activation(value: ir.Value) -> ir.Node | None:
    """The single Relu/Clip consumer of ``value`` (whose effect quantization to its range repeats)."""
    users = [u.node for u in value.uses()]
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
        return users[0]
    return None


def _group_ranges(plan: Plan, ranges: dict[str, Range]) -> dict[str, Range]:
    merged: dict[str, Range] = {}
    for name in plan.groups:
        source = plan.range_of.get(name, name)
        if source not in ranges:
            continue
        root = plan.root(name)
        r = ranges[source]
        m = merged.get(root)
        merged[root] = r if m is None else Range(min(m.rmin, r.rmin), max(m.rmax, r.rmax))
    return merged


def emit(
    model: ir.Model,
    plan: Plan,
    ranges: dict[str, Range],
    config: QuantConfig,
    fmt: Int8Cpu = Int8Cpu.PORTABLE,
) -> Counter[str]:
    """Insert Q/DQ for the plan, weights stored as ``fmt`` needs; returns counts of quantized ops by type."""
    graph = model.graph
    act_dtype = np.int8 if config.symmetric_activations else np.uint8
    group_ranges = _group_ranges(plan, ranges)
    values = {v.name: v for v in _all_values(graph)}
    act_qp: dict[str, QParams] = {}  # by dequantized value name
    quantized = {id(n) for n in plan.nodes}
    for name in plan.groups:
        r = group_ranges.get(plan.root(name))
        if r is None or name not in values:
            continue
        qp = compute_qparams(r.rmin, r.rmax, act_dtype, config.symmetric_activations)
        readers = _dq_readers(values[name], plan, quantized)
        act_qp[_name(_insert_qdq(graph, values[name], qp, readers))] = qp
    per_channel = isinstance(config.weights, PerChannel)
    weight_qp: dict[int, QParams] = {}
    shared: dict[tuple[int, int | None], tuple[ir.Value, QParams]] = {}  # one DQ per shared weight
    floors = _bias_scale_floors(plan, act_qp, per_channel)
    storage = weight_storage(config, fmt)
    for node, idx, axis in plan.weights:
        axis = axis if per_channel else None
        key = (id(node.inputs[idx]), axis)
        if key not in shared:
            shared[key] = quantize_weight(graph, node, idx, axis, storage, floors.get(id(node)))
        dq_out, qp = shared[key]
        node.replace_input_with(idx, dq_out)
        weight_qp[id(node)] = qp
    for node, idx in plan.biases:
        in_qp = act_qp.get(_name(node.inputs[0]))
        if in_qp is not None and id(node) in weight_qp:
            _quantize_bias(graph, node, idx, in_qp, weight_qp[id(node)])
    graph.sort()
    return Counter(n.op_type for n in plan.nodes)


def _all_values(graph: ir.Graph) -> list[ir.Value]:
    vals = list(graph.inputs)
    for node in graph:
        vals.extend(node.outputs)
    return vals


def _dq_readers(value: ir.Value, plan: Plan, quantized: set[int]) -> list[tuple[ir.Node, int]] | None:
    """Which uses of ``value`` read the dequantized copy; None means all of them.

    A tensor made by a quantized op exists only in int8 once ONNX Runtime fuses that op, so every
    reader takes the dequantized value. A tensor made by a float op (LayerNorm, GELU, an input)
    stays available in float: float readers (residual Adds above all) keep the exact value and
    only quantized readers, directly or through data movement, see the quantization error.
    ``quantized`` holds the ids of the plan's nodes.
    """
    producer = value.producer()
    if producer is not None and id(producer) in quantized:
        return None
    return [
        (u.node, u.idx)
        for u in value.uses()
        if id(u.node) in quantized
        or (u.node.op_type in DATA_MOVEMENT and u.node.outputs[0].name in plan.groups)
    ]


def _insert_qdq(
    graph: ir.Graph, value: ir.Value, qp: QParams, readers: list[tuple[ir.Node, int]] | None = None
) -> ir.Value:
    """Q/DQ after ``value``; ``readers`` (node, input index) get the DQ output (None: every use)."""
    scale = new_initializer(graph, np.asarray(qp.scale, np.float32).reshape(()), f"{value.name}_scale")
    zero = new_initializer(graph, np.asarray(qp.zero_point).reshape(()), f"{value.name}_zero_point")
    dq_out = ir.Value(name=f"{value.name}_dq", shape=value.shape, type=value.type)
    if readers is None:
        ir.convenience.replace_all_uses_with(value, dq_out)
    else:
        for node, idx in readers:
            node.replace_input_with(idx, dq_out)
    q = ir.Node("", "QuantizeLinear", [value, scale, zero], num_outputs=1, name=f"{value.name}_Q")
    q.outputs[0].name = f"{value.name}_q"
    dq = ir.Node(
        "", "DequantizeLinear", [q.outputs[0], scale, zero], outputs=[dq_out], name=f"{value.name}_DQ"
    )
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [q, dq])
    else:
        graph.insert_before(next(iter(graph)), [q, dq])
    return dq_out


def quantize_weight(
    graph: ir.Graph,
    node: ir.Node,
    idx: int,
    axis: int | None,
    storage: WeightStorage = PLAIN_INT8,
    min_scale: np.ndarray | None = None,
) -> tuple[ir.Value, QParams]:
    """Replace constant input ``idx`` of ``node`` by its integer weight (symmetric, per channel along
    ``axis``, stored as ``storage`` says: plain or pair-safe int8, or uint8) -> DequantizeLinear.
    ``min_scale`` raises the scale of channels whose bias would not fit int32."""
    weight, w = _constant_input(node, idx)
    q, qp = store_weight(w, axis, storage, min_scale, _depthwise(node, w))
    return _replace_with_dq(graph, node, idx, q, qp, f"{weight.name}"), qp


def _depthwise(node: ir.Node, w: np.ndarray) -> bool:
    """A grouped Conv with one input channel per group: MLAS's depthwise kernel widens to int32."""
    return node.op_type == "Conv" and attr_int(node, "group", 1) > 1 and w.ndim >= 3 and w.shape[1] == 1


#: Largest int32 a bias may take, with room for the float32 rounding of its scale.
_BIAS_LIMIT = float(2**31 - 1) * (1 - 1e-5)


def _bias_scale_floors(plan: Plan, act_qp: dict[str, QParams], per_channel: bool) -> dict[int, np.ndarray]:
    """Smallest weight scale per channel that keeps ``bias / (input scale x weight scale)`` inside
    int32 (ONNX Runtime's quantizer does the same): a near-zero weight channel beside a large bias
    would otherwise overflow its int32 bias. Keyed by the id of the node."""
    floors = {}
    for node, idx in plan.biases:
        in_qp = act_qp.get(_name(node.inputs[0]))
        b = const(node.inputs[idx])
        if in_qp is None or b is None:
            continue
        need = np.abs(b.astype(np.float64)).reshape(-1) / (float(in_qp.scale) * _BIAS_LIMIT)
        floors[id(node)] = (need if per_channel else np.asarray(need.max())).astype(np.float32)
    return floors


def _quantize_bias(graph: ir.Graph, node: ir.Node, idx: int, in_qp: QParams, w_qp: QParams) -> None:
    """int32 bias = round(b / (input scale x weight scale)), computed in float64 and saturated to
    int32 (float32 cannot hold 2**31 - 1: it rounds up to 2**31, which the cast wraps to -2**31)."""
    bias, data = _constant_input(node, idx)
    b = data.astype(np.float64)
    qp = bias_qparams(in_qp.scale, w_qp.scale)
    scale = np.broadcast_to(qp.scale, b.shape) if qp.scale.ndim else qp.scale
    scale64 = np.asarray(scale, np.float64)
    ratio = np.where(scale64 > 0, b / np.where(scale64 > 0, scale64, 1.0), 0.0)
    q = np.clip(np.rint(ratio), -(2**31), 2**31 - 1).astype(np.int32)
    full = QParams(
        np.asarray(scale, np.float32), np.zeros(np.shape(scale), np.int32), 0 if np.ndim(scale) else None
    )
    _replace_with_dq(graph, node, idx, q, full, f"{bias.name}")


def _replace_with_dq(
    graph: ir.Graph, node: ir.Node, idx: int, q: np.ndarray, qp: QParams, hint: str
) -> ir.Value:
    """Insert int8/int32 constant -> DequantizeLinear before ``node`` and feed it to input ``idx``."""
    qv = new_initializer(graph, q, f"{hint}_quantized")
    scale = new_initializer(graph, np.asarray(qp.scale, np.float32), f"{hint}_scale")
    zero = new_initializer(graph, np.asarray(qp.zero_point), f"{hint}_zero_point")
    attrs = (
        {"axis": ir.Attr("axis", ir.AttributeType.INT, qp.axis)}
        if qp.axis is not None and np.ndim(qp.scale)
        else {}
    )
    dq = ir.Node(
        "", "DequantizeLinear", [qv, scale, zero], attributes=attrs, num_outputs=1, name=f"{qv.name}_DQ"
    )
    dq.outputs[0].name = f"{qv.name}_dequantized"
    graph.insert_before(node, dq)
    node.replace_input_with(idx, dq.outputs[0])
    return dq.outputs[0]
