"""Task metrics: how a model is scored on what it is for (ImageNet top-k, COCO mAP, recall@k).

``TASKS`` is the registry: one ``TaskSpec`` per zoo ``Task`` with its metric names, scorer and
labels; ``evaluate`` and the accuracy budget look a task up here instead of comparing strings.
"""

from __future__ import annotations

from modelkiln.accuracy.tasks import coco, imagenet, retrieval
from modelkiln.accuracy.tasks.base import EvalRequest, Scored, Scorer, TaskSpec
from modelkiln.errors import BadInput
from modelkiln.zoo import Task

__all__ = ["TASKS", "EvalRequest", "Scored", "Scorer", "TaskSpec", "task_spec"]

TASKS: dict[Task, TaskSpec] = {
    Task.CLASSIFICATION: TaskSpec(
        Task.CLASSIFICATION,
        metrics=("top1", "top5"),
        scorer=imagenet.score_classification,
        labels=imagenet.LABELS,
        predictions="top-5 CSV",
    ),
    Task.DETECTION: TaskSpec(
        Task.DETECTION,
        metrics=("map50_95", "map50"),
        scorer=coco.score_detection,
        labels=coco.LABELS,
        predictions="COCO results JSON",
    ),
    Task.EMBEDDING: TaskSpec(
        Task.EMBEDDING,
        metrics=(),
        scorer=None,
        unscored="compare its embeddings with a reference instead (kiln compare); "
        "a dual encoder (CLIP) is scored with --task retrieval",
    ),
    Task.GENERATION: TaskSpec(
        Task.GENERATION,
        metrics=(),
        scorer=None,
        unscored="chat with it instead (kiln chat)",
    ),
    # not a family's own task: a dual encoder (Task.EMBEDDING) is scored on it with task="retrieval"
    Task.RETRIEVAL: TaskSpec(
        Task.RETRIEVAL,
        metrics=retrieval.METRICS,
        scorer=retrieval.score_retrieval,
        labels=retrieval.LABELS,
        predictions=retrieval.PREDICTIONS,
    ),
}


def task_spec(task: Task | str) -> TaskSpec:
    """The registry entry of ``task`` (a Task or its value); BadInput for an unknown task."""
    try:
        return TASKS[Task(task)]
    except ValueError:
        raise BadInput(f"unknown task {task!r}; tasks: {', '.join(t.value for t in Task)}") from None
