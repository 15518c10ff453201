"""``compare`` over backends: a tiny model against a perturbed copy (figures checked against numpy),
layer pairs found by name (QDQ's ``_dq`` names included), a candidate on another Backend object,
the path convenience and the ``kiln compare`` command.

Which wrong code each test catches: statistics taken over one batch only or over the wrong
tensors, an output compared against a layer of the same name, a candidate assumed to be ONNX
Runtime, a classifier's top-k agreement counted wrong, per-layer asked of a runtime that cannot
expose tensors, a CLI that ignores --backend or writes other JSON keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelkiln.accuracy.compare import (
    CompareResult,
    compare,
    compare_models,
    layer_pairs,
    load_pair,
    sample_cosines,
)
from modelkiln.errors import BadInput, ConfigError
from modelkiln.runtime.backends.base import Backend, TensorMeta
from modelkiln.runtime.backends.onnxruntime import cpu_backend

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((4, 6)).astype(np.float32)
B1 = RNG.standard_normal(6).astype(np.float32)
W2 = RNG.standard_normal((6, 5)).astype(np.float32)
NOISE = 0.05 * RNG.standard_normal(W2.shape).astype(np.float32)


def _model(w1: np.ndarray, w2: np.ndarray, qdq_names: bool = False) -> onnx.ModelProto:
    """x [N, 4] -> m = x @ W1 -> a = m + B1 -> h = relu(a) -> y = h @ W2 [N, 5].

    ``qdq_names``: the candidate's ``m`` reaches the Add as ``m_dq`` (as in a QDQ model)."""
    m_read = "m_dq" if qdq_names else "m"
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m"])]
    if qdq_names:
        nodes.append(helper.make_node("Identity", ["m"], ["m_dq"]))
    nodes += [
        helper.make_node("Add", [m_read, "B1"], ["a"]),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(B1, "B1"),
            numpy_helper.from_array(w2, "W2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="modelkiln.note", value="tiny")
    return model


def _forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> dict[str, np.ndarray]:
    m = x.astype(np.float64) @ w1
    a = m + B1
    h = np.maximum(a, 0)
    return {"m": m, "a": a, "h": h, "y": h @ w2}


FEEDS = [{"x": RNG.standard_normal((n, 4)).astype(np.float32)} for n in (3, 2, 4)]


def _expected(name: str, cand: np.ndarray, ref_w2: np.ndarray = W2) -> dict[str, float]:
    """Figures of tensor ``name`` over all feeds at once, in numpy."""
    ref = np.concatenate([_forward(f["x"], W1, ref_w2)[name] for f in FEEDS])
    got = np.concatenate([_forward(f["x"], W1, cand)[name] for f in FEEDS])
    noise = got - ref
    return {
        "max_abs": float(np.abs(noise).max()),
        "mean_abs": float(np.abs(noise).mean()),
        "cosine": float(got.ravel() @ ref.ravel() / (np.linalg.norm(got) * np.linalg.norm(ref))),
        "snr_db": float(10 * np.log10((ref**2).sum() / (noise**2).sum())) if noise.any() else np.inf,
    }


class NumpyBackend(Backend):
    """Another runtime: the same network in numpy (what a TensorRT engine is to compare())."""

    name = "numpy"

    def __init__(self, w2: np.ndarray) -> None:
        super().__init__(
            "numpy-mlp", [TensorMeta("x", "float32", ("N", 4))], [TensorMeta("y", "float32", ("N", 5))]
        )
        self.w2 = w2

    @classmethod
    def load(cls, model: Any, options: Any = None) -> NumpyBackend:
        return cls(W2)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": _forward(feed["x"], W1, self.w2)["y"].astype(np.float32)}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cmp")
    ref, cand = folder / "ref.onnx", folder / "cand.onnx"
    onnx.save(_model(W1, W2), ref)
    onnx.save(_model(W1, W2 + NOISE, qdq_names=True), cand)
    return ref, cand


def test_output_figures_against_numpy() -> None:
    reference, candidate = cpu_backend(_model(W1, W2)), cpu_backend(_model(W1, W2 + NOISE))
    result = compare(reference, candidate, FEEDS)
    assert result.samples == 9 and [o.name for o in result.outputs] == ["y"] and result.layers == []
    (y,) = result.outputs
    want = _expected("y", W2 + NOISE)
    assert y.max_abs == pytest.approx(want["max_abs"], rel=1e-4)
    assert y.mean_abs == pytest.approx(want["mean_abs"], rel=1e-4)
    assert y.cosine == pytest.approx(want["cosine"], abs=1e-6)
    assert y.snr_db == pytest.approx(want["snr_db"], abs=1e-3)
    assert 0.9 < y.cosine < 0.99999  # really perturbed, really close
    assert y.passed and result.passed and y.limit is None


def test_min_cosine_decides_passed() -> None:
    reference, candidate = cpu_backend(_model(W1, W2)), cpu_backend(_model(W1, W2 + NOISE))
    cos = compare(reference, candidate, FEEDS).outputs[0].cosine
    strict = compare(reference, candidate, FEEDS, min_cosine=min(1.0, cos + 1e-4))
    assert not strict.passed and not strict.outputs[0].passed and not strict
    assert compare(reference, candidate, FEEDS, min_cosine=cos - 1e-4).passed


def test_layer_pairs_follow_dq_names_and_skip_pre_activation_tensors() -> None:
    pairs = layer_pairs(_model(W1, W2), _model(W1, W2, qdq_names=True))
    # m is compared as the candidate's m_dq; a (read only by Relu) is skipped; y is an output
    assert pairs == [("m", "m_dq"), ("h", "h"), ("y", "y")]


def test_per_layer_figures_and_first_collapse(files: tuple[Path, Path]) -> None:
    ref, cand = files
    pair = load_pair(ref, cand, per_layer=True)
    assert pair.layers == (("m", "m_dq"), ("h", "h"))
    result = compare(pair.reference, pair.candidate, FEEDS, layers=pair.layers, collapse_db=60.0)
    assert [o.name for o in result.outputs] == ["y"]  # the exposed layers are not outputs
    assert [d.name for d in result.layers] == ["m", "h"]
    for layer in result.layers:  # W1 untouched: layers before W2 are identical up to float noise
        assert layer.max_abs < 1e-5 and layer.snr_db > 100
    want = _expected("y", W2 + NOISE)
    assert result.outputs[0].cosine == pytest.approx(want["cosine"], abs=1e-6)
    assert result.first_collapse is None  # only the output moved
    broken = _model(W1 + 0.5, W2, qdq_names=True)  # now the very first layer differs
    pair = load_pair(_model(W1, W2), broken, per_layer=True)
    result = compare(pair.reference, pair.candidate, FEEDS, layers=pair.layers, collapse_db=60.0)
    assert result.first_collapse == "m"


def test_candidate_on_another_backend_object() -> None:
    reference = cpu_backend(_model(W1, W2))
    same = compare(reference, NumpyBackend(W2), FEEDS)
    assert same.outputs[0].cosine == pytest.approx(1.0, abs=1e-9) and same.outputs[0].max_abs < 1e-5
    assert same.candidate == "numpy-mlp" and same.passed
    moved = compare(reference, NumpyBackend(W2 + NOISE), FEEDS)
    want = _expected("y", W2 + NOISE)
    assert moved.outputs[0].cosine == pytest.approx(want["cosine"], abs=1e-6)
    assert moved.outputs[0].max_abs == pytest.approx(want["max_abs"], rel=1e-4)
    # and the other way round: numpy as the reference
    back = compare(NumpyBackend(W2 + NOISE), reference, FEEDS)
    assert back.outputs[0].cosine == pytest.approx(want["cosine"], abs=1e-6)


def test_classifier_topk_agreement() -> None:
    reference, candidate = NumpyBackend(W2), NumpyBackend(W2 + 20 * NOISE)
    result = compare(reference, candidate, FEEDS, classifier=True)
    ref = np.concatenate([_forward(f["x"], W1, W2)["y"] for f in FEEDS])
    got = np.concatenate([_forward(f["x"], W1, W2 + 20 * NOISE)["y"] for f in FEEDS])
    top1 = float(np.mean(ref.argmax(1) == got.argmax(1)))
    top5 = float(
        np.mean([len(set(np.argsort(-r)[:5]) & set(np.argsort(-g)[:5])) / 5 for r, g in zip(ref, got)])
    )
    agreement = result.outputs[0].topk_agreement
    assert agreement == pytest.approx({"top1": top1, "top5": top5})
    assert compare(reference, candidate, FEEDS).outputs[0].topk_agreement is None


def test_compare_models_names_files_and_reads_them(files: tuple[Path, Path]) -> None:
    ref, cand = files
    result = compare_models(ref, cand, FEEDS, per_layer=True)
    assert (result.reference, result.candidate) == (str(ref), str(cand))
    assert [d.name for d in result.layers] == ["m", "h"]
    as_dict = result.to_dict()
    assert {"reference", "candidate", "samples", "outputs", "layers", "first_collapse", "passed"} <= set(
        as_dict
    )
    assert {"name", "max_abs", "mean_abs", "cosine", "snr_db", "topk_agreement"} <= set(as_dict["outputs"][0])


def test_compare_refuses_model_files(files: tuple[Path, Path]) -> None:
    ref, cand = files
    with pytest.raises(ConfigError, match="compare_models"):
        compare(ref, cand, FEEDS)  # type: ignore[arg-type]


def test_per_layer_needs_onnxruntime_on_both_sides(files: tuple[Path, Path]) -> None:
    ref, cand = files
    with pytest.raises(ConfigError, match="onnxruntime on both"):
        load_pair(ref, cand, per_layer=True, candidate_backend="tensorrt")
    with pytest.raises(ConfigError, match="per_layer needs the models"):
        compare(cpu_backend(ref), cpu_backend(cand), FEEDS, per_layer=True)


def test_a_candidate_without_the_output_is_a_clear_error() -> None:
    other = _model(W1, W2)
    other.graph.output[0].name = "logits"
    other.graph.node[-1].output[0] = "logits"
    with pytest.raises(BadInput, match="no tensor 'y'"):
        compare(cpu_backend(_model(W1, W2)), cpu_backend(other), FEEDS)


def test_sample_cosines_per_row() -> None:
    reference, candidate = cpu_backend(_model(W1, W2)), NumpyBackend(W2 + NOISE)
    got = sample_cosines(reference, candidate, FEEDS)
    rows_r = np.concatenate([_forward(f["x"], W1, W2)["y"] for f in FEEDS])
    rows_c = np.concatenate([_forward(f["x"], W1, W2 + NOISE)["y"] for f in FEEDS])
    want = (rows_r * rows_c).sum(1) / (np.linalg.norm(rows_r, axis=1) * np.linalg.norm(rows_c, axis=1))
    assert got.shape == (9,)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_result_passed_reads_the_records() -> None:
    result = compare(NumpyBackend(W2), NumpyBackend(W2), FEEDS)
    assert isinstance(result, CompareResult) and result.passed
    assert result.outputs[0].snr_db == np.inf


def kiln(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "modelkiln", *args], capture_output=True, text=True, check=False, env=env
    )


def test_kiln_compare(files: tuple[Path, Path], tmp_path: Path) -> None:
    ref, cand = files
    data = tmp_path / "data"
    data.mkdir()
    for i, feed in enumerate(FEEDS):
        np.save(data / f"{i}.npy", feed["x"])
    out = tmp_path / "r.json"
    res = kiln("compare", str(ref), str(cand), "--data", str(data), "--per-layer", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "cand.onnx vs ref.onnx (9 samples)" in res.stdout and "2 layers" in res.stdout
    found = json.loads(out.read_text())
    assert found["reference"] == str(ref) and found["samples"] == 9
    assert found["outputs"][0]["cosine"] == pytest.approx(_expected("y", W2 + NOISE)["cosine"], abs=1e-6)
    assert [d["name"] for d in found["layers"]] == ["m", "h"]
    explicit = kiln(
        "compare", str(ref), str(cand), "--data", str(data),
        "--backend", "onnxruntime", "--reference-backend", "onnxruntime",
    )  # fmt: skip
    assert explicit.returncode == 0, explicit.stderr
    bad = kiln("compare", str(ref), str(cand), "--data", str(data), "--backend", "torch")
    assert bad.returncode == 1 and "--backend must be one of" in bad.stderr and "Traceback" not in bad.stderr
