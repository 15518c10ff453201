"""Transformer quantization: SmoothQuant folds keep the float model, transformer defaults keep
LayerNorm/Softmax/GELU/residuals float, weight-only graphs have no activation Q/DQ, and the
accuracy-budget fallback finds a planted outlier layer first and honours the budget."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from toy_models import HIDDEN, SEQ, export_block, export_chain, write_feeds

from modelkiln.accuracy.budget import cosine_scorer
from modelkiln.data.feeds import batches, list_samples
from modelkiln.errors import ConfigError, QuantizationError
from modelkiln.graph.manager import PassManager
from modelkiln.graph.pipeline import build_pipeline
from modelkiln.quant.config import CalibrationData, QuantConfig, Target
from modelkiln.quant.mixed_precision import _search
from modelkiln.quant.quantize import quantize
from modelkiln.quant.quantizer import Quantizer
from modelkiln.quant.smoothquant import find_sites, smooth_model
from modelkiln.runtime.backends.onnxruntime import cpu_backend, optimized_graph

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tq")
    return {
        "pre": export_block(tmp / "pre.onnx", pre_ln=True, outlier=30.0),
        "post": export_block(tmp / "post.onnx", pre_ln=False, outlier=30.0),
        "calib": write_feeds(tmp / "calib", (1, SEQ, HIDDEN), 16),
        "eval": write_feeds(tmp / "eval", (1, SEQ, HIDDEN), 16, seed=1),
    }


def _optimized(path: Path) -> ir.Model:
    model = ir.load(path)
    PassManager(build_pipeline("portable"), verify=False).run(model)
    return model


def _feeds(folder: Path) -> list[dict[str, np.ndarray]]:
    return list(batches(list_samples(folder), ["x"], None, 4))


def _first_output(model: Path | onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(cpu_backend(model).infer(feed).values()))


def _cosine(a: Path, b: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    ra = np.concatenate([_first_output(a, f) for f in feeds]).ravel()
    rb = np.concatenate([_first_output(b, f) for f in feeds]).ravel()
    return float(ra @ rb / np.linalg.norm(ra) / np.linalg.norm(rb))


def test_smoothquant_folds_keep_float_outputs_and_node_count(blocks: dict[str, Path]) -> None:
    model = _optimized(blocks["pre"])
    before = ir.to_proto(model)
    feeds = _feeds(blocks["calib"])
    smoothed, how = smooth_model(model, QuantConfig(smoothquant=0.5), lambda: iter(feeds), 4)
    assert Counter(how.values()) == {"layernorm": 2, "linear": 1}  # LN->QKV, LN->fc1, V->out
    after = ir.to_proto(smoothed)
    assert len(after.graph.node) == len(before.graph.node)  # folded: the graph gains no nodes
    for feed in feeds:
        ref = _first_output(before, feed)
        got = _first_output(after, feed)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    changed = {t.name for t in after.graph.initializer} - {t.name for t in before.graph.initializer}
    assert len(changed) >= 6  # new LayerNorm scales/biases and weights, not the same graph


def test_post_ln_layernorm_is_not_folded(blocks: dict[str, Path]) -> None:
    """A post-LN LayerNorm also feeds the residual Add: scaling it would change the float model."""
    sites = find_sites(_optimized(blocks["post"]))
    folds = {s.name: s.fold for s in sites}
    ln_sites = [s for s in sites if s.tensor.producer().op_type == "LayerNormalization"]
    assert ln_sites and all(folds[s.name] is None for s in ln_sites)
    assert "linear" in folds.values()  # the attention output projection still folds into V


def test_smoothquant_helps_a_model_with_outlier_channels(blocks: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain.onnx"
    smooth = tmp_path / "smooth.onnx"
    quantize(blocks["pre"], plain, blocks["calib"], config=QuantConfig())
    result = quantize(blocks["pre"], smooth, blocks["calib"], config=QuantConfig(smoothquant=0.5))
    assert sorted(set(result.smoothed.values())) == ["layernorm", "linear"]
    feeds = _feeds(blocks["eval"])
    assert _cosine(blocks["pre"], smooth, feeds) > _cosine(blocks["pre"], plain, feeds)


def test_transformer_defaults_keep_norms_softmax_gelu_residuals_float(
    blocks: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "q.onnx"
    result = quantize(blocks["pre"], out, blocks["calib"])
    reasons = " ".join(result.kept_float.values())
    assert "residual Add" in reasons and "attention MatMul" in reasons
    graph = onnx.load(out).graph
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf") or (
            node.op_type == "MatMul" and "attention" in result.kept_float.get(node.name, "")
        ):
            fed = [producers.get(i) for i in node.input]
            assert not any(p is not None and p.op_type == "DequantizeLinear" for p in fed[:1]), node.name
    assert result.quantized_ops.get("MatMul", 0) >= 4  # the linears are int8
    # the residual stream reads exact float values, not dequantized copies
    residuals = [n for n in graph.node if "residual" in result.kept_float.get(n.name, "")]
    assert residuals and all(
        producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
        for n in residuals
        for i in n.input
    )
    forced = quantize(
        blocks["pre"], tmp_path / "f.onnx", blocks["calib"], config=QuantConfig(int8_attention=True)
    )
    assert forced.quantized_ops["MatMul"] == result.quantized_ops["MatMul"] + 2


def test_weight_only_has_no_activation_qdq(blocks: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "wo.onnx"
    result = quantize(blocks["post"], out, None, config=QuantConfig(weight_only=True))
    graph = onnx.load(out).graph
    inits = {t.name for t in graph.initializer}
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] == 0
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == result.quantized_ops["MatMul"] == 4  # merged qkv, o, fc1, fc2
    assert all(n.input[0] in inits for n in dqs)  # only constant weights are dequantized
    assert all(
        onnx.numpy_helper.to_array(t).dtype == np.int8 for t in graph.initializer if t.name == dqs[0].input[0]
    )
    assert _cosine(blocks["post"], out, _feeds(blocks["eval"])) > 0.999


def test_weight_only_refuses_smoothquant() -> None:
    with pytest.raises(ConfigError, match="weight_only"):
        QuantConfig(weight_only=True, smoothquant=0.5)


def test_static_int8_needs_calibration(blocks: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="--calib"):
        quantize(blocks["pre"], tmp_path / "x.onnx", None)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("chain")
    return {
        "model": export_chain(tmp / "chain.onnx", outlier_layer=2),
        "calib": write_feeds(tmp / "calib", (1, 16), 32),
        "eval": write_feeds(tmp / "eval", (1, 16), 32, seed=1),
    }


def _names(cal) -> dict[str, str]:
    """Gemm name by position in the chain (1-based)."""
    gemms = [n.name for n in cal.proto.graph.node if n.op_type == "Gemm"]
    return {name: i + 1 for i, name in enumerate(gemms)}


def test_sensitivity_ranks_the_planted_outlier_layer_first(chain: dict[str, Path]) -> None:
    config = QuantConfig(target=Target.CPU)
    quantizer = Quantizer(chain["model"], config, CalibrationData(chain["calib"]))
    ranking = quantizer.sensitivity(_feeds_chain(chain["calib"]))
    position = _names(quantizer.calibrated)
    assert position[ranking[0].name] == 3  # the Gemm that reads the outlier-channel activation
    assert ranking[0].snr_db < ranking[1].snr_db - 10


def _feeds_chain(folder: Path) -> list[dict[str, np.ndarray]]:
    return list(batches(list_samples(folder), ["x"], None, 8))


def test_fallback_finds_the_outlier_first_and_honours_the_budget(chain: dict[str, Path]) -> None:
    config = QuantConfig()
    quantizer = Quantizer(chain["model"], config, CalibrationData(chain["calib"]))
    ranking = [s.name for s in quantizer.sensitivity(_feeds_chain(chain["calib"]))]
    score = cosine_scorer(onnx.load(chain["model"]), _feeds_chain(chain["eval"]))
    full = score(quantizer.build())
    budget = 1e-4
    assert 1 - full > 5 * budget  # the plain INT8 model misses the budget
    search = quantizer.within_budget(score, budget, 1.0, "cosine", ranking=ranking)
    result, proto, plan = search.fallback, search.model, search.built.plan
    assert result.kept_float == [ranking[0]] and _names(quantizer.calibrated)[ranking[0]] == 3
    assert result.drop <= budget and 1 - score(proto) <= budget
    assert result.steps[0].float_layers == 0 and not result.steps[0].within_budget
    assert len(result.kept_float) < len(ranking)  # most layers stay int8
    assert ranking[0] not in {n.name for n in plan.nodes}


def test_fallback_fails_clearly_when_the_budget_cannot_be_met(chain: dict[str, Path]) -> None:
    config = QuantConfig()
    quantizer = Quantizer(chain["model"], config, CalibrationData(chain["calib"]))
    ranking = [s.name for s in quantizer.sensitivity(_feeds_chain(chain["calib"]))]
    with pytest.raises(QuantizationError, match="even with 3 of 5 layers back in float"):
        quantizer.within_budget(lambda proto: 0.5, 0.01, 1.0, "cosine", min_int8=2, ranking=ranking)


@pytest.mark.parametrize("need", [0, 1, 2, 3, 5, 8, 13])
def test_search_returns_the_smallest_passing_count(need: int) -> None:
    calls: list[int] = []

    def within(k: int) -> bool:
        calls.append(k)
        return k >= need

    assert _search(within, 13) == need
    assert len(calls) <= 2 * 4 + 1  # ~2 log2(n) evaluations, not n


def test_search_gives_up_at_the_limit() -> None:
    assert _search(lambda k: False, 6) is None
    assert _search(lambda k: k >= 7, 6) is None


def test_dynamic_matmuls_fuse_into_ort_kernels(blocks: dict[str, Path], tmp_path: Path) -> None:

    out = tmp_path / "dyn.onnx"
    result = quantize(blocks["post"], out, None, config=QuantConfig(dynamic=True))
    ops = Counter(n.op_type for n in onnx.load(out).graph.node)
    assert result.quantized_ops == {"MatMulInteger": 4} and ops["QuantizeLinear"] == 0
    assert ops["DynamicQuantizeLinear"] == 4  # one per input tensor: x (merged QKV), context, fc1, fc2
    fused = Counter(n.op_type for n in optimized_graph(out).graph.node)
    assert fused["MatMulInteger"] == 0 and fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 4
    assert _cosine(blocks["post"], out, _feeds(blocks["eval"])) > 0.99


def test_dynamic_refuses_the_trt_target() -> None:
    with pytest.raises(ConfigError, match="dynamic"):
        QuantConfig(dynamic=True, target=Target.TRT)
