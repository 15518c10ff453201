"""Preparing a float model for quantization, once: optimise it, fold SmoothQuant in, calibrate the
activation ranges and measure FFN down-projection spreads. Every INT8 model built afterwards
(full, one layer for sensitivity, candidates of a budget search) starts from the result."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from modelkiln import zoo as zoo_registry
from modelkiln.data.feeds import Feed, list_samples, model_feeds
from modelkiln.errors import QuantizationError
from modelkiln.graph.manager import PassManager
from modelkiln.graph.pipeline import build_pipeline
from modelkiln.ir_utils import const
from modelkiln.onnx_io import load_model
from modelkiln.quant.calibrators import CALIBRATORS, Calibrator, PercentileCalibrator, Range
from modelkiln.quant.collect import collect
from modelkiln.quant.config import CalibrationData, Method, QuantConfig, Target
from modelkiln.quant.qdq import mark
from modelkiln.quant.rules import is_ffn_down, transformer_defaults
from modelkiln.quant.smoothquant import channel_absmax, smooth_model
from modelkiln.quant.stem import space_to_depth_stem

log = logging.getLogger(__name__)
Feeds = Callable[[], Iterable[Feed]]


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


def calibrate(
    model: onnx.ModelProto,
    tensors: list[str],
    feeds: Feeds,
    config: QuantConfig,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
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
    config: QuantConfig,
    data: CalibrationData,
    progress: Callable[[int], None] | None = None,
) -> Calibrated:
    """Optimise ``source``, apply SmoothQuant when asked, calibrate (not for weight-only or
    dynamic, whose samples are only listed, for sensitivity analysis)."""
    proto = load_model(source)
    entry = zoo_registry.get(data.zoo, _image_size(proto)) if data.zoo else None
    model = ir.from_proto(proto)
    PassManager(build_pipeline("portable"), verify=False).run(model)
    if config.target is Target.CPU and not (config.weight_only or config.dynamic):
        stem = space_to_depth_stem(model)
        if stem is not None:
            log.info("%s: stem %s runs as SpaceToDepth + a stride-1 convolution", source, stem)
    candidates = mark(model, config)
    if not candidates.weights:
        raise QuantizationError(f"{source}: no Conv/Gemm/MatMul with constant float weights to quantize")
    if config.weight_only or config.dynamic:  # nothing to calibrate; samples kept for sensitivity
        files = list_samples(data.folder, data.limit) if data.folder is not None else []
        return Calibrated(str(source), ir.to_proto(model), {}, 0, proto.ByteSize(), entry=entry, files=files)
    if data.folder is None:
        raise QuantizationError(f"{source}: static INT8 needs calibration data (--calib DIR)")
    files = list_samples(data.folder, data.limit)

    def feeds() -> Iterable[Feed]:
        return model_feeds(proto, files, entry, data.batch_size)

    smoothed: dict[str, str] = {}
    if config.smoothquant is not None:
        model, smoothed = smooth_model(model, config, feeds, data.batch_size)
    optimized = ir.to_proto(model)
    ranges = calibrate(optimized, candidates.activations, feeds, config, data.batch_size, progress)
    ranges.update(bounded_ranges(model, ranges))
    spread = ffn_spread(model, optimized, config, feeds, data.batch_size)
    return Calibrated(
        str(source), optimized, ranges, len(files), proto.ByteSize(), smoothed, entry, files, spread
    )


def ffn_spread(
    model: ir.Model,
    proto: onnx.ModelProto,
    config: QuantConfig,
    feeds: Feeds,
    batch_size: int,
) -> dict[str, float]:
    """Largest / median per-channel max |x| of each FFN down-projection input (one pass over the
    calibration data, transformers only): which of them a per-tensor int8 scale cannot serve."""
    transformer = transformer_defaults(model, config.transformer)
    if not transformer or config.int8_ffn_down:
        return {}
    names = sorted({_name(n.inputs[0]) for n in model.graph if is_ffn_down(n)})
    if not names:
        return {}
    absmax = channel_absmax(proto, names, feeds, batch_size)
    return {k: float(v.max() / max(float(np.median(v)), 1e-12)) for k, v in absmax.items()}


def _name(value: ir.Value | None) -> str:
    """A tensor's name (the ops that read it were matched by rules that need one)."""
    if value is None or value.name is None:
        raise QuantizationError("an FFN down-projection reads an unnamed tensor")
    return value.name


def _image_size(model: onnx.ModelProto) -> int | None:
    """The image size the model's inputs fix (the zoo's rule, on the graph's declared shapes)."""
    return zoo_registry.input_image_size(
        tuple(d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim)
        for i in model.graph.input
    )
