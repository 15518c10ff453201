"""The Quantizer: builds equal what ``quantize`` writes, the model is prepared (calibrated) once
however many builds follow, a build config must be one the calibration covers, and the budget
search keeps a layer float exactly when the scorer penalises quantizing it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelkiln.errors import ConfigError, QuantizationError
from modelkiln.quant import prepare as prepare_module
from modelkiln.quant.config import CalibrationData, Int8Cpu, Method, QuantConfig
from modelkiln.quant.quantize import quantize
from modelkiln.quant.quantizer import Quantizer

WIDTH = 16
LAYERS = ("fc1", "fc2", "fc3", "fc4")


def _chain() -> onnx.ModelProto:
    """x [N, 16] -> MatMul -> Relu -> ... (4 linears) -> y; plain ops, no transformer defaults."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, name in enumerate(LAYERS):
        w = f"w{i}"
        inits.append(
            numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) * 0.4).astype(np.float32), w)
        )
        nodes.append(helper.make_node("MatMul", [x, w], [f"{name}_out"], name=name))
        x = f"{name}_out"
        if i < len(LAYERS) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("quantizer")
    onnx.save(_chain(), tmp / "chain.onnx")
    calib = tmp / "calib"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        np.save(calib / f"{i:02d}.npy", rng.standard_normal((1, WIDTH)).astype(np.float32))
    return {"model": tmp / "chain.onnx", "calib": calib}


