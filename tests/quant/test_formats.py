"""INT8 formats per CPU: the default (portable) stores int8 weights no neighbouring pair of which can
overflow the saturating u8 x s8 kernels, u8 stores uint8 weights (widening kernels), the VNNI format
keeps plain int8 weights (saturating on AVX2-only CPUs), native picks by CPU, the format travels in
the model's metadata, and large biases keep their sign."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from int8_kernels import (
    dot_u8s8_pair_saturating,
    dot_u8u8_widened,
    exact_dot,
    worst_case_activations,
)
from onnx import TensorProto, helper, numpy_helper

from modelkiln.quant import formats
from modelkiln.quant.config import Int8Cpu, QuantConfig, WeightKernel
from modelkiln.quant.pairsafe import PAIR_LIMIT, quantize_pair_safe, violations
from modelkiln.quant.quantize import quantize
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend, optimized_graph
from modelkiln.runtime.cpu import (
    INT8_FORMAT_KEY,
    INT8_REQUIRES_KEY,
    INT8_WEIGHTS_KEY,
    INT32_DOT,
    CpuInfo,
)

C_IN, C_MID, C_OUT = 64, 16, 8


def _first_output(
    model: Path, feed: dict[str, np.ndarray], optimization: GraphOptimization = GraphOptimization.ALL
) -> np.ndarray:
    """The first output of ``model`` on ``feed`` (ONNX Runtime, CPU provider)."""
    return next(iter(cpu_backend(model, optimization=optimization).infer(feed).values()))


def _conv_model(bias_scale: float = 0.1) -> onnx.ModelProto:
    """x -> 1x1 Conv (weights mostly positive, like a trained layer after ReLU) -> Relu -> 1x1 Conv."""
    rng = np.random.default_rng(0)
    w1 = rng.uniform(0.2, 1.0, (C_MID, C_IN, 1, 1)).astype(np.float32)
    w2 = rng.uniform(-1.0, 1.0, (C_OUT, C_MID, 1, 1)).astype(np.float32)
    b1 = (rng.standard_normal(C_MID) * bias_scale).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C_IN, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, C_OUT, 4, 4])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b1, "b1"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    onnx.save(_conv_model(), root / "toy.onnx")
    calib = root / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        np.save(calib / f"{i}.npy", rng.uniform(0, 1, (1, C_IN, 4, 4)).astype(np.float32))
    out = {"model": root / "toy.onnx", "calib": calib}
    for cpu in (Int8Cpu.PORTABLE, Int8Cpu.U8, Int8Cpu.VNNI):
        out[cpu.value] = root / f"toy.{cpu.value}.onnx"
        quantize(out["model"], out[cpu.value], calib, config=QuantConfig(cpu=cpu))
    return out


def _integer_weights(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stored integer weight and zero point of each Conv/Gemm/MatMul, by consumer name."""
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            dq = producers.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear":
                found[node.name] = (inits[dq.input[0]], inits[dq.input[2]])
    return found


def _typical_input() -> dict[str, np.ndarray]:
    """Inputs like the calibration data (uniform in [0, 1]): the output stays inside its calibrated
    range, so a saturated int16 pair sum shows in the output instead of being clipped away."""
    return {"x": np.random.default_rng(7).uniform(0, 1, (1, C_IN, 4, 4)).astype(np.float32)}


def test_numpy_kernel_model_saturates_like_vpmaddubsw() -> None:
    a = np.array([[255, 255, 255, 255]], np.uint8)
    w = np.array([[127], [127], [-128], [1]], np.int8)
    assert exact_dot(a, w)[0, 0] == 255 * 127 * 2 + 255 * (-128 + 1)
    assert dot_u8s8_pair_saturating(a, w)[0, 0] == 32767 + 255 * (-127)  # first pair clipped to int16
    assert (
        dot_u8u8_widened(a, (w.astype(np.int16) + 128).astype(np.uint8))[0, 0]
        == exact_dot(a, w.astype(np.int16) + 128)[0, 0]
    )


