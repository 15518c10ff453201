"""The detect_classify pipeline over real YOLOv5n weights: per-box labels from the classifier,
through the same batchers as direct requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import Running, add_model
from modelkiln.serve.config import DynamicBatching, ModelConfig, PipelineConfig

pytestmark = pytest.mark.assets
httpclient = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def pipeline_server(tmp_path_factory: pytest.TempPathFactory, assets: Path):
    from modelkiln.export import export

    tmp = tmp_path_factory.mktemp("pipe")
    export("yolov5n", tmp / "yolo.onnx", weights=str(assets / "yolov5n.pt"), image_size=320)
    export("efficientnet_lite0", tmp / "lite.onnx", image_size=64)
    repo = tmp / "repo"
    add_model(repo, "yolo", tmp / "yolo.onnx", ModelConfig("yolo", max_batch_size=2))
    add_model(
        repo,
        "lite",
        tmp / "lite.onnx",
        ModelConfig("lite", max_batch_size=8, dynamic_batching=DynamicBatching((8,), 1000)),
    )
    (repo / "boxes").mkdir()
    from modelkiln.serve.config import dump_config

    cfg = ModelConfig(
        "boxes",
        backend="pipeline",
        pipeline=PipelineConfig("detect_classify", {"detector": "yolo", "classifier": "lite"}),
    )
    (repo / "boxes" / "config.yaml").write_text(dump_config(cfg))
    running = Running(repo)
    yield running
    running.stop()


def test_detect_classify_returns_a_label_per_box(pipeline_server, assets: Path) -> None:
    import cv2

    image = cv2.imread(str(min((assets / "coco-tiny" / "val2017").glob("*.jpg"))))
    c = httpclient.InferenceServerClient(pipeline_server.url)
    inp = httpclient.InferInput("image", list(image.shape), "UINT8")
    inp.set_data_from_numpy(image)
    r = c.infer("boxes", [inp])
    boxes, labels = r.as_numpy("boxes"), r.as_numpy("labels")
    assert boxes.shape[0] >= 1 and boxes.shape == (labels.shape[0], 4)
    assert r.as_numpy("label_scores").shape == labels.shape and ((labels >= 0) & (labels < 1000)).all()
    h, w = image.shape[:2]
    assert (boxes[:, 0] >= -1).all() and (boxes[:, 2] <= w + 1).all() and (boxes[:, 3] <= h + 1).all()
    meta = c.get_model_metadata("boxes")
    assert meta["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}


def test_pipeline_rejects_a_bad_image_and_keeps_serving(pipeline_server) -> None:
    from tritonclient.utils import InferenceServerException

    c = httpclient.InferenceServerClient(pipeline_server.url)
    bad = httpclient.InferInput("image", [4, 4], "FP32")
    bad.set_data_from_numpy(np.zeros((4, 4), np.float32))
    with pytest.raises(InferenceServerException) as err:
        c.infer("boxes", [bad])
    assert err.value.status() == "400" and "UINT8 [height, width, 3]" in err.value.message()
    ok = httpclient.InferInput("image", [64, 64, 3], "UINT8")
    ok.set_data_from_numpy(np.full((64, 64, 3), 127, np.uint8))
    assert c.infer("boxes", [ok]).as_numpy("boxes").shape[1] == 4


@pytest.mark.slow
def test_clip_zero_shot_pipeline_caches_label_embeddings(tmp_path: Path) -> None:
    """Random-weight CLIP: the pipeline's probabilities equal the towers run by hand."""
    from modelkiln.export import export
    from modelkiln.runtime.backends.onnxruntime import cpu_backend
    from modelkiln.serve.config import dump_config
    from modelkiln.zoo import get

    export("clip-vit-b-32", tmp_path / "clip", weights="random")
    repo = tmp_path / "repo"
    add_model(
        repo, "clip_image", tmp_path / "clip" / "image.onnx", ModelConfig("clip_image", max_batch_size=4)
    )
    add_model(repo, "clip_text", tmp_path / "clip" / "text.onnx", ModelConfig("clip_text", max_batch_size=4))
    labels = ["a cat", "a dog", "a car"]
    cfg = ModelConfig(
        "zero_shot",
        backend="pipeline",
        pipeline=PipelineConfig(
            "clip_zero_shot", {"image": "clip_image", "text": "clip_text"}, {"labels": labels}
        ),
    )
    (repo / "zero_shot").mkdir()
    (repo / "zero_shot" / "config.yaml").write_text(dump_config(cfg))
    running = Running(repo)
    try:
        image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
        c = httpclient.InferenceServerClient(running.url)
        inp = httpclient.InferInput("image", list(image.shape), "UINT8")
        inp.set_data_from_numpy(image)
        probs = c.infer("zero_shot", [inp]).as_numpy("probs")
        entry = get("clip-vit-b-32")
        image_tower = cpu_backend(tmp_path / "clip" / "image.onnx")
        entry.configure(image_tower.metadata)  # the exported logit scale
        img = image_tower.infer(entry.preprocess([image]).feed)["image_embeds"]
        ids = entry.tokenize([f"a photo of a {x}." for x in labels])
        txt = cpu_backend(tmp_path / "clip" / "text.onnx").infer({"input_ids": ids})["text_embeds"]
        img, txt = img / np.linalg.norm(img), txt / np.linalg.norm(txt, axis=1, keepdims=True)
        logits = entry.logit_scale * img @ txt.T
        ref = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert probs.shape == (1, 3)
        np.testing.assert_allclose(probs, ref, atol=1e-3)
    finally:
        running.stop()
