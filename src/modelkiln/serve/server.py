"""The model server without HTTP: load, unload and reload models from the repository while
requests flow, and route each request to its model's queue."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from modelkiln.errors import BadInput, ConfigError, ModelNotFound, ModelUnavailable
from modelkiln.serve.batcher import Feed, InferRequest, InferResponse, ModelQueue
from modelkiln.serve.budget import CostMeasurer, LazyModel, MemoryBudget, ModelMemory, Slot, rss_cost
from modelkiln.serve.config import ModelConfig, ModelKind
from modelkiln.serve.generation import ChatJob, ChatResult, GenerationQueue, GenerativeModel
from modelkiln.serve.guard import shown
from modelkiln.serve.model import DEFAULT_POLICY, LoadPolicy, ServedModel
from modelkiln.serve.pipeline import build_pipeline
from modelkiln.serve.repository import RepoEntry, Repository
from modelkiln.serve.scheduler import Scheduler

log = logging.getLogger(__name__)


class Servable(Protocol):
    """What the server and its routes read of a loaded model of any kind (ServedModel, Pipeline,
    GenerativeModel)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def config(self) -> ModelConfig: ...

    def validate(self, feed: Feed) -> int:
        """A request's batch size; BadInput when its tensors do not fit the model."""

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata."""


@dataclass
class Loaded:
    model: Servable
    queue: ModelQueue


class ModelServer:
    def __init__(
        self,
        repository: str,
        cores: int | None = None,
        policy: LoadPolicy = DEFAULT_POLICY,
        memory_budget: int | None = None,
        measure: CostMeasurer = rss_cost,
    ) -> None:
        """``memory_budget`` (bytes): load plain models on first request and unload the least
        recently used idle ones to stay within it (serve/budget.py); None: all loaded at start.
        ``measure``: how a load's cost is measured (tests pass a fake)."""
        self.repository = Repository(repository)
        #: What a model file must satisfy to be served (CPU fit, manifest hash, decryption key).
        self.policy = policy
        self.scheduler = Scheduler(cores)
        self._models: dict[str, dict[int, Loaded]] = {}
        self._lock = threading.RLock()
        self._failed: dict[str, str] = {}
        #: How each kind of repository entry becomes its loaded versions.
        self._loaders: dict[ModelKind, Callable[[RepoEntry], dict[int, Loaded]]] = {
            ModelKind.MODEL: self._load_models,
            ModelKind.PIPELINE: self._load_pipeline,
            ModelKind.GENERATION: self._load_generative,
        }
        #: Under a budget: plain models load lazily; chat models and pipelines are always resident
        #: (measured and counted), and the steps of pipelines are pinned.
        self.memory = (
            MemoryBudget(memory_budget, measure, self.scheduler.memory) if memory_budget is not None else None
        )
        self._pipeline_steps: set[str] = set()
        if self.memory is not None:
            self._loaders = {
                ModelKind.MODEL: self._load_budgeted,
                ModelKind.PIPELINE: lambda e: self._fixed(e, self._load_pipeline),
                ModelKind.GENERATION: lambda e: self._fixed(e, self._load_generative, chat=True),
            }

    # --- lifecycle -------------------------------------------------------------------------------
    def load_all(self) -> None:
        """Every model, plain models before the pipelines that call them."""
        names = self.repository.names()
        pipelines = set()
        for name in names:
            try:
                config = self.repository.entry(name).config
                if config.kind is ModelKind.PIPELINE:
                    pipelines.add(name)
                    assert config.pipeline is not None
                    self._pipeline_steps.update(config.pipeline.steps.values())
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
            loaded = self._loaders[entry.config.kind](entry)
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

    def _load_pipeline(self, entry: RepoEntry) -> dict[int, Loaded]:
        pipe = build_pipeline(entry.config, self)
        log.info("loaded pipeline %s (%s: %s)", entry.name, pipe.kind, pipe.spec.steps)
        return {entry.latest: Loaded(pipe, pipe)}

    def _load_generative(self, entry: RepoEntry) -> dict[int, Loaded]:
        loaded: dict[int, Loaded] = {}
        config = entry.config
        for version, folder in sorted(entry.versions.items()):
            t = time.perf_counter()
            gen_model = GenerativeModel.load(config, version, folder, self.scheduler, self.policy.model_key)
            # under a budget, each sequence reserves its KV cache there (the load cost excludes it)
            loaded[version] = Loaded(gen_model, GenerationQueue(gen_model, self.scheduler, self.memory))
            log.info(
                "loaded %s v%d (%s; genai, %d sequence(s) x %d thread(s)) in %.2fs",
                entry.name,
                version,
                folder,
                gen_model.genai.max_sequences,
                config.threads_per_instance,
                time.perf_counter() - t,
            )
        return loaded

    def _load_models(self, entry: RepoEntry) -> dict[int, Loaded]:
        loaded: dict[int, Loaded] = {}
        config = entry.config
        for version, path in sorted(entry.versions.items()):
            t = time.perf_counter()
            model = ServedModel.load(config, version, path, self.policy)
            loaded[version] = Loaded(model, self.scheduler.queue_for(model))
            log.info(
                "loaded %s v%d (%s; batch<=%d, %d instance(s) x %d thread(s), priority %d) in %.2fs",
                entry.name,
                version,
                path,
                config.max_batch_size,
                config.instance_count,
                config.threads_per_instance,
                config.priority,
                time.perf_counter() - t,
            )
        return loaded

    def _load_budgeted(self, entry: RepoEntry) -> dict[int, Loaded]:
        """A plain model under the memory budget: stand-ins now, sessions on first request
        (at once when pinned, or when a pipeline runs it)."""
        assert self.memory is not None

        def load() -> dict[int, tuple[ServedModel, ModelQueue]]:
            out: dict[int, tuple[ServedModel, ModelQueue]] = {}
            for version, item in self._load_models(entry).items():
                assert isinstance(item.model, ServedModel)
                out[version] = (item.model, item.queue)
            return out

        pinned = entry.config.pin or entry.name in self._pipeline_steps
        slot = Slot(entry.name, entry.config, dict(entry.versions), load, pinned=pinned)
        return {v: Loaded(m, q) for v, (m, q) in self.memory.add(slot).items()}

    def _fixed(
        self, entry: RepoEntry, loader: Callable[[RepoEntry], dict[int, Loaded]], chat: bool = False
    ) -> dict[int, Loaded]:
        """A chat model or pipeline under the budget: loaded now, measured, never evicted (a chat
        model's running sequences add their KV-cache reservations)."""
        assert self.memory is not None
        return self.memory.measure_fixed(entry.name, lambda: loader(entry), chat=chat)

    def memory_stats(self) -> list[ModelMemory]:
        """Per model: bytes resident, measured cost, loads, evictions (empty without a budget)."""
        return self.memory.stats() if self.memory is not None else []

    def unload(self, name: str) -> None:
        with self._lock:
            old = self._models.pop(name, None)
        if old is None:
            raise ModelNotFound(f"model '{name}' is not loaded")
        for item in old.values():
            item.queue.close(drain=True)
        if self.memory is not None:
            self.memory.forget_fixed(name)
        log.info("unloaded %s", name)

    def shutdown(self) -> None:
        with self._lock:
            names = list(self._models)
        for name in names:
            self.unload(name)
        if self.memory is not None:
            self.memory.close()
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

    def step_model(self, name: str) -> ServedModel:
        """The newest loaded version of plain model ``name`` (a pipeline's step)."""
        model = self.get(name).model
        if isinstance(model, LazyModel):  # a pipeline's steps are pinned under a budget
            model = model.served() or model
        if not isinstance(model, ServedModel):
            raise ConfigError(
                f"model '{name}' is a {model.config.kind.value} model; a pipeline step must be a plain model"
            )
        return model

    def ready(self, name: str, version: str | None = None) -> bool:
        """Model readiness (KServe v2 / Triton model-ready, HTTP and gRPC): whether a request would
        be served. Under a memory budget a model that is not resident is ready while it can fit
        (it loads on demand), and not ready when it can never fit beside the pinned models."""
        try:
            item = self.get(name, version)
        except (ModelNotFound, ModelUnavailable):
            return False
        if self.memory is not None and isinstance(item.model, LazyModel):
            residency = self.memory.residency(name)
            return residency is None or residency.servable
        return True

    def index(self) -> list[dict[str, str]]:
        """The repository index (HTTP and gRPC), one row per version: READY only while resident;
        under a memory budget a model not resident is UNAVAILABLE (LOADING while it loads), with
        why: not loaded yet, evicted for whom, too big for the budget, its load failed."""
        rows = []
        with self._lock:
            loaded = {n: sorted(v) for n, v in self._models.items()}
        for name in self.repository.names():
            if name in loaded:
                residency = self.memory.residency(name) if self.memory is not None else None
                for v in loaded[name]:
                    row = {"name": name, "version": str(v), "state": "READY"}
                    if residency is not None and residency.state != "READY":
                        row.update(state=residency.state, reason=residency.reason)
                    rows.append(row)
            else:
                reason = self._failed.get(name, "not loaded")
                rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": reason})
        return rows

    def loaded(self) -> list[Loaded]:
        with self._lock:
            return [item for versions in self._models.values() for item in versions.values()]

    # --- inference -------------------------------------------------------------------------------
    def chat(self, name: str, job: ChatJob) -> Future[ChatResult]:
        """Queue a chat on a generative model."""
        item = self.get(name)
        if item.model.config.kind is not ModelKind.GENERATION:
            raise BadInput(f"model '{name}' is not a generative model; use the KServe infer endpoint")
        future: Future[ChatResult] = item.queue.submit(job)
        return future

    def generative(self) -> list[str]:
        """Names of the loaded generative models."""
        with self._lock:
            return sorted(
                n
                for n, v in self._models.items()
                if v and next(iter(v.values())).model.config.kind is ModelKind.GENERATION
            )

    def infer(
        self,
        name: str,
        feed: Feed,
        version: str | None = None,
        timeout_s: float | None = None,
        priority: int | None = None,
    ) -> Future[InferResponse]:
        """Validate and queue a request; the future gives an InferResponse or the typed error.
        ``priority``: the request's level (0 most urgent; None: the model's own); ``timeout_s``
        replaces the queue's default_timeout_us only where allow_timeout_override (Triton's rule)."""
        item = self.get(name, version)
        batch = item.model.validate(feed)
        InferRequest.check_level(priority, name)
        policy = item.model.config.queue
        if timeout_s is None or not policy.allow_timeout_override:
            default = policy.default_timeout_us
            timeout_s = default / 1e6 if default else None
        if timeout_s is not None and timeout_s <= 0:
            raise BadInput(f"timeout must be > 0, got {timeout_s}")
        deadline = time.monotonic() + timeout_s if timeout_s else None
        request = InferRequest(feed, batch, deadline, priority=priority)
        future: Future[InferResponse] = item.queue.submit(request)
        return future
