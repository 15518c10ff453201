"""``quantize``: optimise, calibrate on real inputs, place Q/DQ, save; the result loads in plain
ONNX Runtime (integer kernels on CPU) and in TensorRT (explicit quantization)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from modelkiln.quant.qdq import emit, mark

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

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def make_calibrator(config: QuantConfig) -> Calibrator:
    if config.method is Method.PERCENTILE:
        return PercentileCalibrator(config.percentile)
    return CALIBRATORS[config.method.value]()


def calibrate(
    model: onnx.ModelProto,
    tensors: list[str],
    files: list[Path],
    zoo: zoo_registry.ZooModel | None,
    config: QuantConfig,
    batch_size: int = 8,
    progress: Any = None,
) -> dict[str, Range]:
    """Ranges of ``tensors`` over the calibration files."""
    calibrator = make_calibrator(config)
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    collect(
        model,
        tensors,
        lambda: batches(files, inputs, zoo, batch_size),
        calibrator.observe,
        batch_size,
        progress=progress,
    )
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


def quantize(
    source: str | Path,
    output: str | Path,
    calib: str | Path,
    zoo_name: str | None = None,
    config: QuantConfig | None = None,
    calib_size: int = 100,
    batch_size: int = 8,
    progress: Any = None,
) -> QuantizeResult:
    """Quantize ``source`` to INT8 QDQ at ``output``; nothing is written if any step fails."""
    config = config or QuantConfig()
    proto = load_model(source)
    entry = zoo_registry.get(zoo_name, _image_size(proto)) if zoo_name else None
    files = list_samples(calib, calib_size)
    model = ir.from_proto(proto)
    PassManager(build_pipeline("portable"), verify=False).run(model)
    candidates = mark(model, config)
    if not candidates.weights:
        raise QuantizationError(f"{source}: no Conv/Gemm/MatMul with constant float weights to quantize")
    optimized = ir.to_proto(model)
    ranges = calibrate(optimized, candidates.activations, files, entry, config, batch_size, progress)
    ranges.update(bounded_ranges(model, ranges))
    plan = mark(model, config, ranges)
    counts = emit(model, plan, ranges, config)
    RemoveDead()(model)  # the float weights the quantized ones replaced
    result_proto = ir.to_proto(model)
    onnx.checker.check_model(result_proto)
    save_model(result_proto, Path(output))
    float_ops = Counter(
        n.op_type for n in result_proto.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
    )
    for op, n in counts.items():
        float_ops[op] -= n
    return QuantizeResult(
        str(source),
        str(output),
        config.method.value,
        config.target.value,
        len(files),
        dict(counts),
        {k: v for k, v in float_ops.items() if v > 0},
        plan.kept_float,
        proto.ByteSize(),
        result_proto.ByteSize(),
    )


def _image_size(model: onnx.ModelProto) -> int | None:
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[3].HasField("dim_value"):
            return dims[3].dim_value
    return None
