"""A loaded model version: one backend session per instance, a free list of idle instances, and
its inputs/outputs as the server reports them (batch axis included when max_batch_size > 0)."""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln import zoo
from modelkiln.delivery.crypto import ModelKey, model_source
from modelkiln.delivery.errors import IntegrityError
from modelkiln.delivery.manifest import check_file_against_manifest
from modelkiln.errors import BadInput, ConfigError, CpuMismatch, ModelUnavailable
from modelkiln.runtime.backends.base import Backend, BackendKind, ModelSource, TensorMeta
from modelkiln.runtime.backends.onnxruntime import OrtBackend, OrtOptions
from modelkiln.runtime.cpu import unmet_requirement
from modelkiln.serve.config import ModelConfig, TensorConfig, Warmup

log = logging.getLogger(__name__)


def _onnxruntime(model: ModelSource, config: ModelConfig) -> Backend:
    """One ONNX Runtime session with the config's intra-op threads (instances run side by side)."""
    return OrtBackend.load(
        model, OrtOptions(intra_op_threads=config.threads_per_instance, inter_op_threads=1)
    )


@dataclass(frozen=True)
class LoadPolicy:
    """What the server demands of a model file before serving it.

    ``allow_cpu_mismatch``: serve INT8 models this CPU cannot run as built. ``model_key``: opens
    encrypted models (``model.onnx.enc``), in memory only. ``require_manifest``: refuse a model no
    package manifest lists; a model a manifest lists with another hash is always refused."""

    allow_cpu_mismatch: bool = False
    model_key: ModelKey | None = None
    require_manifest: bool = False


#: Today's rules with no key: CPU fit required, a listed file must match its manifest.
DEFAULT_POLICY = LoadPolicy()


def open_model(path: Path, policy: LoadPolicy) -> ModelSource:
    """The model to hand a backend: its hash checked against the package manifest when one lists
    it, decrypted in memory when encrypted."""
    if check_file_against_manifest(path) is None and policy.require_manifest:
        raise IntegrityError(f"{path}: no package manifest lists this file (kiln serve --require-manifest)")
    return model_source(path, policy.model_key)


#: How one instance of a plain model is loaded on each served runtime (config.SERVED_BACKENDS).
BACKEND_LOADERS: dict[BackendKind, Callable[[ModelSource, ModelConfig], Backend]] = {
    BackendKind.ONNXRUNTIME: _onnxruntime,
}

#: numpy dtype name -> KServe v2 datatype
KSERVE_DTYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}


@dataclass(frozen=True)
class TensorInfo:
    """One input/output as served: numpy dtype, and shape with -1 for dynamic dims (batch first)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def datatype(self) -> str:
        return KSERVE_DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _info(meta: TensorMeta, override: TensorConfig | None, batched: bool, model: str) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in meta.shape)
    if override is not None:
        if override.dtype != meta.dtype:
            raise ConfigError(
                f"model '{model}': config says {override.name} is {override.dtype}, the file has {meta.dtype}"
            )
        want = ((-1,) if batched else ()) + override.dims
        if len(want) != len(shape):
            raise ConfigError(
                f"model '{model}': config dims of {override.name} {list(override.dims)} do not match {list(shape)}"
            )
        shape = tuple(w if s == -1 else s for w, s in zip(want, shape, strict=True))
    if batched and shape and shape[0] != -1:
        raise ConfigError(
            f"model '{model}': max_batch_size > 0 needs a dynamic first axis on {meta.name}, got {list(shape)}"
        )
    return TensorInfo(meta.name, meta.dtype, shape)


def _warmup_tensor(t: TensorInfo, batch: int | None, data: str, rng: np.random.Generator) -> np.ndarray:
    """A warm-up input: the batch axis (first, when ``batch`` is given) at ``batch``, other dynamic
    dims 1; zeros, or random values in the dtype's small positive range."""
    shape = [d if d > 0 else 1 for d in t.shape]
    if batch is not None and shape:
        shape[0] = batch
    dtype = np.dtype(t.dtype)
    if data == "zero":
        return np.zeros(shape, dtype)
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, 2, shape).astype(dtype)  # ids and indices stay valid


