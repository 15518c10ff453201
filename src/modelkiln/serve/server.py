"""The model server without HTTP: load, unload and reload models from the repository while
requests flow, and route each request to its model's queue."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelkiln.errors import BadInput, ModelNotFound, ModelUnavailable
from modelkiln.serve.batcher import InferRequest, ModelQueue
from modelkiln.serve.guard import shown
from modelkiln.serve.repository import Repository
from modelkiln.serve.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any  # ServedModel or Pipeline: name, version, config, inputs, outputs, validate, metadata
    queue: ModelQueue


class ModelServer:
    def __init__(self, repository: str, cores: int | None = None, allow_cpu_mismatch: bool = False) -> None:
        self.repository = Repository(repository)
        #: Serve every model even where this CPU lacks what its INT8 format needs (kiln serve flag).
        self.allow_cpu_mismatch = allow_cpu_mismatch
        self.scheduler = Scheduler(cores)
        self._models: dict[str, dict[int, Loaded]] = {}
        self._lock = threading.RLock()
        self._failed: dict[str, str] = {}

    # --- lifecycle -------------------------------------------------------------------------------
    def load_all(self) -> None:
        """Every model, plain models before the pipelines that call them."""
        names = self.repository.names()
        pipelines = set()
        for name in names:
            try:
                if self.repository.entry(name).config.pipeline is not None:
                    pipelines.add(name)
            except Exception as exc:  # noqa: BLE001 - reported again when its load fails below
                log.debug("%s: config unreadable: %s", name, exc)
        for name in [n for n in names if n not in pipelines] + sorted(pipelines):
            try:
                self.load(name)
            except Exception as exc:  # noqa: BLE001 - one broken model must not stop the others
                log.error("%s: not loaded: %s", name, exc)

    def load(self, name: str) -> list[int]:
        """(Re)load every version of ``name``; new versions serve before old ones are drained."""
        try:
            entry = self.repository.entry(name)
            loaded: dict[int, Loaded] = {}
            if entry.config.pipeline is not None:
                from modelkiln.serve.pipeline import build_pipeline

                pipe = build_pipeline(entry.config, self)
                loaded[entry.latest] = Loaded(pipe, pipe)
                log.info("loaded pipeline %s (%s: %s)", name, pipe.kind, entry.config.pipeline.steps)
            elif entry.config.backend == "genai":
                from modelkiln.serve.generation import GenerationQueue, GenerativeModel

                for version, folder in sorted(entry.versions.items()):
                    t = time.perf_counter()
                    gen_model = GenerativeModel.load(entry.config, version, folder, self.scheduler)
                    loaded[version] = Loaded(gen_model, GenerationQueue(gen_model, self.scheduler))
                    log.info(
                        "loaded %s v%d (%s; genai, %d sequence(s) x %d thread(s)) in %.2fs",
                        name,
                        version,
                        folder,
                        entry.config.genai.max_sequences,
                        entry.config.threads_per_instance,
                        time.perf_counter() - t,
                    )
            else:
                from modelkiln.serve.model import ServedModel

                for version, path in sorted(entry.versions.items()):
                    t = time.perf_counter()
                    model = ServedModel.load(entry.config, version, path, self.allow_cpu_mismatch)
                    loaded[version] = Loaded(model, self.scheduler.queue_for(model))
                    log.info(
                        "loaded %s v%d (%s; batch<=%d, %d instance(s) x %d thread(s), priority %d) in %.2fs",
                        name,
                        version,
                        path,
                        entry.config.max_batch_size,
                        entry.config.instance_count,
                        entry.config.threads_per_instance,
                        entry.config.priority,
                        time.perf_counter() - t,
                    )
        except Exception as exc:
            if self.repository.has(name):  # junk names must not grow this table
                self._failed[name] = str(exc)
            raise
        with self._lock:
            old = self._models.get(name, {})
            self._models[name] = loaded
            self._failed.pop(name, None)
        for item in old.values():
            item.queue.close(drain=True)
        return sorted(loaded)

    def unload(self, name: str) -> None:
        with self._lock:
            old = self._models.pop(name, None)
        if old is None:
            raise ModelNotFound(f"model '{name}' is not loaded")
        for item in old.values():
            item.queue.close(drain=True)
        log.info("unloaded %s", name)

    def shutdown(self) -> None:
        with self._lock:
            names = list(self._models)
        for name in names:
            self.unload(name)
        self.scheduler.shutdown()

    # --- queries ---------------------------------------------------------------------------------
    def get(self, name: str, version: str | int | None = None) -> Loaded:
        with self._lock:
            versions = self._models.get(name)
        if not versions:
            if self.repository.has(name):
                why = self._failed.get(name)
                raise ModelUnavailable(
                    f"model '{name}' is in the repository but not loaded" + (f": {why}" if why else "")
                )
            raise ModelNotFound(f"unknown model {shown(name)}")
        if version in (None, ""):
            return versions[max(versions)]
        try:
            return versions[int(version)]
        except (KeyError, ValueError):
            raise ModelNotFound(f"model '{name}' has no version {shown(version)}") from None

    def has(self, name: str) -> bool:
        """Whether a model of this name is loaded (cheap: for metric labels)."""
        with self._lock:
            return name in self._models

    def ready(self, name: str, version: str | None = None) -> bool:
        try:
            self.get(name, version)
            return True
        except (ModelNotFound, ModelUnavailable):
            return False

    def index(self) -> list[dict[str, str]]:
        rows = []
        with self._lock:
            loaded = {n: sorted(v) for n, v in self._models.items()}
        for name in self.repository.names():
            if name in loaded:
                rows += [{"name": name, "version": str(v), "state": "READY"} for v in loaded[name]]
            else:
                reason = self._failed.get(name, "not loaded")
                rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason})
        return rows

    def loaded(self) -> list[Loaded]:
        with self._lock:
            return [item for versions in self._models.values() for item in versions.values()]

    # --- inference -------------------------------------------------------------------------------
    def chat(self, name: str, job: Any) -> Future:
        """Queue a chat (a ``serve.generation.ChatJob``) on a generative model."""
        item = self.get(name)
        if item.model.config.backend != "genai":
            raise BadInput(f"model '{name}' is not a generative model; use the KServe infer endpoint")
        return item.queue.submit(job)

    def generative(self) -> list[str]:
        """Names of the loaded generative models."""
        with self._lock:
            return sorted(
                n
                for n, v in self._models.items()
                if v and next(iter(v.values())).model.config.backend == "genai"
            )

    def infer(
        self,
        name: str,
        feed: dict[str, np.ndarray],
        version: str | None = None,
        timeout_s: float | None = None,
    ) -> Future:
        """Validate and queue a request; the future gives an InferResponse or the typed error."""
        item = self.get(name, version)
        batch = item.model.validate(feed)
        if timeout_s is None:
            default = item.model.config.queue.default_timeout_us
            timeout_s = default / 1e6 if default else None
        if timeout_s is not None and timeout_s <= 0:
            raise BadInput(f"timeout must be > 0, got {timeout_s}")
        deadline = time.monotonic() + timeout_s if timeout_s else None
        return item.queue.submit(InferRequest(feed, batch, deadline))
