"""W8 from the graph builder without padding waste: the block that pads K least (512 for 1536,
256 for 8960, not one block of 2048 / 16384), the same block and bytes as the weight-only path
(`kiln quantize --weight-only --kernel matmulnbits`) on a decoder whose K are not powers of two,
and logits within cosine 0.999 of FP32 on the mid configuration."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from modelkiln.export.builder.layers import Precision, linear
from modelkiln.export.builder.nbits import PER_CHANNEL, resolve_block
from modelkiln.export.builder.qwen2 import build_decoder
from modelkiln.export.builder.tensors import StateDict
from modelkiln.export.builder.writer import GraphWriter
from modelkiln.quant import matmul_nbits
from modelkiln.quantmath import default_block, padded_k, per_channel_block
from modelkiln.quantmath import pack_int8_rows as pack_rows
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend

#: The issue's bound for W8 against FP32 logits on the mid configuration.
W8_COSINE = 0.999
MID = {"hidden": 512, "layers": 8, "heads": 4, "kv_heads": 2}  # head size 128, as Qwen2-VL-2B's
#: Not powers of two (hidden 96, intermediate 192): blocks 32 and 64 where per channel pads to 128 / 256.
ODD = {"hidden": 96, "layers": 2, "heads": 4, "kv_heads": 2}


@pytest.mark.parametrize(
    ("k", "block", "stored"),
    [
        (1536, 512, 1536),  # Qwen2-VL-2B hidden: was 2048
        (8960, 256, 8960),  # Qwen2-VL-2B intermediate: was 16384
        (1024, 1024, 1024),  # a power of two: one scale per output channel, as before
        (96, 32, 96),
        (1176, 32, 1184),  # the vision patch embedding (8 x 147): the least padding there is
        (40, 16, 48),
    ],
)
def test_default_block_pads_least_and_is_the_weight_only_paths(k: int, block: int, stored: int) -> None:
    assert default_block(k) == matmul_nbits.default_block(k) == block
    assert padded_k(k, block) == stored <= padded_k(k, per_channel_block(k))
    assert block >= 16 and block & (block - 1) == 0  # what MatMulNBits accepts
    assert resolve_block(0, k) == block and resolve_block(PER_CHANNEL, k) == per_channel_block(k)
    assert resolve_block(64, k) == 64


def _one_linear(
    tmp_path: Path,
    w: np.ndarray,
    block_size: int,
    precision: Precision = Precision.W8,
    bias: np.ndarray | None = None,
) -> Path:
    n, k = w.shape
    with GraphWriter("linear", tmp_path, f"linear{precision.value}{block_size}.onnx") as g:
        g.input("x", TensorProto.FLOAT, ("batch", "rows", k))
        g.output("y", TensorProto.FLOAT, ("batch", "rows", n))
        g.op1("Identity", [linear(g, "x", "fc", [w], bias, precision, block_size)], "y")
        return g.save()


def test_w8_linear_stores_k_values_per_channel_and_matches_its_dequantized_weight(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((40, 1536)) * 0.05).astype(np.float32)
    x = rng.standard_normal((7, 1536)).astype(np.float32)
    sizes = {}
    for block_size in (0, PER_CHANNEL):
        path = _one_linear(tmp_path, w, block_size)
        model = onnx.load(path)
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
        b = next(t for t in model.graph.initializer if t.name == node.input[1])
        block = {a.name: a.i for a in node.attribute}["block_size"]
        assert list(b.dims) == [40, -(-1536 // block), block]
        sizes[block_size] = int(np.prod(b.dims))
        y = cpu_backend(path, optimization=GraphOptimization.ALL).infer({"x": x[None]})["y"][0]
        packed, scales = pack_rows(w, block)
        ref = x @ matmul_nbits.unpack_int8_blocks(packed, scales.reshape(-1), 1536)
        cos = float((y * ref).sum() / np.linalg.norm(y) / np.linalg.norm(ref))
        assert cos > 0.9999, (block_size, cos)  # the kernel's int8 activations: close, not equal
    assert sizes[0] == 40 * 1536 and sizes[PER_CHANNEL] == 40 * 2048


def _w8a8_reference(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The W8A8 arithmetic in integers: x per row and w per output channel to symmetric int8
    (absmax / 127, round half to even), an exact integer product, then both scales and the bias."""
    xs = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127.0)
    ws = np.abs(w).max(axis=1) / np.float32(127.0)
    xq = np.rint(x / xs).astype(np.int64)
    wq = np.clip(np.rint(w / ws[:, None]), -127, 127).astype(np.int64)
    return (xq @ wq.T).astype(np.float64) * xs * ws + bias


