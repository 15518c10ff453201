"""INT8 formats per CPU: which integer types a model stores, and the metadata that travels with it.

ONNX Runtime picks its integer kernel from the types in the graph and the CPU it runs on:

| weights | x86 AVX2 / AVX-512BW (no VNNI)  | x86 VNNI / AMX, ARM64          |
| ------- | ------------------------------- | ------------------------------ |
| int8    | VPMADDUBSW: pairs saturate int16 | VPDPBUSD / AMX / SDOT: exact   |
| uint8   | widen to int16, VPMADDWD: exact  | widen, VPMADDWD / UDOT: exact  |

A uint8 weight with zero point 128 holds the same 255 levels as the symmetric int8 one (q + 128),
so the PORTABLE format computes exactly what the VNNI format computes on a VNNI machine, on every
CPU; it costs speed where the int8 kernels would have been exact (VNNI, AMX), which is what
``--cpu native`` / ``vnni`` are for. Weight-only models (DequantizeLinear + float op, or
MatMulNBits at accuracy level 4, measured bit-identical under an emulated AVX2 CPU) keep int8
weights in every format.
"""

from __future__ import annotations

import numpy as np
import onnx

from modelkiln.quant.config import Int8Cpu, QuantConfig, Target
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


def weight_dtype(config: QuantConfig, fmt: Int8Cpu) -> type:
    """Storage type of Conv/Gemm/MatMul weights read by integer kernels."""
    if config.target is Target.CPU and fmt is Int8Cpu.PORTABLE:
        return np.uint8
    return np.int8


def metadata(config: QuantConfig, fmt: Int8Cpu) -> dict[str, str]:
    """The metadata_props describing how the model computes (read back by every loader)."""
    if config.weight_only:
        weights, acts, need = "s8", "float", ""
        name = "weight-only"
    elif config.target is Target.TRT:
        weights, acts, need, name = "s8", "s8", "", "trt"
    else:
        weights = "u8" if fmt is Int8Cpu.PORTABLE else "s8"
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


def describe_format(props: dict[str, str]) -> str:
    """One line naming a model's INT8 format from its metadata ("" for a model without one)."""
    name = props.get(INT8_FORMAT_KEY)
    if not name:
        return ""
    need = props.get(INT8_REQUIRES_KEY) or "any CPU"
    if need == INT32_DOT:
        need = "CPUs with an int32 dot product (x86 AVX512-VNNI/AVX-VNNI/AMX, ARM64)"
    return (
        f"{name} (weights {props.get(INT8_WEIGHTS_KEY, '?')}, activations "
        f"{props.get(INT8_ACTIVATIONS_KEY, '?')}; exact on {need})"
    )
