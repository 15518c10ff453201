"""SmoothQuant (Xiao et al., 2023): divide the input channels of a linear layer by ``s`` and
multiply the matching weight rows by ``s``, with ``s_c = max|X_c|^alpha / max|W_c|^(1-alpha)``:
a few outlier activation channels (typical of transformers) then no longer set the scale of all
the others, and the weights, which quantize per output channel, absorb the difference.

The division is folded into what produces the activation, so the float graph stays equivalent
with no new node:
- ``layernorm``: a LayerNormalization read only by the linears (pre-LN blocks: CLIP, ViT, GPT):
  its scale and bias are divided;
- ``linear``: an attention output projection: the value projection's output channels are divided
  (they reach the context through head split, attention and head merge unchanged).
Other sites are left alone: a post-LN BERT LayerNorm also feeds the residual Add (LayerNorm is not
equivariant to per-channel scaling, so no fold exists), and a GELU output has no linear producer.
Dividing inside the QuantizeLinear instead (a per-channel activation scale) was tried: ONNX
Runtime's per-axis QuantizeLinear made MiniLM 2x slower for no accuracy gain, so it is not offered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from modelkiln.errors import ConfigError, QuantizationError
from modelkiln.ir_utils import attr_int, const, new_initializer, producer
from modelkiln.quant.collect import collect
from modelkiln.quant.config import QuantConfig
from modelkiln.quant.rules import rule_for
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend

log = logging.getLogger(__name__)
_SCALE_LIMITS = (1e-4, 1e4)


@dataclass
class SmoothingSite:
    """An activation tensor and the linear layers (MatMul/Gemm with constant weights) reading it."""

    tensor: ir.Value
    linears: list[ir.Node]
    fold: str | None = None  # "layernorm" | "linear" | None (per-channel quantizer scale)

    @property
    def name(self) -> str:
        return _name(self.tensor)


def _name(value: ir.Value | None) -> str:
    """Name of a tensor this module found in the graph (onnx-ir names every value a graph holds)."""
    assert value is not None and value.name is not None, "a graph tensor has a name"
    return value.name


def _data(value: ir.Value | None) -> np.ndarray:
    """Data of a tensor this module has already found constant."""
    data = const(value)
    assert data is not None, "a tensor found constant is constant"
    return data


def _input(node: ir.Node, i: int) -> ir.Value:
    """Input ``i`` of ``node``, one its op requires (a malformed graph that omits it is refused)."""
    value = node.inputs[i]
    if value is None:
        raise ValueError(f"{node.op_type} node {node.name!r} has no input {i}, which the op requires")
    return value


def input_axis(node: ir.Node) -> int:
    """Axis of a linear's weight that runs over input channels."""
    return 1 if node.op_type == "Gemm" and attr_int(node, "transB", 0) else 0


def find_sites(model: ir.Model, exclude: Iterable[str] = ()) -> list[SmoothingSite]:
    """Activations read as input 0 by linear layers with 2-D constant weights."""
    by_tensor: dict[str, SmoothingSite] = {}
    skip = set(exclude)
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.name in skip:
            continue
        rule = rule_for(node)
        w = const(node.inputs[1])
        if rule is None or rule.weight is None or w is None or w.ndim != 2:
            continue
        x = _input(node, 0)
        if x.is_graph_input() or x.producer() is None:
            continue  # nothing to fold into; a graph input is rarely an outlier case
        site = SmoothingSite(x, [])
        by_tensor.setdefault(site.name, site).linears.append(node)
    sites = list(by_tensor.values())
    for site in sites:
        site.fold = _foldable(site)
    return sites


def _foldable(site: SmoothingSite) -> str | None:
    """How the site's division can be folded; None where only the quantizer can do it."""
    x = site.tensor
    readers = {id(u.node) for u in x.uses() if u.node.op_type != "Shape"}
    only_linears = readers == {id(n) for n in site.linears} and not x.is_graph_output()
    if only_linears and _layernorm_params(_layernorm_above(x)) is not None:
        return "layernorm"
    if only_linears and _value_projection(x) is not None:
        return "linear"
    return None


def _layernorm_above(x: ir.Value) -> ir.Node | None:
    """The node producing ``x``, looking through single-reader Transposes that keep the last axis
    in place (a sequence-first attention layout): per-channel scaling commutes with them."""
    node = x.producer()
    while node is not None and node.op_type == "Transpose" and _single_reader(_input(node, 0)):
        perm = node.attributes.get("perm")
        dims = list(perm.as_ints()) if perm is not None else None
        if not dims or dims[-1] != len(dims) - 1:
            return None
        node = _input(node, 0).producer()
    return node


