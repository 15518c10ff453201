"""Deploy's stages: each one timed and shown, ``summary.json`` saved after it, and a failing one
stopping the run with its name and a list of what the earlier stages kept."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from modelkiln.deploy.summary import DeploySummary
from modelkiln.errors import KilnError

log = logging.getLogger(__name__)

#: Progress callback: gets "<stage>…" as each stage starts (the CLI's spinner text).
Status = Callable[[str], object]


class DeployError(KilnError):
    """A stage failed; the message names it and where the partial results are."""


class Stages:
    """Runs named stages with timing and progress, saving summary.json after each."""

    def __init__(self, summary: DeploySummary, out: Path, status: Status | None = None) -> None:
        self.summary, self.out, self.status = summary, out, status

    @contextlib.contextmanager
    def __call__(self, name: str, save: bool = True) -> Iterator[None]:
        """Run stage ``name``; ``save=False`` for a stage that must be the last to write (sealing:
        it hashes summary.json, which must not change after it)."""
        if self.status is not None:
            self.status(f"{name}…")
        log.info("stage %s", name)
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.summary.failed = f"{name}: {exc}"
            self.save()
            kept = ", ".join(sorted(self.summary.files)) or "nothing yet"
            raise DeployError(f"stage '{name}' failed: {exc} (kept in {self.out}: {kept})") from exc
        self.summary.stages[name] = time.perf_counter() - start
        if save:
            self.save()

    def save(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary.to_dict(), indent=1, default=str))
