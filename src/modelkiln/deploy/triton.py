"""Triton Inference Server model repository: ``config.pbtxt`` beside each ONNX file, so the artefacts
``kiln deploy`` serves with ``kiln serve`` also scale out on Triton unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import text_format

from modelkiln._deps import require
from modelkiln.errors import ConfigError
from modelkiln.serve.config import ModelConfig
from modelkiln.serve.model import TensorInfo

TRITON_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}


def _tensors(kind: str, tensors: list[TensorInfo], batched: bool) -> str:
    rows = []
    for t in tensors:
        dims = list(t.shape[1:] if batched else t.shape)
        rows.append(
            f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} dims: [ {", ".join(map(str, dims))} ] }}'
        )
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def config_pbtxt(config: ModelConfig, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> str:
    """Triton's text-format ModelConfig for an ONNX Runtime model."""
    batched = config.max_batch_size > 0
    text = f'name: "{config.name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {config.max_batch_size}\n'
    text += _tensors("input", inputs, batched) + _tensors("output", outputs, batched)
    if config.dynamic_batching is not None:
        sizes = ", ".join(map(str, config.dynamic_batching.preferred_batch_sizes))
        text += (
            f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
            f"  max_queue_delay_microseconds: {config.dynamic_batching.max_queue_delay_us}\n}}\n"
        )
    text += f"instance_group [ {{ count: {config.instance_count} kind: KIND_CPU }} ]\n"
    return text


def validate_pbtxt(text: str) -> object:
    """Parse into Triton's own ModelConfig protobuf (shipped in tritonclient[grpc])."""
    pb = require(
        "tritonclient.grpc.model_config_pb2", "validating Triton configs (pip install tritonclient[grpc])"
    )
    message = pb.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"config.pbtxt does not parse as Triton's ModelConfig: {exc}") from exc
    return message


def write_triton_model(
    root: Path, model_file: Path, config: ModelConfig, inputs: list[TensorInfo], outputs: list[TensorInfo]
) -> Path:
    """``root/<name>/1/model.onnx`` + ``root/<name>/config.pbtxt``; returns the pbtxt path."""
    folder = root / config.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, folder / "1" / "model.onnx")
    text = config_pbtxt(config, inputs, outputs)
    (folder / "config.pbtxt").write_text(text)
    return folder / "config.pbtxt"
