"""``quantize``: optimise, calibrate on real inputs, place Q/DQ, save; the result loads in plain
ONNX Runtime (integer kernels on CPU) and in TensorRT (explicit quantization)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from modelkiln import zoo as zoo_registry
from modelkiln.errors import QuantizationError
from modelkiln.graph.ir_utils import const
from modelkiln.graph.manager import PassManager
from modelkiln.graph.passes.remove_dead import RemoveDead
from modelkiln.graph.pipeline import build_pipeline
from modelkiln.onnx_io import load_model, save_model
from modelkiln.quant.calibrators import CALIBRATORS, Calibrator, PercentileCalibrator, Range
from modelkiln.quant.collect import collect
from modelkiln.quant.config import Method, QuantConfig
from modelkiln.quant.data import batches, list_samples
from modelkiln.quant.dynamic import dynamic_candidates, quantize_dynamic_matmuls
from modelkiln.quant.formats import describe_format, metadata, resolve, stamp
from modelkiln.quant.qdq import Plan, emit, isolate, layers, mark
from modelkiln.quant.rules import is_ffn_down, transformer_defaults
from modelkiln.quant.smoothquant import channel_absmax, smooth_model
from modelkiln.quant.weight_only import quantize_weights_only

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
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

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Calibrated:
    """A float model ready to be quantized any number of ways: optimised, SmoothQuant folds applied,
    activation ranges calibrated. ``build`` turns it into one INT8 model per config."""

    source: str
    proto: onnx.ModelProto
    ranges: dict[str, Range]
    samples: int
    size_before: int
    smoothed: dict[str, str] = field(default_factory=dict)  # tensor -> how: layernorm | linear
    entry: zoo_registry.ZooModel | None = None
    files: list[Path] = field(default_factory=list)
    #: largest / median channel max |x| of FFN down-projection inputs (transformers only)
    spread: dict[str, float] = field(default_factory=dict)


def make_calibrator(config: QuantConfig) -> Calibrator:
    if config.method is Method.PERCENTILE:
        return PercentileCalibrator(config.percentile)
    return CALIBRATORS[config.method.value]()


def input_names(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def calibrate(
    model: onnx.ModelProto,
    tensors: list[str],
    feeds: Callable[[], Iterable[dict[str, np.ndarray]]],
    config: QuantConfig,
    batch_size: int = 8,
    progress: Any = None,
) -> dict[str, Range]:
    """Ranges of ``tensors`` over the calibration feeds."""
    calibrator = make_calibrator(config)
    collect(model, tensors, feeds, calibrator.observe, batch_size, progress=progress)
    return calibrator.compute()


def bounded_ranges(model: ir.Model, ranges: dict[str, Range]) -> dict[str, Range]:
    """Clip outputs (ReLU6 …) use their analytic bounds: values pile up at the bound, so clipping
    calibrators (entropy above all) would cut what the next layers rely on."""
    out = {}
    for node in model.graph:
        if node.op_type != "Clip" or node.outputs[0].name not in ranges:
            continue
        lo = const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        hi = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if lo is not None and hi is not None:
            out[node.outputs[0].name] = Range(float(lo), float(hi))
    return out


def prepare(
    source: str | Path,
    calib: str | Path | None,
    zoo_name: str | None = None,
    config: QuantConfig | None = None,
    calib_size: int = 100,
    batch_size: int = 8,
    progress: Any = None,
) -> Calibrated:
    """Optimise ``source``, apply SmoothQuant when asked, calibrate (not for weight-only)."""
    config = config or QuantConfig()
    proto = load_model(source)
    entry = zoo_registry.get(zoo_name, _image_size(proto)) if zoo_name else None
    model = ir.from_proto(proto)
    PassManager(build_pipeline("portable"), verify=False).run(model)
    candidates = mark(model, config)
    if not candidates.weights:
        raise QuantizationError(f"{source}: no Conv/Gemm/MatMul with constant float weights to quantize")
    if config.weight_only or config.dynamic:  # nothing to calibrate; samples kept for sensitivity
        files = list_samples(calib, calib_size) if calib is not None else []
        return Calibrated(str(source), ir.to_proto(model), {}, 0, proto.ByteSize(), entry=entry, files=files)
    if calib is None:
        raise QuantizationError(f"{source}: static INT8 needs calibration data (--calib DIR)")
    files = list_samples(calib, calib_size)
    names = input_names(proto)

    def feeds() -> Iterable[dict[str, np.ndarray]]:
        return batches(files, names, entry, batch_size)

    smoothed: dict[str, str] = {}
    if config.smoothquant is not None:
        model, smoothed = smooth_model(model, config, feeds, batch_size)
    optimized = ir.to_proto(model)
    ranges = calibrate(optimized, candidates.activations, feeds, config, batch_size, progress)
    ranges.update(bounded_ranges(model, ranges))
    spread = ffn_spread(model, optimized, config, feeds, batch_size)
    return Calibrated(
        str(source), optimized, ranges, len(files), proto.ByteSize(), smoothed, entry, files, spread
    )


def ffn_spread(
    model: ir.Model,
    proto: onnx.ModelProto,
    config: QuantConfig,
    feeds: Callable[[], Iterable[dict[str, np.ndarray]]],
    batch_size: int,
) -> dict[str, float]:
    """Largest / median per-channel max |x| of each FFN down-projection input (one pass over the
    calibration data, transformers only): which of them a per-tensor int8 scale cannot serve."""
    transformer = transformer_defaults(model, config.transformer)
    if not transformer or config.int8_ffn_down:
        return {}
    names = sorted({n.inputs[0].name for n in model.graph if is_ffn_down(n)})
    if not names:
        return {}
    absmax = channel_absmax(proto, names, feeds, batch_size)
    return {k: float(v.max() / max(float(np.median(v)), 1e-12)) for k, v in absmax.items()}


def build(
    cal: Calibrated, config: QuantConfig, only: str | None = None, check: bool = True
) -> tuple[onnx.ModelProto, Plan, Counter]:
    """One INT8 model from a calibrated float model (which is left as it was); with ``only``, just
    that node is quantized (as it would be in the full model), for sensitivity analysis."""
    model = ir.from_proto(cal.proto)
    fmt = resolve(config.cpu)
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
    result = ir.to_proto(model)
    stamp(result, metadata(config, fmt))
    if check:
        onnx.checker.check_model(result)
    return result, plan, counts


def quantized_layers(cal: Calibrated, config: QuantConfig) -> list[str]:
    """The ops a full build with ``config`` runs in int8, in graph order."""
    model = ir.from_proto(cal.proto)
    if config.weight_only:
        return []
    if config.dynamic:
        return [n.name for n in dynamic_candidates(model, config)]
    return layers(mark(model, config, cal.ranges, cal.spread))


def summarize(
    cal: Calibrated, config: QuantConfig, result: onnx.ModelProto, plan: Plan, counts: Counter, output: str
) -> QuantizeResult:
    float_ops = Counter(
        n.op_type
        for n in result.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
    )
    for op, n in counts.items():
        float_ops[op] -= n
    return QuantizeResult(
        cal.source,
        output,
        "weight-only" if config.weight_only else "dynamic" if config.dynamic else config.method.value,
        config.target.value,
        cal.samples,
        dict(counts),
        {k: v for k, v in float_ops.items() if v > 0},
        plan.kept_float,
        cal.size_before,
        result.ByteSize(),
        smoothed=dict(cal.smoothed),
        int8_format=describe_format({p.key: p.value for p in result.metadata_props}),
    )


def quantize(
    source: str | Path,
    output: str | Path,
    calib: str | Path | None,
    zoo_name: str | None = None,
    config: QuantConfig | None = None,
    calib_size: int = 100,
    batch_size: int = 8,
    progress: Any = None,
) -> QuantizeResult:
    """Quantize ``source`` to INT8 QDQ at ``output``; nothing is written if any step fails."""
    config = config or QuantConfig()
    cal = prepare(source, calib, zoo_name, config, calib_size, batch_size, progress)
    result, plan, counts = build(cal, config)
    save_model(result, Path(output))
    return summarize(cal, config, result, plan, counts, str(output))


def _image_size(model: onnx.ModelProto) -> int | None:
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[3].HasField("dim_value"):
            return dims[3].dim_value
    return None