class ServedModel:
    """``instance_count`` sessions of one model file; ``run`` borrows an idle one."""

    def __init__(self, config: ModelConfig, version: int, backends: list[Backend]) -> None:
        self.config, self.version = config, version
        self._idle: queue.SimpleQueue[Backend] = queue.SimpleQueue()
        self._released = False
        for b in backends:
            self._idle.put(b)
        first = backends[0]
        batched = config.max_batch_size > 0
        by_name = {t.name: t for t in config.inputs}
        out_by_name = {t.name: t for t in config.outputs}
        unknown = sorted(set(by_name) - {m.name for m in first.input_metadata})
        if unknown:
            raise ConfigError(f"model '{config.name}': config names inputs {unknown} the model does not have")
        self.properties: dict[str, str] = {}  # ONNX metadata_props (zoo name, class names …)
        self.inputs = [_info(m, by_name.get(m.name), batched, config.name) for m in first.input_metadata]
        self.outputs = [
            _info(m, out_by_name.get(m.name), batched, config.name) for m in first.output_metadata
        ]

    @classmethod
    def load(
        cls,
        config: ModelConfig,
        version: int,
        path: Path,
        policy: LoadPolicy = DEFAULT_POLICY,
    ) -> ServedModel:
        """Sessions for ``path``; a model this CPU cannot run as built is refused (a server must
        not quietly serve worse answers) unless the config or ``policy.allow_cpu_mismatch`` says
        so, and so is a file its package manifest lists with another hash."""
        load = BACKEND_LOADERS[config.runtime]
        source = open_model(path, policy)  # decrypted once, shared by the instances
        first = load(source, config)
        properties = first.metadata
        reason = unmet_requirement(properties)
        if reason is not None and not (policy.allow_cpu_mismatch or config.allow_cpu_mismatch):
            raise CpuMismatch(
                f"model '{config.name}' v{version} ({path}) refused: {reason}; or serve it anyway with "
                "allow_cpu_mismatch: true in its config.yaml, or kiln serve --allow-cpu-mismatch"
            )
        backends = [first] + [load(source, config) for _ in range(config.instance_count - 1)]
        model = cls(config, version, backends)
        model.properties = properties
        plan = config.warmup_plan
        if plan is not None:
            model.warm_up(plan)
        return model

    @property
    def name(self) -> str:
        return self.config.name

    def warm_up(self, plan: Warmup | None = None) -> int:
        """Run ``plan`` (default: one batch-1 inference on zeros) on every instance; dynamic dims
        other than the batch are 1. Returns the inferences run."""
        plan = plan or Warmup()
        rng = np.random.default_rng(0)
        batched = self.config.max_batch_size > 0
        borrowed = [self._idle.get() for _ in range(self.config.instance_count)]
        runs = 0
        try:
            for size in plan.batch_sizes:
                feed = {
                    t.name: _warmup_tensor(t, size if batched else None, plan.data, rng) for t in self.inputs
                }
                for b in borrowed:
                    for _ in range(plan.count):
                        b.infer(feed)
                        runs += 1
        finally:
            for b in borrowed:
                self._idle.put(b)
        return runs

    def validate(self, feed: dict[str, np.ndarray]) -> int:
        """Check a request's tensors; returns its batch size (1 for unbatched models)."""
        names = {t.name for t in self.inputs}
        if set(feed) != names:
            raise BadInput(f"model '{self.name}': expected inputs {sorted(names)}, got {sorted(feed)}")
        batch = None
        for t in self.inputs:
            value = feed[t.name]
            if value.dtype != np.dtype(t.dtype):
                raise BadInput(
                    f"model '{self.name}': input '{t.name}' expects {t.datatype}, got {KSERVE_DTYPES.get(value.dtype.name, value.dtype.name)}"
                )
            if value.ndim != len(t.shape) or any(
                w != -1 and w != g for w, g in zip(t.shape, value.shape, strict=False)
            ):
                raise BadInput(
                    f"model '{self.name}': input '{t.name}' expects shape {list(t.shape)}, got {list(value.shape)}"
                )
            if self.config.max_batch_size > 0:
                if batch is not None and value.shape[0] != batch:
                    raise BadInput(f"model '{self.name}': inputs disagree on the batch size")
                batch = value.shape[0]
        if batch is not None and not 1 <= batch <= self.config.max_batch_size:
            raise BadInput(
                f"model '{self.name}': batch {batch} is outside 1..{self.config.max_batch_size} (max_batch_size)"
            )
        return batch or 1

    def release(self) -> None:
        """Drop every session (what a memory budget's eviction frees) but keep the inputs,
        outputs and metadata, so requests can still be validated while the model is not resident.
        Only call it when no inference runs (the batcher closed)."""
        self._released = True
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                return

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._released:
            raise ModelUnavailable(f"model '{self.name}' v{self.version} was unloaded")
        backend = self._idle.get()
        try:
            return backend.infer(feed)
        finally:
            self._idle.put(backend)

    def zoo_entry(self) -> zoo.ZooModel:
        """The zoo family this file was exported from (its pre/post-processing), from metadata."""
        size = zoo.input_image_size(t.shape for t in self.inputs)
        entry = zoo.entry_from_metadata(self.properties, size)
        if entry is None:
            raise ConfigError(
                f"model '{self.name}' carries no modelkiln.zoo metadata; pipelines need zoo exports"
            )
        return entry

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [str(self.version)],
            "platform": "onnxruntime_onnx",
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
