"""Pipelines: a served model made of other served models with the zoo's Python pre/post-processing
between steps. Every step is an ordinary request to a loaded model, so it goes through that
model's batcher and batches with direct requests; the Python glue runs on a small executor of its
own (never on the inference pool, whose workers the steps need).

- ``detect_classify``: YOLOv5 boxes -> crops -> classifier top-1 per box.
- ``clip_zero_shot``: CLIP image tower -> cosine to cached text embeddings of the given labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from modelkiln.errors import BadInput, ConfigError, ModelUnavailable
from modelkiln.serve.batcher import Feed, InferRequest, InferResponse
from modelkiln.serve.config import ModelConfig, PipelineConfig
from modelkiln.serve.model import TensorInfo
from modelkiln.zoo import ImageTask, Prepared, ZooModel

log = logging.getLogger(__name__)
IMAGE = TensorInfo("image", "uint8", (-1, -1, 3))


class StepModel(Protocol):
    """What a pipeline reads of the model playing a role: its config and its zoo family."""

    @property
    def config(self) -> ModelConfig: ...

    def zoo_entry(self) -> ZooModel: ...


class ModelLookup(Protocol):
    """All a pipeline needs of the server: run loaded model ``name`` (version ``version``, the
    newest when None) on a feed through its batcher, and look up a loaded plain model. Tests
    pass a fake; the server passes itself."""

    def infer(self, name: str, feed: Feed, version: str | None = None) -> Future[InferResponse]: ...

    def step_model(self, name: str) -> StepModel: ...


@runtime_checkable
class _Detector(Protocol):
    conf_threshold: float
    iou_threshold: float

    def preprocess(self, images: list[np.ndarray]) -> Prepared: ...

    def postprocess(self, outputs: Feed, prepared: Prepared) -> list[Any]: ...


@runtime_checkable
class _ImageTower(Protocol):
    logit_scale: float

    def preprocess(self, images: list[np.ndarray]) -> Prepared: ...


@runtime_checkable
class _TextTower(Protocol):
    def text_feed(self, texts: list[str]) -> dict[str, np.ndarray]: ...


class Pipeline:
    """A ModelQueue and a model at once: validate, metadata, submit."""

    kind = "pipeline"
    roles: ClassVar[tuple[str, ...]] = ()
    #: The outputs every pipeline of this kind has (a kind whose outputs depend on its options
    #: sets ``self.outputs`` itself).
    output_specs: ClassVar[tuple[TensorInfo, ...]] = ()

    def __init__(self, config: ModelConfig, models: ModelLookup, workers: int = 4) -> None:
        if config.pipeline is None:
            raise ConfigError(f"model '{config.name}': a pipeline needs a pipeline section in its config")
        self.config, self.models = config, models
        self.spec: PipelineConfig = config.pipeline
        self.name, self.version = config.name, 1
        self.inputs = [IMAGE]
        self.outputs = list(self.output_specs)
        missing = [role for role in self.roles if role not in self.spec.steps]
        if missing:
            raise ConfigError(
                f"pipeline '{self.name}' ({self.kind}): steps need {self.roles}, missing {missing}"
            )
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"pipeline-{self.name}")
        self._closed = False

    def step(self, role: str, feed: Feed) -> Feed:
        """One request to the model playing ``role``, through its batcher; waits for the answer."""
        future = self.models.infer(self.spec.steps[role], feed)
        return future.result().outputs

    def served(self, role: str) -> StepModel:
        return self.models.step_model(self.spec.steps[role])

    def entry(self, role: str) -> ZooModel:
        """The zoo family (pre/post-processing) of the model playing ``role``."""
        return self.served(role).zoo_entry()

    def _wrong_entry(self, role: str, entry: ZooModel, wanted: str) -> ConfigError:
        return ConfigError(
            f"pipeline '{self.name}' ({self.kind}): step '{role}' "
            f"('{self.spec.steps[role]}', zoo '{entry.name}') is not {wanted}"
        )

    def validate(self, feed: Feed) -> int:
        image = feed.get("image")
        if set(feed) != {"image"} or image is None:
            raise BadInput(f"pipeline '{self.name}': expected one input 'image', got {sorted(feed)}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
            raise BadInput(
                f"pipeline '{self.name}': input 'image' expects UINT8 [height, width, 3] (BGR), "
                f"got {image.dtype} {list(image.shape)}"
            )
        return 1

    def submit(self, request: InferRequest) -> Future[InferResponse]:
        if self._closed:
            raise ModelUnavailable(f"pipeline '{self.name}' is unloading")
        return self._executor.submit(self._answer, request)

    def _answer(self, request: InferRequest) -> InferResponse:
        start = time.monotonic()
        outputs = self.run(np.ascontiguousarray(request.feed["image"]))
        return InferResponse(outputs, start - request.enqueued, time.monotonic() - start, 1)

    def run(self, image: np.ndarray) -> Feed:
        raise NotImplementedError

    def depth(self) -> int:
        return self._executor._work_queue.qsize()

    def close(self, drain: bool = True) -> None:
        self._closed = True
        self._executor.shutdown(wait=drain, cancel_futures=not drain)

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": f"modelkiln_pipeline:{self.kind}",
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


class DetectClassify(Pipeline):
    kind = "detect_classify"
    roles = ("detector", "classifier")
    output_specs = (
        TensorInfo("boxes", "float32", (-1, 4)),
        TensorInfo("scores", "float32", (-1,)),
        TensorInfo("classes", "int64", (-1,)),
        TensorInfo("labels", "int64", (-1,)),
        TensorInfo("label_scores", "float32", (-1,)),
    )

    def __init__(self, config: ModelConfig, models: ModelLookup) -> None:
        super().__init__(config, models)
        opts = self.spec.options
        detector = self.entry("detector")
        if not isinstance(detector, _Detector):
            raise self._wrong_entry("detector", detector, "a detector (conf/iou thresholds)")
        self.detector = detector
        classifier = self.entry("classifier")
        if not isinstance(classifier, ImageTask):
            raise self._wrong_entry("classifier", classifier, "an image model")
        self.classifier = classifier
        self.detector.conf_threshold = float(opts.get("conf", 0.25))
        self.detector.iou_threshold = float(opts.get("iou", 0.45))
        self.max_boxes = int(opts.get("max_boxes", 32))
        self.chunk = max(self.served("classifier").config.max_batch_size, 1)

    def run(self, image: np.ndarray) -> Feed:
        prepared = self.detector.preprocess([image])
        found = self.detector.postprocess(self.step("detector", prepared.feed), prepared)[0].boxes
        boxes = [b for b in found if b.x2 - b.x1 >= 2 and b.y2 - b.y1 >= 2][: self.max_boxes]
        labels: list[int] = []
        label_scores: list[float] = []
        h, w = image.shape[:2]
        crops = [
            image[
                max(int(b.y1), 0) : min(int(np.ceil(b.y2)), h), max(int(b.x1), 0) : min(int(np.ceil(b.x2)), w)
            ]
            for b in boxes
        ]
        for start in range(0, len(crops), self.chunk):
            part = self.classifier.preprocess(crops[start : start + self.chunk])
            for result in self.classifier.postprocess(self.step("classifier", part.feed), part):
                labels.append(result.top[0][0])
                label_scores.append(result.top[0][2])
        return {
            "boxes": np.asarray([[b.x1, b.y1, b.x2, b.y2] for b in boxes], np.float32).reshape(-1, 4),
            "scores": np.asarray([b.score for b in boxes], np.float32),
            "classes": np.asarray([b.class_id for b in boxes], np.int64),
            "labels": np.asarray(labels, np.int64),
            "label_scores": np.asarray(label_scores, np.float32),
        }


class ClipZeroShot(Pipeline):
    kind = "clip_zero_shot"
    roles = ("image", "text")

    def __init__(self, config: ModelConfig, models: ModelLookup) -> None:
        super().__init__(config, models)
        opts = self.spec.options
        labels = opts.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ConfigError(f"pipeline '{self.name}': options.labels must be a non-empty list of strings")
        self.labels: list[str] = labels
        image_tower = self.entry("image")
        if not isinstance(image_tower, _ImageTower):
            raise self._wrong_entry("image", image_tower, "a CLIP image tower")
        self.image_tower = image_tower
        text_tower = self.entry("text")
        if not isinstance(text_tower, _TextTower):
            raise self._wrong_entry("text", text_tower, "a CLIP text tower")
        template = str(opts.get("template", "a photo of a {}."))
        feed = text_tower.text_feed([template.format(x) for x in labels])
        text = np.concatenate(
            [
                self.step("text", {k: v[i : i + 1] for k, v in feed.items()})["text_embeds"]
                for i in range(len(labels))
            ]
        )
        self.text = text / np.maximum(np.linalg.norm(text, axis=-1, keepdims=True), 1e-12)  # cached once
        self.outputs = [TensorInfo("probs", "float32", (1, len(labels))), TensorInfo("label", "int64", (1,))]

    def run(self, image: np.ndarray) -> Feed:
        emb = self.step("image", self.image_tower.preprocess([image]).feed)["image_embeds"]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        logits = self.image_tower.logit_scale * emb @ self.text.T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
        return {"probs": probs, "label": probs.argmax(-1).astype(np.int64)}


KINDS: dict[str, Callable[[ModelConfig, ModelLookup], Pipeline]] = {
    DetectClassify.kind: DetectClassify,
    ClipZeroShot.kind: ClipZeroShot,
}


def build_pipeline(config: ModelConfig, models: ModelLookup) -> Pipeline:
    """The pipeline ``config`` describes, its steps run through ``models`` (the server)."""
    if config.pipeline is None:
        raise ConfigError(f"model '{config.name}': a pipeline needs a pipeline section in its config")
    kind = config.pipeline.kind
    if kind not in KINDS:
        raise ConfigError(f"pipeline '{config.name}': kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind](config, models)
