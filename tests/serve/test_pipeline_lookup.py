"""Pipelines need only a narrow model lookup (run model X on a feed; look up a plain model), not
the server: here they run against a fake one that records every step."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import affine_model
from modelkiln import zoo
from modelkiln.errors import BadInput, ConfigError, ModelUnavailable
from modelkiln.serve.batcher import Feed, InferRequest, InferResponse
from modelkiln.serve.config import ModelConfig, PipelineConfig
from modelkiln.serve.model import ServedModel
from modelkiln.serve.pipeline import ClipZeroShot, DetectClassify, ModelLookup, build_pipeline
from modelkiln.zoo import Prepared


@dataclass
class FakeStep:
    """A StepModel: a config and a zoo family."""

    config: ModelConfig
    entry: Any

    def zoo_entry(self) -> Any:
        return self.entry


@dataclass
class FakeLookup:
    """A ModelLookup: answers each model from a function of its feed, and records the calls."""

    steps: dict[str, FakeStep]
    answers: dict[str, Any]
    calls: list[tuple[str, Feed]] = field(default_factory=list)

    def infer(self, name: str, feed: Feed, version: str | None = None) -> Future[InferResponse]:
        self.calls.append((name, feed))
        future: Future[InferResponse] = Future()
        future.set_result(InferResponse(self.answers[name](feed), 0.0, 0.0, 1))
        return future

    def step_model(self, name: str) -> FakeStep:
        return self.steps[name]


def _image(h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _classifier_logits(feed: Feed) -> Feed:
    """Row i of a call scores class 7 + i highest."""
    n = feed["input"].shape[0]
    logits = np.zeros((n, 1000), np.float32)
    logits[np.arange(n), 7 + np.arange(n)] = 10.0
    return {"logits": logits}


def _detect_classify(classifier_batch: int, **options: Any) -> tuple[DetectClassify, FakeLookup]:
    rows = np.array(
        [
            [0, 4, 4, 30, 30, 0.9, 2],  # [batch, x1, y1, x2, y2, score, class] (in-graph NMS export)
            [0, 32, 32, 60, 60, 0.8, 5],
            [0, 1, 1, 2, 2, 0.7, 1],  # under 2 pixels wide: dropped
        ],
        np.float32,
    )
    lookup = FakeLookup(
        steps={
            "yolo": FakeStep(ModelConfig("yolo", max_batch_size=1), zoo.get("yolov5n", 64)),
            "lite": FakeStep(
                ModelConfig("lite", max_batch_size=classifier_batch), zoo.get("efficientnet_lite0", 32)
            ),
        },
        answers={"yolo": lambda feed: {"detections": rows}, "lite": _classifier_logits},
    )
    config = ModelConfig(
        "boxes",
        backend="pipeline",  # type: ignore[arg-type]  # config files say it as a string
        pipeline=PipelineConfig("detect_classify", {"detector": "yolo", "classifier": "lite"}, options),
    )
    pipe = build_pipeline(config, lookup)
    assert isinstance(pipe, DetectClassify)
    return pipe, lookup


def test_the_fake_is_a_model_lookup() -> None:
    lookup: ModelLookup = FakeLookup({}, {})  # mypy checks the protocol here
    assert not hasattr(lookup, "get") and not hasattr(lookup, "scheduler")  # nothing of a server


def test_detect_classify_runs_its_steps_through_the_lookup() -> None:
    pipe, lookup = _detect_classify(classifier_batch=4, conf=0.5, iou=0.3)
    try:
        assert pipe.detector.conf_threshold == 0.5 and pipe.detector.iou_threshold == 0.3
        out = pipe.submit(InferRequest({"image": _image()})).result(timeout=30)
        assert [name for name, _ in lookup.calls] == ["yolo", "lite"]  # both crops in one batch of 4
        assert lookup.calls[0][1]["images"].shape == (1, 3, 64, 64)
        assert lookup.calls[1][1]["input"].shape == (2, 3, 32, 32)
        np.testing.assert_allclose(out.outputs["boxes"], [[4, 4, 30, 30], [32, 32, 60, 60]])
        np.testing.assert_allclose(out.outputs["scores"], [0.9, 0.8])
        assert out.outputs["classes"].tolist() == [2, 5]
        assert out.outputs["labels"].tolist() == [7, 8]
        assert out.outputs["label_scores"].dtype == np.float32
        assert out.outputs["label_scores"].min() > 0.9
        assert out.batch_size == 1
    finally:
        pipe.close()


def test_detect_classify_splits_crops_by_the_classifiers_batch_and_caps_boxes() -> None:
    pipe, lookup = _detect_classify(classifier_batch=1)
    try:
        out = pipe.run(_image())
        assert [name for name, _ in lookup.calls] == ["yolo", "lite", "lite"]
        assert out["labels"].tolist() == [7, 7]  # each crop is row 0 of its own request
    finally:
        pipe.close()
    pipe, lookup = _detect_classify(classifier_batch=4, max_boxes=1)
    try:
        assert pipe.run(_image())["boxes"].shape == (1, 4)
    finally:
        pipe.close()


def test_a_pipeline_refuses_bad_images_and_answers_nothing_once_closed() -> None:
    pipe, lookup = _detect_classify(classifier_batch=4)
    with pytest.raises(BadInput, match="expects UINT8"):
        pipe.validate({"image": np.zeros((64, 64), np.uint8)})
    with pytest.raises(BadInput, match="expected one input 'image'"):
        pipe.validate({"x": _image()})
    assert pipe.validate({"image": _image()}) == 1
    pipe.close()
    with pytest.raises(ModelUnavailable, match="unloading"):
        pipe.submit(InferRequest({"image": _image()}))
    assert lookup.calls == []


def test_a_step_of_the_wrong_kind_is_a_config_error() -> None:
    lite = FakeStep(ModelConfig("lite", max_batch_size=4), zoo.get("efficientnet_lite0", 32))
    lookup = FakeLookup({"lite": lite}, {})
    config = ModelConfig(
        "boxes", pipeline=PipelineConfig("detect_classify", {"detector": "lite", "classifier": "lite"})
    )
    with pytest.raises(ConfigError, match="step 'detector' .*'lite'.* is not a detector"):
        build_pipeline(config, lookup)
    lookup.steps["yolo"] = FakeStep(ModelConfig("yolo", max_batch_size=1), zoo.get("yolov5n", 64))
    lookup.steps["minilm"] = FakeStep(ModelConfig("minilm", max_batch_size=4), zoo.get("all-minilm-l6-v2"))
    text = ModelConfig(
        "boxes", pipeline=PipelineConfig("detect_classify", {"detector": "yolo", "classifier": "minilm"})
    )
    with pytest.raises(ConfigError, match="step 'classifier' .*'minilm'.* is not an image model"):
        build_pipeline(text, lookup)
    missing = ModelConfig("boxes", pipeline=PipelineConfig("detect_classify", {"detector": "lite"}))
    with pytest.raises(ConfigError, match=r"missing \['classifier'\]"):
        build_pipeline(missing, lookup)
    unknown = ModelConfig("boxes", pipeline=PipelineConfig("segment", {}))
    with pytest.raises(ConfigError, match="kind must be one of"):
        build_pipeline(unknown, lookup)


class _ImageTower:
    name = "fake-clip-image"
    logit_scale = 50.0

    def preprocess(self, images: list[np.ndarray]) -> Prepared:
        return Prepared({"image": np.stack([i.mean(axis=(0, 1)).astype(np.float32) for i in images])})


class _TextTower:
    name = "fake-clip-text"

    def text_feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Two inputs (as MiniLM's tower takes): the pipeline must pass each row of both."""
        ids = np.array([[len(t), i] for i, t in enumerate(texts)], np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids) * 7}