@pytest.mark.parametrize("weights", ["u8", "s8"])
def test_w8a8_linear_is_the_integer_arithmetic_it_states(weights: str, tmp_path: Path, monkeypatch) -> None:
    """Per-token int8 activations x per-channel 8-bit weights through MatMulInteger equal the same
    arithmetic done in int64 (to float32 rounding), tokens of very different scales included (an
    outlier token must not coarsen the others, as one scale per call would). uint8 weights (zero
    point 128) are exact on every CPU; int8 ones only where u8 x s8 accumulates in int32."""
    from modelkiln.runtime.cpu import cpu_info

    if weights == "s8" and not cpu_info().int32_dot:
        pytest.skip(
            f"{cpu_info().describe()}: u8 x s8 saturates in int16 here (u8 weights are built instead)"
        )
    monkeypatch.setenv("MODELKILN_W8A8_WEIGHTS", weights)
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((48, 320)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    x = rng.standard_normal((2, 5, 320)).astype(np.float32)
    x[0, 1] *= 300.0  # an outlier token
    x[1, 2] = 0.0  # an all-zero row: scale floor, output = bias
    path = _one_linear(tmp_path, w, 0, Precision.W8A8, bias)
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "MatMulInteger")
    b = next(t for t in model.graph.initializer if t.name == node.input[1])
    assert b.data_type == (TensorProto.INT8 if weights == "s8" else TensorProto.UINT8)
    assert list(b.dims) == [320, 48]
    y = cpu_backend(path, optimization=GraphOptimization.ALL).infer({"x": x})["y"]
    ref = _w8a8_reference(x, w, bias)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(y[1, 2], bias, rtol=1e-6)
    exact = x @ w.T + bias
    for t in range(5):  # each ordinary token keeps int8 accuracy beside the outlier
        cos = _cosine(y[0, t] - bias, exact[0, t] - bias)
        assert cos > 0.9995, (t, cos)


@pytest.fixture(scope="module")
def odd():
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from modelkiln.zoo.qwen_vl import build_tiny

    return build_tiny(**ODD)


def _inits(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_builder_w8_is_the_weight_only_path_bit_for_bit_without_padding(odd, tmp_path: Path) -> None:
    """K = 96 and 192 (not powers of two): the builder's W8 and the FP32 build quantized by
    quant/matmul_nbits pick the same blocks (32, 64: nothing padded) and write the same bytes."""
    import onnx_ir as ir

    model, _ = odd
    text = model.model.language_model.config
    tensors = StateDict(model.state_dict())
    fp32 = build_decoder(text, tensors, tmp_path, "fp32.onnx")
    w8 = build_decoder(text, tensors, tmp_path, "w8.onnx", Precision.W8)
    quantized = ir.load(fp32)
    assert matmul_nbits.quantize_matmul_nbits(quantized) == 4 * ODD["layers"] + 1
    ir.save(quantized, tmp_path / "quantized.onnx")
    a, b = onnx.load(tmp_path / "quantized.onnx"), onnx.load(w8)
    ia, ib = _inits(tmp_path / "quantized.onnx"), _inits(w8)
    na = [n for n in a.graph.node if n.op_type == "MatMulNBits"]
    nb = [n for n in b.graph.node if n.op_type == "MatMulNBits"]
    blocks = set()
    for x, y in zip(na, nb, strict=True):
        attrs = {at.name: at.i for at in y.attribute}
        assert {at.name: at.i for at in x.attribute} == attrs
        assert all(np.array_equal(ia[x.input[i]], ib[y.input[i]]) for i in (1, 2))
        assert ib[y.input[1]].size == attrs["N"] * attrs["K"]  # no padded column stored
        blocks.add((attrs["K"], attrs["block_size"]))
    assert blocks == {(96, 32), (192, 64)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize(
    ("sizes", "precision"),
    [
        (MID, Precision.W8),
        ({"hidden": 768, "layers": 2, "heads": 6, "kv_heads": 2}, Precision.W8),
        (MID, Precision.W8A8),
    ],
    ids=["mid", "k768", "mid-w8a8"],
)
def test_w8_logits_stay_within_cosine_0999_of_fp32(sizes, precision: Precision, tmp_path: Path) -> None:
    """The mid configuration (the issue's bound), and one with K = 768 / 1536 (blocks 256 / 512, as
    2B's hidden): a prefill of 65 tokens and a decode step on a 65-token cache. W8A8 (int8
    activations per token) on the mid configuration too."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from modelkiln.zoo.qwen_vl import build_tiny, decoder_example, decoder_part

    model, _ = build_tiny(**sizes)
    text = model.model.language_model.config
    tensors = StateDict(model.state_dict())
    fp32 = cpu_backend(build_decoder(text, tensors, tmp_path, "fp32.onnx"))
    w8_path = build_decoder(text, tensors, tmp_path, "w8.onnx", precision)
    kinds = Counter(n.op_type for n in onnx.load(w8_path, load_external_data=False).graph.node)
    layers = sizes["layers"]
    if precision is Precision.W8A8:  # QKV, o_proj, gate+up and the head per token; down_proj W8
        assert (kinds["MatMulInteger"], kinds["MatMulNBits"]) == (3 * layers + 1, layers)
    else:
        assert (kinds["MatMulInteger"], kinds["MatMulNBits"]) == (0, 4 * layers + 1)
    w8 = cpu_backend(w8_path)
    part = decoder_part(text)
    table = model.state_dict()["model.language_model.embed_tokens.weight"].numpy()
    for seed, (seq, past) in enumerate(((65, 0), (1, 65))):
        feed = decoder_example(part, 1, seq, past, seed)
        ids = np.random.default_rng(seed).integers(0, table.shape[0], seq)
        feed["inputs_embeds"] = table[ids][None]  # real token rows: the scale the decoder sees
        cos = _cosine(fp32.infer(feed)["logits"], w8.infer(feed)["logits"])
        print(sizes["hidden"], seq, past, f"cosine {cos:.6f}")
        assert cos >= W8_COSINE, (sizes, seq, past, cos)