def _canonical(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], list[tuple[str, list[str]]]]:
    """Initializers and (op, inputs) per node, with the process-wide counters in generated names
    (``w0_scale__kiln105``) renumbered from 0 in creation order, so two builds in one process
    compare by what they contain."""
    text = model.SerializeToString()
    numbers = sorted({int(n) for n in re.findall(rb"__kiln(\d+)", text)})
    rank = {n: i for i, n in enumerate(numbers)}

    def name(s: str) -> str:
        return re.sub(r"__kiln(\d+)", lambda m: f"__k{rank[int(m.group(1))]}", s)

    inits = {name(t.name): numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [(n.op_type, [name(i) for i in n.input]) for n in model.graph.node]
    return inits, nodes


def _quantized(model: onnx.ModelProto, layer: str) -> bool:
    """Whether ``layer`` reads a dequantized weight (it runs in int8) rather than a float one."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == layer)
    weight = producers.get(node.input[1])
    return weight is not None and weight.op_type == "DequantizeLinear"


@pytest.mark.parametrize(
    "config",
    [QuantConfig(), QuantConfig(method=Method.MINMAX, cpu=Int8Cpu.U8), QuantConfig(dynamic=True)],
    ids=["default", "minmax-u8", "dynamic"],
)
def test_build_equals_what_quantize_writes(toy: dict[str, Path], tmp_path: Path, config: QuantConfig) -> None:
    out = tmp_path / "q.onnx"
    calib = None if config.dynamic else toy["calib"]
    result = quantize(toy["model"], out, calib, config=config)
    built = Quantizer(toy["model"], config, CalibrationData(calib)).build()
    (want, want_nodes), (got, got_nodes) = _canonical(onnx.load(out)), _canonical(built)
    assert want.keys() == got.keys() and len(want) > len(LAYERS)
    for name, value in want.items():
        assert value.dtype == got[name].dtype and np.array_equal(value, got[name]), name
    assert want_nodes == got_nodes
    assert sum(result.quantized_ops.values()) >= len(LAYERS)


def _counting_collect(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = prepare_module.collect

    def counted(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        calls.append(1)
        original(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "collect", counted)
    return calls


def test_the_model_is_prepared_once(
    toy: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes = _counting_collect(monkeypatch)
    config = QuantConfig()
    quantizer = Quantizer(toy["model"], config, CalibrationData(toy["calib"], batch_size=4))
    assert passes == []  # nothing happens until something is built
    quantizer.build()
    quantizer.build(dataclasses.replace(config, exclude=("fc2",)))
    quantizer.sensitivity()
    quantizer.within_budget(lambda m: 0.0 if _quantized(m, "fc3") else 1.0, 0.01)
    quantizer.save(tmp_path / "q.onnx")
    assert passes == [1]  # one calibration pass (one tensor group) for everything above


def test_within_budget_keeps_the_penalised_layer_float(toy: dict[str, Path]) -> None:
    quantizer = Quantizer(toy["model"], QuantConfig(), CalibrationData(toy["calib"]))
    penalised = "fc3"
    scored: list[onnx.ModelProto] = []

    def score(model: onnx.ModelProto) -> float:
        scored.append(model)
        return 0.9 if _quantized(model, penalised) else 1.0

    search = quantizer.within_budget(score, max_drop=0.05, baseline=1.0, metric="fake")
    order = [s.name for s in search.sensitivity]
    assert sorted(order) == sorted(LAYERS)  # the full model missed: sensitivity was needed
    assert penalised in search.fallback.kept_float
    assert search.fallback.kept_float == order[: order.index(penalised) + 1]  # the fewest that do
    assert not _quantized(search.model, penalised)
    assert any(_quantized(search.model, layer) for layer in LAYERS)  # the others stay int8
    assert search.fallback.drop <= 0.05 and search.fallback.metric == 1.0
    assert not search.fallback.steps[0].within_budget and search.fallback.steps[0].float_layers == 0
    assert len(scored) == len(search.fallback.steps)


def test_within_budget_needs_no_sensitivity_when_full_int8_passes(toy: dict[str, Path]) -> None:
    quantizer = Quantizer(toy["model"], QuantConfig(), CalibrationData(toy["calib"]))
    search = quantizer.within_budget(lambda m: 1.0, max_drop=0.0)
    assert search.fallback.kept_float == [] and search.sensitivity == []
    assert all(_quantized(search.model, layer) for layer in LAYERS)
    with pytest.raises(ConfigError, match="max_drop"):
        quantizer.within_budget(lambda m: 1.0, max_drop=-0.1)


def test_within_budget_fails_when_the_budget_cannot_be_met(toy: dict[str, Path]) -> None:
    quantizer = Quantizer(toy["model"], QuantConfig(), CalibrationData(toy["calib"]))
    with pytest.raises(QuantizationError, match="accuracy budget not met"):
        quantizer.within_budget(lambda m: 0.0, max_drop=0.1)


def test_build_refuses_a_config_its_calibration_does_not_cover(toy: dict[str, Path]) -> None:
    config = QuantConfig(exclude=("fc1",))
    quantizer = Quantizer(toy["model"], config, CalibrationData(toy["calib"]))
    more = quantizer.build(dataclasses.replace(config, exclude=("fc1", "fc2"), cpu=Int8Cpu.U8))
    assert not _quantized(more, "fc2") and _quantized(more, "fc3")
    with pytest.raises(ConfigError, match="method"):
        quantizer.build(dataclasses.replace(config, method=Method.MINMAX))
    with pytest.raises(ConfigError, match="fc1"):
        quantizer.build(dataclasses.replace(config, exclude=()))


def test_progress_gets_one_bar_per_step(toy: dict[str, Path]) -> None:
    bars: list[tuple[str, int | None]] = []
    advanced: dict[str, int] = {}

    def factory(label: str, total: int | None) -> Callable[[int], None]:
        bars.append((label, total))
        advanced[label] = 0

        def advance(n: int) -> None:
            advanced[label] += n

        return advance

    quantizer = Quantizer(toy["model"], QuantConfig(), CalibrationData(toy["calib"], batch_size=4), factory)
    quantizer.sensitivity(samples=8)
    assert bars == [("calibrating", None), ("sensitivity", len(LAYERS))]
    assert advanced == {"calibrating": 3, "sensitivity": len(LAYERS)}  # 12 samples in batches of 4


def test_calibration_data_is_validated() -> None:
    with pytest.raises(ConfigError, match="batch size"):
        CalibrationData("calib", batch_size=0)
    with pytest.raises(ConfigError, match="limit"):
        CalibrationData("calib", limit=-1)


def test_quant_imports_nothing_downstream() -> None:
    """quant sits before accuracy, bench, serve and deploy in the pipeline: it imports none of them."""
    code = (
        "import sys, pkgutil, importlib, modelkiln.quant as q\n"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(q.__path__, 'modelkiln.quant.')]\n"
        "print(' '.join(sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    for room in ("accuracy", "bench", "serve", "deploy", "genai", "cli"):
        assert not [m for m in loaded if m.startswith(f"modelkiln.{room}")], room