def test_clip_zero_shot_caches_label_embeddings_and_scores_images() -> None:
    text_embeds = {0: [1.0, 0.0, 0.0], 1: [0.0, 1.0, 0.0], 2: [1.0, 1.0, 1.0]}
    lookup = FakeLookup(
        steps={
            "img": FakeStep(ModelConfig("img", max_batch_size=4), _ImageTower()),
            "txt": FakeStep(ModelConfig("txt", max_batch_size=4), _TextTower()),
        },
        answers={
            "txt": lambda feed: {
                "text_embeds": np.array([text_embeds[int(feed["input_ids"][0, 1])]], np.float32)
            },
            "img": lambda feed: {"image_embeds": feed["image"] * 2},
        },
    )
    labels = ["a cat", "a dog", "a car"]
    config = ModelConfig(
        "zero_shot",
        pipeline=PipelineConfig("clip_zero_shot", {"image": "img", "text": "txt"}, {"labels": labels}),
    )
    pipe = build_pipeline(config, lookup)
    try:
        assert isinstance(pipe, ClipZeroShot)
        assert [n for n, _ in lookup.calls] == ["txt"] * 3  # one request per label, at load
        assert [int(f["input_ids"][0, 0]) for _, f in lookup.calls] == [
            len(f"a photo of a {x}.") for x in labels
        ]
        assert all(f["attention_mask"].shape == (1, 2) for _, f in lookup.calls)  # every input, one row
        assert [t.name for t in pipe.outputs] == ["probs", "label"] and pipe.outputs[0].shape == (1, 3)
        image = np.zeros((16, 16, 3), np.uint8)
        image[..., 1] = 200  # mean colour (0, 200, 0): closest to label 1
        out = pipe.submit(InferRequest({"image": image})).result(timeout=30).outputs
        assert [n for n, _ in lookup.calls][3:] == ["img"]  # the label embeddings were cached
        emb = np.array([0.0, 1.0, 0.0])
        txt = np.array([text_embeds[i] for i in range(3)])
        txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
        logits = 50.0 * emb @ txt.T
        ref = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(out["probs"][0], ref, rtol=1e-5)
        assert out["label"].tolist() == [1]
        meta = pipe.metadata()
        assert meta["platform"] == "modelkiln_pipeline:clip_zero_shot" and meta["outputs"][0]["shape"] == [
            1,
            3,
        ]
    finally:
        pipe.close()


