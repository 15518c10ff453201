"""What a task's scorer is given and gives back (shared by the task modules and the registry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modelkiln.predict import Predictor
from modelkiln.zoo import Task


@dataclass(frozen=True)
class EvalRequest:
    """The data to score on: an image folder, its labels, where predictions go, how many images."""

    data: Path
    labels: Path | None = None
    predictions: Path | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Scored:
    """How many images were scored and the task's metrics on them, headline metric first."""

    images: int
    metrics: dict[str, float] = field(default_factory=dict)


#: Runs a predictor over a request's data and scores the answers.
Scorer = Callable[[Predictor, EvalRequest], Scored]


@dataclass(frozen=True)
class TaskSpec:
    """How one task is scored: its metrics (headline first), the scorer, and the data it reads.

    ``scorer`` is None for tasks without a task metric; ``unscored`` then says what to use instead."""

    task: Task
    metrics: tuple[str, ...]
    scorer: Scorer | None
    labels: str = "none"  # what --labels is for this task
    predictions: str | None = None  # what --predictions writes
    unscored: str = ""

    @property
    def metric(self) -> str | None:
        """The headline metric: what accuracy budgets and deploy gates read."""
        return self.metrics[0] if self.metrics else None
