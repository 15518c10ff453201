"""The building blocks of a decoder graph in plain ONNX ops (opset 17) plus MatMulNBits: linear
layers in three weight precisions, RMSNorm, rotary halves. Each writes its weights through the
``GraphWriter`` as it goes.

Linear weights arrive in torch's layout [out, in]; several of them (Q, K and V; gate and up) can
be packed into one matrix, so one MatMul reads the input once and a Split hands the parts on.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

import numpy as np
from onnx import TensorProto

from modelkiln.errors import ConfigError
from modelkiln.export.builder.nbits import ACCURACY_INT8, pack_chunks, per_channel_block
from modelkiln.export.builder.writer import MS_DOMAIN, GraphWriter

#: Input rows (of K) converted and written per chunk when a weight is transposed to [in, out].
ROWS_PER_CHUNK = 256


class Precision(enum.StrEnum):
    """How the builder stores linear weights. The graph's inputs and outputs stay float32 in all
    three, so the generation engine runs any of them unchanged."""

    FP32 = "fp32"
    #: float16 weights, widened to float32 in the graph (ONNX Runtime folds the Cast at load: half
    #: the file, FP32 arithmetic on the CPU)
    FP16 = "fp16"
    #: 8-bit MatMulNBits, one scale per output channel (the weight-only INT8 path's format)
    W8 = "w8"

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ConfigError(f"precision must be one of {[p.value for p in cls]}, got {value!r}") from None


def _transposed_chunks(w_nk: np.ndarray, dtype: type[np.generic]) -> Iterator[np.ndarray]:
    """``w_nk.T`` [in, out] in ``dtype``, a few input rows at a time (no whole transposed copy)."""
    for k0 in range(0, w_nk.shape[1], ROWS_PER_CHUNK):
        yield w_nk[:, k0 : k0 + ROWS_PER_CHUNK].T.astype(dtype)


def linear(
    g: GraphWriter,
    x: str,
    name: str,
    weights: list[np.ndarray],
    bias: np.ndarray | None,
    precision: Precision,
    block_size: int = 0,
) -> str:
    """``x @ concat(weights).T + bias`` with the weights stored in ``precision``; ``weights`` are
    [out_i, in] matrices packed along the output axis (``block_size`` 0: one W8 scale per output
    channel)."""
    w = weights[0] if len(weights) == 1 else np.concatenate(weights, axis=0)
    n, k = w.shape
    if precision is Precision.W8:
        block = block_size or per_channel_block(k)
        blocks = -(-k // block)
        scales: list[np.ndarray] = []

        def packed() -> Iterator[np.ndarray]:
            for b, s in pack_chunks(w, block):
                scales.append(s.reshape(-1))
                yield b

        b_name = g.weight_parts(f"{name}.B", np.dtype(np.uint8), (n, blocks, block), packed())
        s_name = g.weight(np.concatenate(scales), f"{name}.scales")
        inputs = [x, b_name, s_name]
        if bias is not None:
            inputs += ["", "", g.weight(bias.astype(np.float32), f"{name}.bias")]
        attrs = {"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": ACCURACY_INT8}
        return g.op1("MatMulNBits", inputs, domain=MS_DOMAIN, **attrs)
    if precision is Precision.FP16:
        stored = g.weight_parts(
            f"{name}.weight", np.dtype(np.float16), (k, n), _transposed_chunks(w, np.float16)
        )
        weight = g.op1("Cast", [stored], to=TensorProto.FLOAT)
    else:
        weight = g.weight_parts(
            f"{name}.weight", np.dtype(np.float32), (k, n), _transposed_chunks(w, np.float32)
        )
    y = g.op1("MatMul", [x, weight])
    if bias is not None:
        y = g.op1("Add", [y, g.weight(bias.astype(np.float32), f"{name}.bias")])
    return y


def rms_norm(g: GraphWriter, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis, as transformers' Qwen2RMSNorm
    (the pattern ONNX Runtime fuses into SimplifiedLayerNormalization at load)."""
    sq = g.op1("Pow", [x, g.const(np.float32(2.0))])
    var = g.op1("ReduceMean", [sq], axes=[-1], keepdims=1)
    std = g.op1("Sqrt", [g.op1("Add", [var, g.const(np.float32(eps))])])
    y = g.op1("Div", [x, std])
    return g.op1("Mul", [g.weight(weight.astype(np.float32), f"{name}.weight"), y])


def rotate(g: GraphWriter, x: str, cos: str, sin_signed: str, half: int) -> str:
    """Rotary embedding of ``x`` [..., 2*half]: ``x*cos + cat(x2, x1)*sin_signed``, where
    ``sin_signed`` is sin with its first half negated (= transformers' ``rotate_half(x)*sin``)."""
    x1, x2 = g.op("Split", [x, g.const(np.array([half, half], np.int64))], 2, axis=-1)
    swapped = g.op1("Concat", [x2, x1], axis=-1)
    return g.op1("Add", [g.op1("Mul", [x, cos]), g.op1("Mul", [swapped, sin_signed])])