def test_clip_zero_shot_needs_labels() -> None:
    lookup = FakeLookup({"img": FakeStep(ModelConfig("img"), _ImageTower())}, {})
    config = ModelConfig("z", pipeline=PipelineConfig("clip_zero_shot", {"image": "img", "text": "img"}))
    with pytest.raises(ConfigError, match="options.labels must be a non-empty list"):
        build_pipeline(config, lookup)


def test_a_served_model_rebuilds_its_zoo_entry_from_its_metadata(tmp_path: Path) -> None:
    """A step's pre/post-processing comes from the file's modelkiln.zoo metadata and its input size."""
    plain = ServedModel.load(ModelConfig("plain", max_batch_size=8), 1, affine_model(tmp_path / "plain.onnx"))
    with pytest.raises(ConfigError, match="model 'plain' carries no modelkiln.zoo metadata"):
        plain.zoo_entry()
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
        "gap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 96, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    exported = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(exported, {"modelkiln.zoo": "efficientnet_lite0"})
    onnx.save(exported, tmp_path / "lite.onnx")
    served = ServedModel.load(ModelConfig("lite", max_batch_size=8), 1, tmp_path / "lite.onnx")
    assert served.properties["modelkiln.zoo"] == "efficientnet_lite0"  # read through the backend
    entry = served.zoo_entry()
    assert entry.name == "efficientnet_lite0" and getattr(entry, "image_size", None) == 96
