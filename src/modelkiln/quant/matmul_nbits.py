"""Weight-only INT8 on ONNX Runtime's MatMulNBits kernel (com.microsoft, bits=8).

A decoder generating one token at a time is bound by reading its weights: each step streams every
linear layer's matrix once. Stored as int8 the matrices are 4x smaller, and MatMulNBits with
accuracy level 4 multiplies them in integer arithmetic (it quantizes each activation row per
block to int8 inside the kernel, the graph stays float). Its other accuracy levels dequantize the
8-bit weights on every call and measured ~30x slower than a float MatMul here, so level 4 it is.

Layout (ONNX Runtime's contrib op spec): B [N, blocks, block] uint8 = int8 + 128 (the default zero
point for 8 bits), scales [N * blocks] float32, K zero-padded to a whole number of blocks; a
following constant bias Add is folded into the op's bias input.

The block (``default_block``): the op takes power-of-two blocks only, so "one scale per output
channel" costs padding wherever K is not a power of two (Qwen2-VL-2B: 1536 -> 2048, 8960 -> 16384,
46% more bytes and multiplies); the largest power-of-two divisor of K stores K exactly, with a few
more scales (and a little more accuracy). The rule and the packing are ``quantmath``'s, which the
graph builder's W8 (export/builder/nbits.py) calls too: a model quantized here and one the builder
writes in W8 are the same bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelkiln.errors import QuantizationError
from modelkiln.ir_utils import (
    attr_float,
    attr_int,
    const,
    new_initializer,
    replace_value,
    single_consumer,
)
from modelkiln.quantmath import NBITS_ACCURACY_INT8, default_block, pack_int8_rows

DOMAIN = "com.microsoft"


def pack_int8_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``w`` [K, N] per (column, block of K): (B [N, blocks, block] uint8,
    scales [N * blocks] float32)."""
    b, scale = pack_int8_rows(w.T, block)
    return b, scale.reshape(-1)


def unpack_int8_blocks(b: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The float weight [K, N] a packed B and scales stand for (tests and quality checks)."""
    n, blocks, block = b.shape
    w = (b.astype(np.float32) - 128.0) * scales.reshape(n, blocks, 1)
    kn: np.ndarray = w.reshape(n, blocks * block)[:, :k].T.copy()
    return kn


def nbits_candidates(model: ir.Model, exclude: tuple[str, ...] = ()) -> list[ir.Node]:
    """MatMuls with a constant 2-D float32 weight as second input, and Gemms that are a plain
    linear layer (alpha = beta = 1, A not transposed, constant B and [N] bias), not excluded."""
    found = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.name in exclude or const(node.inputs[0]) is not None:
            continue
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and _plain_gemm(node)):
            w = const(node.inputs[1])
            if w is not None and w.ndim == 2 and w.dtype == np.float32:
                found.append(node)
    return found


def _plain_gemm(node: ir.Node) -> bool:
    if attr_float(node, "alpha", 1.0) != 1.0 or attr_float(node, "beta", 1.0) != 1.0:
        return False
    if attr_int(node, "transA", 0):
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = const(node.inputs[2])
        return bias is not None and bias.ndim == 1 and bias.dtype == np.float32
    return True


def _weight_kn(node: ir.Node) -> np.ndarray:
    """The weight as [K, N] (a Gemm with transB=1 stores it [N, K], as torch's Linear does)."""
    w = const(node.inputs[1])
    if w is None:
        raise QuantizationError(f"{node.name}: MatMulNBits needs a constant weight")
    return w.T if node.op_type == "Gemm" and attr_int(node, "transB", 0) else w


def quantize_matmul_nbits(model: ir.Model, block_size: int = 0, exclude: tuple[str, ...] = ()) -> int:
    """Replace every candidate MatMul (and its bias Add) or Gemm (and its bias) with MatMulNBits;
    returns how many."""
    graph = model.graph
    count = 0
    for node in nbits_candidates(model, exclude):
        w = _weight_kn(node)
        k, n = w.shape
        block = block_size or default_block(k)
        b, scales = pack_int8_blocks(w, block)
        inputs = [
            node.inputs[0],
            new_initializer(graph, b, f"{node.name}_B"),
            new_initializer(graph, scales, f"{node.name}_scales"),
        ]
        out = node.outputs[0]
        add = _bias_add(out, n) if node.op_type == "MatMul" else None
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            inputs += [None, None, node.inputs[2]]
        elif add is not None:
            bias = next(v for v in add.inputs if v is not out)
            inputs += [None, None, bias]
            out = add.outputs[0]
        attrs = {"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": NBITS_ACCURACY_INT8}
        attributes = [ir.AttrInt64(key, value) for key, value in attrs.items()]
        fused = ir.Node(DOMAIN, "MatMulNBits", inputs, attributes=attributes, name=f"{node.name}_nbits")
        graph.insert_before(node, fused)
        fused.outputs[0].shape, fused.outputs[0].type = out.shape, out.type
        fused.outputs[0].name = f"{out.name}_nbits"
        replace_value(out, fused.outputs[0])
        for dead in ([add] if add is not None else []) + [node]:
            graph.remove(dead, safe=True)
        count += 1
    if count:
        model.opset_imports.setdefault(DOMAIN, 1)
    return count


def _bias_add(out: ir.Value, n: int) -> ir.Node | None:
    """The Add adding a constant [N] bias to ``out``, when it is out's only reader."""
    add = single_consumer(out)
    if add is None or add.op_type != "Add":
        return None
    other = next((v for v in add.inputs if v is not out), None)
    bias = const(other)
    if bias is None or bias.shape != (n,) or bias.dtype != np.float32:
        return None
    return add
