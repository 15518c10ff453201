"""The building blocks of a decoder graph in plain ONNX ops (opset 17) plus MatMulNBits: linear
layers in three weight precisions, RMSNorm, rotary halves. Each writes its weights through the
``GraphWriter`` as it goes.

Linear weights arrive in torch's layout [out, in]; several of them (Q, K and V; gate and up) can
be packed into one matrix, so one MatMul reads the input once and a Split hands the parts on.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator

import numpy as np
from onnx import TensorProto

from modelkiln.errors import ConfigError
from modelkiln.export.builder.nbits import pack_chunks, resolve_block
from modelkiln.export.builder.writer import MS_DOMAIN, GraphWriter
from modelkiln.quantmath import NBITS_ACCURACY_INT8
from modelkiln.runtime.cpu import cpu_info

#: Input rows (of K) converted and written per chunk when a weight is transposed to [in, out].
ROWS_PER_CHUNK = 256


class Precision(enum.StrEnum):
    """How the builder stores linear weights. The graph's inputs and outputs stay float32 in all of
    them, so the generation engine runs any of them unchanged."""

    FP32 = "fp32"
    #: float16 weights, widened to float32 in the graph (ONNX Runtime folds the Cast at load: half
    #: the file, FP32 arithmetic on the CPU)
    FP16 = "fp16"
    #: 8-bit MatMulNBits, one scale per block of K per output channel (the weight-only INT8
    #: path's format; ``nbits.default_block``): int8 activations quantized per row and block
    W8 = "w8"
    #: 8-bit weights [K, N] with one scale per output channel, activations quantized per row (per
    #: token, symmetric, absmax / 127) in the graph, MatMulInteger: ONNX Runtime's int8 GEMM for
    #: prefill; an outlier token coarsens only itself (ONNX Runtime's DynamicQuantizeMatMul takes
    #: one scale per call: 2B logit cosine 0.889 on a 512-token prompt, dropped for this). Weights
    #: are uint8 (zero point 128) unless the CPU multiplies u8 x s8 into int32 (``w8a8_signed``):
    #: AVX2's VPMADDUBSW would saturate pairs of u8 x s8 products in int16. Layers with
    #: heavy-tailed inputs stay W8 (``heavy_tailed_input``)
    W8A8 = "w8a8"

    def heavy_tailed_input(self) -> Precision:
        """The precision for a linear layer whose input is heavy-tailed (the MLP's down projection,
        fed by SiLU(gate) x up): one scale per token would be set by its few largest products and
        coarsen the rest, so W8A8 keeps W8 there (MatMulNBits scales activations per block of K).
        Qwen2-VL-2B random, 512-token prompt: logit cosine to FP32 0.987 -> 0.992 (W8 0.994)."""
        return Precision.W8 if self is Precision.W8A8 else self

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
    [out_i, in] matrices packed along the output axis. W8 ``block_size``: 0 picks the block that
    pads K least (``nbits.default_block``: one scale per output channel when K is a power of two),
    ``nbits.PER_CHANNEL`` the first builder's padded per-channel layout, else the block given."""
    w = weights[0] if len(weights) == 1 else np.concatenate(weights, axis=0)
    n, k = w.shape
    if precision is Precision.W8:
        block = resolve_block(block_size, k)
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
        attrs = {"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": NBITS_ACCURACY_INT8}
        return g.op1("MatMulNBits", inputs, domain=MS_DOMAIN, **attrs)
    if precision is Precision.W8A8:
        return _token_int8(g, x, name, w, bias, signed=w8a8_signed())
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


def w8a8_signed() -> bool:
    """W8A8 weights as int8 where this CPU's u8 x s8 products accumulate in int32 (VNNI, AMX,
    ARM64), else as uint8 (u8 x u8 kernels widen before multiplying: exact everywhere). The model
    is built for the CPU it is built on; ``MODELKILN_W8A8_WEIGHTS=s8|u8`` overrides."""
    forced = os.environ.get("MODELKILN_W8A8_WEIGHTS", "").lower()
    if forced in ("s8", "u8"):
        return forced == "s8"
    return cpu_info().int32_dot


def _channel_int8(
    g: GraphWriter, name: str, w: np.ndarray, dtype: type[np.integer]
) -> tuple[str, np.ndarray]:
    """``w`` [N, K] as B [K, N] symmetric 8-bit per output channel (absmax / 127, an all-zero
    channel scale 1), int8 or uint8 = int8 + 128, written a few input rows at a time: (B's name,
    scales [N])."""
    n, k = w.shape
    scale = np.abs(w).max(axis=1).astype(np.float32) / np.float32(127.0)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    shift = 128 if dtype is np.uint8 else 0

    def rows() -> Iterator[np.ndarray]:
        for k0 in range(0, k, ROWS_PER_CHUNK):
            chunk = np.asarray(w[:, k0 : k0 + ROWS_PER_CHUNK], np.float32) / scale[:, None]
            yield (np.clip(np.rint(chunk), -127, 127).astype(np.int16) + shift).astype(dtype).T

    return g.weight_parts(f"{name}.B", np.dtype(dtype), (k, n), rows()), scale


def _token_int8(
    g: GraphWriter, x: str, name: str, w: np.ndarray, bias: np.ndarray | None, signed: bool
) -> str:
    """``x`` quantized per row (the last axis: one token) to symmetric int8 held as uint8 + 128,
    MatMulInteger with B [K, N] 8-bit per output channel, then row scale x channel scale (+ bias).
    Every value written is exact: |round(x / s)| <= 127 with s = absmax / 127."""
    b_name, scale = _channel_int8(g, name, w, np.int8 if signed else np.uint8)
    absmax = g.op1("ReduceMax", [g.op1("Abs", [x])], axes=[-1], keepdims=1)
    row_scale = g.op1("Div", [g.op1("Max", [absmax, g.const(np.float32(1e-30))]), g.const(np.float32(127.0))])
    shifted = g.op1("Add", [g.op1("Round", [g.op1("Div", [x, row_scale])]), g.const(np.float32(128.0))])
    xq = g.op1("Cast", [shifted], to=TensorProto.UINT8)
    zero = g.const(np.uint8(128))
    w_zero = g.const(np.int8(0)) if signed else zero
    acc = g.op1("MatMulInteger", [xq, b_name, zero, w_zero])
    y = g.op1("Mul", [g.op1("Cast", [acc], to=TensorProto.FLOAT), row_scale])
    y = g.op1("Mul", [y, g.weight(scale, f"{name}.scales")])
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
