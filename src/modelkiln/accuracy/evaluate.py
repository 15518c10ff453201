"""``evaluate``: task metrics through the zoo's own pre/post-processing, with predictions written
out so anyone can re-score them (top-5 CSV for classifiers, COCO results JSON for detectors).

Which metric a model gets is its zoo task's entry in the task registry (``accuracy.tasks.TASKS``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkiln.accuracy.tasks import EvalRequest, task_spec
from modelkiln.accuracy.tasks.imagenet import classification_labels
from modelkiln.errors import BadInput
from modelkiln.predict import Predictor, load_parts
from modelkiln.runtime.backends import BackendKind
from modelkiln.zoo import Task, as_image_task

__all__ = ["EvalResult", "classification_labels", "evaluate"]

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    model: str
    task: Task
    images: int
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def evaluate(
    model: str | Path,
    zoo_name: str | None,
    data: str | Path,
    labels: str | Path | None = None,
    predictions: str | Path | None = None,
    limit: int | None = None,
    backend: BackendKind | str = BackendKind.ONNXRUNTIME,
) -> EvalResult:
    """Top-1/top-5 (classifiers) or COCO mAP50-95/mAP50 (detectors) of ``model`` on ``data``,
    run on ``backend``."""
    entry, backends = load_parts(model, zoo_name=zoo_name, backend=backend)
    spec = task_spec(entry.task)
    if spec.scorer is None:
        raise BadInput(f"evaluate has no task metric for {entry.name} ({entry.task}): {spec.unscored}")
    request = EvalRequest(
        Path(data),
        Path(labels) if labels else None,
        Path(predictions) if predictions else None,
        limit,
    )
    scored = spec.scorer(Predictor(as_image_task(entry), backends), request)
    log.info("%s: %s on %d images", model, scored.metrics, scored.images)
    return EvalResult(
        str(model), entry.task, scored.images, scored.metrics, str(predictions) if predictions else None
    )
