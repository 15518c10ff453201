"""Pipelines: a served model made of other served models with the zoo's Python pre/post-processing
between steps. Every step is an ordinary request to a loaded model, so it goes through that
model's batcher and batches with direct requests; the Python glue runs on a small executor of its
own (never on the inference pool, whose workers the steps need).

- ``detect_classify``: YOLOv5 boxes -> crops -> classifier top-1 per box.
- ``clip_zero_shot``: CLIP image tower -> cosine to cached text embeddings of the given labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from modelkiln.errors import BadInput, ConfigError, ModelUnavailable
from modelkiln.serve.batcher import InferRequest, InferResponse
from modelkiln.serve.config import ModelConfig
from modelkiln.serve.model import TensorInfo

if TYPE_CHECKING:
    from modelkiln.serve.server import ModelServer

log = logging.getLogger(__name__)
IMAGE = TensorInfo("image", "uint8", (-1, -1, 3))


class Pipeline:
    """A ModelQueue and a model at once: validate, metadata, submit."""

    kind = "pipeline"
    outputs: ClassVar[list[TensorInfo]] = []

    def __init__(self, config: ModelConfig, server: ModelServer, workers: int = 4) -> None:
        self.config, self.server = config, server
        self.name, self.version = config.name, 1
        self.inputs = [IMAGE]
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"pipeline-{self.name}")
        self._closed = False
        missing = [role for role in self.roles if role not in config.pipeline.steps]
        if missing:
            raise ConfigError(
                f"pipeline '{self.name}' ({self.kind}): steps need {self.roles}, missing {missing}"
            )

    roles: tuple[str, ...] = ()

    def step(self, role: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request to the model playing ``role``, through its batcher; waits for the answer."""
        future = self.server.infer(self.config.pipeline.steps[role], feed)
        return future.result().outputs

    def served(self, role: str):
        return self.server.get(self.config.pipeline.steps[role]).model

    def validate(self, feed: dict[str, np.ndarray]) -> int:
        image = feed.get("image")
        if set(feed) != {"image"} or image is None:
            raise BadInput(f"pipeline '{self.name}': expected one input 'image', got {sorted(feed)}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
            raise BadInput(
                f"pipeline '{self.name}': input 'image' expects UINT8 [height, width, 3] (BGR), "
                f"got {image.dtype} {list(image.shape)}"
            )
        return 1

    def submit(self, request: InferRequest) -> Future:
        if self._closed:
            raise ModelUnavailable(f"pipeline '{self.name}' is unloading")
        return self._executor.submit(self._answer, request)

    def _answer(self, request: InferRequest) -> InferResponse:
        import time

        start = time.monotonic()
        outputs = self.run(np.ascontiguousarray(request.feed["image"]))
        return InferResponse(outputs, start - request.enqueued, time.monotonic() - start, 1)

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def depth(self) -> int:
        return self._executor._work_queue.qsize()

    def close(self, drain: bool = True) -> None:
        self._closed = True
        self._executor.shutdown(wait=drain, cancel_futures=not drain)

    def metadata(self) -> dict:
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
    outputs: ClassVar[list[TensorInfo]] = [
        TensorInfo("boxes", "float32", (-1, 4)),
        TensorInfo("scores", "float32", (-1,)),
        TensorInfo("classes", "int64", (-1,)),
        TensorInfo("labels", "int64", (-1,)),
        TensorInfo("label_scores", "float32", (-1,)),
    ]

    def __init__(self, config: ModelConfig, server: ModelServer) -> None:
        super().__init__(config, server)
        opts = config.pipeline.options
        self.detector = self.served("detector").zoo_entry()
        self.classifier = self.served("classifier").zoo_entry()
        self.detector.conf_threshold = float(opts.get("conf", 0.25))
        self.detector.iou_threshold = float(opts.get("iou", 0.45))
        self.max_boxes = int(opts.get("max_boxes", 32))
        self.chunk = max(self.served("classifier").config.max_batch_size, 1)

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        prepared = self.detector.preprocess([image])
        found = self.detector.postprocess(self.step("detector", prepared.feed), prepared)[0].boxes
        boxes = [b for b in found if b.x2 - b.x1 >= 2 and b.y2 - b.y1 >= 2][: self.max_boxes]
        labels, label_scores = [], []
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

    def __init__(self, config: ModelConfig, server: ModelServer) -> None:
        super().__init__(config, server)
        opts = config.pipeline.options
        labels = opts.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ConfigError(f"pipeline '{self.name}': options.labels must be a non-empty list of strings")
        self.labels = labels
        self.entry = self.served("image").zoo_entry()
        template = str(opts.get("template", "a photo of a {}."))
        ids = self.served("text").zoo_entry().tokenize([template.format(x) for x in labels])
        text = np.concatenate(
            [self.step("text", {"input_ids": ids[i : i + 1]})["text_embeds"] for i in range(len(ids))]
        )
        self.text = text / np.maximum(np.linalg.norm(text, axis=-1, keepdims=True), 1e-12)  # cached once
        self.outputs = [TensorInfo("probs", "float32", (1, len(labels))), TensorInfo("label", "int64", (1,))]  # type: ignore[misc]

    def run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        emb = self.step("image", self.entry.preprocess([image]).feed)["image_embeds"]
        emb = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        logits = self.entry.logit_scale * emb @ self.text.T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
        return {"probs": probs, "label": probs.argmax(-1).astype(np.int64)}


KINDS: dict[str, Callable[[ModelConfig, ModelServer], Pipeline]] = {
    "detect_classify": DetectClassify,
    "clip_zero_shot": ClipZeroShot,
}


def build_pipeline(config: ModelConfig, server: ModelServer) -> Pipeline:
    kind = config.pipeline.kind
    if kind not in KINDS:
        raise ConfigError(f"pipeline '{config.name}': kind must be one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind](config, server)