def test_default_is_portable_and_no_layer_can_saturate(toy: dict[str, Path]) -> None:
    portable, u8, vnni = (_integer_weights(toy[f]) for f in ("portable", "u8", "vnni"))
    assert set(portable) == set(u8) == set(vnni) == {"conv1"}  # conv2 feeds the float output: stays float
    # default: int8 weights whose neighbouring pairs cannot overflow int16, whatever the activations
    wq, zp = portable["conv1"]
    assert wq.dtype == np.int8 and np.all(zp == 0) and violations(wq) == 0
    w = wq.reshape(wq.shape[0], -1).T  # [K, N]
    a = worst_case_activations(w)
    assert np.array_equal(dot_u8s8_pair_saturating(a, w), exact_dot(a, w))
    # u8: the VNNI format's int8 levels shifted by 128, run by the widening (exact) u8 x u8 kernels
    wu, zu = u8["conv1"]
    assert wu.dtype == np.uint8 and np.all(zu == 128)
    assert np.array_equal(wu.astype(np.int16) - 128, vnni["conv1"][0].astype(np.int16))
    wu2 = wu.reshape(wu.shape[0], -1).T
    assert np.array_equal(dot_u8u8_widened(a, wu2), exact_dot(a, wu2))
    # the old (VNNI) format on a CPU without VNNI: the worst case overflows int16 pair sums
    w1 = vnni["conv1"][0].reshape(C_MID, -1).T
    a = worst_case_activations(w1)
    assert not np.array_equal(dot_u8s8_pair_saturating(a, w1), exact_dot(a, w1))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    k=st.integers(2, 70),
    scale=st.floats(1e-3, 1e3),
    skew=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_pair_safe_weights_never_overflow_and_stay_near_8_bits(
    rows: int, k: int, scale: float, skew: float, seed: int
) -> None:
    """Any weight matrix: no neighbouring same-sign pair sums past 128, and the squared error is
    never worse than 7-bit weights (half the scale), the blunt remedy, gives."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, rows)) * scale + skew * scale).astype(np.float32)  # MatMul [K, N]
    q, s = quantize_pair_safe(w, 1)
    assert q.dtype == np.int8 and violations(q.T) == 0
    a = worst_case_activations(q)
    assert np.array_equal(dot_u8s8_pair_saturating(a, q), exact_dot(a, q))
    err = ((q * s - w) ** 2).sum()
    seven = np.abs(w).max(axis=0) / 63.5
    err7 = ((np.clip(np.rint(w / seven), -64, 64) * seven - w) ** 2).sum()
    assert err <= err7 * (1 + 1e-5) + 1e-30


def test_pair_safe_conv_holds_in_both_reduction_orders() -> None:
    """A 3x3 conv is reduced with input channels fastest (ONNX Runtime's NHWC kernels) or kernel
    width fastest (ONNX's layout): neighbours in both orders stay inside the limit."""
    w = np.abs(np.random.default_rng(3).standard_normal((4, 8, 3, 3))).astype(np.float32)
    q, _ = quantize_pair_safe(w, 0)
    nhwc = q.transpose(0, 2, 3, 1).reshape(4, -1).astype(np.int32)
    nchw = q.reshape(4, -1).astype(np.int32)
    for flat in (nhwc, nchw):
        assert (flat[:, :-1] + flat[:, 1:]).max() <= PAIR_LIMIT


@pytest.mark.parametrize("fmt", ["portable", "u8"])
def test_portable_integer_kernels_match_the_qdq_arithmetic(toy: dict[str, Path], fmt: str) -> None:
    """On whatever CPU runs this: ONNX Runtime's fused integer kernels give what the QDQ graph means
    (computed in float with its optimisations off)."""
    fused = _first_output(toy[fmt], _typical_input())
    reference = _first_output(toy[fmt], _typical_input(), GraphOptimization.DISABLE)
    assert np.abs(fused - reference).max() <= 1e-3 * np.abs(reference).max()


@pytest.mark.parametrize("fmt", ["portable", "u8"])
def test_portable_weights_fuse_into_integer_kernels(toy: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    ops = Counter(n.op_type for n in optimized_graph(toy[fmt]).graph.node)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 1  # conv2 feeds the float graph output


def test_format_travels_in_metadata(toy: dict[str, Path]) -> None:
    def props(p: Path) -> dict[str, str]:
        return {m.key: m.value for m in onnx.load(p).metadata_props}

    assert props(toy["portable"])[INT8_FORMAT_KEY] == "portable"
    assert props(toy["portable"])[INT8_WEIGHTS_KEY] == "s8-pairsafe"
    assert props(toy["u8"])[INT8_WEIGHTS_KEY] == "u8"
    assert props(toy["u8"])[INT8_REQUIRES_KEY] == ""
    assert props(toy["portable"])[INT8_REQUIRES_KEY] == ""
    assert props(toy["vnni"])[INT8_FORMAT_KEY] == "vnni"
    assert props(toy["vnni"])[INT8_REQUIRES_KEY] == INT32_DOT
    assert "exact on any CPU" in formats.describe_format(props(toy["portable"]))


@pytest.mark.parametrize(
    ("arch", "flags", "expected"),
    [
        ("x86_64", {"avx2"}, Int8Cpu.PORTABLE),
        ("x86_64", {"avx2", "avx512bw"}, Int8Cpu.PORTABLE),  # Skylake-X: VPMADDUBSW saturates too
        ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}, Int8Cpu.VNNI),
        ("x86_64", {"avx2", "avx_vnni"}, Int8Cpu.VNNI),
        ("x86_64", {"avx2", "amx_int8"}, Int8Cpu.VNNI),
        ("arm64", {"asimddp"}, Int8Cpu.VNNI),
        ("arm64", set(), Int8Cpu.VNNI),
    ],
)
def test_native_resolves_by_cpu(arch: str, flags: set[str], expected: Int8Cpu) -> None:
    info = CpuInfo(arch, "test cpu", frozenset(flags))
    assert formats.resolve(Int8Cpu.NATIVE, info) is expected
    assert formats.resolve(Int8Cpu.PORTABLE, info) is Int8Cpu.PORTABLE


def test_native_builds_for_the_cpu_it_runs_on(
    toy: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    avx2 = CpuInfo("x86_64", "AVX2-only test CPU", frozenset({"avx2"}))
    monkeypatch.setattr(formats, "cpu_info", lambda: avx2)
    out = tmp_path / "native.onnx"
    result = quantize(toy["model"], out, toy["calib"], config=QuantConfig(cpu=Int8Cpu.NATIVE))
    assert result.int8_format.startswith("portable")
    assert {m.key: m.value for m in onnx.load(out).metadata_props}[INT8_FORMAT_KEY] == "portable"


def test_dynamic_formats_store_weights_as_their_kernels_need(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    src = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    outs = {}
    for cpu in (Int8Cpu.PORTABLE, Int8Cpu.U8, Int8Cpu.VNNI):
        outs[cpu] = tmp_path / f"mm.{cpu.value}.onnx"
        quantize(src, outs[cpu], None, config=QuantConfig(dynamic=True, cpu=cpu))

    def weight(cpu: Int8Cpu) -> tuple[np.ndarray, np.ndarray]:
        model = onnx.load(outs[cpu])
        mm = next(n for n in model.graph.node if n.op_type == "MatMulInteger")
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return inits[mm.input[1]], inits[mm.input[3]]

    wq, zp = weight(Int8Cpu.PORTABLE)
    assert wq.dtype == np.int8 and np.all(zp == 0) and violations(wq.T) == 0
    wq, zp = weight(Int8Cpu.U8)
    assert wq.dtype == np.uint8 and np.all(zp == 128)
    assert violations(weight(Int8Cpu.VNNI)[0].T) > 0  # plain int8: pairs that overflow exist
    x = {"x": np.abs(rng.standard_normal((4, 32))).astype(np.float32) * 3}
    reference = x["x"] @ w
    for cpu, path in outs.items():
        got = _first_output(path, x)
        cos = float((got * reference).sum()) / (np.linalg.norm(got) * np.linalg.norm(reference))
        assert cos > 0.999, cpu


def test_bias_too_large_for_int32_keeps_its_sign(tmp_path: Path) -> None:
    """A near-zero weight channel beside a large bias: bias / (input scale x weight scale) exceeds
    int32. The weight scale of that channel is raised so the bias stays exact (it used to become
    -2**31 through a float32 round-up and a wrapping cast)."""
    model = _conv_model()
    inits = {t.name: t for t in model.graph.initializer}
    w1 = numpy_helper.to_array(inits["w1"]).copy()
    b1 = numpy_helper.to_array(inits["b1"]).copy()
    w1[3] = 1e-9  # channel 3: weights almost zero ...
    b1[3] = 50.0  # ... and a bias far larger than any int32 step of that scale can hold
    inits["w1"].CopyFrom(numpy_helper.from_array(w1, "w1"))
    inits["b1"].CopyFrom(numpy_helper.from_array(b1, "b1"))
    src, out = tmp_path / "big_bias.onnx", tmp_path / "big_bias.int8.onnx"
    onnx.save(model, src)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(2)
    for i in range(4):
        np.save(calib / f"{i}.npy", rng.uniform(0, 1, (1, C_IN, 4, 4)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "invalid value encountered in cast"
        quantize(src, out, calib, config=QuantConfig())
    q = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    bias = next(v for k, v in inits.items() if v.dtype == np.int32 and v.size == C_MID)
    assert bias[3] > 0 and bias[3] < 2**31 - 1
    x = {"x": rng.uniform(0, 1, (1, C_IN, 4, 4)).astype(np.float32)}
    want = _first_output(src, x, GraphOptimization.DISABLE)
    got = _first_output(out, x)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def _qemu_avx2() -> list[str] | None:
    """qemu user-mode emulating an AVX2-only EPYC (Zen 2), where ONNX Runtime takes its AVX2 kernels."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return [qemu, "-cpu", "EPYC-Rome"]


_RUN_BOTH = """
import sys, numpy as np, onnxruntime as ort
x = {"x": np.random.default_rng(7).uniform(0, 1, (1, %d, 4, 4)).astype(np.float32)}
out = {}
for name in ("portable", "u8", "vnni"):
    s = ort.InferenceSession(sys.argv[1] + "/toy." + name + ".onnx", providers=["CPUExecutionProvider"])
    out[name] = s.run(None, x)[0]
np.savez(sys.argv[2], **out)
"""


@pytest.mark.skipif(_qemu_avx2() is None, reason="qemu-x86_64 (Debian package qemu-user) not installed")
def test_on_an_emulated_avx2_cpu_only_portable_keeps_its_values(toy: dict[str, Path], tmp_path: Path) -> None:
    """The real ONNX Runtime kernels on an emulated AVX2-only CPU: the portable and u8 models compute
    what their QDQ graphs mean; the VNNI-format model's int16 pair sums saturate."""
    script = tmp_path / "run_both.py"
    script.write_text(_RUN_BOTH % C_IN)
    npz = tmp_path / "avx2.npz"
    cmd = [*_qemu_avx2(), sys.executable, str(script), str(toy["model"].parent), str(npz)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    got = np.load(npz)
    for name in ("portable", "u8", "vnni"):
        reference = _first_output(toy[name], _typical_input(), GraphOptimization.DISABLE)
        scale = np.abs(reference).max()
        if name == "vnni":
            assert np.abs(got[name] - reference).max() > 0.05 * scale
        else:
            assert np.abs(got[name] - reference).max() <= 1e-3 * scale, name


_RUN_NBITS = """
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1])
s = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
np.save(sys.argv[3], s.run(None, {"x": x})[0])
"""


@pytest.mark.skipif(_qemu_avx2() is None, reason="qemu-x86_64 (Debian package qemu-user) not installed")
def test_matmul_nbits_level_4_gives_the_same_numbers_on_avx2(tmp_path: Path) -> None:
    """Weight-only MatMulNBits (8 bits, accuracy level 4: int8 activations inside the kernel) on an
    emulated AVX2-only CPU gives what this CPU gives up to float rounding (no saturation: that would
    show as errors of whole percent), one row (a decode step) or several;
    ONNX Runtime has an open report of wrong AVX2 results for its asymmetric 4-bit M=1 kernel."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])],
        [numpy_helper.from_array(w, "w")],
    )
    src, out = tmp_path / "mm.onnx", tmp_path / "mm.w8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    quantize(src, out, None, config=QuantConfig(weight_only=True, weight_kernel=WeightKernel.MATMUL_NBITS))
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(out).graph.node)
    script = tmp_path / "run.py"
    script.write_text(_RUN_NBITS)
    for rows in (1, 5):
        x = rng.standard_normal((rows, 256)).astype(np.float32)
        x[:, :3] *= 20  # outlier activation channels, as decoders have them
        np.save(tmp_path / "x.npy", x)
        cmd = [
            *_qemu_avx2(),
            sys.executable,
            str(script),
            str(tmp_path / "x.npy"),
            str(out),
            str(tmp_path / "y.npy"),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        native = _first_output(out, {"x": x})
        emulated = np.load(tmp_path / "y.npy")
        assert np.abs(emulated - native).max() <= 1e-5 * np.abs(native).max(), rows
        cos = float((native * (x @ w)).sum() / (np.linalg.norm(native) * np.linalg.norm(x @ w)))
        assert cos > 0.999
