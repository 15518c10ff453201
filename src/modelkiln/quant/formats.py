"""INT8 formats per CPU: how a model stores its weights, and the metadata that travels with it.

ONNX Runtime picks its integer kernel from the types in the graph and the CPU it runs on:

| weights        | x86 AVX2 / AVX-512BW (no VNNI)     | x86 VNNI / AMX, ARM64          |
| -------------- | ---------------------------------- | ------------------------------ |
| int8           | VPMADDUBSW: pairs saturate in int16 | VPDPBUSD / AMX / SDOT: exact   |
| int8 pair-safe | VPMADDUBSW: no pair can overflow    | exact, same kernels            |
| uint8 (zp 128) | widen to int16, VPMADDWD: exact     | widen, VPMADDWD / UDOT: exact  |

PORTABLE (pair-safe int8, the default) and U8 compute the same on every CPU; VNNI-format models
only on CPUs with an int32 dot product. Depthwise convolutions run on a kernel that widens to int32
on every CPU and keep plain int8 weights. Weight-only models (DequantizeLinear + float op, or
MatMulNBits at accuracy level 4, which under an emulated AVX2 CPU gives this VNNI CPU's results
up to float rounding) keep int8
weights in every format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from modelkiln.quant.config import Int8Cpu, PerTensor, QuantConfig, Target
from modelkiln.quant.pairsafe import quantize_pair_safe
from modelkiln.quantmath import QParams, quantize, weight_qparams
from modelkiln.runtime.cpu import (
    INT8_ACTIVATIONS_KEY,
    INT8_FORMAT_KEY,
    INT8_REQUIRES_KEY,
    INT8_WEIGHTS_KEY,
    INT32_DOT,
    CpuInfo,
    cpu_info,
)


def resolve(cpu: Int8Cpu, info: CpuInfo | None = None) -> Int8Cpu:
    """NATIVE becomes the best format for this machine: VNNI where u8 x s8 is exact, else PORTABLE."""
    if cpu is not Int8Cpu.NATIVE:
        return cpu
    return Int8Cpu.VNNI if (info or cpu_info()).int32_dot else Int8Cpu.PORTABLE


@dataclass(frozen=True)
class WeightStorage:
    """How Conv/Gemm/MatMul weights read by integer kernels are stored."""

    dtype: type  # np.int8 or np.uint8
    pair_safe: bool  # int8 with no neighbouring pair able to overflow int16 (pairsafe.py)
    label: str  # the metadata value: "s8", "s8-pairsafe" or "u8"


#: Plain symmetric int8 (TensorRT, weight-only, the VNNI format).
PLAIN_INT8 = WeightStorage(np.int8, False, "s8")


def weight_storage(config: QuantConfig, fmt: Int8Cpu) -> WeightStorage:
    """The storage ``fmt`` needs. TensorRT and weight-only models keep plain int8; PORTABLE with
    per-tensor weights stores uint8 (the pair search is per channel)."""
    if config.target is Target.TRT or config.weight_only or fmt is Int8Cpu.VNNI:
        return PLAIN_INT8
    if fmt is Int8Cpu.U8 or isinstance(config.weights, PerTensor):
        return WeightStorage(np.uint8, False, "u8")
    return WeightStorage(np.int8, True, "s8-pairsafe")


def store_weight(
    w: np.ndarray,
    axis: int | None,
    storage: WeightStorage,
    min_scale: np.ndarray | None = None,
    depthwise: bool = False,
) -> tuple[np.ndarray, QParams]:
    """Integer values and parameters of weight ``w`` (symmetric, per channel along ``axis``) as
    ``storage`` says: pair-safe int8 (not for per-tensor or ``depthwise`` weights, whose kernels
    cannot overflow), plain int8 or uint8. ``min_scale`` raises channel scales (int32 bias room)."""
    if storage.pair_safe and axis is not None and not depthwise:
        q, scale = quantize_pair_safe(w, axis, _floor(min_scale, w.shape[axis]))
        return q, QParams(scale, np.zeros(scale.shape, np.int8), axis)
    qp = weight_qparams(w, axis, storage.dtype)
    floor = _floor(min_scale, qp.scale.size)
    if floor is not None:
        qp = QParams(np.maximum(qp.scale, floor.reshape(qp.scale.shape)), qp.zero_point, qp.axis)
    return quantize(w, qp), qp


def _floor(min_scale: np.ndarray | None, channels: int) -> np.ndarray | None:
    """Per-channel lower bound on a weight scale (one value for all when the sizes differ)."""
    if min_scale is None:
        return None
    if min_scale.size != channels:  # per-tensor weight, or channels the bias does not map to
        return np.full(channels, min_scale.max(), np.float32)
    return min_scale.reshape(-1).astype(np.float32)


def metadata(config: QuantConfig, fmt: Int8Cpu) -> dict[str, str]:
    """The metadata_props describing how the model computes (read back by every loader)."""
    if config.weight_only:
        weights, acts, need = "s8", "float", ""
        name = "weight-only"
    elif config.target is Target.TRT:
        weights, acts, need, name = "s8", "s8", "", "trt"
    else:
        weights = weight_storage(config, fmt).label
        acts, name = "u8", fmt.value
        need = INT32_DOT if fmt is Int8Cpu.VNNI else ""
    return {
        INT8_FORMAT_KEY: name,
        INT8_WEIGHTS_KEY: weights,
        INT8_ACTIVATIONS_KEY: acts,
        INT8_REQUIRES_KEY: need,
    }


def stamp(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Write ``props`` into ``model.metadata_props`` (replacing keys already there)."""
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def format_fields(props: dict[str, str], missing: str = "unknown") -> dict[str, str]:
    """format / weights / activations / requires as a model's metadata states them (``missing``
    where a key is absent)."""
    keys = {
        "format": INT8_FORMAT_KEY,
        "weights": INT8_WEIGHTS_KEY,
        "activations": INT8_ACTIVATIONS_KEY,
        "requires": INT8_REQUIRES_KEY,
    }
    return {name: props.get(key, missing) for name, key in keys.items()}


def describe_format(props: dict[str, str]) -> str:
    """One line naming a model's INT8 format from its metadata ("" for a model without one)."""
    if not props.get(INT8_FORMAT_KEY):
        return ""
    f = format_fields(props, "?")
    need = props.get(INT8_REQUIRES_KEY) or "any CPU"
    if need == INT32_DOT:
        need = "CPUs with an int32 dot product (x86 AVX512-VNNI/AVX-VNNI/AMX, ARM64)"
    return f"{f['format']} (weights {f['weights']}, activations {f['activations']}; exact on {need})"
