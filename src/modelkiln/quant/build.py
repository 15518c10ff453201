"""Building INT8 models from a prepared (calibrated) float model, and what a build is summarised as.

A build never changes the prepared model, so one calibration serves any number of builds: the
full model, one layer at a time (sensitivity), the candidates of an accuracy-budget search."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import onnx
import onnx_ir as ir

from modelkiln.errors import QuantizationError
from modelkiln.graph.passes.remove_dead import RemoveDead
from modelkiln.quant.config import QuantConfig, Target
from modelkiln.quant.dynamic import dynamic_candidates, quantize_dynamic_matmuls
from modelkiln.quant.formats import describe_format, metadata, resolve, stamp
from modelkiln.quant.prepare import Calibrated
from modelkiln.quant.qdq import Plan, emit, isolate, layers, mark
from modelkiln.quant.trt import check_trt
from modelkiln.quant.weight_only import quantize_weights_only
from modelkiln.runtime import kernels
from modelkiln.runtime.kernels.lookup import find_chains

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


@dataclass
class QuantizeResult:
    """The summary of one INT8 model (what ``kiln quantize`` prints and writes with --json)."""

    source: str
    output: str
    method: str
    target: str
    calibration_samples: int
    quantized_ops: dict[str, int]
    float_ops: dict[str, int]
    kept_float: dict[str, str] = field(default_factory=dict)
    size_before: int = 0
    size_after: int = 0
    smoothed: dict[str, str] = field(default_factory=dict)
    #: how the INT8 model computes, as written in its metadata: "portable (weights u8, ...)"
    int8_format: str = ""
    #: activation chains kiln's runtime runs as one exact int8 lookup (LookupTable), by kind
    lookups: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Built(NamedTuple):
    """One INT8 model and what its summary needs: the plan (which nodes stayed float, and why),
    the quantized op counts, and the config it was built with."""

    model: onnx.ModelProto
    plan: Plan
    counts: Counter[str]
    config: QuantConfig
    lookups: Counter[str]


def build(cal: Calibrated, config: QuantConfig, only: str | None = None, check: bool = True) -> Built:
    """One INT8 model from a calibrated float model (which is left as it was); with ``only``, just
    that node is quantized (as it would be in the full model), for sensitivity analysis."""
    model = ir.from_proto(cal.proto)
    fmt = resolve(config.cpu)
    counts: Counter[str]
    if config.weight_only:
        counts, kept = quantize_weights_only(model, config)
        plan = Plan(kept_float=kept)
    elif config.dynamic:
        counts = quantize_dynamic_matmuls(model, config, only, fmt)
        plan = Plan()
    else:
        plan = mark(model, config, cal.ranges, cal.spread)
        ranges = cal.ranges
        if only is not None:
            plan, ranges = isolate(plan, only, ranges)
        counts = emit(model, plan, ranges, config, fmt)
    RemoveDead()(model)  # the float weights the quantized ones replaced
    chains = find_chains(model.graph) if _use_kernels(config) else []
    lookups = Counter(c.name for c in chains if not c.clips_only)
    result = ir.to_proto(model)
    props = metadata(config, fmt)
    if lookups:
        props[kernels.METADATA_KEY] = kernels.LOOKUP_OP
    stamp(result, props)
    if check:
        onnx.checker.check_model(result)
        if config.target is Target.TRT and not (config.weight_only or config.dynamic):
            problems = check_trt(result)
            if problems:
                raise QuantizationError(
                    f"{cal.source}: the trt-target INT8 graph breaks TensorRT's Q/DQ rules: "
                    + "; ".join(problems[:5])
                )
    return Built(result, plan, counts, config, lookups)


def _use_kernels(config: QuantConfig) -> bool:
    """Whether kiln's runtime should run this model's activation chains as lookups: static INT8
    for ONNX Runtime CPU, unless standard kernels only were asked for. The file is standard QDQ
    either way; only its metadata differs."""
    return (
        config.custom_kernels and config.target is Target.CPU and not (config.weight_only or config.dynamic)
    )


def quantized_layers(cal: Calibrated, config: QuantConfig) -> list[str]:
    """The ops a full build with ``config`` runs in int8, in graph order."""
    model = ir.from_proto(cal.proto)
    if config.weight_only:
        return []
    if config.dynamic:
        return [n.name for n in dynamic_candidates(model, config) if n.name is not None]
    return layers(mark(model, config, cal.ranges, cal.spread))


def summarize(cal: Calibrated, built: Built, output: str) -> QuantizeResult:
    """What a build did: int8 and float op counts, the nodes kept float and why, sizes."""
    config, result = built.config, built.model
    float_ops = Counter(
        n.op_type for n in result.graph.node if n.op_type not in _QDQ_OPS and n.domain != kernels.DOMAIN
    )
    for op, n in built.counts.items():
        float_ops[op] -= n
    return QuantizeResult(
        cal.source,
        output,
        "weight-only" if config.weight_only else "dynamic" if config.dynamic else config.method.value,
        config.target.value,
        cal.samples,
        dict(built.counts),
        {k: v for k, v in float_ops.items() if v > 0},
        dict(built.plan.kept_float),
        cal.size_before,
        result.ByteSize(),
        smoothed=dict(cal.smoothed),
        int8_format=describe_format({p.key: p.value for p in result.metadata_props}),
        lookups=dict(built.lookups),
    )
