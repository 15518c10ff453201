"""TensorRT backend: builds an engine from ONNX (explicit QDQ INT8 respected, optional FP16),
caches it on disk keyed by model hash + GPU + TensorRT version + flags, and runs it.

Imported lazily; needs the ``tensorrt`` package and a CUDA GPU. Device buffers are torch CUDA
tensors (torch is already a dependency of the export extra).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from modelkiln.errors import BackendError, MissingDependency
from modelkiln.runtime.backends.base import Backend, ModelSource, TensorMeta, serialized, source_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorRTOptions:
    fp16: bool = False
    int8: bool = False  # needed for explicit-quantization (QDQ) graphs
    workspace_bytes: int = 4 << 30
    cache_dir: Path = field(
        default_factory=lambda: (
            Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "modelkiln")) / "trt"
        )
    )
    #: per dynamic input: (min, opt, max) shapes; dynamic dims default to 1/1/max_batch
    profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict
    )
    max_batch: int = 32


def available() -> bool:
    try:
        import tensorrt  # noqa: F401
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def engine_key(model_bytes: bytes, options: TensorRTOptions, gpu: str, trt_version: str) -> str:
    """Cache key: anything that changes the engine changes the key."""
    h = hashlib.sha256(model_bytes)
    h.update(
        f"{gpu}|{trt_version}|fp16={options.fp16}|int8={options.int8}|{sorted(options.profiles.items())}|"
        f"{options.max_batch}".encode()
    )
    return h.hexdigest()[:32]


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine: Any, model_name: str, metadata: dict[str, str] | None = None) -> None:
        import tensorrt as trt

        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}

        def meta(n: str) -> TensorMeta:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n))).name
            shape = tuple(d if d >= 0 else f"{n}_dim{i}" for i, d in enumerate(engine.get_tensor_shape(n)))
            return TensorMeta(n, dtype, shape)

        super().__init__(
            model_name,
            [meta(n) for n in names if is_input[n]],
            [meta(n) for n in names if not is_input[n]],
            metadata,
        )

    @classmethod
    def load(cls, model: ModelSource, options: TensorRTOptions | None = None) -> TensorRTBackend:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise MissingDependency("tensorrt", "all", "the TensorRT backend") from exc
        if not torch.cuda.is_available():
            raise BackendError("the TensorRT backend needs a CUDA GPU; none is visible")
        options = options or TensorRTOptions()
        data = serialized(model)
        path = source_name(model)
        key = engine_key(data, options, torch.cuda.get_device_name(), trt.__version__)
        cache = options.cache_dir / f"{key}.engine"
        logger = trt.Logger(trt.Logger.WARNING)
        if cache.is_file():
            log.info("TensorRT engine from cache %s", cache)
            plan = cache.read_bytes()
        else:
            plan = _build(trt, logger, data, options, str(path))
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(plan)
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(f"TensorRT could not deserialize the engine for {path}")
        proto = onnx.load_from_string(data) if len(data) < 2**31 else None
        metadata = {p.key: p.value for p in proto.metadata_props} if proto is not None else {}
        return cls(engine, path, metadata)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keep = []
        for m in self._inputs:
            t = torch.from_numpy(np.ascontiguousarray(feed[m.name])).cuda()
            keep.append(t)
            self.context.set_input_shape(m.name, tuple(t.shape))
            self.context.set_tensor_address(m.name, t.data_ptr())
        outs = {}
        for m in self._outputs:
            shape = tuple(self.context.get_tensor_shape(m.name))
            t = torch.empty(shape, dtype=getattr(torch, m.dtype), device="cuda")
            self.context.set_tensor_address(m.name, t.data_ptr())
            outs[m.name] = t
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.model_name}: TensorRT execution failed")
        stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}


def _build(trt: Any, logger: Any, data: bytes, options: TensorRTOptions, name: str) -> bytes:
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if tensor.name in options.profiles:
            profile.set_shape(tensor.name, *options.profiles[tensor.name])
        elif any(d < 0 for d in shape):
            lo = tuple(1 if d < 0 else d for d in shape)
            hi = tuple(options.max_batch if d < 0 else d for d in shape)
            profile.set_shape(tensor.name, lo, lo, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT failed to build an engine for {name}")
    return bytes(plan)
