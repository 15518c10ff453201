"""Predictor over backends: the entry comes from the backend's metadata (or --zoo), every backend
kind is reachable (the torch reference without any export), and CLIP labels go through the text
tower."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelkiln.errors import BadInput, ModelNotFound
from modelkiln.predict import Predictor, load_parts
from modelkiln.runtime.backends.base import Backend, TensorMeta
from modelkiln.runtime.backends.onnxruntime import OrtBackend
from modelkiln.zoo import as_image_task, get


def _plain_classifier(path: Path, size: int = 32) -> Path:
    """An untagged classifier: mean over pixels, then a fixed [3, 1000] projection (class 2 wins
    for bright red after ImageNet normalisation)."""
    w = np.zeros((3, 1000), np.float32)
    w[0, 2], w[1, 1], w[2, 0] = 1.0, 0.5, 0.25
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["logits"]),
        ],
        "plain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        [helper.make_tensor("W", TensorProto.FLOAT, list(w.shape), w.flatten().tolist())],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _image(path: Path, bgr: tuple[int, int, int] = (0, 0, 255)) -> Path:
    cv2.imwrite(str(path), np.full((50, 70, 3), bgr, np.uint8))
    return path


def test_untagged_file_runs_with_zoo_and_asks_for_it_otherwise(tmp_path: Path) -> None:
    model = _plain_classifier(tmp_path / "plain.onnx")
    with pytest.raises(BadInput, match="--zoo NAME"):
        Predictor.open(model)
    predictor = Predictor.open(model, zoo_name="efficientnet_lite0")
    assert isinstance(predictor.backends["model"], OrtBackend)
    assert predictor.entry.parts[0].inputs[0].shape == ("batch", 3, 32, 32)  # size from the file
    (pred,) = predictor.predict([_image(tmp_path / "red.png")])
    assert pred.result.top[0][0] == 2 and len(pred.result.top) == 5


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="model file not found"):
        Predictor.open(tmp_path / "nope.onnx")


def test_load_parts_names_the_single_part_after_the_entry(tmp_path: Path) -> None:
    entry, backends = load_parts(_plain_classifier(tmp_path / "renamed.onnx"), zoo_name="resnet50")
    assert entry.name == "resnet50" and list(backends) == ["model"]


def test_torch_backend_on_a_zoo_name_needs_no_export(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    predictor = Predictor.open("efficientnet_lite0", weights="random", backend="torch")
    assert predictor.backends["model"].name == "torch"
    assert predictor.backends["model"].metadata["modelkiln.weights"] == "random"
    (pred,) = predictor.predict([_image(tmp_path / "a.png")])
    assert len(pred.result.top) == 5


class _Fixed(Backend):
    def __init__(self, inputs: list[TensorMeta], output: str, rows: np.ndarray) -> None:
        super().__init__("fixed", inputs, [TensorMeta(output, "float32", ("batch", rows.shape[1]))])
        self.rows = rows

    @classmethod
    def load(cls, model: object, options: object = None) -> _Fixed:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self._outputs[0].name: self.rows[: next(iter(feed.values())).shape[0]]}


def test_clip_labels_go_through_the_text_tower(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    entry = as_image_task(get("clip-vit-b-32", 64))
    image = _Fixed([TensorMeta("image", "float32", ("batch", 3, 64, 64))], "image_embeds", np.eye(2, 512))
    text = _Fixed([TensorMeta("input_ids", "int64", ("batch", 77))], "text_embeds", np.eye(2, 512)[::-1])
    (pred,) = Predictor(entry, {"image": image, "text": text}).predict(
        [_image(tmp_path / "a.png")], labels=["dog", "cat"]
    )
    assert pred.result.labels[0][0] == "cat"  # image embedding [1, 0, …] meets "cat"'s text row


def test_cli_predict_takes_a_backend(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from modelkiln.export import export

    model = tmp_path / "lite.onnx"
    export("efficientnet_lite0", model, image_size=32)
    image = _image(tmp_path / "a.png")
    outputs = []
    for backend in ("onnxruntime", "torch"):
        run = subprocess.run(
            [sys.executable, "-m", "modelkiln", "predict", str(model), str(image), "--backend", backend],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout.split("\n", 1)[1].split(" (")[0])  # the top-1 class name
    assert outputs[0] == outputs[1]
