"""``evaluate``: task metrics through the zoo's own pre/post-processing, with predictions written
out so anyone can re-score them (top-5 CSV for classifiers, COCO results JSON for detectors).

Which metric a model gets is its zoo task's entry in the task registry (``accuracy.tasks.TASKS``),
or the task asked for: a dual encoder (CLIP-like, task embedding) is scored on ``retrieval``.
``compare_task`` scores two models (FP32 and INT8) on the same data, for ``kiln compare --task``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkiln.accuracy.tasks import EvalRequest, TaskSpec, task_spec
from modelkiln.accuracy.tasks.imagenet import classification_labels
from modelkiln.accuracy.tasks.retrieval import dual_encoder_problem
from modelkiln.errors import BadInput
from modelkiln.predict import Predictor, load_parts
from modelkiln.runtime.backends import BackendKind
from modelkiln.runtime.backends.base import Backend
from modelkiln.zoo import Task, ZooModel, as_image_task

__all__ = ["EvalResult", "TaskComparison", "classification_labels", "compare_task", "evaluate"]

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
    task: Task | str | None = None,
) -> EvalResult:
    """Top-1/top-5 (classifiers), COCO mAP50-95/mAP50 (detectors) or, with ``task="retrieval"``
    on a dual encoder's folder of towers, recall@1/5/10 both ways, of ``model`` on ``data``, run
    on ``backend``. ``task`` (None: the model's own) must be the model's task or retrieval."""
    entry, backends = load_parts(model, zoo_name=zoo_name, backend=backend)
    spec = _spec_for(entry, backends, task, model)
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
        str(model), spec.task, scored.images, scored.metrics, str(predictions) if predictions else None
    )


def _spec_for(
    entry: ZooModel, backends: dict[str, Backend], task: Task | str | None, model: str | Path
) -> TaskSpec:
    """The registry entry to score ``entry`` with: its own task's, or ``task``'s where it applies."""
    if task is None or task_spec(task).task is entry.task:
        return task_spec(entry.task)
    spec = task_spec(task)
    if spec.task is not Task.RETRIEVAL:
        raise BadInput(
            f"{model} is a {entry.task} model ({entry.name}); it cannot be scored on {spec.task} "
            f"(a task other than its own applies only to dual encoders: retrieval)"
        )
    problem = dual_encoder_problem(Predictor(as_image_task(entry), backends))
    if problem:
        raise BadInput(f"{model}: --task retrieval: {problem}")
    return spec


@dataclass
class TaskComparison:
    """Two models scored on the same data and task: the metrics of each and the drop
    (reference - candidate) per metric; ``metric`` is the task's headline."""

    task: Task
    metric: str
    reference: EvalResult
    candidate: EvalResult
    drop: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.value,
            "metric": self.metric,
            "reference": self.reference.to_dict(),
            "candidate": self.candidate.to_dict(),
            "drop": dict(self.drop),
        }


def compare_task(
    reference: str | Path,
    candidate: str | Path,
    data: str | Path,
    labels: str | Path | None = None,
    task: Task | str | None = None,
    zoo_name: str | None = None,
    limit: int | None = None,
    backends: tuple[BackendKind | str, BackendKind | str] = (
        BackendKind.ONNXRUNTIME,
        BackendKind.ONNXRUNTIME,
    ),
) -> TaskComparison:
    """``evaluate`` of both models on the same data and task (FP32 vs INT8 retrieval recall, top-1,
    mAP), and how much the candidate loses on each metric."""
    ref = evaluate(reference, zoo_name, data, labels, limit=limit, backend=backends[0], task=task)
    cand = evaluate(candidate, zoo_name, data, labels, limit=limit, backend=backends[1], task=task)
    if cand.task is not ref.task:
        raise BadInput(
            f"{reference} was scored on {ref.task} but {candidate} on {cand.task}: not the same model"
        )
    if ref.images != cand.images:  # the same data read the same way: a difference is a bug
        raise BadInput(f"{reference} was scored on {ref.images} images but {candidate} on {cand.images}")
    metric = task_spec(ref.task).metric or next(iter(ref.metrics))
    drop = {k: ref.metrics[k] - cand.metrics[k] for k in ref.metrics if k in cand.metrics}
    return TaskComparison(ref.task, metric, ref, cand, drop)