def _layernorm_params(node: ir.Node | None) -> tuple[np.ndarray, np.ndarray | None] | None:
    if node is None or node.op_type != "LayerNormalization" or attr_int(node, "axis", -1) != -1:
        return None
    gamma = const(node.inputs[1])
    beta = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if (
        gamma is None
        or gamma.ndim != 1
        or (len(node.inputs) > 2 and node.inputs[2] is not None and beta is None)
    ):
        return None
    return gamma, beta


def _single_reader(value: ir.Value) -> bool:
    """One node reads the values (Shape readers only read the shape, which smoothing keeps)."""
    readers = {id(u.node) for u in value.uses() if u.node.op_type != "Shape"}
    return len(readers) == 1 and not value.is_graph_output()


def _value_projection(x: ir.Value) -> tuple[ir.Node, ir.Node | None, int] | None:
    """(V projection linear, its bias Add, first output column) when ``x`` is an attention context:
    head merge (Transpose/Reshape) <- MatMul(probabilities, V) <- head split <- [Split of a merged
    QKV projection] <- [Add bias] <- linear."""
    node = producer(_up_through_movement(x))
    if node is None or node.op_type != "MatMul" or not _single_reader(_input(node, 1)):
        return None
    v = _up_through_movement(_input(node, 1))
    if v is None:
        return None
    node = v.producer()
    offset = 0
    if node is not None and node.op_type == "Split":
        sizes = const(node.inputs[1]) if len(node.inputs) > 1 else None
        if sizes is None or attr_int(node, "axis", 0) != -1 or not _single_reader(_input(node, 0)):
            return None
        offset = int(sum(sizes[: [o.name for o in node.outputs].index(v.name)]))
        node = _input(node, 0).producer()
    bias_add = None
    if node is not None and node.op_type == "Add" and _single_reader(node.outputs[0]):
        consts = [i for i, inp in enumerate(node.inputs) if const(inp) is not None]
        bias = const(node.inputs[consts[0]]) if len(consts) == 1 else None
        if bias is None or bias.ndim != 1:
            return None
        bias_add = node
        node = _input(node, 1 - consts[0]).producer()
    if node is None or node.op_type not in ("MatMul", "Gemm") or not _single_reader(node.outputs[0]):
        return None
    w = const(node.inputs[1])
    if w is None or w.ndim != 2 or (node.op_type == "Gemm" and len(node.inputs) > 2):
        return None
    return node, bias_add, offset


def _up_through_movement(value: ir.Value) -> ir.Value | None:
    """Walk up single-reader Reshape/Transpose ops to the tensor they rearrange."""
    while True:
        node = value.producer()
        if node is None or node.op_type not in ("Reshape", "Transpose"):
            return value
        if not _single_reader(_input(node, 0)):
            return None
        value = _input(node, 0)


def channel_absmax(
    model: onnx.ModelProto,
    names: list[str],
    batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    batch_size: int,
) -> dict[str, np.ndarray]:
    """max |x| per channel (last axis) of each tensor over all batches."""
    found: dict[str, np.ndarray] = {}

    def observe(tensors: dict[str, np.ndarray]) -> None:
        for name, t in tensors.items():
            m = np.abs(t.reshape(-1, t.shape[-1])).max(0)
            found[name] = m if name not in found else np.maximum(found[name], m)

    collect(model, names, batches, observe, batch_size)
    return found


def smoothing_scale(
    act_absmax: np.ndarray, weights: list[np.ndarray], axes: list[int], alpha: float
) -> np.ndarray:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel (1 where a channel is all zero)."""
    w_max = np.max([np.abs(w).max(axis=1 - a) for w, a in zip(weights, axes, strict=True)], axis=0)
    a = np.asarray(act_absmax, np.float64)
    ok = (a > 0) & (w_max > 0)
    s = np.where(ok, a**alpha / np.where(ok, w_max, 1.0) ** (1 - alpha), 1.0)
    return np.clip(s, *_SCALE_LIMITS).astype(np.float32)


def scale_weight_rows(graph: ir.Graph, node: ir.Node, s: np.ndarray) -> None:
    """Multiply the weight's input-channel rows by ``s`` (a fresh initializer: weights may be shared)."""
    w = _data(node.inputs[1])
    axis = input_axis(node)
    shape = [1, 1]
    shape[axis] = -1
    node.replace_input_with(
        1, new_initializer(graph, (w * s.reshape(shape)).astype(w.dtype), _name(node.inputs[1]))
    )


def fold(graph: ir.Graph, site: SmoothingSite, s: np.ndarray) -> None:
    """Divide the activation by ``s`` in its producer and multiply the linears' weight rows by it."""
    if site.fold == "layernorm":
        ln = _layernorm_above(site.tensor)
        params = _layernorm_params(ln)
        assert ln is not None and params is not None, "find_sites found this LayerNorm"
        gamma, beta = params
        ln.replace_input_with(1, new_initializer(graph, (gamma / s).astype(gamma.dtype), _name(ln.inputs[1])))
        if beta is not None:
            ln.replace_input_with(
                2, new_initializer(graph, (beta / s).astype(beta.dtype), _name(ln.inputs[2]))
            )
    elif site.fold == "linear":
        projection = _value_projection(site.tensor)
        assert projection is not None, "find_sites found this value projection"
        proj, bias_add, offset = projection
        cols = slice(offset, offset + s.size)
        w = _data(proj.inputs[1]).copy()
        if input_axis(proj) == 0:
            w[:, cols] /= s
        else:
            w[cols, :] /= s[:, None]
        proj.replace_input_with(1, new_initializer(graph, w, _name(proj.inputs[1])))
        if bias_add is not None:
            idx = next(i for i, v in enumerate(bias_add.inputs) if const(v) is not None)
            b = _data(bias_add.inputs[idx]).copy()
            b[cols] /= s
            bias_add.replace_input_with(idx, new_initializer(graph, b, _name(bias_add.inputs[idx])))
    else:
        raise ValueError(f"{site.name}: no fold for this site")
    for node in site.linears:
        scale_weight_rows(graph, node, s)


def site_scales(
    sites: list[SmoothingSite], absmax: dict[str, np.ndarray], alpha: float
) -> dict[str, np.ndarray]:
    """Smoothing factors per site tensor."""
    out = {}
    for site in sites:
        if site.name not in absmax:
            continue
        weights = [_data(n.inputs[1]) for n in site.linears]
        axes = [input_axis(n) for n in site.linears]
        if absmax[site.name].shape[0] != weights[0].shape[axes[0]]:
            continue  # last axis is not the input-channel axis (e.g. a transposed input)
        out[site.name] = smoothing_scale(absmax[site.name], weights, axes, alpha)
    return out


def smooth_model(
    model: ir.Model,
    config: QuantConfig,
    feeds: Callable[[], Iterable[dict[str, np.ndarray]]],
    batch_size: int = 8,
    tolerance: float = 1e-4,
) -> tuple[ir.Model, dict[str, str]]:
    """Apply SmoothQuant with ``config.smoothquant`` as alpha: the model with the folds applied and
    how each tensor was smoothed. The folded model is checked against the original on the first
    calibration batch; if an attention fold did not preserve the outputs (a head layout we do not
    recognise), only the LayerNorm folds are kept."""
    if config.smoothquant is None:
        raise ConfigError("SmoothQuant needs config.smoothquant (its alpha)")
    alpha = float(config.smoothquant)
    original = ir.to_proto(model)
    sites = [s for s in find_sites(model, config.exclude) if s.fold]
    if not sites:
        log.warning("SmoothQuant: no LayerNorm or attention projection to fold into; nothing smoothed")
        return model, {}
    absmax = channel_absmax(original, [s.name for s in sites], feeds, batch_size)
    for kinds in (("layernorm", "linear"), ("layernorm",)):
        candidate = ir.from_proto(original)
        how = _apply(candidate, find_sites(candidate, config.exclude), absmax, alpha, kinds)
        error = _max_relative_change(original, ir.to_proto(candidate), next(iter(feeds())))
        if error <= tolerance:
            log.info("SmoothQuant alpha=%g: %s (float outputs change %.1e)", alpha, _summary(how), error)
            return candidate, how
        log.warning("SmoothQuant folds %s changed the float outputs by %.1e; retrying without", kinds, error)
    raise QuantizationError("SmoothQuant could not be folded without changing the float model")


def _apply(
    model: ir.Model,
    sites: list[SmoothingSite],
    absmax: dict[str, np.ndarray],
    alpha: float,
    kinds: tuple[str, ...],
) -> dict[str, str]:
    scales = site_scales([s for s in sites if s.fold in kinds], absmax, alpha)
    how: dict[str, str] = {}
    for site in sites:
        if site.name in scales:
            fold(model.graph, site, scales[site.name])
            assert site.fold is not None, "fold() refuses a site without a fold"
            how[site.name] = site.fold
    return how


def _max_relative_change(
    before: onnx.ModelProto, after: onnx.ModelProto, feed: dict[str, np.ndarray]
) -> float:
    a = cpu_backend(before, optimization=GraphOptimization.DISABLE).infer(feed).values()
    b = cpu_backend(after, optimization=GraphOptimization.DISABLE).infer(feed).values()
    return max(
        float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12))
        if np.issubdtype(x.dtype, np.floating)
        else 0.0
        for x, y in zip(a, b, strict=True)
    )


def _summary(how: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for kind in how.values():
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing to smooth"
